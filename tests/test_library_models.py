"""Models as people get them from `transformers` (small configs, nothing downloaded) and `peft` (LoRA
adapters): every architecture below takes the hook path (no refusal, nothing generic but the few parameters named), its exact rows equal
the float64 per-example loop and its factored rows the explicit projection of those gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tracin_engine.gradients.factored import FactoredProjection
from tracin_engine.gradients.hooks import HookFeaturizer, SharedInput, Unsupported
from tracin_engine.gradients.per_example import GradientComputer

from models import lm_loss, token_batch

tr = pytest.importorskip("transformers")

TEXT = dict(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
            attn_implementation="eager")
VISION = dict(num_channels=3, num_labels=3)

# name: (kind, config class, model class, config overrides, generic parameters (name suffixes))
CASES = {
    "mistral": ("lm", "MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1), ()),
    "qwen2": ("lm", "Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1), ()),
    "phi3": ("lm", "Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=1), ()),
    "gemma": ("lm", "GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=8), ()),
    "gpt_neox": ("lm", "GPTNeoXConfig", "GPTNeoXForCausalLM", {}, ()),
    "bloom": ("lm", "BloomConfig", "BloomForCausalLM", dict(n_layer=1, n_head=2), ()),
    "falcon": ("lm", "FalconConfig", "FalconForCausalLM", {}, ()),
    "distilbert": ("cls", "DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=16, n_layers=1, n_heads=2, hidden_dim=32), ()),
    "albert": ("cls", "AlbertConfig", "AlbertForSequenceClassification", dict(embedding_size=8), ()),
    "electra": ("cls", "ElectraConfig", "ElectraForSequenceClassification", dict(embedding_size=8), ()),
    "deberta_v2": ("cls", "DebertaV2Config", "DebertaV2ForSequenceClassification", {}, ()),
    "deit": ("img", "DeiTConfig", "DeiTForImageClassification",
             dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, attn_implementation="eager"),
             ("cls_token", "position_embeddings", "distillation_token")),
    "dinov2": ("img", "Dinov2Config", "Dinov2ForImageClassification",
               dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    mlp_ratio=2, attn_implementation="eager"), ("cls_token", "position_embeddings", "mask_token")),
    "convnext": ("img", "ConvNextConfig", "ConvNextForImageClassification",
                 dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), ("layer_scale_parameter",)),
    "resnet": ("img", "ResNetConfig", "ResNetForImageClassification",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]), ()),
    "mobilevit": ("img16", "MobileViTConfig", "MobileViTForImageClassification",
                  dict(image_size=16, patch_size=2, hidden_sizes=[16, 16, 16],
                       neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16]), ()),
}


class Logits(nn.Module):
    """model(ids) or model(pixels) -> logits (an encoder's mean hidden state for T5's encoder)."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x):
        if self.kind.startswith("img"):
            return self.model(pixel_values=x).logits
        out = self.model(input_ids=x, attention_mask=(x != 0).long())
        return out.logits if self.kind != "t5" else out.last_hidden_state.mean(1)[:, :3]


def build(name):
    kind, cfg_cls, model_cls, over, generic = CASES[name]
    torch.manual_seed(0)
    base = VISION if kind.startswith("img") else dict(TEXT, num_labels=3)
    if kind == "t5":
        base = dict(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                    eos_token_id=1, dropout_rate=0.0)
    model = Logits(getattr(tr, model_cls)(getattr(tr, cfg_cls)(**{**base, **over})), kind)
    dtype = torch.float64
    model = model.to(dtype).eval()
    if kind.startswith("img"):
        side = 16 if kind == "img16" else 8
        return model, torch.randn(4, 3, side, side, dtype=dtype), torch.randint(0, 3, (4,)), F.cross_entropy, generic
    if kind == "lm":
        ids = token_batch(3, 8, 30, pad=0)
        y = torch.cat([ids[:, 1:], torch.zeros(3, 1, dtype=torch.long)], 1)
        y[y == 0] = -100
        return model, ids, y, lm_loss, generic
    return model, token_batch(4, 8, 30, pad=0), torch.randint(0, 3, (4,)), F.cross_entropy, generic


@pytest.mark.parametrize("name", list(CASES))
def test_library_model_takes_the_hook_path_exactly(name):
    model, x, y, loss, generic = build(name)
    gc = GradientComputer(model, loss, device="cpu")
    state = gc.prepare(model.state_dict())
    G = gc.reference(state, x, y)
    hf = HookFeaturizer(gc)
    left = [] if hf.generic is None else hf.generic.params
    assert {n.rsplit(".", 1)[-1] for n in left} == set(generic)
    rtol = 1e-4 if G.dtype == torch.float32 else 1e-9
    scale = float(G.abs().max())
    rows = hf.expand(hf(state, x, y)).to(G.dtype)
    if hf.rounded_in == torch.float32:           # norms computing in float32 (Gemma, Llama's kin): their rounding
        rtol = 1e-5
    assert torch.allclose(rows, G, rtol=rtol, atol=rtol * scale)
    if name == "gemma":                          # (1 + w) * norm(x) in float32: the first batch's checks at float32
        assert hf.rounded_in == torch.float32
    if name == "distilbert":                     # nn.LayerNorm in float64: checks stay at 1e-8
        assert hf.rounded_in is None
    if name == "convnext":                       # the layer scales (B, H, W, C): per-example copies (B, 1, 1, C)
        assert hf.broadcast is True and hf.lead == 2
    fp = FactoredProjection(gc, 512, seed=3)
    Z = fp.expand(fp(state, x, y)).to(G.dtype)
    want = G @ fp.matrix().to(G.dtype)
    assert torch.allclose(Z, want, rtol=rtol,
                          atol=rtol * float(want.abs().max()))


def test_t5_relative_position_buckets_are_shared_by_the_batch_so_their_table_goes_generic():
    """T5 looks up its relative position bias with ids (T, T) that no example owns: the first batch finds
    that the Embedding's leading size does not follow the number of examples (hooks.SharedInput), and the
    featurizer rebuilds the hook path (and the factored projection) with that table generic; exact."""
    import tracin_engine as te

    CASES["t5_encoder"] = ("t5", "T5Config", "T5EncoderModel", {}, ())
    try:
        model, x, y, loss, _ = build("t5_encoder")
    finally:
        del CASES["t5_encoder"]
    table = "model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    gc = GradientComputer(model, loss, device="cpu")
    state = gc.prepare(model.state_dict())
    with pytest.raises(Unsupported, match="relative_attention_bias does not hold the batch") as err:
        HookFeaturizer(gc)(state, x, y)
    assert isinstance(err.value, SharedInput) and err.value.modules == [table]
    G = gc.reference(state, x, y)
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    exact = te.TracIn(model, ckpts, loss_fn=loss)
    got = exact.features((x, y))[0]
    fz = exact.featurizer
    assert fz.mode == "hooks" and fz.hooks.exclude == {table} and fz.hooks.generic.params == [table + ".weight"]
    assert torch.allclose(fz.hooks.expand(got.double()), G, rtol=1e-9, atol=1e-12)
    proj = te.TracIn(model, ckpts, loss_fn=loss, proj_dim=512)
    Z = proj.features((x, y))[0]
    fp = proj.featurizer.projection
    assert proj.featurizer.mode == "factored" and fp.exclude == {table}
    assert torch.allclose(fp.expand(Z.double()), G @ fp.matrix().double(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_lora_adapters_are_the_trainable_linear_layers_the_hook_path_takes(name):
    """A `peft` LoRA model (the usual way to fine-tune a language model): only the adapters are trainable,
    so only their lora_A / lora_B weights are attributed, each an nn.Linear on (B, T, d): hook path, exact;
    TracIn(proj_dim=) takes the factored projection without a fallback warning."""
    import warnings

    import tracin_engine as te
    from peft import LoraConfig, get_peft_model
    from models import hf_bert, hf_llama

    torch.manual_seed(0)
    wrapper = (hf_llama if name == "llama" else hf_bert)(seq=16)
    targets = ["q_proj", "v_proj"] if name == "llama" else ["query", "value"]
    wrapper.model = get_peft_model(wrapper.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             lora_dropout=0.1, init_lora_weights="gaussian"))
    model = wrapper.double().eval()
    if name == "llama":
        x = token_batch(3, 8, 30)
        y = torch.cat([x[:, 1:], torch.zeros(3, 1, dtype=torch.long)], 1)
        y[y == 0] = -100
        loss = lm_loss
    else:
        x, y, loss = token_batch(4, 8, 30), torch.randint(0, 3, (4,)), F.cross_entropy
    gc = GradientComputer(model, loss, device="cpu")
    assert len(gc.param_names) == 4 and all(".lora_A." in n or ".lora_B." in n for n in gc.param_names)
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    assert hf.generic is None
    G = gc.reference(state, x, y)
    assert torch.allclose(hf.expand(hf(state, x, y)), G, rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)          # no fallback warning
        tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=loss,
                           proj_dim=64)
        Z = tracin.features((x, y))[0]
    fp = tracin.featurizer.projection
    assert tracin.featurizer.mode == "factored"
    assert torch.allclose(fp.expand(Z.double()), G @ fp.matrix().double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_a_half_precision_model_takes_the_hook_path(dtype):
    """Language models are loaded in half precision: the first-batch checks allow its rounding (4 of its
    epsilons), so the hook path and the factored projection run (no fallback warning); the rows (float32,
    products of the layers' half-precision inputs and output gradients) match the per-example loop of the
    same half-precision model to that tolerance, and so do the index's scores."""
    import warnings

    import tracin_engine as te
    from models import hf_llama
    from tracin_engine.gradients.hooks import check_tolerance

    torch.manual_seed(0)
    model = hf_llama(seq=16).to(dtype).eval()
    x = token_batch(6, 8, 30)
    y = torch.cat([x[:, 1:], torch.zeros(6, 1, dtype=torch.long)], 1)
    y[y == 0] = -100
    gc = GradientComputer(model, lm_loss, device="cpu")
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    rows = hf(state, x, y)
    assert rows.dtype == torch.float32 and hf.grad_dtype == dtype
    tol = check_tolerance(rows, dtype)
    assert tol == 4 * torch.finfo(dtype).eps
    G = gc.reference(state, x, y).float()
    err = (hf.expand(rows) - G).norm(dim=1) / G.norm(dim=1)
    assert float(err.max()) < tol
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        exact = te.TracIn(model, ckpts, loss_fn=lm_loss).index((x, y), progress=False, batch_size=3)
        proj = te.TracIn(model, ckpts, loss_fn=lm_loss, proj_dim=256)
        proj.index((x, y), progress=False, batch_size=3)
    assert exact.tracin.featurizer.mode == "hooks" and proj.featurizer.mode == "factored"
    top = exact.top_k((x[:2], y[:2]), k=3).proponents
    want = (G[:2] @ G.T).gather(1, top.indices)                    # the loop's scores of the examples returned
    scale = G[:2].norm(dim=1, keepdim=True) * G.norm(dim=1)[top.indices]
    assert bool(((top.scores.float() - want).abs() <= 2 * tol * scale).all())


def test_layer_paths_report_how_each_block_is_featurized():
    """TracIn.layer_paths(): ConvNeXt's layers by path after the first batch (its layer scales generic,
    as per-example copies); a model the hook path refuses reports the fallback for all its parameters."""
    import tracin_engine as te

    model, x, y, loss, _ = build("convnext")
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=loss)
    assert {r["path"] for r in tracin.layer_paths()} >= {"kronecker", "vector", "generic: not yet known"}
    tracin.features((x, y))
    paths = tracin.layer_paths()
    assert sum(r["numbers"] for r in paths) == tracin.num_params
    generic = [r for r in paths if r["path"].startswith("generic")]
    assert len(generic) == 1 and generic[0]["path"] == "generic: per-example copies"
    assert all(n.endswith("layer_scale_parameter") for n in generic[0]["params"])
    assert any("GroupedConv" not in r["layers"] and "dwconv" in r["layers"] and r["path"] == "vector" for r in paths)
    looped = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=loss,
                       per_example="vmap")
    assert looped.layer_paths() == [{"layers": "<all>", "params": list(looped.featurizer.grads.param_names),
                                     "numbers": looped.num_params, "path": "vmap"}]
