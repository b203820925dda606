"""Adds ``<output root>/conf`` to Hydra's config search path, so a sampling preset saved with
``python -m rtdlm_experiments.config.presets save NAME --from-run RUN`` (``conf/sampling/NAME.yaml`` there)
loads with ``sampling=NAME`` like the bundled ones."""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class SavedPresetsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from rtdlm_experiments.config.preset_files import saved_presets_dir

        folder = saved_presets_dir().parent
        if folder.is_dir():
            search_path.append(provider="rtdlm-saved-presets", path=f"file://{folder}")
