"""The sampling stages: one pure batched rule per stage plus its `record.Stage` beside it (`history`:
the logit modifiers; `classic`: temperature, top-k, top-p, min-p; `filters`: the others), collected by
`registry`; the chain runner (`chain`, `context`), the candidate search (`candidates`, `select`), the draw
(`draw`) and the helpers they share (`common`)."""
