"""Layer handlers against the float64 per-example loop: every kind, sequences with padding masks, repeated
tokens, padding_idx, norm layers in eval mode, tied weights; factored rows against the explicit
projection of exact gradients; the registry; the automatic fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.gradients.factored import FactoredProjection
from tracin_engine.gradients.handlers import VectorHandler, handler_for, register_handler
from tracin_engine.gradients.hooks import HookFeaturizer
from tracin_engine.gradients.per_example import GradientComputer

from models import HANDLER_CASES as MODELS
from models import ChannelLayerNorm2d, ChannelScaled, SumsScale


@pytest.mark.parametrize("name", list(MODELS))
def test_handlers_exact_and_factored_match_the_float64_loop(name):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    model, x, y, loss = MODELS[name]()
    gc = GradientComputer(model, loss, device="cpu")
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, x, y)                                        # (B, P) slow loop, float64
    hf = HookFeaturizer(gc)
    rows = hf(state, x, y)
    assert torch.allclose(hf.expand(rows), G, rtol=1e-9, atol=1e-12)
    assert torch.allclose(hf.layout.sq_norms(rows), (G * G).sum(1), rtol=1e-9)
    fp = FactoredProjection(gc, 512, seed=3)
    Z = fp(state, x, y)
    assert fp.layout.dim <= 512
    assert torch.allclose(fp.expand(Z), G @ fp.matrix(), rtol=1e-8, atol=1e-11)
    for path in (hf, fp):       # into a reused buffer (featurization's): every entry written, the same numbers
        want = path(state, x, y)   # (settled: the first batch took the generic block from vmap, later ones from copies)
        poisoned = torch.full_like(want, float("nan")).unsqueeze(0)
        got = path.many_with_outputs([state], x, y, rows_out=poisoned)[0]
        assert got is poisoned and torch.equal(got[0], want)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("gain", [0.0, float("inf")], ids=["by_positions", "dense"])
def test_factored_rows_by_positions_and_from_dense_gradients_agree(name, gain, monkeypatch):
    """Both ways of projecting a block (position by position, or from dW_b = R_b^T C_b: dense_route)
    give the explicit projection G P of the float64 loop's gradients; gain inf forces the dense way
    wherever it is allowed, 0 forbids it."""
    from tracin_engine.gradients import factored

    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    monkeypatch.setattr(factored, "DENSE_GAIN", {"cpu": gain})
    model, x, y, loss = MODELS[name]()
    gc = GradientComputer(model, loss, device="cpu")
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, x, y)
    fp = FactoredProjection(gc, 512, seed=3)
    routes = []
    real = FactoredProjection.dense_route
    monkeypatch.setattr(FactoredProjection, "dense_route",
                        lambda self, *a: routes.append(real(self, *a)) or routes[-1])
    Z = fp(state, x, y)
    assert torch.allclose(fp.expand(Z), G @ fp.matrix(), rtol=1e-8, atol=1e-11)
    # every case has a block the dense way can take, but the stepped cells' (one call per step, not per example)
    assert any(routes) == (gain > 0 and name not in ("lstm_cell_loop", "gru_cell_loop", "rnn_cell_relu_nobias"))


def test_tied_weights_sum_over_uses_and_last_layer_is_the_head():
    model, x, y, loss = MODELS["causal_lm_tied"]()
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]), loss_fn=loss,
                       layers="last")
    gc = tracin.featurizer.grads
    assert gc.param_names == ["wte.weight"]                          # lm_head's weight, under its first name
    assert [u.name for u in tracin.featurizer.hooks.blocks[0].uses] == ["wte", "lm_head"]
    state = gc.prepare(model.state_dict())
    assert torch.allclose(tracin.featurizer(state, x, y), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make,broadcast,names", [
    (lambda: MODELS["vit"]()[:3], True, ["cls_token", "pos_embed"]),
    (lambda: (SumsScale().double(), torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))), False,
     ["scale"]),
    (lambda: (ChannelScaled().double(), torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4,))),
     True, ["gamma"]),
    (lambda: (ChannelScaled(True).double(), torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4,))),
     False, ["gamma", "mix"])], ids=["vit", "summed", "layer_scale", "diagonal"])
def test_generic_path_covers_parameters_without_a_handler(make, broadcast, names):
    """Parameters no handler covers: per-example copies in the batched pass where the model broadcasts them
    ((B, ...) for a leading size 1, (B, 1, .., C) for a 1-D scale; checked against vmap on the first batch),
    vmap otherwise; both exact."""
    torch.manual_seed(0)
    model, x, y = make()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    hf = HookFeaturizer(gc)
    assert hf.generic is not None and hf.generic.params == names
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, x, y)
    for _ in range(2):                                  # the first batch checks, the second uses the result
        assert torch.allclose(hf.expand(hf(state, x, y)), G, rtol=1e-9, atol=1e-12)
    assert hf.broadcast is broadcast


class ScaleNorm(nn.Module):
    """A user's own layer (the docs/handlers.md example): y = g * x / ||x||, one scalar parameter."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True)


class ScaleNormHandler(VectorHandler):
    covers = ("g",)

    def capture(self, inputs, output):
        x = inputs[0].detach()
        return x / x.norm(dim=-1, keepdim=True)

    def vector(self, ctx, g):
        return (g * ctx).reshape(g.shape[0], -1).sum(1, keepdim=True)


def test_register_handler_for_a_user_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), ScaleNorm(), nn.Linear(5, 3)).double()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    assert HookFeaturizer(gc).generic.params == ["1.g"]              # before: the generic path
    register_handler(ScaleNorm, ScaleNormHandler)
    assert handler_for(model[1]) is ScaleNormHandler
    hf = HookFeaturizer(gc)
    assert hf.generic is None and [b.kind for b in hf.blocks] == ["kron", "vector", "kron"]
    state = gc.prepare(model.state_dict())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)
    with pytest.raises(te.TracInError, match="KronHandler or VectorHandler"):
        register_handler(ScaleNorm, object)


class DirectUse(nn.Module):
    """An embedding matrix also used outside its module (F.linear): hooks cannot see that use."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids).mean(1)))
        return F.linear(h, self.emb.weight)


class MixesBatch(nn.Module):
    """Each example's output depends on the batch's mean (a layer mixing the examples, in eval mode)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h + 0.5 * h.mean(0, keepdim=True))


class NoVmap(nn.Module):
    """.item() inside forward (torch.func cannot vmap it; the loop can) and a weight used outside its
    module (hooks cannot see that use)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x) * float(x.abs().max().item() > -1) + F.linear(x, self.fc.weight)


class UnusedHead(nn.Module):
    """A layer that never runs (zero gradients) next to one that does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.aux = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x)


def test_unused_layer_has_zero_gradients_on_the_hook_path():
    torch.manual_seed(0)
    model = UnusedHead().double()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    for hf in (HookFeaturizer(gc), FactoredProjection(gc, 16, seed=0)):
        rows = hf(state, x, y)
        G = gc.reference(state, x, y)
        want = G @ hf.matrix() if isinstance(hf, FactoredProjection) else G
        assert torch.allclose(hf.expand(rows), want, rtol=1e-9, atol=1e-12)


def test_a_weight_used_outside_its_layer_goes_generic_and_the_rest_stays_on_hooks():
    """DirectUse's embedding matrix also serves as an output layer through F.linear: its block's per-example
    sums miss that use, so the embedding alone takes the generic path (vmap restricted to it); exact, and the
    factored projection runs too."""
    torch.manual_seed(0)
    model = DirectUse().double()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    ids, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 10, (6,))
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    G = gc.reference(gc.prepare(model.state_dict()), ids, y)
    tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no fallback warning: nothing left the hook path
        index = tracin.index((ids, y), progress=False)
    assert tracin.featurizer.mode == "hooks"
    assert {p["layers"]: p["path"] for p in tracin.layer_paths()}["emb.weight"] == "generic: vmap"
    assert torch.allclose(tracin.featurizer.hooks.expand(index.features(0)), G, rtol=1e-9, atol=1e-12)
    proj = te.TracIn(model, ck, loss_fn=F.cross_entropy, proj_dim=16)
    rows = proj.index((ids, y), progress=False).features(0)
    assert proj.featurizer.projection_kind == "factored"
    assert torch.allclose(proj.featurizer.projection.expand(rows), G @ proj.featurizer.projection.matrix(),
                          rtol=1e-9, atol=1e-12)


def test_auto_fallbacks_warn_once_and_stay_exact():
    torch.manual_seed(0)
    model = MixesBatch().double()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    # exact, hooks refused on the first batch (example 0 alone differs) -> vmap, same scores as the loop
    tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy)
    with pytest.warns(UserWarning, match="torch.func vmap"):
        index = tracin.index((X, y), progress=False)
    assert tracin.featurizer.mode == "vmap"
    gc = tracin.featurizer.grads
    G = gc.reference(gc.prepare(model.state_dict()), X, y)
    assert torch.allclose(index.features(0), G, rtol=1e-9, atol=1e-12)
    # proj_dim set, projection="auto": factored refused -> the dense Gaussian projection, one warning
    with pytest.warns(UserWarning, match="dense Gaussian"):
        proj = te.TracIn(model, ck, loss_fn=F.cross_entropy, proj_dim=16)
        proj.index((X, y), progress=False)
    assert proj.featurizer.projection_kind == "gaussian"
    with pytest.raises(te.TracInError, match="factored' cannot handle this model"):
        te.TracIn(model, ck, loss_fn=F.cross_entropy, proj_dim=16, projection="factored").index((X, y), progress=False)
    # vmap fails -> the loop, with one warning, never an error naming per_example='loop'
    model = NoVmap().double()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = tracin.index((X, y), progress=False, batch_size=2)
    assert tracin.featurizer.mode == "loop"
    assert sum("per-example loop" in str(w.message) for w in caught) == 1
    gc = tracin.featurizer.grads
    assert torch.allclose(index.features(0), gc.reference(gc.prepare(model.state_dict()), X, y), rtol=1e-12)


def test_projection_auto_is_factored_where_handlers_cover():
    model = MODELS["resnet_bn"]()[0].float()
    t = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]), loss_fn=F.cross_entropy,
                  proj_dim=64)
    assert t.featurizer.projection_kind == "factored" and t.metadata()["projection"] == "factored"


def test_sequence_model_index_saves_and_reloads(tmp_path):
    """Linear layers on sequences are stored dense (rank > 1); a reopened index takes that layout back."""
    model, x, y, loss = MODELS["encoder_mask"]()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    for kw in ({}, {"proj_dim": 256}):
        index = te.TracIn(model, ck, loss_fn=loss, **kw).index((x, y), progress=False)
        path = index.save(tmp_path / f"ix{len(kw)}")
        again = te.GradientIndex.load(path, te.TracIn(model, ck, loss_fn=loss, **kw))
        assert torch.allclose(again.influence((x[:2], y[:2])), index.influence((x[:2], y[:2])), rtol=1e-9)


@pytest.mark.parametrize("name", ["lstm_2layer_bidir_state", "gru_2layer_bidir_state", "lstm_packed_bidir_state"])
def test_recurrent_layers_are_kron_blocks_per_layer_direction_and_side(name):
    """nn.LSTM / nn.GRU (any depth, both directions, an initial state from the input, packed sequences):
    every weight is its own Kronecker block (weight_ih / weight_hh of each layer and direction with its
    bias), none left to the generic per-example path; rows equal the float64 loop (also checked above)."""
    model, x, y, loss = MODELS[name]()
    gc = GradientComputer(model, loss, device="cpu")
    hf = HookFeaturizer(gc)
    state = gc.prepare(model.state_dict())
    rows = hf(state, x, y)
    rnn = [b for b in hf.blocks if b.uses and b.uses[0].name == "rnn"]
    assert all(b.kind == "kron" and b.has_bias and len(b.params) == 2 for b in rnn)
    names = sorted(b.params[0] for b in rnn)
    want = sorted(f"rnn.weight_{side}_l{l}{sfx}" for l in (0, 1) for sfx in ("", "_reverse") for side in ("ih", "hh"))
    assert names == want and not any(b.kind == "generic" for b in hf.blocks)
    assert torch.allclose(hf.expand(rows), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


def test_recurrent_layers_the_unroll_cannot_take_go_to_the_generic_path():
    """LSTM proj_size and dropout between layers in train mode: those parameters take the generic
    per-example path (exact), the rest of the model keeps its handlers."""
    from models import Recurrent, token_batch

    x, y = token_batch(4, 7, 20), torch.randint(0, 3, (4,))
    for kw, train in (({"proj_size": 3}, False), ({"num_layers": 2, "dropout": 0.5}, True)):
        torch.manual_seed(0)
        model = Recurrent("LSTM").double()
        model.rnn = nn.LSTM(5, 6, batch_first=True, **kw).double()
        model.head = nn.Linear(kw.get("proj_size", 6), 3).double()
        gc = GradientComputer(model, F.cross_entropy, device="cpu", train_mode=train)
        hf = HookFeaturizer(gc)
        generic = [b for b in hf.blocks if b.kind == "generic"]
        assert len(generic) == 1 and all(p.startswith("rnn.") for p in generic[0].params)
        assert len(generic[0].params) == len(list(model.rnn.parameters()))
        if not train:                              # (train mode: dropout draws differ between the two paths)
            state = gc.prepare(model.state_dict())
            assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


def test_recurrent_state_by_keyword_subclass_forward_and_a_wrong_kernel():
    """The hook path replaces the layer's forward for its pass, so an initial state passed by keyword
    (hx=...) is used (rows exact); a subclass with its own forward is left to the generic path; and a
    layer whose kernel computes something else than the documented cells is refused on its first call
    (the unroll is checked against the fused kernel once), after which per_example="auto" falls back
    with a warning to a path that is exact."""
    from models import Recurrent, token_batch

    class Keyword(Recurrent):
        def forward(self, ids):
            e = self.emb(ids)
            h = torch.tanh(self.init(e.mean(1))).reshape(len(ids), *self.shape).transpose(0, 1).contiguous()
            out, _ = self.rnn(e, hx=(h, torch.zeros_like(h)))
            return self.head(out.mean(1))

    class OwnForward(nn.LSTM):
        def forward(self, x, hx=None):
            out, state = super().forward(x, hx)
            return out * 2, state

    x, y = token_batch(4, 7, 20), torch.randint(0, 3, (4,))
    torch.manual_seed(0)
    model = Keyword("LSTM", init_state=True).double()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)

    model.rnn = OwnForward(5, 6, batch_first=True).double()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    assert [b.params[0] for b in HookFeaturizer(gc).blocks if b.kind == "generic"] == ["rnn.weight_ih_l0"]

    from tracin_engine.gradients.handlers import rnn as rnn_mod

    real = rnn_mod.cell_step
    torch.manual_seed(0)
    try:
        rnn_mod.cell_step = lambda mode, gi, gh, h, c: (real(mode, gi, gh, h, c)[0] * 1.01, None)   # a wrong cell
        _refused_then_auto_is_exact(Recurrent("GRU").double(), x, y, F.cross_entropy,
                                    "step-by-step recurrence does not reproduce the layer's output")
    finally:
        rnn_mod.cell_step = real


def _refused_then_auto_is_exact(model, x, y, loss, match):
    """The hook path refuses the model (Unsupported matching `match`); per_example="auto" then warns once
    and falls back to vmap / the loop, whose rows equal the float64 loop's."""
    from tracin_engine.gradients.hooks import Unsupported

    gc = GradientComputer(model, loss, device="cpu")
    with pytest.raises(Unsupported, match=match):
        HookFeaturizer(gc)(gc.prepare(model.state_dict()), x, y)
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=loss)
    with pytest.warns(UserWarning, match="per_example"):
        got = tracin.features((x, y))[0]
    assert tracin.featurizer.mode in ("vmap", "loop")
    assert torch.allclose(got.double(), gc.reference(tracin.state(0), x, y), rtol=1e-9, atol=1e-12)


def test_recurrence_check_tolerance_follows_the_dtype():
    """replaced.check_same_output: equal outputs pass; a 1e-3 relative difference (far above float32 rounding) is
    refused in float32 and float64; half precision allows 16 of its unit roundoffs."""
    from tracin_engine.gradients.handlers.replaced import check_same_output
    from tracin_engine.gradients.hooks import Unsupported

    lstm = nn.LSTM(2, 3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = torch.linspace(-2, 2, 12, dtype=dtype).reshape(2, 2, 3)
        check_same_output(lstm, out.clone(), out)
        off = out * (1 + 1e-3)
        if dtype == torch.bfloat16:
            check_same_output(lstm, off, out)
        else:
            with pytest.raises(Unsupported, match="does not reproduce"):
                check_same_output(lstm, off, out)


@pytest.mark.parametrize("kind, kw", [("LSTM", {"bias": False}), ("GRU", {"bias": False, "batch_first": False}),
                                      ("RNN", {"nonlinearity": "relu", "bias": False, "num_layers": 2,
                                               "bidirectional": True})],
                         ids=["lstm_nobias", "gru_nobias_seq_first", "rnn_relu_nobias_bidir"])
@pytest.mark.parametrize("B", [1, 3])
def test_recurrent_layers_without_bias_relu_and_one_example(kind, kw, B):
    from models import Recurrent, token_batch

    torch.manual_seed(0)
    model = Recurrent(kind).double()
    model.rnn = getattr(nn, kind)(5, 6, **({"batch_first": True} | kw)).double()
    model.head = nn.Linear(6 * (2 if kw.get("bidirectional") else 1), 3).double()
    model.batch_first = kw.get("batch_first", True)
    x, y = token_batch(B, 7, 20), torch.randint(0, 3, (B,))
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    assert all(b.kind == "kron" and not b.has_bias for b in hf.blocks if b.uses[0].name == "rnn")
    assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["lstm_cell_loop", "gru_cell_loop", "rnn_cell_relu_nobias"])
def test_recurrent_cells_stepped_in_a_loop_are_kron_blocks(name):
    """nn.LSTMCell / nn.GRUCell / nn.RNNCell called once per step of the model's own loop: weight_ih and
    weight_hh are two Kronecker blocks whose positions are the calls (rows equal the float64 loop)."""
    model, x, y, loss = MODELS[name]()
    gc = GradientComputer(model, loss, device="cpu")
    hf = HookFeaturizer(gc)
    state = gc.prepare(model.state_dict())
    rows = hf(state, x, y)
    cell = sorted(b.params[0] for b in hf.blocks if b.uses and b.uses[0].name == "cell")
    assert cell == ["cell.weight_hh", "cell.weight_ih"] and not any(b.kind == "generic" for b in hf.blocks)
    assert torch.allclose(hf.expand(rows), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["torch_encoder_padmask", "torch_encoder_seq_first", "mha_seq_first_weights",
                                  "torch_decoder_cross",
                                  "mha_cross_qkv"])
def test_attention_input_projection_is_a_kron_block_and_out_proj_a_linear(name):
    """nn.MultiheadAttention (inside nn.TransformerEncoder / DecoderLayer or called directly, batch first
    or not, weights asked for or not, self- or cross-attention): in_proj_weight with its bias is one
    Kronecker block, out_proj its own Linear block, nothing left to the generic path; the replaced forward
    was checked against PyTorch's once per layer; rows equal the float64 loop."""
    from tracin_engine.gradients.handlers.attention import AttentionHandler

    model, x, y, loss = MODELS[name]()
    gc = GradientComputer(model, loss, device="cpu")
    hf = HookFeaturizer(gc)
    state = gc.prepare(model.state_dict())
    rows = hf(state, x, y)
    attn = [u.handler for b in hf.blocks for u in b.uses if isinstance(u.handler, AttentionHandler)]
    mha = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == len(mha) >= 1 and all(h.replacement.verified for h in attn)
    names = {b.params[0]: b for b in hf.blocks}
    for n, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            assert names[f"{n}.in_proj_weight"].kind == "kron" and names[f"{n}.in_proj_weight"].has_bias
            assert names[f"{n}.out_proj.weight"].kind == "kron"
    assert not any(b.kind == "generic" for b in hf.blocks)
    assert torch.allclose(hf.expand(rows), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


def test_attention_the_handler_cannot_take_goes_generic_with_its_out_proj():
    """add_bias_kv, key / value dimensions other than E, attention dropout in train mode: the layer's
    parameters, out_proj's included (PyTorch reads out_proj.weight itself), take the generic path; the
    rest of the model keeps its handlers and the rows stay exact."""
    from models import Attending, token_batch

    x, y = token_batch(4, 7, 20), torch.randint(0, 3, (4,))
    for kw, train in (({"add_bias_kv": True}, False), ({"kdim": 6, "bias": False}, False),
                      ({"dropout": 0.5}, True)):
        torch.manual_seed(0)
        model = Attending("cross").double()
        model.body = nn.MultiheadAttention(8, 2, batch_first=True, **kw).double()
        model.key = nn.Linear(8, kw.get("kdim", 8)).double()
        gc = GradientComputer(model, F.cross_entropy, device="cpu", train_mode=train)
        hf = HookFeaturizer(gc)
        generic = [b for b in hf.blocks if b.kind == "generic"]
        assert len(generic) == 1 and sorted(generic[0].params) == sorted(f"body.{n}" for n, _ in
                                                                         model.body.named_parameters())
        assert {b.params[0] for b in hf.blocks if b.kind == "kron"} == {"emb.weight", "key.weight", "head.weight"}
        if not train:                              # (train mode: dropout draws differ between the two paths)
            state = gc.prepare(model.state_dict())
            assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)


def test_attention_replacement_that_differs_is_refused_then_auto_falls_back():
    """The replaced forward is checked against PyTorch's on its first call: an attention computing
    something else (scores scaled wrongly) stops the hook path, and per_example="auto" falls back with a
    warning to a path that is exact."""
    from tracin_engine.gradients.handlers import attention

    real = attention.attend
    try:
        attention.attend = lambda q, k, v, *a: real(q * 1.5, k, v, *a)
        _refused_then_auto_is_exact(*MODELS["torch_encoder_padmask"](),
                                    "unfused attention does not reproduce the layer's output")
    finally:
        attention.attend = real


class _SeqFirst(nn.Module):
    """Token ids (B, T) embedded, then sequence-first (T, B, E) through a Linear: its leading dimension
    is the positions, not the examples."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids).transpose(0, 1)))     # (T, B, 5)
        return self.head(h.mean(0))


def test_a_sequence_first_layer_whose_length_equals_the_batch_is_told_caught_or_known():
    """A sequence-first Linear ((T, B, E)) is handled as (B, T, E). With T == B the shapes cannot tell: a
    first batch is taken as batch-first, then a forward pass over its first B - 1 examples tells (the guess
    was wrong: the batch is redone); with B = 2 there is no such pass, and the check of example 0 against
    its own gradient refuses the hook path (per_example="auto" then falls back); a layer already seen
    sequence-first (an earlier batch of another size) stays so."""
    from tracin_engine.gradients.hooks import Unsupported
    from models import token_batch

    torch.manual_seed(0)
    model = _SeqFirst().double()
    x, y = token_batch(4, 4, 20), torch.randint(0, 3, (4,))
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)
    assert sorted(hf.layouts.values()) == [0, 0, 1]                   # emb and head batch-first, fc not
    x2, y2 = token_batch(2, 2, 20), y[:2]
    with pytest.raises(Unsupported, match="gradient of example 0 alone differs .* fc .*not batch-first"):
        HookFeaturizer(gc)(state, x2, y2)
    hf = HookFeaturizer(gc)
    assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)
    assert torch.allclose(hf.expand(hf(state, x2, y2)), gc.reference(state, x2, y2), rtol=1e-9, atol=1e-12)
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=F.cross_entropy)
    got = tracin.features((x2, y2))[0]           # the first batch refuses the hook path: auto falls back, exact
    assert tracin.featurizer.mode != "hooks"
    assert torch.allclose(got.double(), gc.reference(state, x2, y2), rtol=1e-5, atol=1e-7)


def test_library_patterns_take_their_handlers_and_layouts(monkeypatch):
    """Other libraries' layers by structure: the own RMSNorm, the channels-first LayerNorm subclass and the
    LayerScale get the probed affine-norm handler, the scaled embedding its scale, the mask-counted positions their ids;
    nothing is left generic; the folded Linears are read as folded. Windows whose shapes read both ways
    ((8, 4, 2D), 4 examples) are told by the pass over 3 examples; without it the check of example 0 refuses."""
    from tracin_engine.gradients.handlers.affine_norm import AffineNormHandler
    from tracin_engine.gradients.hooks import FOLDED, Unsupported

    for name in ("library_patterns", "library_patterns_ambiguous"):
        model, x, y, loss = MODELS[name]()
        gc = GradientComputer(model, loss, device="cpu")
        hf = HookFeaturizer(gc)
        kinds = {u.name: type(u.handler).__name__ for b in hf.blocks for u in b.uses}
        assert hf.generic is None
        assert kinds["norm"] == kinds["cnorm"] == kinds["scale"] == AffineNormHandler.__name__
        state = gc.prepare(model.state_dict())
        assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)
        assert float(hf.blocks[0].uses[0].handler.scale[0]) == pytest.approx(6 ** 0.5)
        folded = {u.name for b in hf.blocks for u in b.uses if hf.layouts.get(id(u)) == FOLDED}
        assert folded == {"fc", "win"}
    monkeypatch.setattr(HookFeaturizer, "_settle_layouts", lambda self, *a: False)
    with pytest.raises(Unsupported, match="gradient of example 0 alone differs .* win "):
        HookFeaturizer(gc)(state, x, y)


@pytest.mark.parametrize("name", ["torch_encoder_seq_first", "library_patterns", "hf_opt"])
def test_a_batch_of_one_after_regrouped_batches_is_exact(name):
    """A last batch of one example, after batches whose layers ran sequence-first or folded: exact, and the
    layouts learned are kept (the next full batch needs no settling)."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    model, x, y, loss = MODELS[name]()
    gc = GradientComputer(model, loss, device="cpu")
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    hf(state, x, y)
    learned = dict(hf.layouts)
    assert set(learned.values()) - {0}                                  # something ran regrouped
    for part in (slice(0, 1), slice(1, 2), slice(0, len(y))):
        got = hf.expand(hf(state, x[part], y[part]))
        assert torch.allclose(got, gc.reference(state, x[part], y[part]), rtol=1e-9, atol=1e-12)
    assert hf.layouts == learned


def test_grouped_convolutions_are_exact_vectors_not_generic():
    from tracin_engine.gradients.handlers.grouped_conv import GroupedConvHandler

    model, x, y, loss = MODELS["grouped_conv"]()
    hf = HookFeaturizer(GradientComputer(model, loss, device="cpu"))
    kinds = {u.name: (b.kind, type(u.handler)) for b in hf.blocks for u in b.uses}
    assert hf.generic is None
    assert {n for n, (k, h) in kinds.items() if h is GroupedConvHandler and k == "vector"} == {"dw", "gc", "c1"}
    assert kinds["pw"][0] == "kron"


def test_probed_norms_are_claimed_by_structure_only():
    """affine_norm.AffineNormHandler claims a module named *Norm with a 1-D weight (and bias), nothing else
    of its own and no sublayers; a batch norm of its own class in train mode is refused (batch statistics)."""
    from tracin_engine.gradients.handlers import handler_for
    from tracin_engine.gradients.handlers.affine_norm import AffineNormHandler

    class MyBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.register_buffer("running_mean", torch.zeros(4))

    class WithChild(PlainRMSNorm):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

    class Gate(PlainRMSNorm):
        pass

    assert handler_for(PlainRMSNorm()) is AffineNormHandler
    assert handler_for(WithChild()) is None and handler_for(Gate()) is None
    assert handler_for(PowerNorm()) is AffineNormHandler                # claimed; its first call refuses it
    assert handler_for(MyBatchNorm()) is AffineNormHandler
    assert AffineNormHandler.unsupported(MyBatchNorm(), train_mode=True) is not None
    assert AffineNormHandler.unsupported(MyBatchNorm(), train_mode=False) is None
    assert AffineNormHandler.unsupported(PlainRMSNorm(), train_mode=True) is None


class PlainRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Squash(nn.Module):
    """A user layer with a handler registered for it that cannot take this input (capture raises)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return torch.tanh(x) * self.weight


class BrokenHandler(VectorHandler):
    def capture(self, inputs, output):
        return inputs[0].reshape(-1, 3)          # 4 features do not reshape to 3: a RuntimeError from torch

    def vector(self, ctx, g):
        return ctx


def test_a_handler_failing_inside_its_hook_is_refused_then_auto_is_exact():
    """An exception from a handler's capture (not Unsupported: a RuntimeError from torch) stops the hook
    path with the layer named, and per_example="auto" falls back instead of stopping."""
    torch.manual_seed(0)
    register_handler(Squash, BrokenHandler)
    model = nn.Sequential(nn.Linear(3, 4), Squash(), nn.Linear(4, 2)).double()
    _refused_then_auto_is_exact(model, torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)),
                                F.cross_entropy, "handler of layer '1' \\(Squash\\) cannot take its input \\(RuntimeError")


class PowerNorm(nn.Module):
    """Named like a norm, but not affine in its weight: x ** (1 + w)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x):
        return x.abs() ** (1 + self.weight)


class Unrolled(nn.Embedding):
    """An Embedding subclass whose forward is not a lookup: the weight times a fixed matrix of the ids."""

    def forward(self, ids):
        return F.one_hot(ids, self.num_embeddings).to(self.weight.dtype).cumsum(1) @ self.weight


@pytest.mark.parametrize("layer,what", [(PowerNorm(), "an elementwise-affine scale does not reproduce"),
                                        (Unrolled(20, 4), "Unrolled: .* does not reproduce")])
def test_probed_layers_that_are_not_what_they_look_like_are_refused_then_auto_is_exact(layer, what):
    torch.manual_seed(0)
    first = nn.Embedding(20, 4) if isinstance(layer, PowerNorm) else layer
    model = nn.Sequential(first, *([layer] if first is not layer else []), nn.Flatten(), nn.Linear(28, 3)).double()
    x, y = torch.randint(1, 20, (4, 7)), torch.randint(0, 3, (4,))
    _refused_then_auto_is_exact(model, x, y, F.cross_entropy, what)


def test_batch_layouts_are_told_from_shapes_only_where_they_can_tell():
    """hooks.batch_layouts: (T, B, ...) with T != B is sequence-first; (B, T, ...) batch-first; (B k, ...)
    folded; T == B and (k B, B, ...) cannot be told (both, likelier first); a leading size 1 is an output
    shared by the batch (position embeddings), not T = 1; layers whose handler does not act position by
    position (convolutions) are always batch-first."""
    from tracin_engine.gradients.handlers import handler_for
    from tracin_engine.gradients.hooks import BATCH_FIRST as BF, FOLDED as FO, SEQUENCE_FIRST as SF, batch_layouts

    lin = handler_for(nn.Linear(4, 2))(nn.Linear(4, 2))
    conv = handler_for(nn.Conv1d(4, 2, 1))(nn.Conv1d(4, 2, 1))
    B = 3
    for shape, want in (((5, B), (SF,)), ((B, B), (BF, SF)), ((1, B), (BF,)), ((B, 5), (BF,)), ((2 * B, 5), (FO,)),
                        ((2 * B,), (FO,)), ((2 * B, B), (SF, FO)), ((B,), (BF,))):
        assert batch_layouts(lin, (torch.zeros(*shape, 4),), torch.zeros(*shape, 2), B) == want, shape
    for shape, want in (((5, 1), (FO,)), ((1, 5), (BF,)), ((5,), (FO,))):     # one example: all its positions
        assert batch_layouts(lin, (torch.zeros(*shape, 4),), torch.zeros(*shape, 2), 1) == want, shape
    assert batch_layouts(conv, (torch.zeros(5, B, 4),), torch.zeros(5, B, 2), B) == (BF,)
    # a Linear on a (T, in) table with in == out == B: its features are not a batch (sequence-first needs
    # (T, B, features)); an Embedding's (T, B) ids with a (T, B, D) output are sequence-first
    sq = handler_for(nn.Linear(B, B))(nn.Linear(B, B))
    assert batch_layouts(sq, (torch.zeros(5, B),), torch.zeros(5, B), B) == (BF,)
    emb = handler_for(nn.Embedding(9, 2))(nn.Embedding(9, 2))
    assert batch_layouts(emb, (torch.zeros(5, B, dtype=torch.long),), torch.zeros(5, B, 2), B) == (SF,)


def test_first_batch_check_tolerance_follows_dtype_and_tf32(monkeypatch):
    """The sum and example-0 checks allow rounding, not misattribution: 1e-8 in float64, 2e-3 in float32,
    3% for float32 on CUDA with TF32 on (a projected index's default there)."""
    from tracin_engine.gradients import hooks

    assert hooks.check_tolerance(torch.zeros(2, dtype=torch.float64)) == 1e-8
    assert hooks.check_tolerance(torch.zeros(2)) == 2e-3
    cuda_like = type("T", (), {"dtype": torch.float32, "is_cuda": True})()
    monkeypatch.setattr(hooks, "tf32_enabled", lambda: True)
    assert hooks.check_tolerance(cuda_like) == 64 * 2.0 ** -11
    monkeypatch.setattr(hooks, "tf32_enabled", lambda: False)
    assert hooks.check_tolerance(cuda_like) == 2e-3


class _SquareChannelsFirst(nn.Module):
    """A channels-first LayerNorm subclass on (B, C, H, W) with W == C: the last dimension and the channels
    both have the scale's size (ConvNeXt's stem norm with 8 channels on an 8 x 8 grid)."""

    def __init__(self, C=4):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)
        self.norm = ChannelLayerNorm2d(C)
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def test_a_channels_first_norm_on_a_square_grid_is_told_by_a_probe():
    """The probed norm tries distinct scales 1..C to tell which dimension its scale runs along (before, the
    last was taken, and the sum check sent the whole model to vmap); exact on the hook path."""
    from tracin_engine.gradients.handlers.affine_norm import AffineNormHandler

    torch.manual_seed(0)
    model = _SquareChannelsFirst().double()
    with torch.no_grad():
        model.norm.weight.copy_(torch.randn(4))                 # not all ones: a wrong dimension would show
    x, y = torch.randn(5, 3, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    hf = HookFeaturizer(gc)
    state = gc.prepare(model.state_dict())
    assert torch.allclose(hf.expand(hf(state, x, y)), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)
    (h,) = [u.handler for b in hf.blocks for u in b.uses if u.name == "norm"]
    assert isinstance(h, AffineNormHandler) and h.along == 1
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=F.cross_entropy)
    tracin.features((x, y))
    assert tracin.featurizer.mode == "hooks"
