"""Functions of an index (anything implementing tracin_engine.interface.InfluenceIndex's queries).

clustering.py         TracIn clusters (spherical k-means / agglomerative over unit gradient rows)
outliers.py           self-influence rankings (output or parameter space), ReTrac renormalized scores
embeddings.py         penultimate-layer embeddings and their nearest neighbours (the baseline view)
neighbors_quality.py  how TracIn neighbours compare with embedding neighbours
"""
