"""Exact rows of convolutions with few output positions stored as factor pairs ("lowrank" segments):
rows against the float64 loop, inner products and norms of the segment against the dense gradients,
an index (memory, float16 disk, reload) against the dense vmap index, clustering's expansion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.gradients.hooks import HookFeaturizer
from tracin_engine.gradients.per_example import GradientComputer
from tracin_engine.store.scoring import half_matmul


class LowCNN(nn.Module):
    """conv1: 64 positions (stored dense); conv2: 2x2 = 4 positions, 32 x 145 weights (stored as 4 pairs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.fc = nn.Linear(128, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


def _data(n=12, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(n, 3, 8, 8, dtype=dtype), torch.randint(0, 3, (n,))


def test_lowrank_rows_are_exact_and_keep_inner_products():
    model = LowCNN().double()
    x, y = _data(5, torch.float64)
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, x, y)                                        # (B, P) float64 loop
    hf = HookFeaturizer(gc)
    rows = hf(state, x, y)
    kinds = [s.kind for s in hf.layout.segments]
    assert kinds == ["dense", "lowrank", "outer"] and hf.layout.segments[1].rank == 4
    assert hf.layout.dim < G.shape[1] - 3000                             # 4 x (145 + 32) instead of 32 x 145
    assert torch.allclose(hf.expand(rows), G, rtol=1e-9, atol=1e-12)
    assert torch.allclose(hf.layout.sq_norms(rows), (G * G).sum(1), rtol=1e-9)
    assert torch.allclose(hf.layout.dots(rows[:2], rows), G[:2] @ G.T, rtol=1e-9, atol=1e-12)
    # float16 rows through the half products scoring uses: within float16 rounding of the exact products
    half = rows.float().half()
    got = hf.layout.dots(rows[:2].float(), half, matmul=half_matmul)
    assert torch.allclose(got.double(), G[:2] @ G.T, rtol=0, atol=2e-2 * float((G[:2] @ G.T).abs().max()))


def test_index_with_lowrank_rows_matches_the_dense_index(tmp_path):
    model = LowCNN()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    train, test = _data(24), _data(4)
    low = te.TracIn(model, ck, loss_fn=F.cross_entropy)
    index = low.index(train, progress=False, batch_size=8)
    assert any(s.kind == "lowrank" for s in index.layout.segments)
    dense = te.TracIn(model, ck, loss_fn=F.cross_entropy, per_example="vmap").index(train, progress=False)
    assert dense.layout.is_dense and index.store.dim < dense.store.dim
    want = dense.influence(test)
    assert torch.allclose(index.influence(test), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    assert torch.allclose(index.self_influence(), dense.self_influence(), rtol=1e-4)
    assert torch.equal(index.top_k(test, k=5).proponents.indices, dense.top_k(test, k=5).proponents.indices)
    # on disk (float16 rows) and reopened by a fresh TracIn: the same layout, scores within float16 rounding
    disk = te.TracIn(model, ck, loss_fn=F.cross_entropy).index(train, store=tmp_path / "ix", progress=False)
    again = te.GradientIndex.load(tmp_path / "ix", te.TracIn(model, ck, loss_fn=F.cross_entropy))
    assert again.layout.to_dict() == index.layout.to_dict()
    assert torch.allclose(again.influence(test), want, rtol=0, atol=5e-3 * float(want.abs().max()))
    # clustering expands the pairs to the layer's gradient: the same clusters as from the dense rows
    assert torch.equal(torch.as_tensor(index.cluster(3, seed=0).labels), torch.as_tensor(dense.cluster(3, seed=0).labels))


class GridMLP(nn.Module):
    """ConvNeXt's pattern: a convolution, then Linear layers on (B, H, W, C) (a 2 x 2 grid: stored as 4 pairs
    each), and a Linear on (B, T, C) positions that a batch may change (a sequence: stored dense)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.seq = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)                                  # (B, 2, 2, 16)
        h = h + self.down(F.gelu(self.up(h)))
        return self.fc(torch.tanh(self.seq(h.flatten(1, 2))).mean(1))          # (B, 4, 16) as a sequence


def test_linear_layers_on_a_grid_of_positions_are_stored_as_factor_pairs():
    model = GridMLP().double()
    x, y = _data(5, torch.float64)
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, x, y)
    hf = HookFeaturizer(gc)
    rows = hf(state, x, y)
    names = [b.describe() for b in hf.blocks]
    kinds = dict(zip(names, [(s.kind, getattr(s, "rank", 0)) for s in hf.layout.segments]))
    assert [k for n, k in kinds.items() if "up" in n or "down" in n] == [("lowrank", 4), ("lowrank", 4)], kinds
    assert [k for n, k in kinds.items() if "seq" in n] == [("dense", 0)], kinds
    assert torch.allclose(hf.expand(rows), G, rtol=1e-9, atol=1e-12)
    assert torch.allclose(hf.layout.dots(rows[:2], rows), G[:2] @ G.T, rtol=1e-9, atol=1e-12)
    model = GridMLP()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    train, test = _data(12), _data(3)
    index = te.TracIn(model, ck, loss_fn=F.cross_entropy).index(train, progress=False, batch_size=4)
    dense = te.TracIn(model, ck, loss_fn=F.cross_entropy, per_example="vmap").index(train, progress=False)
    want = dense.influence(test)
    assert torch.allclose(index.influence(test), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
