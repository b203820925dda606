"""Hydra plugins of rtdlm-experiments: ``hydra/sweeper=optuna`` (a search on the current Optuna release,
`optuna_sweeper`) and the saved sampling presets' config folder (`saved_presets`)."""


def register_plugins() -> None:
    """Register both plugins with Hydra by hand. Hydra finds plugins by listing the ``hydra_plugins``
    namespace package, and an editable install (``pip install -e .``) adds its folder as a path hook that
    this listing cannot see: outside the checkout, ``hydra/sweeper=optuna`` would then not exist."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.rtdlm_search.optuna_sweeper import OptunaSweeper
    from hydra_plugins.rtdlm_search.saved_presets import SavedPresetsSearchPath

    for plugin in (OptunaSweeper, SavedPresetsSearchPath):
        Plugins.instance().register(plugin)
