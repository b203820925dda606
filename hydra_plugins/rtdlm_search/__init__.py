"""Hydra plugins of rtdlm-experiments: ``hydra/sweeper=optuna`` (a search on the current Optuna release,
`optuna_sweeper`) and the saved sampling presets' config folder (`saved_presets`)."""
