"""Attribution methods: each builds an index that answers the InfluenceIndex queries.

index.py        GradientIndex: TracInCP over a FeatureStore
tracin.py       TracIn: the engine facade (model + checkpoints + loss) that featurizes and queries
ekfac.py        EK-FAC curvature per segment (for SOURCE)
source.py       SourceIndex: SOURCE (Bae et al. 2024) over the same store machinery
ensemble.py     EnsembleIndex and dropout ensembles
ideal.py        TracInIdealRecorder: exact per-step loss changes recorded during training
distributed.py  featurization sharded over torch.distributed ranks into one store
"""
