"""The sampling stages beyond the original five, one pure batched function each (re-exported by
`sampling.processors`), and the helpers they share."""
