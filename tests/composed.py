"""The config as the app composes it, for tests that check configs without running the app (shared by
the app, quality, sampling-config and input-bound tests, instead of a copy in each)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from rtdlm_experiments.config.paths import config_dir
from rtdlm_experiments.config.schema import register_configs
from rtdlm_experiments.config.validation import JobSpec, prepare_job

register_configs()


def compose_config(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """``config.yaml`` with ``overrides`` (and the ``hydra`` node when ``hydra_node``)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_node)


def compose_tiny(*overrides: str) -> DictConfig:
    """`compose_config` on the tiny random model (no weights, loads in a moment)."""
    return compose_config("model=tiny-random", *overrides)


def prepare_tiny(*overrides: str) -> JobSpec:
    """The validated job of `compose_tiny`."""
    return prepare_job(compose_tiny(*overrides))
