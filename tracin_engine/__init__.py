"""tracin_engine: TracIn influence from a featurize-once gradient index.

    import tracin_engine as te
    ckpts = te.Checkpoints.from_dir(run_dir)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    index = tracin.index((X_train, y_train))
    index.top_k((X_test, y_test), k=10)
"""

from . import examples
from .analysis import embeddings
from .checkpoints import Checkpoint, CheckpointRecorder, Checkpoints
from .analysis.clustering import Clusters
from .data import DataSource
from .methods.distributed import index_distributed
from .methods.tracin import TracIn
from .methods.ensemble import EnsembleIndex, dropout_ensemble
from .errors import TracInError
from .interface import InfluenceIndex
from .gradients.factored import FactoredProjection
from .gradients.handlers import KronHandler, VectorHandler, register_handler
from .methods.ideal import TracInIdealRecorder
from .methods.index import GradientIndex
from .analysis.outliers import Outliers
from .gradients.projection import RandomProjection
from .methods.ekfac import source_layers
from .methods.source import SourceIndex
from .store.feature_store import FeatureStore
from .store.topk import Neighbors, TopK

__all__ = [
    "Checkpoint", "CheckpointRecorder", "Checkpoints", "Clusters", "DataSource", "EnsembleIndex",
    "FactoredProjection", "FeatureStore", "GradientIndex", "InfluenceIndex", "Neighbors", "Outliers", "RandomProjection",
    "SourceIndex", "TopK", "TracIn", "TracInError", "TracInIdealRecorder", "dropout_ensemble",
    "index_distributed", "KronHandler", "VectorHandler", "register_handler", "source_layers",
]
__version__ = "0.1.0"
