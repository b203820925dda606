"""tiny-random: a seeded random Qwen2-architecture model and the byte tokenizer that lets it produce text."""

from __future__ import annotations

from collections.abc import Iterable

import torch

TINY_HEADS = 4
"""Attention heads of tiny-random; ``hidden_size`` must be a multiple of twice this (even head size)."""
TINY_KV_HEADS = 2


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, so tiny-random can produce (garbled) text; id 0 (NUL) is EOS.

    >>> ByteTokenizer().encode("hé")
    [104, 195, 169]
    >>> ByteTokenizer().decode([104, 0, 105], skip_special_tokens=True)
    'hi'
    """

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i == self.eos_token_id:
                continue
            out += bytes([i]) if 0 <= i < 256 else "\ufffd".encode()
        return out.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def build_tiny_random(
    num_layers: int = 2, vocab_size: int = 256, hidden_size: int = 64, seed: int = 0
) -> torch.nn.Module:
    """A seeded random Qwen2ForCausalLM: same arguments, same weights, whatever the global RNG state.

    Weights are drawn wider than HF's default (std 0.02), so logits have a real spread (std about 4)
    rather than being nearly uniform; the inner projections are fan-in scaled so activations stay O(1).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            for module_name, module in model.named_modules():
                if isinstance(module, torch.nn.Embedding):
                    module.weight.normal_(0.0, 0.5)
                elif isinstance(module, torch.nn.Linear):
                    std = 0.5 if module_name == "lm_head" else module.in_features**-0.5
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.normal_(0.0, 0.1)
    return model.eval()
