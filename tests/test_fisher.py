"""Sampled output Hessians (Loss.fisher_sample) and SOURCE's curvature on models with many outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

import tracin_engine as te
from tracin_engine.data import as_source
from tracin_engine.errors import TracInError
from tracin_engine.gradients.per_example import GradientComputer
from tracin_engine.losses import IGNORE, resolve_loss
from tracin_engine.methods import ekfac, ekfac_fit, output_curvature
from tracin_engine.methods.ekfac import KronLayers
from tracin_engine.methods.ekfac_fit import fit_ekfac

from models import CausalLM

DRAWS = 40000   # Monte-Carlo draws: the relative error of a mean of u u^T is about sqrt(2 / DRAWS) per entry scale


def _hessian(loss, out, y):
    """Per-example Hessian (O, O) of loss(out (1, ...), y (1, ...)) in the flattened output, float64."""
    shape = out.shape[1:]
    f = lambda o, t: loss(o.reshape(shape).unsqueeze(0), t.unsqueeze(0)).reshape(())  # noqa: E731
    return vmap(hessian(f))(out.reshape(len(out), -1), y)


def _second_moment(loss, out, y, seed=0):
    """Mean of u u^T over DRAWS samples of example 0's u (out, y repeated), (O, O)."""
    rep = (DRAWS,) + (1,) * (out.dim() - 1)
    u = loss.fisher_sample(out[:1].repeat(rep), y[:1].repeat((DRAWS,) + (1,) * (y.dim() - 1)),
                           torch.Generator().manual_seed(seed))
    u = u.reshape(DRAWS, -1)
    return u.T @ u / DRAWS


CASES = {
    # name: (loss, out (1, ...), y (1, ...))
    "classification": lambda g: ("classification", torch.randn(1, 5, generator=g, dtype=torch.float64),
                                 torch.tensor([3])),
    "soft labels": lambda g: ("classification", torch.randn(1, 4, generator=g, dtype=torch.float64),
                              torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)),
    "causal_lm": lambda g: ("causal_lm", torch.randn(1, 5, 4, generator=g, dtype=torch.float64),
                            torch.tensor([[1, 2, IGNORE, 3, 0]])),
    "masked_lm": lambda g: ("masked_lm", torch.randn(1, 4, 3, generator=g, dtype=torch.float64),
                            torch.tensor([[IGNORE, 2, 0, IGNORE]])),
    "regression": lambda g: ("regression", torch.randn(1, 3, 2, generator=g, dtype=torch.float64),
                             torch.randn(1, 3, 2, generator=g, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fisher_sample_second_moment_is_the_output_hessian(case):
    name, out, y = CASES[case](torch.Generator().manual_seed(1))
    loss = resolve_loss(name)
    H = _hessian(loss, out, y)[0]
    M = _second_moment(loss, out, y)
    rel = ((M - H).norm() / H.norm()).item()
    # each entry of M is a mean of DRAWS bounded products: relative error ~ sqrt(O / DRAWS) <= 0.03 here
    assert rel < 0.05, rel
    assert ((2 * M - H).norm() / H.norm()).item() > 0.5      # a factor-of-two error in the scale would show


def test_fisher_sample_is_zero_where_nothing_is_scored_and_sums_to_zero_over_the_vocabulary():
    _, out, y = CASES["causal_lm"](torch.Generator().manual_seed(2))
    u = resolve_loss("causal_lm").fisher_sample(out.repeat(3, 1, 1), y.repeat(3, 1), torch.Generator().manual_seed(0))
    # position t predicts token t + 1: t = 1 (its target is ignored) and t = 4 (the last) score nothing
    assert torch.equal(u[:, [1, 4]], torch.zeros_like(u[:, [1, 4]]))
    assert u[:, [0, 2, 3]].abs().min(-1).values.gt(0).all()
    assert torch.allclose(u.sum(-1), torch.zeros(3, 5, dtype=u.dtype), atol=1e-15)


def test_fisher_sample_is_none_for_a_custom_loss():
    out = torch.randn(2, 3)
    assert resolve_loss(F.mse_loss).fisher_sample(out, out, None) is None


def _block_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")]


def _lm_fit(curvature, n=48, seq=6, vocab=12, seed=0):
    torch.manual_seed(seed)
    model = CausalLM(vocab=vocab, dim=8, depth=1, seq=seq).double()
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    gc = GradientComputer(model, "causal_lm", device="cpu", layers=_block_linears(model))
    layers = KronLayers(gc)
    state = gc.prepare(model.state_dict())
    return layers, fit_ekfac(layers, [state], as_source(ids), curvature, batch_size=16)


def test_sampled_labels_give_the_gauss_newton_output_factors_of_a_language_model_on_average(monkeypatch):
    """Per layer, S = sum_k sum_t g g^T from curvature="mc" (one sampled label per position, no Hessian formed)
    averages to the exact Gauss-Newton S of curvature="gn" (72 backward passes: one per output); the
    empirical Fisher (true labels) is a different matrix."""
    layers, _ = _lm_fit("gn", n=4)
    gc = layers.grads
    state = gc.prepare(gc.model.state_dict())
    ids = torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(3))
    reps = 1000

    def S(captured, scale=1.0):
        return [torch.einsum("bkti,bktj->ij", g, g) / scale for _, g in captured]

    exact = S(layers.capture(state, ids, None, "gn"))
    empirical = S(layers.capture(state, ids, None, "empirical"))
    monkeypatch.setattr(output_curvature, "hessian", None)           # "mc" must not form the output Hessian
    sampled = S(layers.capture(state, ids.repeat(reps, 1), None, "mc", torch.Generator().manual_seed(0)), reps)
    for e, m, f in zip(exact, sampled, empirical):
        rel = ((m - e).norm() / e.norm()).item()
        assert rel < 0.05, rel                                         # Monte-Carlo error ~ 1 / sqrt(reps T)
        assert ((f - e).norm() / e.norm()).item() > 4 * rel


def test_auto_curvature_is_exact_for_few_outputs_and_sampled_for_many(monkeypatch):
    layers, _ = _lm_fit("gn", n=4)
    source = as_source(torch.randint(0, 12, (4, 6)))
    state = layers.grads.prepare(layers.grads.model.state_dict())
    assert layers.output_size(state, source) == 6 * 12
    assert ekfac.choose_curvature("auto", layers, state, source) == "mc"
    monkeypatch.setattr(output_curvature, "GN_OUTPUTS", 72)
    assert ekfac.choose_curvature("auto", layers, state, source) == "gn"
    with pytest.raises(TracInError, match="curvature must be one of"):
        ekfac.choose_curvature("fisher", layers, state, source)


def test_source_on_a_language_model_records_the_curvature_it_used():
    torch.manual_seed(0)
    model = CausalLM(vocab=40, dim=8, depth=1, seq=8).double()
    ids = torch.randint(0, 40, (10, 8))
    linear = _block_linears(model)
    ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 20)])
    tracin = te.TracIn(model, ckpts, loss_fn="causal_lm", layers=linear)
    index = tracin.index(ids, method="source", progress=False)
    assert index.settings.curvature == index.metadata()["curvature"] == "mc"   # 320 outputs per example
    scores = index.influence(ids[:2])
    assert scores.shape == (2, 10) and torch.isfinite(scores).all()
    again = tracin.index(ids, method="source", progress=False)             # same seed, same draws
    assert torch.equal(again.influence(ids[:2]), scores)


def test_a_hessian_that_cannot_fit_is_refused_before_it_is_formed(monkeypatch):
    torch.manual_seed(0)
    model = CausalLM(vocab=40, dim=8, depth=1, seq=8).double()
    ids = torch.randint(0, 40, (6, 8))

    def custom(out, y):                                                   # a causal LM loss the engine cannot name
        return F.cross_entropy(out[0, :-1], y[0, 1:])

    monkeypatch.setattr(output_curvature, "budget", lambda device: 2**20)   # 1 MiB: one 320 x 320 float64 Hessian
    gc = GradientComputer(model, custom, device="cpu", layers=["blocks.0.mlp.2"])
    layers = KronLayers(gc)
    state = gc.prepare(model.state_dict())
    for curvature in ("gn", "mc", "auto"):
        with pytest.raises(TracInError, match="Hessian of the loss in the model's 320 outputs.*curvature='empirical'"):
            fit_ekfac(layers, [state], as_source((ids, ids)), curvature, batch_size=6)
    named = GradientComputer(model, "causal_lm", device="cpu", layers=["blocks.0.mlp.2"])
    with pytest.raises(TracInError, match=r"320 outputs.*Use curvature='mc' \(or 'auto'\)"):
        fit_ekfac(KronLayers(named), [state], as_source(ids), "gn", batch_size=6)


def test_factors_that_cannot_fit_are_made_diagonal_then_refused_naming_the_largest_layer(monkeypatch):
    """Factors that do not fit: the largest square ones are kept as diagonals (one warning naming them) until
    the rest fits; when even all-diagonal factors cannot fit, refused naming the largest layers."""
    torch.manual_seed(0)
    model = CausalLM(vocab=40, dim=8, depth=1, seq=8).double()
    gc = GradientComputer(model, "causal_lm", device="cpu", layers=_block_linears(model))
    layers = KronLayers(gc)
    full = sum(p.factor_bytes for p in layers.plans)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ekfac_fit.check_factor_memory(layers)                                 # fits: nothing changes
    assert not any(p.diag_in or p.diag_out for p in layers.plans)
    monkeypatch.setattr(ekfac_fit, "budget", lambda device: full - 1)
    with pytest.warns(UserWarning, match=r"diagonal factors for blocks.0.mlp.2 \(33 inputs\)"):
        ekfac_fit.check_factor_memory(layers)
    assert [(p.key, p.diag_in, p.diag_out) for p in layers.plans if p.diag_in or p.diag_out] == \
        [("blocks.0.mlp.2", True, False)]                                 # its 33 x 33 A was the largest square
    assert sum(p.factor_bytes for p in layers.plans) <= full - 1
    monkeypatch.setattr(ekfac_fit, "budget", lambda device: 2_000)
    with pytest.raises(TracInError, match=r"factors need 9.7 KiB even with diagonal factors .* 2.0 KiB can be used; "
                                          r"the largest are blocks.0.mlp.0 \(32 x 9"):
        ekfac_fit.check_factor_memory(KronLayers(gc))


def test_source_on_a_transformers_llama_takes_every_layer():
    """Llama with nothing left out: its own RMSNorm class (probed handler) gets a curvature block, its
    embedding token counts and a (D x D) factor; the curvature is sampled (240 outputs per example)."""
    pytest.importorskip("transformers")
    from models import hf_llama, token_batch

    torch.manual_seed(0)
    model = hf_llama(vocab=30, dim=16, depth=1, heads=2, seq=8).double()
    ids = token_batch(8, 8, 30)
    ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 20)])
    assert len(te.source_layers(model)) == 12                               # every module with parameters
    tracin = te.TracIn(model, ckpts, loss_fn="causal_lm")
    layers = KronLayers(tracin.featurizer.grads)
    norms = [p.name for p in layers.plans if p.vector]
    assert len(norms) == 3 and all("norm" in n for n in norms), norms        # two per block, one final
    assert [p.name for p in layers.plans if p.one_hot] == ["model.model.embed_tokens"]
    index = tracin.index(ids, method="source", progress=False, batch_size=4)
    assert index.settings.curvature == "mc"
    scores = index.influence(ids[:3])
    assert torch.isfinite(scores).all()
    assert torch.allclose(torch.diagonal(scores[:, :3]).double(), index.self_influence()[:3], rtol=1e-6)


def test_source_on_a_transformers_gpt2_takes_its_tied_embedding_and_positions():
    """GPT-2 with every layer: the tied wte / lm_head is one block (its two uses' gradients summed; 480
    numbers: its exact block, beyond 1,024 its diagonal), the position embedding (ids (1, T) every example
    shares) gets per-example copies of its output."""
    pytest.importorskip("transformers")
    from models import hf_gpt2, token_batch

    torch.manual_seed(0)
    model = hf_gpt2(vocab=30, dim=16, depth=1, heads=2, seq=8).double()
    ids = token_batch(6, 8, 30)
    ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 20)])
    names = te.source_layers(model)                 # lm_head holds no parameter of its own: wte's is selected
    assert {n.rsplit(".", 1)[-1] for n in names} == {"wte", "wpe", "ln_1", "c_attn", "c_proj", "ln_2", "c_fc", "ln_f"}
    assert te.TracIn(model, ckpts, loss_fn="causal_lm", layers=names).featurizer.grads.param_names == \
        te.TracIn(model, ckpts, loss_fn="causal_lm").featurizer.grads.param_names
    tracin = te.TracIn(model, ckpts, loss_fn="causal_lm")
    layers = KronLayers(tracin.featurizer.grads)
    tied = [p for p in layers.plans if p.tied]
    assert len(tied) == 1 and tied[0].out_dim == 30 * 16 and tied[0].diagonal is False
    index = tracin.index(ids, method="source", progress=False, batch_size=3)
    assert torch.isfinite(index.influence(ids[:2])).all()


def test_labels_drawn_in_chunks_of_rows_are_the_same_draws(monkeypatch):
    import tracin_engine.losses as losses

    out, y = torch.randn(3, 7, 11, dtype=torch.float64), torch.randint(0, 11, (3, 7))
    whole = resolve_loss("causal_lm").fisher_sample(out, y, torch.Generator().manual_seed(5))
    monkeypatch.setattr(losses, "_CDF_NUMBERS", 25)                   # two rows of 11 classes at a time
    chunked = resolve_loss("causal_lm").fisher_sample(out, y, torch.Generator().manual_seed(5))
    assert torch.equal(whole, chunked) and whole.abs().sum() > 0
