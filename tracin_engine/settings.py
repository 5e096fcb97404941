"""IndexSettings: one frozen description of how an index was built; it *is* the store's metadata.

    >>> s = tracin.settings()                     # IndexSettings(method="tracin", proj_dim=None, ...)
    >>> s.to_metadata()                           # the dict written to metadata.json (flat, JSON-able)
    >>> IndexSettings.from_metadata(meta) == s    # round trip; a reopened store is checked against it

A store reopened with different settings is refused (store/feature_store.py compares the
metadata); fields therefore hold only what changes the stored numbers or their meaning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class SourceSettings:
    """SOURCE's own settings (methods/source.py).

    segments: L, the number of training segments; steps: K_l, optimizer steps per segment;
    curvature: how EK-FAC's output factor is estimated ("gn", "mc" or "empirical");
    horizons: eta_l K_l per segment (momentum folded in), the time each segment's curvature acts.
    """

    segments: int
    steps: tuple[int, ...]
    curvature: str
    horizons: tuple[float, ...]


@dataclass(frozen=True)
class IndexSettings:
    """What identifies an index. Every field is written to metadata.json and checked on reopen.

    model: hash of the model's state-dict names, shapes and dtypes (its architecture).
    parameters: names of the parameters whose gradients are used (from `layers=`).
    checkpoints: per checkpoint a JSON-able identity (name, learning rate, step, size / content).
    learning_rates: eta_c, the weight of checkpoint c.
    proj_dim: None for exact gradients, else the projected length per layer set.
    seed: the projection's seed.  projection: "gaussian", "rademacher" or "factored"; None for
    exact rows (not written: stores of exact rows record no projection).
    per_example: the per-example path the rows were computed with ("hooks", "vmap", "loop").
    layout: the row layout (store/layout.py Layout.to_dict()).
    method: "tracin" (TracInCP rows) or "source" (SOURCE's v(z) rows, with `source` set).
    projection_generator: the dense projection's generator (gradients/projection.py; R, hence the
    stored rows, depend on it), None without a dense projection.
    projection_allocation: the factored projection's per-layer [k_c, k_r, k2, paired] (gradients/factored.py;
    calibrated from gradient norms, so it is stored and adopted, never recomputed), None otherwise.
    """

    model: str
    parameters: tuple[str, ...]
    checkpoints: tuple[dict, ...]
    learning_rates: tuple[float, ...]
    proj_dim: int | None
    seed: int
    projection: str | None
    per_example: str
    layout: dict
    method: str = "tracin"
    source: SourceSettings | None = None
    projection_generator: str | None = None
    projection_allocation: tuple | None = None

    def with_method(self, source: SourceSettings, layout: dict) -> "IndexSettings":
        """The same model and checkpoints described as a SOURCE index with `layout`."""
        return replace(self, method="source", source=source, layout=layout)

    def to_metadata(self) -> dict[str, Any]:
        """Flat JSON-able dict (SOURCE's fields at top level, as stores have always been written)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        if out["projection_allocation"] is not None:
            out["projection_allocation"] = [list(a) for a in out["projection_allocation"]]
        for optional in ("projection", "projection_generator", "projection_allocation"):
            if out[optional] is None:
                del out[optional]
        if self.source is not None:
            out.update({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.source).items()})
        else:
            out.pop("method")  # TracIn stores never recorded a method; keep their metadata unchanged
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "IndexSettings":
        """Rebuild the settings from a store's metadata (unknown keys, like n and dim, are ignored)."""
        source = None
        if meta.get("method") == "source":
            source = SourceSettings(int(meta["segments"]), tuple(meta["steps"]), meta["curvature"],
                                    tuple(meta["horizons"]))
        return cls(meta["model"], tuple(meta["parameters"]), tuple(meta["checkpoints"]),
                   tuple(meta["learning_rates"]), meta["proj_dim"], meta["seed"], meta.get("projection"),
                   meta["per_example"], meta["layout"], meta.get("method", "tracin"), source,
                   meta.get("projection_generator"),
                   None if meta.get("projection_allocation") is None else tuple(map(tuple, meta["projection_allocation"])))
