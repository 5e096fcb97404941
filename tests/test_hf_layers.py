"""Layers of transformers models beyond the HANDLER_CASES basics, each against the float64 per-example loop:
mixture-of-experts weights and routers (experts.py), DeBERTa's relative-position projections (an output
shared by the batch that the model cannot take per example, a table read outside its layer: GenericLayers)
and wav2vec2's weight-normed positional convolution (a parametrized weight: generic)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.gradients.factored import FactoredProjection
from tracin_engine.gradients.handlers import handler_for
from tracin_engine.gradients.handlers.experts import ExpertsHandler, RouterHandler
from tracin_engine.gradients.hooks import HookFeaturizer
from tracin_engine.gradients.per_example import GradientComputer
from tracin_engine.methods.ekfac import KronLayers

from models import HFWrapper, hf_moe, lm_loss, token_batch

tr = pytest.importorskip("transformers")


def _lm_batch(n=3, seq=8, vocab=30):
    ids = token_batch(n, seq, vocab, pad=0)
    y = torch.cat([ids[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
    y[y == 0] = -100
    return ids, y


def _no_fallback(tracin, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)      # a fallback to vmap / the loop would warn
        return tracin.index(data, progress=False)


@pytest.mark.parametrize("pair_loop", [2048, 0], ids=["per_pair", "padded"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_experts_and_routers_are_claimed_by_structure_and_exact(kind, pair_loop, monkeypatch):
    """Exact rows by one product per (expert, example) pair or, past PAIR_LOOP pairs, per expert over padded
    slots; both equal the loop."""
    from tracin_engine.gradients.handlers import experts

    monkeypatch.setattr(experts, "PAIR_LOOP", pair_loop)
    torch.manual_seed(0)
    model = hf_moe(kind, seq=16).double().eval()
    ids, y = _lm_batch()
    gc = GradientComputer(model, lm_loss, device="cpu")
    hf = HookFeaturizer(gc)
    used = [type(u.handler) for b in hf.blocks for u in b.uses]
    assert used.count(ExpertsHandler) == 2 and used.count(RouterHandler) == 1 and hf.generic is None
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, ids, y)
    for _ in range(2):                                   # the first batch checks, the second trusts
        assert torch.allclose(hf.expand(hf(state, ids, y)), G, rtol=1e-9, atol=1e-12)
    fp = FactoredProjection(gc, 256, seed=1)
    assert torch.allclose(fp.expand(fp(state, ids, y)), G @ fp.matrix(), rtol=1e-8, atol=1e-11)


def test_experts_in_float32_with_the_default_grouped_mm_agree_with_the_loop():
    """transformers' default experts kernel (grouped_mm, float32 only): the handler recomputes the experts with
    F.linear; the rows agree with the float32 loop to float32 rounding."""
    torch.manual_seed(0)
    model = hf_moe("mixtral", seq=16, implementation="grouped_mm").float().eval()
    ids, y = _lm_batch()
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    tracin = te.TracIn(model, ck, loss_fn=lm_loss)
    index = _no_fallback(tracin, (ids, y))
    gc = tracin.featurizer.grads
    G = gc.reference(gc.prepare(model.state_dict()), ids, y)
    got = tracin.featurizer.hooks.expand(index.features(0))
    assert (got - G).norm() <= 1e-5 * G.norm()


def test_source_runs_on_a_mixture_of_experts_with_every_layer():
    torch.manual_seed(0)
    model = hf_moe("mixtral", seq=16).double().eval()
    ids, y = _lm_batch(6)
    ck = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 10)])
    tracin = te.TracIn(model, ck, loss_fn=lm_loss)
    index = tracin.index((ids, y), method="source", progress=False, batch_size=3)
    layers = KronLayers(tracin.featurizer.grads)
    assert {type(p.handler).__name__ for p in layers.plans if not p.generic} >= {"ExpertsHandler", "RouterHandler"}
    s = index.influence((ids, y))
    assert s.shape == (6, 6) and bool(torch.isfinite(s).all()) and bool((s.diagonal() != 0).all())


class ScaledRouter(nn.Module):
    """Named like a router, one (E, D) weight, but its first output is not x W^T: refused on the first call."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        logits = 2 * F.linear(x, self.weight)
        return logits, logits.softmax(-1)


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = ScaledRouter()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        logits, p = self.router(x)
        return self.head(p * logits)


def test_a_router_that_does_not_return_its_logits_first_is_refused_and_stays_exact():
    torch.manual_seed(0)
    model = Routed().double()
    assert handler_for(model.router) is RouterHandler
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]), loss_fn=F.cross_entropy)
    with pytest.warns(UserWarning, match="ScaledRouter"):
        index = tracin.index((X, y), progress=False)
    gc = tracin.featurizer.grads
    G = gc.reference(gc.prepare(model.state_dict()), X, y)
    assert tracin.featurizer.mode != "hooks" or {p["path"] for p in tracin.layer_paths()
                                                 if "router" in p["layers"]} == {"generic: vmap"}
    got = index.features(0) if tracin.featurizer.hooks is None else tracin.featurizer.hooks.expand(index.features(0))
    assert torch.allclose(got, G, rtol=1e-9, atol=1e-12)


def test_experts_of_another_layout_are_not_claimed():
    model = hf_moe("mixtral")
    experts = model.model.model.layers[0].mlp.experts
    assert handler_for(experts) is ExpertsHandler
    experts.has_bias = True                              # (gpt-oss style biases: not this handler's formula)
    assert handler_for(experts) is None


def _deberta():
    cfg = tr.DebertaV2Config(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32, num_labels=3, relative_attention=True,
                             position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return HFWrapper(tr.DebertaV2ForSequenceClassification(cfg))


def test_deberta_relative_positions_go_generic_and_the_rest_stays_on_hooks():
    """DeBERTa-v2 projects its relative-position table (1, 2S, D) by pos_key_proj / pos_query_proj and repeats
    it to the batch size: per-example copies of that output break the model, so those layers go generic
    (SharedInput); its rel_embeddings table is read as a weight outside its layer: generic too (the sums
    check). Everything else stays on the hook path; exact; SOURCE leaves the same layers out of EK-FAC."""
    torch.manual_seed(0)
    model = _deberta().double().eval()
    ids, y = token_batch(4, 8, 30, pad=0), torch.randint(0, 3, (4,))
    ck = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 10)])
    tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy)
    index = _no_fallback(tracin, (ids, y))
    generic = [n for p in tracin.layer_paths() if p["path"].startswith("generic") for n in p["params"]]
    assert "model.deberta.encoder.rel_embeddings.weight" in generic
    assert any("pos_key_proj" in n for n in generic) and not any("query_proj" in n and "pos_" not in n for n in generic)
    gc = tracin.featurizer.grads
    G = gc.reference(gc.prepare(model.state_dict()), ids, y)
    assert torch.allclose(tracin.featurizer.hooks.expand(index.features(0)), G, rtol=1e-9, atol=1e-12)
    source = tracin.index((ids, y), method="source", progress=False)
    assert bool(torch.isfinite(source.influence((ids, y))).all())


def test_a_weight_normed_grouped_convolution_goes_generic():
    """wav2vec2's positional convolution: groups > 1 and weight_norm (its weight is computed from
    parametrizations.weight.original0/1, not a parameter of the layer): the layer takes the generic path."""
    torch.manual_seed(0)
    cfg = tr.Wav2Vec2Config(conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                            num_labels=3, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, hidden_size=16,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    model = tr.Wav2Vec2ForSequenceClassification(cfg).double().eval()
    x, y = torch.randn(3, 400, dtype=torch.float64), torch.randint(0, 3, (3,))
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]),
                       loss_fn=F.cross_entropy, output_fn=lambda out: out.logits)
    index = _no_fallback(tracin, (x, y))
    generic = [n for p in tracin.layer_paths() if p["path"].startswith("generic") for n in p["params"]]
    assert "wav2vec2.encoder.pos_conv_embed.conv.bias" in generic
    assert any("parametrizations.weight.original1" in n for n in generic)
    gc = tracin.featurizer.grads
    G = gc.reference(gc.prepare(model.state_dict()), x, y)
    assert torch.allclose(tracin.featurizer.hooks.expand(index.features(0)), G, rtol=1e-9, atol=1e-12)
