"""Attribution methods: each builds an index that answers the InfluenceIndex queries.

index.py        GradientIndex: TracInCP over a FeatureStore
tracin.py       TracIn: the engine facade (model + checkpoints + loss) that featurizes and queries
ekfac.py        EK-FAC curvature per segment (for SOURCE): layers' factors from one batched pass
curvature_blocks.py  a layer's parameters as a matrix (LayerPlan) and its fitted curvature (LayerCurvature)
output_curvature.py  pseudo-gradients of the loss in the model's outputs ("gn", "mc", "empirical", "auto")
source.py       SourceIndex: SOURCE (Bae et al. 2024) over the same store machinery
ensemble.py     EnsembleIndex and dropout ensembles
ideal.py        TracInIdealRecorder: exact per-step loss changes recorded during training
distributed.py  featurization sharded over torch.distributed ranks into one store
"""
