"""SOURCE (source.py): the influence-function limit, matrix-exponential segment products, sign, API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, vmap

import tracin_engine as te
from tracin_engine.data import as_source
from tracin_engine.methods.ekfac import KronLayers
from tracin_engine.methods.ekfac_fit import fit_ekfac
from tracin_engine.methods.source import SourceIndex, spectral

D, K, N, M = 3, 2, 200, 30


def _blobs(n, seed):
    """Two weakly separated Gaussian classes: the regime where EK-FAC is close to the exact Hessian
    (with a well separated 3-class problem EK-FAC itself limits the agreement to Pearson ~0.92)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    means = 0.5 * torch.randn(K, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return means[y] + torch.randn(n, D, generator=g, dtype=torch.float64), y


def _fit(theta, X, y, iters=25):
    """Newton's method to the minimum of the mean CE loss (pseudo-inverse: softmax leaves a null space)."""
    theta = theta.clone()
    for _ in range(iters):
        H = hessian(_mean_loss)(theta, X, y).reshape(theta.numel(), -1)
        step = torch.linalg.pinv(H, rtol=1e-10) @ grad(_mean_loss)(theta, X, y).flatten()
        theta -= step.reshape(theta.shape)
    return theta


def _mean_loss(theta, X, y):
    return F.cross_entropy(X @ theta[:, :D].T + theta[:, D], y)


def _as_model(theta):
    model = nn.Linear(D, K).double()
    with torch.no_grad():
        model.weight.copy_(theta[:, :D])
        model.bias.copy_(theta[:, D])
    return model


@pytest.fixture(scope="module")
def logreg():
    X, y = _blobs(N, 0)
    Xt, yt = _blobs(M, 1)
    theta = _fit(torch.zeros(K, D + 1, dtype=torch.float64), X, y)
    assert grad(_mean_loss)(theta, X, y).norm() < 1e-10
    model = _as_model(theta)
    ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 1.0, 10**6)])
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    index = tracin.index((X, y), method="source", segments=1, progress=False)
    return dict(X=X, y=y, Xt=Xt, yt=yt, theta=theta, tracin=tracin, index=index)


def _per_example_grads(theta, X, y):
    return vmap(grad(lambda t, x, yy: _mean_loss(t, x[None], yy[None])), (None, 0, 0))(theta, X, y).flatten(1)


def test_long_horizon_single_segment_matches_exact_influence_function(logreg):
    theta, X, y = logreg["theta"], logreg["X"], logreg["y"]
    H = hessian(_mean_loss)(theta, X, y).reshape(K * (D + 1), -1)
    G, Gt = _per_example_grads(theta, X, y), _per_example_grads(theta, logreg["Xt"], logreg["yt"])
    exact = Gt @ torch.linalg.pinv(H, rtol=1e-10) @ G.T / N
    scores = logreg["index"].influence((logreg["Xt"], logreg["yt"]))
    r = np.corrcoef(scores.flatten().numpy(), exact.flatten().numpy())[0, 1]
    assert r >= 0.99, r
    assert 0.8 < (scores * exact).sum() / exact.pow(2).sum() < 1.2   # same scale, not only correlated


def test_positive_score_means_removal_raises_test_loss(logreg):
    X, y, theta = logreg["X"], logreg["y"], logreg["theta"]
    xt, yt = logreg["Xt"][:1], logreg["yt"][:1]
    scores = logreg["index"].influence((xt, yt))[0]
    order = scores.argsort()
    picks = order[-3:].tolist() + order[:3].tolist()           # top proponents, top opponents
    base = _mean_loss(theta, xt, yt)
    actual = []
    for z in picks:
        keep = torch.arange(N) != z
        actual.append(float(_mean_loss(_fit(theta, X[keep], y[keep], 10), xt, yt) - base))
    actual = torch.tensor(actual)
    assert (actual[:3] > 0).all() and (actual[3:] < 0).all(), (scores[picks], actual)
    assert np.corrcoef(scores[picks].numpy(), actual.numpy())[0, 1] > 0.9


def test_self_influence_is_diagonal_of_scores_on_training_data(logreg):
    index = logreg["index"]
    S = index.influence((logreg["X"], logreg["y"]))
    assert torch.allclose(torch.diagonal(S).double(), index.self_influence(), rtol=1e-6, atol=1e-12)
    assert index.self_influence_per_checkpoint().shape == (1, N)
    # outliers of a SOURCE index rank by SOURCE(z, z); it records no output norms, and says so
    ranked = index.outliers(space="parameters")
    assert torch.equal(ranked.indices, torch.argsort(index.self_influence(), descending=True, stable=True))
    with pytest.raises(te.TracInError, match="SourceIndex has no output-space self-influence"):
        index.outliers()


def test_top_k_and_prediction_target_and_save_load(logreg, tmp_path):
    index, test = logreg["index"], (logreg["Xt"], logreg["yt"])
    S = index.influence(test)
    top = index.top_k(test, k=4)
    assert torch.equal(top.proponents.indices, S.topk(4, dim=1).indices)
    assert index.influence((logreg["Xt"],), target="prediction").shape == (M, N)
    index.save(tmp_path / "src")
    again = SourceIndex.load(tmp_path / "src", logreg["tracin"])
    assert torch.allclose(again.influence(test), S)
    assert torch.allclose(again.self_influence(), index.self_influence())
    logreg["tracin"].index((logreg["X"], logreg["y"]), method="source", store=tmp_path / "disk",
                           progress=False)
    assert torch.allclose(SourceIndex.load(tmp_path / "disk", logreg["tracin"]).influence(test), S)


def test_projected_source_approximates_exact(logreg):
    tr = logreg["tracin"]
    proj = te.TracIn(tr.model, tr.checkpoints, loss_fn=F.cross_entropy, proj_dim=4000, device="cpu")
    pidx = proj.index((logreg["X"], logreg["y"]), method="source", progress=False)
    test = (logreg["Xt"], logreg["yt"])
    r = np.corrcoef(pidx.influence(test).flatten(), logreg["index"].influence(test).flatten())[0, 1]
    assert r > 0.97, r


# -- several segments against a direct matrix-exponential computation ------------------------------

def _tiny_run(norm=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4) if norm else nn.Identity(), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    items = []
    for c, (step, lr) in enumerate([(5, 0.5), (10, 0.5), (20, 0.3), (30, 0.3)]):
        sd = {k: v + 0.2 * c * torch.randn_like(v) for k, v in model.state_dict().items()}
        items.append(te.Checkpoint(sd, lr, step, {"momentum": 0.5, "optimizer": "SGD"}))
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, te.Checkpoints(items), X, y


def _matrix_exponential_reference(tracin, ckpts, X, y, segments):
    """v(z) (n, P) by direct matrix exponentials of each segment's EK-FAC matrix (flat parameter order):
    segments = [(checkpoint indices, K, eta)], momentum 0.5."""
    gc = tracin.featurizer.grads
    layers = KronLayers(gc)
    P = gc.num_params
    v = torch.zeros(P, len(X), dtype=torch.float64)
    for seg, steps, lr in segments:
        states = [gc.prepare(ckpts.load(c)) for c in seg]
        curv = fit_ekfac(layers, states, as_source((X, y)), "gn", batch_size=5)
        to_layer = [m.reshape(P, -1) for m in layers.to_mats(torch.eye(P, dtype=torch.float64))]   # plans settled
        H = sum(T @ cv.dense() @ T.T for T, cv in zip(to_layer, curv))            # flat parameter order
        c = lr * steps / (1 - 0.5)
        S = torch.linalg.matrix_exp(-c * H)
        aug = torch.zeros(2 * P, 2 * P, dtype=torch.float64)
        aug[:P, :P], aug[:P, P:] = -H, torch.eye(P, dtype=torch.float64)
        R = torch.linalg.matrix_exp(c * aug)[:P, P:]        # int_0^c exp(-tH) dt = (I - exp(-cH)) H^-1
        g = sum(gc.reference(s, X, y) for s in states).T / len(seg)
        v = S @ v + R @ g / len(X)
    return v.T


@pytest.mark.parametrize("norm", [False, True])
def test_segment_products_match_matrix_exponential(norm):
    model, ckpts, X, y = _tiny_run(norm)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    index = tracin.index((X, y), method="source", segments=2, progress=False, batch_size=5)
    assert index.settings.steps == (10, 20)
    want = _matrix_exponential_reference(tracin, ckpts, X, y, [((0, 1), 10, 0.5), ((2, 3), 20, 0.3)])
    assert torch.allclose(index.features(0), want, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind", ["resnet", "grouped", "vit"])
def test_source_takes_every_layer_without_layers(kind):
    """A ResNet with BatchNorm (eval mode), a model of grouped convolutions and a ViT run SOURCE with every
    parameter selected: the norms and grouped convolutions get their own curvature blocks (VectorHandler), the
    ViT's cls_token and pos_embed (no layer handler) one block together (generic_curvature.py)."""
    from models import Grouped, ResNet, ViT

    torch.manual_seed(0)
    model = {"resnet": lambda: ResNet(width=2, blocks=(1, 1), classes=3), "grouped": Grouped,
             "vit": lambda: ViT(dim=4, classes=3)}[kind]().double().eval()
    X = torch.randn(10, 4 if kind == "grouped" else 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    items = []
    for c, (step, lr) in enumerate([(10, 0.5), (20, 0.5)]):
        sd = {k: (v + 0.1 * c * torch.randn_like(v)) if v.is_floating_point() and "running" not in k else v
              for k, v in model.state_dict().items()}
        items.append(te.Checkpoint(sd, lr, step, {"momentum": 0.5, "optimizer": "SGD"}))
    ckpts = te.Checkpoints(items)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    index = tracin.index((X, y), method="source", progress=False, batch_size=5)
    layers = KronLayers(tracin.featurizer.grads)
    assert any(p.vector for p in layers.plans) and sum(p.out_dim * p.cols for p in layers.plans) == layers.num_params
    assert any(p.generic for p in layers.plans) is (kind == "vit")
    want = _matrix_exponential_reference(tracin, ckpts, X, y, [((0, 1), 20, 0.5)])
    assert torch.allclose(index.features(0), want, rtol=1e-7, atol=1e-12 * float(want.abs().max()))


def test_a_float32_model_fits_in_float32_and_agrees_with_float64():
    """Per-batch products of a float32 model's fit run in float32 (sums over batches, eigendecompositions and
    v(z) in float64): SOURCE of the same weights in float32 and float64 agree to float32 accuracy."""
    model, ckpts, X, y = _tiny_run(norm=True)
    got = {}
    for dtype in (torch.float64, torch.float32):
        cks = te.Checkpoints([te.Checkpoint({k: v.to(dtype) for k, v in ckpts.load(c).items()}, ckpts[c].learning_rate,
                                            ckpts[c].step, dict(ckpts[c].extra)) for c in range(len(ckpts))])
        tracin = te.TracIn(model.to(dtype), cks, loss_fn=F.cross_entropy, device="cpu")
        got[dtype] = tracin.index((X.to(dtype), y), method="source", segments=2, progress=False,
                                  batch_size=5).features(0).double()
    err = (got[torch.float32] - got[torch.float64]).norm() / got[torch.float64].norm()
    assert 0 < err < 1e-5, err                # float32 rounding, not a different computation


def test_source_with_diagonal_factors_matches_matrix_exponentials(monkeypatch):
    """A factor too large for memory is kept as its diagonal (identity eigenbasis on that side); SOURCE's
    rotations take it (source_update) and equal direct matrix exponentials of that EK-FAC matrix."""
    from tracin_engine.methods import ekfac_fit

    model, ckpts, X, y = _tiny_run()
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    full = sum(p.factor_bytes for p in KronLayers(tracin.featurizer.grads).plans)
    monkeypatch.setattr(ekfac_fit, "budget", lambda device: full - 1)
    with pytest.warns(UserWarning, match=r"diagonal factors for 3 \(5 inputs\)"):
        index = tracin.index((X, y), method="source", segments=2, progress=False, batch_size=5)
    with pytest.warns(UserWarning, match="diagonal factors"):                # the reference fits the same way
        want = _matrix_exponential_reference(tracin, ckpts, X, y, [((0, 1), 10, 0.5), ((2, 3), 20, 0.3)])
    assert torch.allclose(index.features(0), want, rtol=1e-7, atol=1e-12)


def test_source_fits_in_ieee_and_computes_rows_under_the_tracin_tf32_policy(monkeypatch):
    """On CUDA float32 products may use TF32: the curvature fit never does (tf32_mode(False)); the rows follow
    the TracIn's policy (tf32=True here), as its own rows do. Checked by the modes active inside each call."""
    from contextlib import contextmanager

    from tracin_engine.methods import source as source_mod

    active, seen = [], {}
    real_mode, real_fit, real_grads = source_mod.tf32_mode, source_mod.fit_ekfac, source_mod.flat_gradients

    @contextmanager
    def mode(enabled):
        active.append(enabled)
        try:
            with real_mode(enabled):
                yield
        finally:
            active.pop()

    def fit(*a, **k):
        seen.setdefault("fit", list(active))
        return real_fit(*a, **k)

    def grads(*a, **k):
        seen.setdefault("rows", list(active))
        return real_grads(*a, **k)

    monkeypatch.setattr(source_mod, "tf32_mode", mode)
    monkeypatch.setattr(source_mod, "fit_ekfac", fit)
    monkeypatch.setattr(source_mod, "flat_gradients", grads)
    model, ckpts, X, y = _tiny_run()
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, tf32=True)
    tracin.index((X, y), method="source", segments=2, progress=False, batch_size=5)
    assert seen == {"fit": [False], "rows": [True]}


def test_spectral_functions_are_stable():
    s = torch.tensor([0.0, 1e-300, 1e-12, 1.0, 1e6], dtype=torch.float64)
    decay, gain = spectral(s, 50.0)
    assert torch.isfinite(gain).all() and torch.isfinite(decay).all()
    assert gain[0] == 50.0 and torch.isclose(gain[1], torch.tensor(50.0, dtype=torch.float64))
    assert torch.isclose(gain[2], torch.tensor(50.0, dtype=torch.float64), rtol=1e-9)
    assert torch.isclose(gain[3], torch.tensor(1 - np.exp(-50.0), dtype=torch.float64))
    assert gain[4] == 1e-6 and decay[4] == 0 and decay[0] == 1


def test_errors():
    model, ckpts, X, y = _tiny_run()
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    with pytest.raises(te.TracInError, match="not divisible by segments=3; use one of \\[1, 2, 4\\]"):
        tracin.index((X, y), method="source", segments=3, progress=False)
    with pytest.raises(te.TracInError, match="method must be 'tracin' or 'source'"):
        tracin.index((X, y), method="sauce", progress=False)
    no_steps = te.Checkpoints([te.Checkpoint(ckpts.load(0), 0.1, None)])
    with pytest.raises(te.TracInError, match="step of every checkpoint"):
        te.TracIn(model, no_steps, loss_fn=F.cross_entropy).index((X, y), method="source", progress=False)
    with pytest.raises(te.TracInError, match="positive integers"):
        tracin.index((X, y), method="source", segments=2, steps=[3, 0], progress=False)


def test_regression_loss_and_mc_curvature_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    X, Y = torch.randn(20, 3), torch.randn(20, 2)
    ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 50)])
    tracin = te.TracIn(model, ckpts, loss_fn=F.mse_loss, device="cpu")
    for curvature in ("gn", "mc", "empirical"):
        S = tracin.index((X, Y), method="source", curvature=curvature, progress=False).influence((X[:4], Y[:4]))
        assert S.shape == (4, 20) and torch.isfinite(S).all()
        assert (torch.diagonal(S[:, :4]) > 0).all()   # an example supports its own fit


def test_cnn_end_to_end_conv_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    states = [{k: v + 0.1 * c * torch.randn_like(v) for k, v in model.state_dict().items()} for c in range(2)]
    ckpts = te.Checkpoints.from_state_dicts(states, [0.1, 0.1], steps=[20, 40])
    X, y = torch.randn(60, 1, 8, 8), torch.randint(0, 5, (60,))
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    index = tracin.index((X, y), method="source", segments=2, progress=False)
    S = index.influence((X[:20], y[:20]))
    assert S.shape == (20, 60) and torch.isfinite(S).all()
    assert torch.allclose(torch.diagonal(S[:, :20]).double(), index.self_influence()[:20], rtol=1e-4, atol=1e-9)
    assert (index.self_influence() > 0).float().mean() > 0.9


def test_steps_learning_rates_and_momentum_come_from_the_recorder(tmp_path):
    from tracin_engine.examples import MLP, train

    torch.manual_seed(0)
    model = MLP(6, 3, hidden=5)
    X, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    train(model, (X, y), tmp_path, epochs=2, n_checkpoints=2, lr=0.1, momentum=0.5, batch_size=25, lr_decay=0.5)
    ckpts = te.Checkpoints.from_dir(tmp_path)
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), method="source", segments=2,
                                                                    progress=False)
    assert index.settings.steps == (4, 4)
    assert index.settings.horizons == pytest.approx([0.1 * 4 / 0.5, 0.05 * 4 / 0.5])


def _jittered_checkpoints(model) -> te.Checkpoints:
    """Two checkpoints (steps 10, 20; learning rate 0.5, momentum 0.5): the weights plus 0.1 c noise."""
    return te.Checkpoints([te.Checkpoint({k: v + 0.1 * c * torch.randn_like(v) for k, v in model.state_dict().items()},
                                         0.5, s, {"momentum": 0.5, "optimizer": "SGD"}) for c, s in enumerate((10, 20))])


def _assert_source_matches_matrix_exponentials(model, X, y, segments, batch_size):
    ckpts = _jittered_checkpoints(model)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    index = tracin.index((X, y), method="source", segments=len(segments), progress=False, batch_size=batch_size)
    want = _matrix_exponential_reference(tracin, ckpts, X, y, segments)
    assert torch.allclose(index.features(0), want, rtol=1e-7, atol=1e-12 * float(want.abs().max()))


def test_source_with_an_embedding_matches_matrix_exponentials():
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_ekfac import _Bag, _bag_data

    torch.manual_seed(0)
    ids, y = _bag_data()
    _assert_source_matches_matrix_exponentials(_Bag().double(), ids, y, [((0,), 10, 0.5), ((1,), 10, 0.5)], 5)


def test_source_with_an_lstm_matches_matrix_exponentials():
    from models import Recurrent, token_batch

    torch.manual_seed(0)
    model = Recurrent("LSTM", vocab=12, dim=3, hidden=4).double()
    _assert_source_matches_matrix_exponentials(model, token_batch(6, 5, 12), torch.randint(0, 3, (6,)),
                                               [((0, 1), 20, 0.5)], 4)


def test_source_with_a_layer_on_shared_positions_matches_matrix_exponentials():
    """A Linear on a position table all examples share (no per-example factors) joins the generic block."""
    from models import SharedTable

    torch.manual_seed(0)
    model = SharedTable(6).double()
    _assert_source_matches_matrix_exponentials(model, torch.randn(10, 6, 4, dtype=torch.float64),
                                               torch.randint(0, 3, (10,)), [((0, 1), 20, 0.5)], 4)


def model_numel(model):
    return sum(p.numel() for p in model.parameters())


def test_factored_projection_of_source_rows_is_the_projection_matrix_applied_to_exact_rows(tmp_path):
    """With a factored projection, v(z) (and the test gradients) are projected block by block
    (FactoredProjection.project_flat): equal to the exact SOURCE rows times the projection's matrix; scores
    close to the exact ones; a store reopened by a fresh TracIn takes the stored allocation."""
    from models import ResNet

    torch.manual_seed(0)
    model = ResNet(width=2, blocks=(1, 1), classes=3).double().eval()
    X, y = torch.randn(12, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (12,))
    ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 30, {"momentum": 0.0})])
    exact = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index((X, y), method="source", progress=False)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=256, projection="factored")
    index = tracin.index((X, y), method="source", progress=False, store=tmp_path / "src")
    fp = tracin.featurizer.projection
    assert tracin.settings().projection == "factored" and fp.calibrated
    assert type(tracin.featurizer.exact_path()).__name__ == "HookFeaturizer"     # exact v(z) from the hooks
    M = fp.matrix()                                                      # (P, D), the explicit projection
    assert index.store.dim == fp.expanded_dim == M.shape[1] < model_numel(model)
    torch.testing.assert_close(index.features(0), exact.features(0) @ M, rtol=1e-9, atol=1e-12)
    test = (X[:4], y[:4])
    torch.testing.assert_close(index.test_features(test)[0], exact.test_features(test)[0] @ M, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(index.self_influence(), exact.self_influence())   # from the exact vectors
    r = np.corrcoef(index.influence(test).flatten(), exact.influence(test).flatten())[0, 1]
    assert r > 0.9, r
    fresh = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=256, projection="factored")
    again = SourceIndex.load(tmp_path / "src", fresh)
    torch.testing.assert_close(again.influence(test), index.influence(test))
