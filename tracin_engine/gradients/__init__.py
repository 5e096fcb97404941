"""Per-example work: from (model, checkpoint, batch) to the rows a FeatureStore holds.

per_example.py  GradientComputer: exact per-example gradients (vmap or loop), objectives, predictions
hooks.py        exact per-example gradients from one batched backward pass with module hooks
factored.py     the factored projection P_g^T dW P_a per layer, without forming per-example gradients
projection.py   dense random projections (Gaussian / Rademacher) and build_projection
featurize.py    the featurization loop: checkpoints x batches -> rows -> store (resumable)
"""
