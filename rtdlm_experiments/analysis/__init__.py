"""Reading jobs back: tables, plots, paired comparisons, bootstrap statistics, drift."""
