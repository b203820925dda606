"""One job: prompts in, models and decoder built, generations scored (computation only)."""
