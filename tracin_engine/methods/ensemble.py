"""Dropout ensembles (Deng et al. 2024): several attribution members from one training run, averaged.

Example:
    >>> ens = dropout_ensemble(tracin, (X_train, y_train), n_members=4)               # TracIn members
    >>> ens = dropout_ensemble(tracin, (X_train, y_train), 4, method="source", segments=2)
    >>> ens.influence((X_test, y_test))         # Tensor (n_test, n_train): mean over members
    >>> ens.top_k((X_test, y_test), k=10)       # TopK of the averaged scores

Member m is the model with a fixed dropout mask drawn from seed + m: every nn.Dropout (Dropout1d/2d/3d:
per channel) multiplies its input by keep / (1 - p), keep ~ Bernoulli(1 - p) of the per-example
shape, the SAME mask for every example, train and test alike, at every checkpoint. So a member is a
sub-network and the ensemble averages over (checkpoint, mask) pairs:
    score(z', z) = 1/M sum_m score_m(z', z)
Masks come from numpy generators (not torch's), so they are identical inside torch.func.vmap, the
batched hook path and the loop reference. The model's own dropout randomness is replaced, whatever
its train/eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..data import BatchFn
from ..errors import TracInError
from ..gradients.per_example import Target
from ..analysis.clustering import Clusters
from ..analysis.outliers import Outliers
from .index import GradientIndex
from .source import SourceIndex
from ..store.topk import TopK, streaming_top_k
from ..store.scoring import score_blocks


_CHANNEL = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every dropout layer; raises for alpha dropout and for models without any."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    alpha = [n for n, m in mods if isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout))]
    if alpha:
        raise TracInError(f"alpha dropout layers {alpha} are not supported by dropout ensembles; "
                          "use nn.Dropout or nn.Dropout1d/2d/3d.")
    if not mods:
        raise TracInError("the model has no nn.Dropout layers, so a dropout ensemble has nothing to vary; "
                          "add dropout to the model or use a single index.")
    return mods


class fixed_dropout:
    """Context manager: every dropout layer of `model` applies the fixed mask of `seed`.

    mask(module i, per-example shape s) = keep / (1 - p), keep = U[0, 1) >= p from
    numpy.random.default_rng([seed, i, *s]); Dropout1d/2d/3d draw one value per channel.
    """

    def __init__(self, model: nn.Module, seed: int):
        self.model, self.seed = model, int(seed)
        self.modules = dropout_modules(model)
        self._masks: dict[tuple, torch.Tensor] = {}
        self._handles: list = []

    def mask(self, i: int, module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
        """Mask for per-example input shape `shape` (the batch dimension removed), float64 on the CPU."""
        if isinstance(module, _CHANNEL):
            shape = (shape[0],) + (1,) * (len(shape) - 1)
        key = (i, shape)
        if key not in self._masks:
            rng = np.random.default_rng([self.seed, i, *shape])
            p = float(module.p)
            keep = rng.random(shape) >= p
            self._masks[key] = torch.from_numpy(keep / (1.0 - p) if p < 1 else np.zeros(shape))
        return self._masks[key]

    def __enter__(self) -> "fixed_dropout":
        for i, (_, mod) in enumerate(self.modules):
            def hook(m, args, out, i=i):
                x = args[0]
                return x * self.mask(i, m, tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
            self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class EnsembleIndex:
    """Member indexes (one per dropout seed) of the same training set; queries average their scores.

    Implements tracin_engine.interface.InfluenceIndex: with M members, S(z', z) = (1/M) sum_m S_m(z', z)
    for influence, per-checkpoint terms, similarity and self-influence; top_k ranks the averaged scores.
    test_features returns the members' query features stacked: Tensor (M, C, m, dim).
    """

    def __init__(self, tracin: Any, members: list[tuple[int, GradientIndex]]):
        if not members:
            raise TracInError("an ensemble needs at least one member.")
        self.tracin, self.members = tracin, members

    def __repr__(self) -> str:
        return f"EnsembleIndex(members={len(self.members)}, first={self.members[0][1]!r})"

    @property
    def n_train(self) -> int:
        return self.members[0][1].n_train

    @property
    def n_checkpoints(self) -> int:
        return self.members[0][1].n_checkpoints

    @property
    def learning_rates(self) -> torch.Tensor:
        """Tensor (C,) float64: the members' learning rates (shared: one training run)."""
        return self.members[0][1].learning_rates

    @property
    def records_outputs(self) -> bool:
        return all(idx.records_outputs for _, idx in self.members)

    def _mean(self, fn) -> torch.Tensor:
        total = None
        for m, (seed, idx) in enumerate(self.members):
            with fixed_dropout(self.tracin.model, seed):
                s = fn(m, idx)
            total = s if total is None else total + s
        return total / len(self.members)

    def test_features(self, test_data: Any, target: Target = "loss", batch_fn: BatchFn | None = None
                      ) -> torch.Tensor:
        """Each member's query features under its own dropout mask: Tensor (M, C, m, dim)."""
        feats = []
        for seed, idx in self.members:
            with fixed_dropout(self.tracin.model, seed):
                feats.append(idx.test_features(test_data, target, batch_fn))
        return torch.stack(feats)

    def query_features(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                       features: torch.Tensor | None = None) -> torch.Tensor:
        """`features` when given (checked: (M, C, m, dim)), else test_features(test_data, ...)."""
        if features is None:
            if test_data is None:
                raise TracInError("pass test_data (or features= from index.test_features(...)).")
            return self.test_features(test_data, target, batch_fn)
        if features.dim() != 4 or features.shape[0] != len(self.members):
            raise TracInError(f"features= must come from this ensemble's test_features (shape (M={len(self.members)}, "
                              f"C, m, dim)), got shape {tuple(features.shape)}.")
        return features

    def influence(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None, *,
                  features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean member scores: Tensor (n_test, n_train); positive = proponent."""
        t = self.query_features(test_data, target, batch_fn, features)
        return self._mean(lambda m, idx: idx.influence(features=t[m]))

    def influence_per_checkpoint(self, test_data: Any = None, target: Target = "loss",
                                 batch_fn: BatchFn | None = None, *,
                                 features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean member per-checkpoint terms: Tensor (C, n_test, n_train); sums to influence."""
        t = self.query_features(test_data, target, batch_fn, features)
        return self._mean(lambda m, idx: idx.influence_per_checkpoint(features=t[m]))

    def member_influence(self, test_data: Any = None, target: Target = "loss",
                         batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of each member: Tensor (M, n_test, n_train)."""
        t = self.query_features(test_data, target, batch_fn, features)
        return torch.stack([idx.influence(features=t[m]) for m, (_, idx) in enumerate(self.members)])

    def similarity(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None, *,
                   features: torch.Tensor | None = None) -> torch.Tensor:
        """Mean member cosine similarity: Tensor (n_test, n_train) in [-1, 1]."""
        t = self.query_features(test_data, target, batch_fn, features)
        return self._mean(lambda m, idx: idx.similarity(features=t[m]))

    def self_influence(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean member self-influence: Tensor (n_train,) float64."""
        return self._mean(lambda m, idx: idx.self_influence(weights))

    def self_influence_per_checkpoint(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean member self-influence terms: Tensor (C, n_train) float64; sums to self_influence()."""
        return self._mean(lambda m, idx: idx.self_influence_per_checkpoint(weights))

    def outliers(self, weights: torch.Tensor | None = None, checkpoints: Any = None,
                 normalize: str = "none", space: str = "output") -> Outliers:
        """Training examples ranked by the members' mean self-influence terms (see GradientIndex.outliers)."""
        terms = self._mean(lambda m, idx: idx.outliers(weights, checkpoints, normalize, space).per_checkpoint)
        scores = terms.sum(0)
        return Outliers(torch.argsort(scores, descending=True, stable=True), scores, terms)

    def top_k(self, test_data: Any = None, k: int = 10, target: Target = "loss", batch_fn: BatchFn | None = None,
              *, features: torch.Tensor | None = None, block_size: int = 65536) -> TopK:
        """k proponents / opponents of the averaged scores, streamed over training blocks."""
        if k < 1:
            raise TracInError(f"k must be at least 1, got {k}.")
        t = self.query_features(test_data, target, batch_fn, features)

        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            gens = [score_blocks(t[m], idx.store, idx.learning_rates, idx.layout, block_size=block_size)
                    for m, (_, idx) in enumerate(self.members)]
            for parts in zip(*gens):
                yield parts[0][0], sum(p for _, p in parts) / len(parts)

        return streaming_top_k(blocks(), k)

    def renormalized_top_k(self, *args: Any, **kwargs: Any) -> TopK:
        raise TracInError("an EnsembleIndex has no renormalized scores; ask one member: "
                          "ens.members[0][1].renormalized_top_k(...).")

    def cluster(self, n_clusters: int, **kwargs: Any) -> Clusters:
        raise TracInError("an EnsembleIndex cannot cluster (its members' gradient spaces differ); cluster one "
                          "member: ens.members[0][1].cluster(n_clusters), or the plain index tracin.index(data).")

    def save(self, path: str | Path) -> Path:
        """Write each member to path/member_<m> (each member's save checks its own folder). Returns path."""
        path = Path(path)
        for m, (_, idx) in enumerate(self.members):
            idx.save(path / f"member_{m}")
        return path

    @classmethod
    def load(cls, path: str | Path, tracin: Any, seeds: list[int] | None = None) -> "EnsembleIndex":
        """Reopen an ensemble saved by save() or dropout_ensemble(store=path); seeds default to 0..M-1."""
        folders = sorted(Path(path).glob("member_*"), key=lambda f: int(f.name.split("_")[1]))
        if not folders:
            raise TracInError(f"{path} holds no member_<m> folders; save an ensemble there with ens.save(path).")
        seeds = list(range(len(folders))) if seeds is None else list(seeds)
        if len(seeds) != len(folders):
            raise TracInError(f"{path} holds {len(folders)} members but {len(seeds)} seeds were given.")
        members = []
        for seed, folder in zip(seeds, folders):
            with fixed_dropout(tracin.model, seed):
                members.append((seed, (SourceIndex if SourceIndex.holds(folder) else GradientIndex).load(folder, tracin)))
        return cls(tracin, members)


def dropout_ensemble(tracin: Any, train_data: Any, n_members: int = 4, seed: int = 0,
                     method: str = "tracin", store: str | Path | None = None, **index_kwargs: Any) -> EnsembleIndex:
    """Build one index per dropout mask (seeds seed .. seed + n_members - 1): EnsembleIndex.

    index_kwargs go to tracin.index (method="source" takes segments=..., etc.). store: a folder gets
    one subfolder member_<m> per member.
    """
    if not isinstance(n_members, int) or n_members < 1:
        raise TracInError(f"n_members must be a positive integer, got {n_members!r}.")
    dropout_modules(tracin.model)
    members = []
    for m in range(n_members):
        with fixed_dropout(tracin.model, seed + m):
            where = None if store is None else Path(store) / f"member_{m}"
            members.append((seed + m, tracin.index(train_data, store=where, method=method, **index_kwargs)))
    return EnsembleIndex(tracin, members)
