"""Config-driven experiments on LLM token sampling and speculative decoding."""
