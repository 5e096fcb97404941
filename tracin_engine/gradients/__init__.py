"""Per-example work: from (model, checkpoint, batch) to the rows a FeatureStore holds.

per_example.py  GradientComputer: exact per-example gradients (vmap or loop), objectives, predictions
handlers/       layer handlers: the only code that knows layer types (register_handler; docs/handlers.md)
layers.py       the selected parameters as blocks of handlers (tied weights, the generic rest)
hooks.py        exact per-example gradients from one batched backward pass with module hooks
factored.py     the factored projection P_r^T dW P_c per block, without forming per-example gradients
projection.py   dense random projections (Gaussian / Rademacher) and build_projection
featurize.py    the featurization loop: checkpoints x batches -> rows -> store (resumable)
"""
