"""What a job is asked to do: structured configs, validation into a JobSpec, the preset viewer."""
