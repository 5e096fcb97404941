"""Batches as dicts and tuples, outputs as tuples/dicts/ModelOutputs, and the named losses.

Every fast path is checked against a float64 per-example loop written here from scratch
(autograd on one example at a time, the model called the obvious way).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tracin_engine as te
from tracin_engine.losses import resolve_loss


class KwargsModel(nn.Module):
    """Token classifier called as model(input_ids=..., attention_mask=...): masked mean pooling."""

    def __init__(self, vocab=20, dim=6, classes=3, out="tensor"):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)
        self.out = out

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        pooled = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        logits = self.head(pooled)
        if self.out == "tuple":
            return logits, pooled
        if self.out == "dict":
            return {"logits": logits, "hidden": pooled}
        if self.out == "nologits":
            return {"scores": logits}
        return logits


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


def _tokens(n=6, T=7, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):  # right padding of different lengths
        L = 3 + i % (T - 2)
        mask[i, L:] = 0
        ids[i, L:] = 0
    return ids, mask


def _reference(model, state, examples, objective):
    """Float64 loop: row b = grad of objective(model called on example b alone)."""
    model = model.double()
    rows = []
    for ex in examples:
        params = {k: v.detach().double().clone().requires_grad_(True) for k, v in state.items()}
        out = torch.func.functional_call(model, params, (), ex[0])
        val = objective(out, ex[1])
        gs = torch.autograd.grad(val, [params[n] for n, _ in model.named_parameters()])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    model.float()
    return torch.stack(rows)


@pytest.mark.parametrize("out", ["tensor", "tuple", "dict"])
def test_dict_batches_call_the_model_with_keywords_and_match_a_loop(out):
    torch.manual_seed(0)
    model = KwargsModel(out=out).double()
    ids, mask = _tokens()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = te.Checkpoints.from_state_dicts([state], [1.0])
    ref = _reference(KwargsModel(), state,
                     [({"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]}, y[i:i + 1]) for i in range(6)],
                     lambda o, t: F.cross_entropy(o if torch.is_tensor(o) else (o[0] if isinstance(o, tuple) else o["logits"]), t))
    for per_example in ["vmap", "loop", "auto"]:
        tr = te.TracIn(model, ckpts, per_example=per_example)  # loss_fn None: classification
        index = tr.index({"input_ids": ids, "attention_mask": mask, "labels": y}, progress=False)
        torch.testing.assert_close(index.self_influence(), ref.pow(2).sum(1), rtol=1e-10, atol=1e-12)
        # the same data with labels given separately, and as a Dataset of dict items
        G = tr.features(({"input_ids": ids, "attention_mask": mask}, y))[0].double()
        # rows are in the featurizer's layout (flat on vmap/loop, per-layer factors on the hook path):
        # compare the inner products they represent
        torch.testing.assert_close(tr.featurizer.layout.dots(G, G), ref @ ref.T, rtol=1e-10, atol=1e-12)


def test_padding_does_not_change_an_example_gradient():
    """An example padded to a longer length has the gradient of the same example unpadded."""
    torch.manual_seed(0)
    model = KwargsModel().double()
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    tr = te.TracIn(model, ckpts)
    ids = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    g1 = tr.features({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([1])})
    g2 = tr.features({"input_ids": padded, "attention_mask": torch.tensor([[1, 1, 1, 0, 0]]),
                      "labels": torch.tensor([1])})
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_a_dataset_of_dict_items_and_a_loader_of_dicts_give_the_same_features():
    torch.manual_seed(0)
    model = KwargsModel().double()
    ids, mask = _tokens()
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    class Items(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):  # what datasets.Dataset gives: lists, ints, and a text column
            return {"input_ids": ids[i].tolist(), "attention_mask": mask[i].tolist(), "label": int(y[i]),
                    "text": f"sentence {i}"}

    tr = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]))
    want = tr.features({"input_ids": ids, "attention_mask": mask, "labels": y})
    torch.testing.assert_close(tr.features(Items(), batch_size=4), want)
    torch.testing.assert_close(tr.features(DataLoader(Items(), batch_size=4)), want)
    x, label = te.DataSource(Items()).example(2)
    assert set(x) == {"input_ids", "attention_mask"} and int(label) == 2


def test_datasets_library_dataset_is_read_as_dict_items():
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    model = KwargsModel().double()
    ids, mask = _tokens()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                     "label": y.tolist(), "text": [f"t{i}" for i in range(6)]})
    tr = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]))
    want = tr.features({"input_ids": ids, "attention_mask": mask, "labels": y})
    torch.testing.assert_close(tr.features(ds), want)
    ds.set_format("torch", columns=["input_ids", "attention_mask", "label"])
    torch.testing.assert_close(tr.features(ds), want)


def test_multi_input_models_take_flat_or_nested_tuples():
    torch.manual_seed(0)
    model = TwoInputs().double()
    x1, x2, y = torch.randn(5, 3).double(), torch.randn(5, 2).double(), torch.randint(0, 4, (5,))
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    tr = te.TracIn(model, ckpts, per_example="vmap")
    flat = tr.features((x1, x2, y))
    torch.testing.assert_close(tr.features(((x1, x2), y)), flat)
    ref = []
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x1[i:i + 1], x2[i:i + 1]), y[i:i + 1]).backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(flat[0], torch.stack(ref), rtol=1e-10, atol=1e-12)
    hooks = te.TracIn(model, ckpts).index((x1, x2, y), progress=False)   # batched Linear hooks
    torch.testing.assert_close(hooks.self_influence(), torch.stack(ref).pow(2).sum(1), rtol=1e-10, atol=1e-12)
    x, label = te.DataSource((x1, x2, y)).example(1)
    assert isinstance(x, tuple) and len(x) == 2 and int(label) == int(y[1])


def test_output_errors_name_what_the_model_returned_and_output_fn_fixes_them():
    torch.manual_seed(0)
    model = KwargsModel(out="nologits").double()
    ids, mask = _tokens()
    data = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(6, dtype=torch.long)}
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    with pytest.raises(te.TracInError, match=r"dict with keys \['scores'\] and no 'logits'.*output_fn"):
        te.TracIn(model, ckpts).index(data, progress=False)
    fixed = te.TracIn(model, ckpts, output_fn=lambda out: out["scores"]).index(data, progress=False)
    model.out = "tensor"
    plain = te.TracIn(model, ckpts).index(data, progress=False)
    torch.testing.assert_close(fixed.self_influence(), plain.self_influence())


def test_batch_errors_do_not_ask_for_what_was_given():
    torch.manual_seed(0)
    model = KwargsModel().double()
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    tr = te.TracIn(model, ckpts)
    with pytest.raises(te.TracInError) as err:
        tr.index([object(), object()], batch_fn=lambda b: (b, None), progress=False)
    assert "your batch_fn must return" in str(err.value) and "pass batch_fn" not in str(err.value)
    with pytest.raises(te.TracInError, match=r"no length and no indexing\); batch_fn maps") as err:
        tr.index((i for i in range(3)), batch_fn=lambda b: b, progress=False)
    assert "or batch_fn=" not in str(err.value)
    ids, mask = _tokens()
    with pytest.raises(te.TracInError, match="no labels; pass .*'labels'"):
        tr.index({"input_ids": ids, "attention_mask": mask}, progress=False)
    with pytest.raises(te.TracInError, match="different shapes"):
        tr.index([{"input_ids": [1, 2], "attention_mask": [1, 1], "label": 0},
                  {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "label": 1}], progress=False)


# -- named losses --------------------------------------------------------------------------------
def test_token_losses_average_each_sequence_over_its_own_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[3, 1, -100, 4, -100]])
    lp = torch.log_softmax(logits, -1)[0]
    masked = -(lp[0, 3] + lp[1, 1] + lp[3, 4]) / 3
    torch.testing.assert_close(resolve_loss("masked_lm")(logits, labels), masked)
    torch.testing.assert_close(resolve_loss("token_classification")(logits, labels), masked)
    causal = -(lp[0, 1] + lp[2, 4]) / 2          # position t predicts token t+1
    torch.testing.assert_close(resolve_loss("causal_lm")(logits, labels), causal)
    torch.testing.assert_close(resolve_loss("causal_lm").prediction(logits, labels), 2 * causal)
    reg = resolve_loss("regression")
    torch.testing.assert_close(reg(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])), torch.tensor(2.5))
    with pytest.raises(te.TracInError, match="unknown loss_fn 'ctc'"):
        resolve_loss("ctc")


def _tiny_gpt2():
    """A transformers GPT-2 LM (vocab 30, width 8, one layer) in eval mode, seeded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_causal_lm_matches_the_library_loss_and_ignores_padding():
    lm = _tiny_gpt2()
    ids, mask = _tokens(n=4, T=6, vocab=30)
    tr = te.TracIn(lm, te.Checkpoints.from_state_dicts([lm.state_dict()], [1.0]), loss_fn="causal_lm")
    gc = tr.featurizer.grads
    state = gc.prepare(lm.state_dict())
    x, y = gc.batch({"input_ids": ids, "attention_mask": mask}, None)
    ours = gc.objectives(gc.forward(state, x), y, "loss")
    for i in range(4):  # the library's own loss on the example alone, without padding
        L = int(mask[i].sum())
        with torch.no_grad():
            want = lm(input_ids=ids[i:i + 1, :L], labels=ids[i:i + 1, :L]).loss
        torch.testing.assert_close(ours[i], want, rtol=1e-5, atol=1e-6)
    G = {pe: te.TracIn(lm, tr.checkpoints, loss_fn="causal_lm", per_example=pe).features(
        {"input_ids": ids, "attention_mask": mask})[0] for pe in ("vmap", "loop")}
    torch.testing.assert_close(G["vmap"], G["loop"], rtol=1e-4, atol=1e-6)
    alone = tr.features({"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]})[0]
    torch.testing.assert_close(G["loop"][:1], alone, rtol=1e-4, atol=1e-6)  # example 0 has 3 tokens


def test_lm_prediction_form_is_the_log_probability_of_the_continuation():
    lm = _tiny_gpt2()
    ckpts = te.Checkpoints.from_state_dicts([lm.state_dict()], [1.0])
    tr = te.TracIn(lm, ckpts, loss_fn="causal_lm", per_example="loop")
    prompt_and_continuation = torch.tensor([[4, 9, 2, 7, 7]])
    labels = torch.tensor([[-100, -100, 2, 7, 7]])       # score the continuation only
    G = tr.features({"input_ids": prompt_and_continuation, "labels": labels}, target="prediction")[0]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in lm.named_parameters()}
    logp = torch.log_softmax(torch.func.functional_call(lm, params, (prompt_and_continuation,)).logits, -1)[0]
    objective = -(logp[1, 2] + logp[2, 7] + logp[3, 7])
    grads = torch.autograd.grad(objective, list(params.values()))
    torch.testing.assert_close(G[0], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-4, atol=1e-6)


def test_masked_lm_and_seq2seq_match_the_library_losses():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16)).eval()
    ids, mask = _tokens(n=3, T=6, vocab=30)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    labels[0, 2] = ids[0, 2]
    tr = te.TracIn(bert, te.Checkpoints.from_state_dicts([bert.state_dict()], [1.0]), loss_fn="masked_lm")
    gc = tr.featurizer.grads
    x, y = gc.batch({"input_ids": ids, "attention_mask": mask}, labels)
    ours = gc.objectives(gc.forward(gc.prepare(bert.state_dict()), x), y, "loss")
    for i in range(3):
        with torch.no_grad():
            want = bert(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).loss
        torch.testing.assert_close(ours[i], want, rtol=1e-5, atol=1e-6)

    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0)).eval()
    target = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    tr = te.TracIn(t5, te.Checkpoints.from_state_dicts([t5.state_dict()], [1.0]), loss_fn="seq2seq",
                   per_example="loop")
    gc = tr.featurizer.grads
    x, y = gc.batch({"input_ids": ids[:2], "attention_mask": mask[:2]}, target)
    ours = gc.objectives(gc.forward(gc.prepare(t5.state_dict()), x, y), y, "loss")
    for i in range(2):
        with torch.no_grad():
            want = t5(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=target[i:i + 1]).loss
        torch.testing.assert_close(ours[i], want, rtol=1e-5, atol=1e-6)
    assert tr.index(({"input_ids": ids[:2], "attention_mask": mask[:2]}, target), progress=False) \
        .self_influence().gt(0).all()


def test_explorer_shows_dict_examples_through_render():
    tw = pytest.importorskip("tracin_widgets")
    torch.manual_seed(0)
    model = KwargsModel().double()
    ids, mask = _tokens()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    train = {"input_ids": ids, "attention_mask": mask, "labels": y}
    index = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])).index(train, progress=False)
    words = [f"w{i}" for i in range(20)]

    def render(x):
        return " ".join(words[int(t)] for t in x["input_ids"][x["attention_mask"].bool()])

    ex = tw.InfluenceExplorer(index, train, {"input_ids": ids[:2], "attention_mask": mask[:2]}, k=3, render=render)
    strips = {s["key"]: s for s in ex._strips()}
    tile = strips["proponents"]["tiles"][0]
    assert tile["text"] == render({"input_ids": ids[tile["index"]], "attention_mask": mask[tile["index"]]})
    assert tile["pred"] is not None        # predictions come from model(**batch) on the stacked dicts


def test_predictions_of_a_language_model_name_the_per_token_alternative():
    from models import CausalLM, lm_loss
    torch.manual_seed(0)
    model = CausalLM(vocab=20, dim=8, depth=1, seq=6)
    ids = torch.randint(1, 20, (4, 6))
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [1.0]), loss_fn=lm_loss)
    with pytest.raises(te.TracInError, match=r"shape \(4, 6, 20\).*argmax\(-1\)"):
        tracin.predictions((ids,))
    assert tracin.outputs((ids,)).argmax(-1).shape == (4, 6)


def test_label_checks_read_the_cpu_batch_on_an_accelerator():
    """On a GPU the label range check runs on the CPU copy of the batch's targets (a check on the device
    makes the host wait for the GPU every batch); forced here on the CPU: same errors, same rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]), loss_fn=F.cross_entropy)
    gc = tracin.featurizer.grads
    assert gc.check_on_host is False                      # on the CPU the labels are already there
    gc.check_on_host = True
    X, y = torch.randn(6, 4), torch.tensor([0, 2, 1, 0, 2, 1])
    checked = []
    real = gc.loss_fn.check
    gc.loss_fn.check = lambda out, labels: (checked.append(labels), real(out, labels))
    want = te.TracIn(model, tracin.checkpoints, loss_fn=F.cross_entropy).features((X, y))
    torch.testing.assert_close(tracin.features((X, y)), want)
    assert checked and all(t.device.type == "cpu" and torch.equal(t, y) for t in checked)
    assert gc._host_targets is not None and torch.equal(gc._host_targets[1], y)   # the CPU copy was kept
    with pytest.raises(te.TracInError, match=r"labels out of range for 3 classes at positions \[1\]"):
        tracin.features((X, torch.tensor([0, 7, 1, 0, 2, 1])))


def test_causal_lm_targets_are_derived_on_the_cpu_too():
    lm = _tiny_gpt2()
    ids, mask = _tokens(n=4, T=6, vocab=30)
    tr = te.TracIn(lm, te.Checkpoints.from_state_dicts([lm.state_dict()], [1.0]), loss_fn="causal_lm")
    gc = tr.featurizer.grads
    want = tr.features({"input_ids": ids, "attention_mask": mask})
    gc.check_on_host = True
    x, y = gc.batch({"input_ids": ids, "attention_mask": mask}, None)
    dev, host = gc._host_targets
    assert dev is y and host is not y and host.device.type == "cpu" and torch.equal(host, y)
    assert (host == -100).sum() == (mask == 0).sum()       # padding masked out on the CPU copy as well
    torch.testing.assert_close(tr.features({"input_ids": ids, "attention_mask": mask}), want)
