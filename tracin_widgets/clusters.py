"""ClusterGallery: one strip per TracIn cluster, its size and label mix, representatives first.

Example:
    >>> g = tw.ClusterGallery(index, split.train, n_clusters=8, class_names=split.class_names)
    >>> g.clusters.sizes            # LongTensor (K,), from index.cluster(n_clusters)
    >>> g.selected                  # training indices clicked in any strip

Clusters come from index.cluster(n_clusters) (gradients compared by cosine, distance = 1 - similarity),
or pass clusters= a result you already have. Each strip shows the cluster's representatives (most
central first), then further members by centrality, up to per_cluster tiles. The bar on a tile is the
example's self-influence s(z) = sum_c eta_c ||g_c(z)||^2, so outliers inside a cluster stand out.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ._engine import TracInError

from ._base import GalleryBase


class ClusterGallery(GalleryBase):
    """Strips of TracIn clusters (largest first). See the module docstring."""

    def __init__(self, index: Any, train_data: Any, n_clusters: int = 8, per_cluster: int = 10,
                 clusters: Any = None, cluster_kwargs: dict | None = None, **kwargs: Any):
        if per_cluster < 1:
            raise TracInError(f"per_cluster must be at least 1, got {per_cluster}.")
        super().__init__(index, train_data, **kwargs)
        self.add_class("tw-clusters")
        self.clusters = clusters if clusters is not None else index.cluster(n_clusters, **(cluster_kwargs or {}))
        if len(self.clusters.labels) != len(self.train):
            raise TracInError(f"clusters label {len(self.clusters.labels)} examples but train_data has {len(self.train)}.")
        self.per_cluster = int(per_cluster)
        self.self_influence = index.self_influence().double().cpu() if index is not None else None
        self.labels = self.train.labels()
        self.order = sorted(range(len(self.clusters.sizes)), key=lambda k: -int(self.clusters.sizes[k]))
        self.refresh()

    def shown(self, k: int) -> list[int]:
        """Training indices in cluster k's strip: representatives first, then other members by centrality."""
        reps = [int(i) for i in self.clusters.representatives[k]]
        rest = [int(i) for i in self.clusters.members(k)[: self.per_cluster + len(reps)] if int(i) not in set(reps)]
        return (reps + rest)[: self.per_cluster]

    def label_mix(self, k: int, top: int = 8) -> list[list]:
        """[[label text, count], ...] of cluster k, most common first; the rest summed as "other"."""
        if self.labels is None or self.labels.dim() != 1 or self.labels.is_floating_point():
            return []
        members = torch.nonzero(torch.as_tensor(self.clusters.labels) == k).flatten()
        counts = Counter(self.labels[members].tolist()).most_common()
        mix = [[self.renderer.label(v), n] for v, n in counts[:top]]
        rest = sum(n for _, n in counts[top:])
        return mix + ([["other", rest]] if rest else [])

    def _strips(self) -> list[dict]:
        strips = []
        n_reps = {k: len(self.clusters.representatives[k]) for k in self.order}
        for k in self.order:
            idx = self.shown(k)
            mix = self.label_mix(k)
            total = sum(n for _, n in mix) or 1
            mix_text = ", ".join(f"{lab} {100 * n / total:.0f}%" for lab, n in mix[:4])
            scores = self.self_influence[idx] if self.self_influence is not None else None
            strips.append(self._strip(f"cluster-{k}", f"cluster {k}: {int(self.clusters.sizes[k])} examples",
                                      idx, scores, mix=mix, signed=False, color="self",
                                      help="bar: self-influence sum_c eta_c ||g_c(z)||^2, scaled to this cluster's largest",
                                      note=f"{n_reps[k]} representatives first" + (f"; labels {mix_text}" if mix_text else "")))
        return strips

    def _status(self) -> str:
        return (f"{len(self.order)} TracIn clusters of {len(self.train)} training examples (largest first): "
                "examples the model learns alike; a long bar marks a member that is hard to fit")

    def _help(self) -> str:
        return ("clusters of gradients compared by cosine (distance 1 - similarity); bar: self-influence "
                "sum_c eta_c ||g_c(z)||^2, scaled per cluster")

    def _detail_rows(self, i: int) -> list[tuple[str, str]]:
        k = int(self.clusters.labels[i])
        rows = [("cluster", f"{k} ({int(self.clusters.sizes[k])} examples)"),
                ("representative", "yes" if i in {int(r) for r in self.clusters.representatives[k]} else "no")]
        if self.self_influence is not None:
            rows.append(("self-influence (parameters)", f"{float(self.self_influence[i]):.4g}"))
        return rows

    def to_dataframe(self):
        """pandas DataFrame of the shown tiles: cluster, position, index, label, self_influence, selected."""
        import pandas as pd

        sel = set(self.selected)
        rows = [{"cluster": int(s["key"].split("-")[1]), "position": r, "index": t["index"], "label": t["label"],
                 "self_influence": t["score"], "selected": t["index"] in sel}
                for s in self.gallery.strips for r, t in enumerate(s["tiles"])]
        return pd.DataFrame(rows, columns=["cluster", "position", "index", "label", "self_influence", "selected"])
