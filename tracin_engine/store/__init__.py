"""Stored features and the arithmetic over them (the bottom of the data flow, above data/checkpoints).

layout.py         how a stored row represents a gradient (dense vectors, or per-layer (a, g) factors)
feature_store.py  FeatureStore: (C, n, dim) features + norms + done mask, in memory or on disk
writer.py         RowWriter: featurized rows into a store, checked; on CUDA one micro-batch behind the GPU
residency.py      DeviceFeatures: the stored features where queries run (in place, resident once, streamed)
scoring.py        TracInCP scores, similarities and self-influence over a store, streamed in blocks
topk.py           TopK / Neighbors results and the streaming top-k (with its slow reference)
"""
