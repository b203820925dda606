"""The job record on disk (results.json, generations.jsonl), its environment, metric names."""
