"""tracin_widgets: influence galleries in Jupyter (anywidget + ipywidgets), on top of tracin_engine.

    import tracin_widgets as tw
    tw.InfluenceExplorer(index, train_data, test_data, k=8)   # a query -> proponents / opponents
    tw.SelfInfluenceGallery(index, train_data)                # ranked by self-influence; mark, relabel, undo;
                                                              # .to_dataframe(), .to_csv(), .cleaned()
    tw.cleaned_dataset(train_data, marks, relabels)           # the training data after review (for retraining)
    tw.ClusterGallery(index, train_data, n_clusters=8)        # TracIn clusters as strips

Every gallery: `selected` (training indices clicked), keyboard navigation (arrows, Enter, Escape),
`_repr_html_` (static thumbnail grid) and `to_figure()` (matplotlib). Options shared by all:
render= (example -> PIL image | array | str | dict), text= (original text of each training example),
class_names=, feature_names=,
predictions= ("auto": argmax of the model output when labels are integer classes; True; False;
or a tensor of predicted classes).
"""

from importlib import import_module
from typing import Any

from .extension import load_ipython_extension, unload_ipython_extension  # %load_ext tracin_widgets

_LAZY = {"ClusterGallery": ".clusters", "InfluenceExplorer": ".explorer", "Renderer": ".render",
         "SelfInfluenceGallery": ".outliers", "CleanedData": ".review", "cleaned_dataset": ".review"}
__all__ = ["CleanedData", "ClusterGallery", "InfluenceExplorer", "Renderer", "SelfInfluenceGallery", "cleaned_dataset"]


def __getattr__(name: str) -> Any:
    """Import the galleries (and torch) on first use, so `%load_ext tracin_widgets` stays cheap."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tracin_widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
