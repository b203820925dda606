"""``python -m rtdlm_experiments.tracking sync <dir>``: the command line of
`rtdlm_experiments.tracking.sync`."""

from rtdlm_experiments.tracking.sync import main

if __name__ == "__main__":
    raise SystemExit(main())
