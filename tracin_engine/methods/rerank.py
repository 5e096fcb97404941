"""Exact rescoring of a projected index's best candidates: exact top-k for the cost of a few gradients.

Example:
    >>> index = TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=4096).index(train)
    >>> best = index.top_k(test, k=10, rerank=50, train_data=train)      # TopK with exact TracInCP scores
    >>> best = index.top_k(test, k=10, rerank="auto", train_data=train)  # as many candidates as the error needs
    >>> index.last_rerank                   # {"rescored": 57, "rounds": 2, "alpha": 0.031}

A projected index ranks every training example by estimated scores whose error grows as gradients get
wider than proj_dim (docs/benchmarks.md: a GPT-2's top-10 overlap with exact mode 0.46-0.89 at
proj_dim 4096), while the true top k usually lie near the top of its list. rerank_top_k takes candidates
from the projected scores, recomputes exact gradients (layer handlers, no projection: TracIn.exact())
of the test examples and of the candidates (their union U over the test examples), and scores

    S(z, z') = sum_c eta_c <g_c(z), g_c(z')>       for z' in U

returning, per test example, the k highest (proponents) and k lowest (opponents) over U. Every returned
score is exact; the returned sets are the exact top k whenever those lie within U.

Candidates: rerank=M takes each test example's M highest and M lowest projected scores. rerank="auto"
starts from 2k each way plus a random probe of 2k training examples and widens: a projected score s^ of
a pair errs by about alpha * u, with u^2 = sum_c eta_c^2 ||t_c||^2 ||f_c||^2 + s^2 from the stored norms
(noise_scale; the Johnson-Lindenstrauss variance) and alpha the root mean square of (s^ - S) / u on the
probe (unbiased, unlike the selected candidates, whose projected scores are extreme because of their
errors), raised by two standard errors. Every training example with s^ + 3 alpha u >= the k-th best
exact score so far (or s^ - 3 alpha u <= the k-th lowest) is rescored, until none is left (or half the
training set is rescored, and at least one more round of 2k each way after the first candidates: then a
warning says the projection is too coarse).
Cost: |U| + m exact per-example gradients per checkpoint; memory: the test examples' exact rows
(C, m, P) plus one chunk of candidates' (measured in benchmarks/bench_rerank.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import inputs as tree
from ..checks import check_k
from ..data import BatchFn, as_source
from ..errors import TracInError
from ..fingerprint import data_fingerprint
from ..gradients.featurize import progress_bar
from ..gradients.per_example import Target
from ..memory import fits, rows_that_fit
from ..resources import format_bytes
from ..store.scoring import accum_dtype
from ..store.topk import Neighbors, TopK

WORK_ROWS = 3     # a candidate's exact rows plus the working memory of computing them, in rows
AUTO_START = 2    # rerank="auto": first 2 k candidates each way and a random probe of 2 k examples
AUTO_PROBE = 2    #   (the probe's residuals fit the error scale alpha without selection bias),
AUTO_Z = 3.0      # then every example whose projected score is within 3 error scales of the k-th exact one,
AUTO_LIMIT = 0.5  # until none is left or half the training set is rescored (then a warning), but always
AUTO_EXTRA = 4    #   allowing 4 k more rows after the first candidates and the probe (a round of 2 k each
#                   way: on a small training set those alone can pass half of it)
PROGRESS_STEP = 64  # candidates featurized per step; more than one step shows a progress bar


def check_train_data(index: Any, train_data: Any, batch_fn: BatchFn | None):
    """The DataSource of `train_data`, refused (TracInError) unless it is the data the index was built
    from: same length, and the same fingerprint (every example and label) when the store recorded one.
    The last accepted object is remembered, so repeated queries with it do not hash the data again,
    unless its tensors were modified in place since (their version counters moved)."""
    if train_data is None:
        raise TracInError("rerank= recomputes exact gradients of the candidate training examples: pass "
                          "train_data= (the data the index was built from).")
    seen = index._rerank_source
    if seen is not None and seen[0] is train_data and seen[1] is batch_fn and seen[3] == _versions(train_data):
        return seen[2]
    source = as_source(train_data, batch_fn)
    if len(source) != index.n_train:
        raise TracInError(f"train_data has {len(source)} examples but the index holds {index.n_train}; pass "
                          "the training data the index was built from.")
    stored = index.store.metadata.get("data")
    if stored is not None and data_fingerprint(source) != stored:
        raise TracInError("train_data is not the data this index was built from (its examples, labels or "
                          "order differ); pass the same training data, in the same order.")
    index._rerank_source = (train_data, batch_fn, source, _versions(train_data))
    return source


def _versions(data: Any) -> tuple[int, ...]:
    """The in-place modification counters (Tensor._version) of the tensors `data` holds directly: an
    (inputs, labels) tuple, a dict, a TensorDataset. A changed counter means the same object now holds
    other values, and its fingerprint is checked again. Other datasets give () (their identity only)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = data.tensors
    try:
        return tuple(t._version for t in tree.leaves(data))
    except TracInError:
        return ()


class ExactScorer:
    """Exact per-checkpoint terms of fixed test examples against any training rows, computed on demand.

    Holds the test examples' exact rows T (C, m, P) (the index's TracIn without projection,
    TracIn.exact()); terms(rows) featurizes the training examples at `rows` in chunks of at most
    PROGRESS_STEP within the memory budget (a tqdm bar when there is more than one) and returns
    eta_c <T_c, F_c(z')>: Tensor (C, m, len(rows)) float64 on the CPU.
    """

    def __init__(self, index: Any, test_data: Any, source, target: Target, batch_fn: BatchFn | None):
        self.index, self.source = index, source
        self.exact = exact = index.tracin.exact()
        C, P = len(exact.checkpoints), exact.dim
        self.row_bytes = C * P * accum_dtype(exact.featurizer.grads.dtype).itemsize   # one example's rows
        m = len(as_source(test_data, batch_fn))
        if not fits((m + WORK_ROWS) * self.row_bytes, "cpu"):
            raise TracInError(f"exact rows of {m} test examples take {format_bytes(m * self.row_bytes)} "
                              f"({C} checkpoints x {P:,} gradient numbers each), more than the free memory "
                              "allows; rescore fewer test examples per call, or select fewer layers (layers=[...]).")
        self.T = exact.features(test_data, target=target, batch_fn=batch_fn)       # (C, m, P) on the CPU

    def terms(self, rows: torch.Tensor) -> torch.Tensor:
        C, m = self.T.shape[0], self.T.shape[1]
        layout, lrs = self.exact.featurizer.layout, self.index.learning_rates
        out = torch.zeros(C, m, len(rows), dtype=torch.float64)
        chunk = rows_that_fit(WORK_ROWS * self.row_bytes, "cpu", maximum=max(1, min(len(rows), PROGRESS_STEP)))
        bar = progress_bar(len(rows), len(rows) > PROGRESS_STEP, "rerank: exact gradients of candidates", "example")
        try:
            for s in range(0, len(rows), chunk):
                part = rows[s:s + chunk]
                F = self.exact.features(self.source.subset(part.tolist()), target="loss",
                                        batch_size=min(len(part), 32))              # (C, b, P)
                for c in range(C):
                    out[c, :, s:s + len(part)] = float(lrs[c]) * layout.dots(self.T[c], F[c]).double().cpu()
                bar.update(len(part))
        finally:
            bar.close()
        return out


def exact_influence_per_checkpoint(index: Any, test_data: Any, train_data: Any, rows: Any,
                                   target: Target = "loss", batch_fn: BatchFn | None = None,
                                   train_batch_fn: BatchFn | None = None) -> torch.Tensor:
    """Exact terms eta_c <g_c(z), g_c(z')> of the test examples z against the training examples z' at
    `rows` (indices into train_data, the index's data: a sequence or tensor of ints): Tensor (C, m, len(rows)) float64 on the CPU,
    summing over c to S(z, z'). Gradients of the index's TracIn without projection (TracIn.exact())."""
    source = check_train_data(index, train_data, train_batch_fn)
    return ExactScorer(index, test_data, source, target, batch_fn).terms(_checked_rows(rows, index.n_train))


def _checked_rows(rows: Any, n: int) -> torch.Tensor:
    rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
    if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < n):
        raise TracInError(f"training rows must lie in 0..{n - 1}, got {rows.tolist()[:10]}.")
    return rows


def _ranked(S: torch.Tensor, rows: torch.Tensor, k: int) -> TopK:
    """TopK of scores S (m, r) over the training rows `rows` (r,): the k' = min(k, r) highest and lowest."""
    kk = min(k, S.shape[1])
    top, low = S.topk(kk, dim=1), S.topk(kk, dim=1, largest=False)
    return TopK(Neighbors(rows[top.indices], top.values), Neighbors(rows[low.indices], low.values))


def noise_scale(index: Any, t: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """u (m, n) float64 with u^2 = sum_c eta_c^2 ||t_c||^2 ||f_c||^2 + s^2: projected test features t
    (C, m, dim), the stored training rows' squared norms, the projected scores s^ = est (m, n). A
    Johnson-Lindenstrauss projection of k numbers errs on <x, y> with variance (|x|^2 |y|^2 + <x, y>^2) / k,
    so the error of a projected score is about alpha * u (alpha fitted in rerank_top_k)."""
    lrs = index.learning_rates.double()
    tn = torch.stack([index.layout.sq_norms(t[c]).double().cpu() for c in range(t.shape[0])], 1)   # (m, C)
    return ((tn * lrs ** 2) @ index.store.sq_norms + est ** 2).clamp_min(0).sqrt()


def rerank_top_k(index: Any, test_data: Any, train_data: Any, k: int, candidates: int | str,
                 target: Target = "loss", batch_fn: BatchFn | None = None,
                 train_batch_fn: BatchFn | None = None, features: torch.Tensor | None = None) -> TopK:
    """k proponents and opponents per test example with exact scores, among candidates picked by the
    index's projected scores (see the module docstring): `candidates` M (int) best each way, or "auto".
    Returns TopK on the CPU: .proponents.indices / .scores (m, k') best first, .opponents most negative
    first, k' = min(k, candidates scored); scores in the model's accumulation dtype, like index.top_k.
    index.last_rerank records what was done: {"rescored": rows featurized, "rounds", "alpha"}."""
    k = check_k(k)
    auto = isinstance(candidates, str) and candidates == "auto"
    if not auto and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k):
        raise TracInError(f"rerank= is the number of projected candidates to rescore exactly per test example "
                          f"and direction (an integer >= k={k}) or 'auto'; got {candidates!r}.")
    if test_data is None:
        raise TracInError("rerank= needs test_data (exact gradients of the test examples), not only features=.")
    source = check_train_data(index, train_data, train_batch_fn)
    t = index.query_features(test_data, target, batch_fn, features)             # projected (C, m, dim)
    n, dtype = index.n_train, accum_dtype(index.tracin.featurizer.grads.dtype)
    first = min(AUTO_START * k if auto else candidates, n)
    approx = index.top_k(k=first, features=t)
    rows = torch.unique(torch.cat([approx.proponents.indices.flatten(), approx.opponents.indices.flatten()]).cpu())
    scorer = ExactScorer(index, test_data, source, target, batch_fn)
    rounds, alpha, probe = 1, None, rows[:0]
    if auto:
        est = index.influence(features=t).double().cpu()                         # (m, n) projected
        u = noise_scale(index, t, est).clamp_min(torch.finfo(torch.float64).tiny)
        done = torch.zeros(n, dtype=torch.bool)
        done[rows] = True
        free = (~done).nonzero().flatten()                # a random probe: residuals free of selection
        probe = free[torch.randperm(len(free), generator=torch.Generator().manual_seed(0))[:AUTO_PROBE * k]]
        done[probe] = True
        rows = torch.cat([rows, probe])
    budget = max(AUTO_LIMIT * n, len(rows) + AUTO_EXTRA * k)
    S = scorer.terms(rows).sum(0)                                                # (m, |rows|) exact
    if auto:
        if len(probe):
            r = (est[:, probe] - S[:, -len(probe):]) / u[:, probe]
            # root mean square, raised by two of its standard errors (~ alpha / sqrt(2 N) for N residuals)
            alpha = float(r.pow(2).mean().sqrt()) * (1 + 2 / (2 * r.numel()) ** 0.5)
        else:
            alpha = 0.0                                                          # every example is scored
        while True:
            kk = min(k, len(rows))
            hi = S.topk(kk, dim=1).values[:, -1:]                               # k-th best exact score so far
            lo = S.topk(kk, dim=1, largest=False).values[:, -1:]
            reach = AUTO_Z * alpha * u
            could = ((est + reach >= hi) | (est - reach <= lo)).any(0) & ~done
            if not could.any() or int(done.sum()) >= budget:
                break
            new = could.nonzero().flatten()
            done[new] = True
            rows = torch.cat([rows, new])
            S = torch.cat([S, scorer.terms(new).sum(0)], 1)
            rounds += 1
        if could.any():
            warnings.warn(f"rerank='auto' stopped after rescoring {len(rows)} of {n} training examples "
                          f"({int(could.sum())} more could still enter the top {k}): the projection is too "
                          "coarse here; raise proj_dim, or pass rerank=M.", stacklevel=3)
    index.last_rerank = {"rescored": len(rows), "rounds": rounds, "alpha": alpha}
    return _ranked(S.to(dtype), rows, k)
