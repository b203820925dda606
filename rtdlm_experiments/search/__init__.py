"""Search instead of grids: an Optuna study over sampling configs, one job per trial, raced on the same
prompts and seeds (`racing`), with the best config or the Pareto front as its outcome.

- `space`: the sweeper's ``params`` (``interval``, ``int(interval)``, ``tag(log, interval)``, ``choice``)
  as Optuna distributions;
- `objectives`: ``search.objectives`` (``metric:max``) and ``search.constraints`` (``metric>=bound``);
- `racing`: the pruning rule (a paired, Bonferroni-corrected upper bound) and the chunked generation hook
  a trial's job runs;
- `study`: storage, resume after a kill, one trial's result told to the study;
- `outcome`: best config / front, importances, plots and files.

The Hydra plugin that drives it lives in ``hydra_plugins/rtdlm_search``.
"""
