"""tracin_engine: TracIn influence from a featurize-once gradient index.

    import tracin_engine as te
    ckpts = te.Checkpoints.from_dir(run_dir)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    index = tracin.index((X_train, y_train))
    index.top_k((X_test, y_test), k=10)
"""

from . import examples
from .checkpoints import Checkpoint, CheckpointRecorder, Checkpoints
from .data import DataSource
from .engine import TracIn
from .errors import TracInError
from .index import GradientIndex
from .projection import RandomProjection
from .store import FeatureStore
from .topk import Neighbors, TopK

__all__ = [
    "Checkpoint", "CheckpointRecorder", "Checkpoints", "DataSource", "FeatureStore", "GradientIndex",
    "Neighbors", "RandomProjection", "TopK", "TracIn", "TracInError",
]
__version__ = "0.1.0"
