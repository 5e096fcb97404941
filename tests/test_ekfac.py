"""EK-FAC (ekfac.py) against exact Gauss-Newton matrices and exact per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from tracin_engine.data import as_source
from tracin_engine import source_layers as te_source_layers
from tracin_engine.methods.ekfac import KronLayers
from tracin_engine.methods.ekfac_fit import fit_ekfac
from tracin_engine.errors import TracInError
from tracin_engine.gradients.per_example import GradientComputer

from models import SharedTable


def _linear(d_in=5, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).double()


def _exact_gn_linear(model: nn.Linear, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hessian (= Gauss-Newton: the model is linear) of the mean CE loss w.r.t. [W | b], row-major."""
    d_in = model.in_features

    def loss(theta):
        return F.cross_entropy(X @ theta[:, :d_in].T + theta[:, d_in], y)

    theta = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1)
    P = theta.numel()
    return hessian(loss)(theta).reshape(P, P)


def _fit(model, X, y, curvature="gn"):
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    layers = KronLayers(gc)
    state = gc.prepare(model.state_dict())
    return layers, fit_ekfac(layers, [state], as_source((X, y)), curvature, batch_size=7)


def test_single_example_ekfac_and_kfac_equal_exact_gn():
    model = _linear()
    X, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    exact = _exact_gn_linear(model, X, y)
    _, (curv,) = _fit(model, X, y)
    assert torch.allclose(curv.dense(), exact, atol=1e-10, rtol=1e-8)
    assert torch.allclose(curv.dense(kfac=True), exact, atol=1e-10, rtol=1e-8)


def test_eigenvalue_correction_beats_kfac_on_a_batch():
    model = _linear(6, 4, seed=1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    exact = _exact_gn_linear(model, X, y)
    _, (curv,) = _fit(model, X, y)
    err_ek = (curv.dense() - exact).norm()
    err_k = (curv.dense(kfac=True) - exact).norm()
    assert err_ek < 0.95 * err_k, (err_ek, err_k)
    assert err_ek / exact.norm() < 0.5
    # the diagonal in the eigenbasis is exact: Lambda_ij = q^T H q
    Q = torch.kron(curv.QS, curv.QA)
    assert torch.allclose(torch.diagonal(Q.T @ exact @ Q), curv.lam.flatten(), atol=1e-10)


@pytest.mark.parametrize("side", ["in", "out"])
def test_a_diagonal_factor_gives_the_exact_gauss_newton_diagonal_in_its_basis(side):
    """A factor kept as its diagonal (check_factor_memory, when the full one cannot fit) has the identity as its
    eigenbasis; the eigenvalue correction is still the exact Gauss-Newton diagonal in the basis Q_S (x) Q_A."""
    model = _linear(6, 4, seed=1)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (30,), generator=g)
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    layers = KronLayers(gc)
    setattr(layers.plans[0], f"diag_{side}", True)
    (curv,) = fit_ekfac(layers, [gc.prepare(model.state_dict())], as_source((X, y)), "gn", batch_size=7)
    assert (curv.QA is None) is (side == "in") and (curv.QS is None) is (side == "out")
    eye = torch.eye(4 if side == "out" else 7, dtype=torch.float64)
    Q = torch.kron(eye, curv.QA.contiguous()) if side == "out" else torch.kron(curv.QS.contiguous(), eye)
    exact = _exact_gn_linear(model, X, y)
    assert torch.allclose(torch.diagonal(Q.T @ exact @ Q), curv.lam.flatten(), atol=1e-10)
    assert torch.allclose(curv.dense(), Q @ torch.diag(curv.lam.flatten()) @ Q.T, atol=1e-12)


def test_mc_curvature_is_unbiased_estimate_of_gn():
    model = _linear(4, 3, seed=2)
    X = torch.randn(300, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(2))
    _, (gn,) = _fit(model, X, y, "gn")
    _, (mc,) = _fit(model, X, y, "mc")
    rel = (mc.dense() - gn.dense()).norm() / gn.dense().norm()
    assert rel < 0.3, rel


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 4, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_captured_factors_rebuild_exact_per_example_gradients_conv_and_linear():
    torch.manual_seed(0)
    model = _Conv().double()
    X = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    layers, _ = _factors_rebuild_gradients(model, X, y)
    gc = layers.grads
    flat = gc.reference(gc.prepare(model.state_dict()), X, y)
    assert torch.equal(layers.from_mats(layers.to_mats(flat)), flat)


def _factors_rebuild_gradients(model, X, y):
    """Asserts that the captured factors (a, g) of every layer rebuild the exact per-example gradients
    (sum_t g_t a_t^T against the float64 loop); returns (KronLayers, captured)."""
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    layers = KronLayers(gc)
    state = gc.prepare(model.state_dict())
    captured = layers.capture(state, X, y, "empirical")
    mats = [_one_hot_matrix(a, g, p.cols) if p.one_hot else torch.einsum("bkto,bti->boi", g, a)
            for p, (a, g) in zip(layers.plans, captured)]
    for m, r in zip(mats, layers.to_mats(gc.reference(state, X, y))):
        assert torch.allclose(m, r, atol=1e-10)
    return layers, captured


def _one_hot_matrix(ids, g, V):
    """sum_t g_t e_{x_t}^T (B, out, V) from an Embedding's captured ids (B, T) (-1: none) and g (B, 1, T, out)."""
    M = torch.zeros(g.shape[0], g.shape[-1], V, dtype=g.dtype)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] >= 0:
                M[b, :, ids[b, t]] += g[b, 0, t]
    return M


@pytest.mark.parametrize("kw", [dict(kind="LSTM"), dict(kind="GRU", layers=2, bidirectional=True),
                                dict(kind="RNN", packed=True), dict(kind="LSTM", batch_first=False, init_state=True)])
def test_captured_factors_of_recurrent_layers_rebuild_exact_per_example_gradients(kw):
    """nn.LSTM / GRU / RNN: each (layer, direction, side) is a Kronecker block with the time steps as positions
    (r_t the gate pre-activations' gradients, c_t the input or previous hidden state), through the hook
    path's unrolled recurrence; packed sequences and sequence-first included."""
    from models import Recurrent, token_batch

    torch.manual_seed(0)
    model = Recurrent(**kw).double()
    layers, _ = _factors_rebuild_gradients(model, token_batch(5, 7, 20), torch.randint(0, 3, (5,)))
    keys = [p.key for p in layers.plans if p.name == "rnn"]
    assert keys[:2] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"] and len(set(keys)) == len(keys)


class _Raw(nn.Module):
    """A parameter no layer handler covers (used directly in forward, like a ViT's cls_token)."""

    def __init__(self):
        super().__init__()
        self.gain, self.fc = nn.Parameter(torch.ones(3, 3)), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x @ self.gain)


class _Shifted(nn.Module):
    """A (1, 4) shift broadcast over the batch, as a ViT's pos_embed: per-example copies act per example."""

    def __init__(self):
        super().__init__()
        self.fc1, self.shift, self.fc2 = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 4)), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) + self.shift))


class _InPlace(_Raw):
    """_Raw through an in-place add into a fresh buffer: torch.func vmap cannot run it (VmapFailed)."""

    def forward(self, x):
        h = torch.zeros(x.shape[0], 3, dtype=x.dtype)
        h += x @ self.gain
        return self.fc(h)


def _generic_cases():
    from models import ChannelScaled, SumsScale, ViT

    return {   # model, X, y, whether per-example copies give the per-example gradients (broadcast.py)
        "vit": lambda: (ViT(dim=4, classes=3).double(), torch.randn(5, 3, 8, 8, dtype=torch.float64), True),
        "layer_scale": lambda: (ChannelScaled().double(), torch.randn(5, 6, 3, dtype=torch.float64), True),
        "summed": lambda: (SumsScale().double(), torch.randn(5, 3, dtype=torch.float64), False),
        "matrix": lambda: (_Raw().double(), torch.randn(5, 3, dtype=torch.float64), False),
        "diagonal": lambda: (ChannelScaled(True).double(), torch.randn(5, 6, 3, dtype=torch.float64), False),
        "no_vmap": lambda: (_InPlace().double(), torch.randn(5, 3, dtype=torch.float64), False),
    }


@pytest.mark.parametrize("route", ["vmap", "loop"])
@pytest.mark.parametrize("case", ["vit", "layer_scale", "summed", "matrix", "diagonal", "no_vmap"])
def test_parameters_without_a_handler_are_one_block_with_exact_pseudo_gradients(case, route, monkeypatch):
    """Parameters no layer handler covers (cls_token / pos_embed, a layer scale, a raw matrix) form one vector
    block; their per-example pseudo-gradients come from per-example copies in the batched pass where the model
    broadcasts them (checked against the reference on the first batch, then relied on), else from the reference
    (vmap of <f_b, u_bk>, or the loop over examples). Every way the captured factors rebuild the exact
    per-example gradients, batch after batch."""
    from tracin_engine.methods.generic_curvature import GenericPseudoGradients

    if route == "loop":
        monkeypatch.setattr(GenericPseudoGradients, "reference", GenericPseudoGradients.loop)
    torch.manual_seed(0)
    model, X, broadcast = _generic_cases()[case]()
    y = torch.randint(0, 2, (5,))
    layers, _ = _factors_rebuild_gradients(model, X, y)
    (gp,) = [p for p in layers.plans if p.generic]
    assert gp is layers.plans[-1] and gp.vector and gp.key.startswith("<no handler")
    assert layers.generic.broadcast is broadcast and gp.key not in layers.taps
    if route == "vmap":
        assert layers.generic.vmap is (case != "no_vmap")               # vmap where it runs, else the loop
    gc = layers.grads
    state = gc.prepare(model.state_dict())
    again = layers.capture(state, X[1:], y[1:], "empirical")[-1][1]           # the settled path
    assert torch.allclose(again[:, 0, 0], gp.mat(gc.reference(state, X[1:], y[1:]))[:, :, 0], atol=1e-10)


@pytest.mark.parametrize("model_cls", [_Shifted, "summed"])
def test_parameters_without_a_handler_get_their_exact_gauss_newton_block(model_cls):
    """With "gn" (K = 3 pseudo-gradients per example) the block's curvature is the exact Gauss-Newton block
    of those parameters, by copies (_Shifted) or by the loop (a scale summed before use)."""
    from models import SumsScale

    torch.manual_seed(0)
    model = (SumsScale() if model_cls == "summed" else model_cls()).double()
    X, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    layers, curv = _fit(model, X, y)
    name = "scale" if model_cls == "summed" else "shift"
    assert layers.plans[-1].generic and layers.generic.broadcast is (model_cls is _Shifted)
    assert torch.allclose(curv[-1].dense(), _exact_gn_block(model, [name], X, y), atol=1e-12, rtol=1e-9)


def test_unsupported_layers_are_named(monkeypatch):
    """Parameters without a handler beyond GENERIC_LIMIT numbers are refused by name and size; source_layers
    leaves them out."""
    from tracin_engine.methods import ekfac

    monkeypatch.setattr(ekfac, "GENERIC_LIMIT", 8)
    gc = GradientComputer(_Raw(), F.cross_entropy, device="cpu")
    with pytest.raises(TracInError, match=r"gain \(3, 3\) = 9 \(9 numbers without a layer handler; limit 8\).*"
                                          r"te.source_layers"):
        KronLayers(gc)
    assert te_source_layers(_Raw()) == ["fc"]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_a_cell_stepped_in_a_loop_has_its_calls_as_positions(kind):
    """nn.LSTMCell / GRUCell called once per step by the model's own loop: each call is recorded when it runs
    (the replaced forward keeps only its latest call), the calls side by side; exact per-example gradients."""
    from models import Stepped, token_batch

    torch.manual_seed(0)
    layers, captured = _factors_rebuild_gradients(Stepped(kind).double(), token_batch(5, 7, 20),
                                                  torch.randint(0, 3, (5,)))
    assert [p.key for p in layers.plans if p.name == "cell"] == ["cell.weight_ih", "cell.weight_hh"]
    assert captured[1][0].shape[1] == 7                              # seven calls: seven positions


class _TiedBag(nn.Module):
    """Token ids -> mean embedding -> scores against the same embedding (a tied output layer over V classes)."""

    def __init__(self, V=6, D=3):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids).mean(1)))


def test_a_tied_weight_is_one_block_with_its_exact_gauss_newton_curvature():
    """wte / lm_head sharing a weight: one vector block, its per-example gradient summed over both modules
    (rebuilds the exact gradients), its curvature the exact Gauss-Newton block (18 numbers: dense)."""
    torch.manual_seed(0)
    model = _TiedBag().double()
    ids, y = torch.tensor([[1, 2, 2], [3, 0, 5], [4, 4, 1], [5, 2, 0]]), torch.tensor([2, 0, 4, 1])
    layers, _ = _factors_rebuild_gradients(model, ids, y)
    assert len(layers.plans) == 1 and len(layers.plans[0].tied) == 2 and len(layers.taps) == 2
    _, (curv,) = _fit(model, ids, y)
    assert torch.allclose(curv.dense(), _exact_gn_block(model, ["emb.weight"], ids, y), atol=1e-12, rtol=1e-9)


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _exact_gn_block(model, names, X, y):
    """1/N sum_n J_n^T H_n J_n for the parameters `names` (J_n: the output's Jacobian in them), float64."""
    from torch.func import functional_call, jacrev

    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(theta, x):
        return functional_call(model, {**params, **dict(zip(names, theta))}, (x[None],))[0]

    theta = tuple(params[n] for n in names)
    total = 0
    for x, t in zip(X, y):
        J = torch.cat([j.reshape(j.shape[0], -1) for j in jacrev(out)(theta, x)], 1)       # (O, n)
        H = hessian(lambda o: F.cross_entropy(o[None], t[None]))(out(theta, x).detach())
        total = total + J.T @ H @ J
    return total / len(X)


@pytest.mark.parametrize("dense", [True, False])
def test_a_norm_layer_gets_its_exact_gauss_newton_block_or_its_diagonal(monkeypatch, dense):
    """A vector block (LayerNorm's weight and bias, 10 numbers) is one column: A = 1, S = E[sum_k v v^T] with
    v = J^T u_k, sum_k u_k u_k^T = H_out: the exact Gauss-Newton block of those parameters on any batch
    ("gn"); longer than VECTOR_DENSE, its diagonal."""
    from tracin_engine.methods import curvature_blocks

    if not dense:
        monkeypatch.setattr(curvature_blocks, "VECTOR_DENSE", 4)
    torch.manual_seed(0)
    model = _Normed().double()
    X, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    layers, curv = _fit(model, X, y)
    names = [p.name for p in layers.plans]
    assert names == ["fc1", "norm", "fc2"] and layers.plans[1].vector and layers.plans[1].diagonal is not dense
    exact = _exact_gn_block(model, ["norm.weight", "norm.bias"], X, y)
    want = exact if dense else torch.diag(torch.diagonal(exact))
    assert torch.allclose(curv[1].dense(), want, atol=1e-12, rtol=1e-9)
    # to_mats / from_mats round trip through the vector column
    flat = layers.grads.reference(layers.grads.prepare(model.state_dict()), X, y)
    assert torch.equal(layers.from_mats(layers.to_mats(flat)), flat)


def test_bad_curvature_name():
    model = _linear()
    X, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(TracInError, match="curvature must be one of"):
        _fit(model, X, y, "fisherish")


class _Attn(nn.Module):
    """Self-attention (batch first, a padding mask) then cross-attention to another sequence (seq first)."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(4, 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[:, -1] = True
        h, _ = self.self_attn(x, x, x, key_padding_mask=pad)
        m = x[:, :3].transpose(0, 1)
        h, _ = self.cross(h.transpose(0, 1), m, m, need_weights=False)
        return self.fc(h.transpose(0, 1).mean(1))


def test_captured_factors_rebuild_exact_per_example_gradients_attention():
    """nn.MultiheadAttention: the input projection's factors (a = the inputs at every query / key /
    value position, g = the projections' gradients, zero outside their third for cross-attention)
    and out_proj's rebuild the exact per-example gradients."""
    torch.manual_seed(0)
    model = _Attn().double()
    layers, _ = _factors_rebuild_gradients(model, torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    assert [p.name for p in layers.plans] == ["self_attn", "self_attn.out_proj", "cross", "cross.out_proj", "fc"]


class _SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):                       # x (B, T, 4) run sequence-first through fc1: (T, B, 5)
        return self.fc(torch.tanh(self.fc1(x.transpose(0, 1))).mean(0))


def test_captured_factors_of_a_sequence_first_layer_are_per_example():
    """A Linear run on (T, B, in) (T != B): its factors are regrouped by example, so they rebuild the
    exact per-example gradients (read batch-first they would mix the examples)."""
    torch.manual_seed(0)
    model = _SeqFirst().double()
    _, captured = _factors_rebuild_gradients(model, torch.randn(5, 6, 4, dtype=torch.float64),
                                             torch.randint(0, 3, (5,)))
    assert captured[0][0].shape[:2] == (5, 6)                     # (B, T, in + 1)


def test_a_sequence_first_layer_with_as_many_positions_as_examples_is_told_by_a_smaller_pass():
    """(T, B, in) with T == B reads as batch-first too; a forward over B - 1 examples tells the layout, which
    is kept for later batches (without it, the factors would be grouped by position, not by example)."""
    torch.manual_seed(0)
    model = _SeqFirst().double()
    layers, captured = _factors_rebuild_gradients(model, torch.randn(6, 6, 4, dtype=torch.float64),
                                                  torch.randint(0, 3, (6,)))
    assert layers.layouts == {"fc1": 1, "fc": 0}                  # SEQUENCE_FIRST, BATCH_FIRST
    with pytest.raises(TracInError, match=r"cannot tell how layer\(s\) \['fc1'\] hold a batch of 2 examples"):
        KronLayers(layers.grads).capture(layers.grads.prepare(model.state_dict()),
                                         torch.randn(2, 2, 4, dtype=torch.float64), torch.tensor([0, 1]), "empirical")


class _Folded(nn.Module):
    """The batch folded into positions around its first layer (OPT's MLP: hidden.reshape(-1, D))."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):                       # x (B, T, 4) -> (B T, 4) -> (B T, 5) -> (B, T, 5)
        h = torch.tanh(self.fc1(x.reshape(-1, 4))).reshape(x.shape[0], x.shape[1], 5)
        return self.fc(h.mean(1))


def test_captured_factors_of_a_layer_on_a_folded_batch_are_per_example():
    torch.manual_seed(0)
    model = _Folded().double()
    layers, captured = _factors_rebuild_gradients(model, torch.randn(5, 4, 4, dtype=torch.float64),
                                                  torch.randint(0, 3, (5,)))
    assert layers.layouts["fc1"] == 2 and captured[0][0].shape[:2] == (5, 4)    # FOLDED: (B, T, in + 1)


@pytest.mark.parametrize("B", [4, 3])           # T = 8: read as folded (8 = 2 x 4), or as 8 examples (8 != 3)
def test_a_layer_on_what_all_examples_share_joins_the_generic_block(B):
    """A layer whose output all examples share (BART's decoder positions) has no per-example factors: on the
    first capture it joins the block of parameters without a handler (pseudo-gradients by the per-example loop),
    and the captured factors rebuild the exact per-example gradients. After the plans are settled, or for a
    tied weight's use, it is refused by name with the source_layers filter that leaves it out."""
    torch.manual_seed(0)
    model = SharedTable(8).double()
    X, y = torch.randn(B, 8, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    layers, _ = _factors_rebuild_gradients(model, X, y)
    assert layers.exclude == {"pos"} and [p.key for p in layers.plans] == ["fc", "<no handler: pos.weight, pos.bias>"]
    assert layers.settled and layers.generic.broadcast is False
    late = KronLayers(layers.grads)
    late.settled = True                          # as if a first batch had settled the plans
    with pytest.raises(TracInError, match=r"layer\(s\) \['pos'\] does not hold the batch's.*te.source_layers"):
        late.capture(late.grads.prepare(model.state_dict()), X, y, "empirical")


class _Siamese(nn.Module):
    """One encoder (Linear, LayerNorm) run on both halves of each example, a head on the pair; `unused` never runs."""

    def __init__(self):
        super().__init__()
        self.enc, self.norm, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(8, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):                       # x (B, 2, 3): two views of an example
        a, b = (self.norm(torch.tanh(self.enc(x[:, i]))) for i in (0, 1))
        return self.head(torch.cat([a, b], 1))


def test_a_layer_called_twice_has_its_calls_positions_side_by_side_and_one_never_called_has_none():
    torch.manual_seed(0)
    model = _Siamese().double()
    X, y = torch.randn(5, 2, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    layers, captured = _factors_rebuild_gradients(model, X, y)
    names = [p.name for p in layers.plans]
    assert names == ["enc", "norm", "head", "unused"]
    assert captured[0][0].shape[:2] == (5, 2)                      # enc: two calls of one position each
    assert captured[3][1].abs().max() == 0                         # unused: no gradient
    _, curv = _fit(model, X, y)
    assert torch.allclose(curv[3].lam, torch.zeros_like(curv[3].lam))
    exact = _exact_gn_block(model, ["enc.weight", "enc.bias"], X, y)
    # K-FAC treats the calls as positions: not exact, but EK-FAC's diagonal in its basis is exact
    Q = torch.kron(curv[0].QS, curv[0].QA)
    perm = torch.cat([torch.arange(12).reshape(4, 3), torch.arange(12, 16)[:, None]], 1).flatten()
    assert torch.allclose(torch.diagonal(Q.T @ exact[perm][:, perm] @ Q), curv[0].lam.flatten(), atol=1e-12)


class _Bag(nn.Module):
    """Token ids (B, T) -> mean of their embeddings (padding_idx 0) -> tanh -> Linear."""

    def __init__(self, V=7, D=3):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, D, padding_idx=0), nn.Linear(D, 2)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids).mean(1)))


def _bag_data():
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [4, 1, 0, 0], [5, 6, 1, 2], [2, 0, 0, 0], [6, 6, 5, 1]])
    return ids, torch.tensor([0, 1, 1, 0, 1, 0])


def test_an_embedding_gets_token_counts_and_a_gradient_factor_with_exact_eigenvalues():
    """Embedding (V, D) taken transposed: A = token counts (diagonal, never V x V), S = E[c c^T] (D x D);
    the captured (ids, c) rebuild the per-example gradients; EK-FAC's eigenvalues are the exact
    Gauss-Newton block's diagonal in its basis; padding (id 0) gets nothing."""
    torch.manual_seed(0)
    model = _Bag().double()
    ids, y = _bag_data()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    layers = KronLayers(gc)
    plan = layers.plans[0]
    assert plan.one_hot and (plan.out_dim, plan.cols) == (3, 7)
    state = gc.prepare(model.state_dict())
    a, g = layers.capture(state, ids, y, "empirical")[0]
    assert torch.equal(a, ids.masked_fill(ids == 0, -1))
    rebuilt = _one_hot_matrix(a, g, 7)
    want = layers.to_mats(gc.reference(state, ids, y))[0]
    assert torch.allclose(rebuilt, want, atol=1e-12)
    _, curv = _fit(model, ids, y)
    c = curv[0]
    assert c.QA is None and torch.allclose(c.eig_A, torch.bincount(ids[ids > 0], minlength=7).double() / 4 / 6)
    exact = _exact_gn_block(model, ["emb.weight"], ids, y)                       # (V D), row-major (v, d)
    perm = torch.arange(21).reshape(7, 3).T.flatten()                              # -> (d, v) order
    Q = torch.kron(c.QS.contiguous(), torch.eye(7, dtype=torch.float64))
    assert torch.allclose(torch.diagonal(Q.T @ exact[perm][:, perm] @ Q), c.lam.flatten(), atol=1e-12)
    assert c.lam[:, 0].abs().max() == 0                                            # padding row: no curvature


def test_bart_with_every_layer_rebuilds_exact_per_example_gradients():
    """transformers' BART: its decoder's learned positions are looked up once for the batch ((1, T, D) from
    (B, T) ids) and join the generic block; the shared token embedding is a tied block; every block's captured
    factors rebuild the exact per-example gradients (float64 loop)."""
    T = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = T.BartConfig(vocab_size=30, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                       max_position_embeddings=16, num_labels=3)
    model = T.BartForSequenceClassification(cfg).double().eval()
    ids = torch.randint(3, 30, (4, 6))
    ids[:, -1] = cfg.eos_token_id
    layers, _ = _factors_rebuild_gradients(model, {"input_ids": ids}, torch.randint(0, 3, (4,)))
    assert layers.exclude == {"model.decoder.embed_positions"}
    assert "model.decoder.embed_positions.weight" in layers.plans[-1].key and any(p.tied for p in layers.plans)
