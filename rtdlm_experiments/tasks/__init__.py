"""Task-scored evaluation: sandboxed code execution, HumanEval prompts and scoring, reference answers."""
