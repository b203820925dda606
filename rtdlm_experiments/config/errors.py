"""The error of a config value the app cannot run with (light: no torch, no sampling)."""

from __future__ import annotations

from hydra.errors import CompactHydraException


class ConfigError(CompactHydraException, ValueError):
    """A config value the app cannot run with; the message names the field and what it must be.

    Subclassing `CompactHydraException` makes Hydra print just the message, not a traceback.
    """
