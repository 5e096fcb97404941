"""The factored projection's shares of proj_dim: calibrated from gradient norms, paired (Khatri-Rao) blocks,
and the allocation stored with an index, adopted on resume and reload, checked at query time."""

from __future__ import annotations

import pytest
import torch

import tracin_engine as te
from tracin_engine.gradients.factored import FactoredProjection
from tracin_engine.gradients.featurize import Featurizer
from tracin_engine.gradients.per_example import GradientComputer

from models import CausalLM, lm_loss, topic_lm

V, T = 300, 12


@pytest.fixture(scope="module")
def lm_run():
    """A tied-embedding causal LM fitted for 30 Adam steps on three topics of 100 words each."""
    model, ids, y, states = topic_lm(V, T, n=60, topics=3, steps=30)
    return model, te.Checkpoints.from_state_dicts(states, [1.0]), (ids[:48], y[:48]), (ids[48:], y[48:])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_calibrated_shares_bring_factored_scores_closer_to_exact(lm_run):
    model, ck, train, test = lm_run
    exact = te.TracIn(model, ck, loss_fn=lm_loss).index(train, progress=False).influence(test)
    calibrated = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=256)
    cal = calibrated.index(train, progress=False).influence(test)
    fp = calibrated.featurizer.projection
    assert fp.weights is not None and fp.layout.dim <= 256
    # the block with the largest mean squared norm gets the widest share
    widths = [fp.width(i) for i in range(len(fp.blocks))]
    assert widths[max(range(len(widths)), key=lambda i: fp.weights[i])] == max(widths)
    equal = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=256)
    equal.resolve(te.data.as_source(train))
    equal.featurizer.projection.calibrate([1.0] * len(fp.blocks))       # equal weights: equal shares
    eq = equal.index(train, progress=False).influence(test)
    assert _corr(cal, exact) > 0.85 and _corr(cal, exact) > _corr(eq, exact) + 0.05


def test_allocation_rule_pairs_wide_blocks_with_large_shares():
    shapes = [(257, 5000, False), (65, 64, False), (32, 1, False)]     # tied head, small linear, norm vector
    k, k2, paired = FactoredProjection._allocate(shapes, 4096, [100.0, 1.0, 0.5], equal=0.05)
    assert paired[0] and not paired[2] and k[0][0] == k[0][1] and k2[0] is None
    assert k[2] == (32, 1)                                               # fits its share: exact
    sizes = [k[0][0], k[1][0] if paired[1] else (k2[1] or k[1][0] * k[1][1]), 32]
    assert sum(sizes) <= 4096 and sizes[0] > 10 * sizes[1]
    k, k2, paired = FactoredProjection._allocate(shapes, 4096)          # equal shares: block 1 fits exactly
    assert k[1] == (65, 64) and k2[1] and not paired[1]


def test_paired_rows_are_the_explicit_projection_of_exact_gradients():
    torch.manual_seed(0)
    model = CausalLM(vocab=V, dim=8, depth=1, seq=6).double()
    ids = torch.randint(0, V, (3, 6))
    y = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
    gc = GradientComputer(model, lm_loss, device="cpu")
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, ids, y)                                      # (B, P) float64 per-example loop
    fp = FactoredProjection(gc, 512, seed=5)
    fp(state, ids, y)                                                    # settles the layout
    alloc = fp.allocation()
    tied = next(i for i, b in enumerate(fp.blocks) if len(b.uses) == 2)   # wte and lm_head
    alloc[tied] = [200, 200, 0, 1]
    fp.adopt_allocation(alloc)
    Z = fp(state, ids, y)
    assert fp.paired[tied] and fp.layout.segments[tied].size == 200
    assert torch.allclose(fp.expand(Z), G @ fp.matrix(), rtol=1e-8, atol=1e-11)
    # the inner products it keeps are those of the exact gradients in expectation: E[R R^T] = I
    R = fp.matrix()
    o = fp.offsets[fp.blocks[tied].params[0]]
    block = R[o:o + V * 8]
    gram = block @ block.T
    assert abs(float(gram.diagonal().mean()) - 1) < 0.05 and float(gram.fill_diagonal_(0).abs().mean()) < 0.1


def test_resume_and_reload_take_the_stored_allocation(lm_run, tmp_path, monkeypatch):
    model, ck, train, test = lm_run
    store = tmp_path / "ix"
    first = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=128)
    first.featurize_rows(train, store, rows=(0, 16), progress=False, dtype=torch.float32)     # an interrupted featurization
    stored = te.FeatureStore.load(store).metadata["projection_allocation"]
    assert stored == first.featurizer.allocation

    def no_calibration(*args, **kwargs):
        raise AssertionError("a store that exists must not be calibrated again")

    monkeypatch.setattr(Featurizer, "calibrate", no_calibration)
    resumed = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=128).index(train, store=store, progress=False,
                                                                       dtype=torch.float32)
    assert resumed.tracin.featurizer.allocation == stored
    monkeypatch.undo()
    in_memory = first.index(train, progress=False)                       # same allocation, all rows at once
    assert torch.allclose(resumed.influence(test), in_memory.influence(test), rtol=1e-4, atol=1e-6)
    reloaded = te.GradientIndex.load(store, te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=128))
    assert torch.equal(reloaded.influence(test), resumed.influence(test))


def test_an_index_refuses_a_tracin_that_took_another_allocation(lm_run, tmp_path):
    model, ck, train, test = lm_run
    a = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=128).index(train, store=tmp_path / "a", progress=False)
    other = (train[0].flip(1), train[1].flip(1).clamp(min=-100))          # other data: other block norms
    b = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=128).index(other, store=tmp_path / "b", progress=False)
    assert a.store.metadata["projection_allocation"] != b.store.metadata["projection_allocation"]
    shared = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=128)
    first = te.GradientIndex.load(tmp_path / "a", shared)
    assert torch.equal(first.influence(test), a.influence(test))
    te.GradientIndex.load(tmp_path / "b", shared)                         # the TracIn now holds b's allocation
    with pytest.raises(te.TracInError, match="another factored allocation"):
        first.influence(test)


def test_tight_budgets_give_every_block_at_least_two_numbers_within_proj_dim():
    # a BERT-like mix (one dominant block, many tiny-weight ones) at proj_dim = 2 L .. 3 L: the floor of two
    # numbers per block overshoots and must be paid by several blocks, none going below two
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        L = int(torch.randint(3, 20, (1,), generator=gen))
        shapes = [(int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen)), False)
                  for _ in range(L)]
        weights = (torch.rand(L, generator=gen) ** 8).tolist()
        budget = 2 * L + int(torch.randint(0, L + 1, (1,), generator=gen))
        k, k2, paired = FactoredProjection._allocate(shapes, budget, weights, equal=0.05)
        widths = [ka if p else (b2 or ka * kg) for (ka, kg), b2, p in zip(k, k2, paired)]
        assert sum(widths) <= budget and min(widths) >= 1, (trial, shapes, widths)
