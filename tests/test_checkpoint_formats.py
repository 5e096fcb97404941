"""Checkpoints written by the real libraries: a Hugging Face Trainer run and a PyTorch Lightning run
(a few steps on the CPU), safetensors files, wrapper key prefixes, and no pickled code executed."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.checkpoint_formats import match_keys


def _tiny_bert(transformers, attn="sdpa"):
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, num_labels=2, max_position_embeddings=16,
                                  attn_implementation=attn)
    return transformers.BertForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """6 Trainer steps (linear lr decay), checkpoint-3/ and checkpoint-6/; returns (dir, model, data, lrs seen)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = _tiny_bert(transformers)
    ids = torch.randint(1, 30, (16, 6))
    mask = torch.ones(16, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    y = (ids[:, 0] > 15).long()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]}

    out = tmp_path_factory.mktemp("hf") / "run"
    lrs = []

    class Spy(transformers.TrainerCallback):  # the lr the optimizer holds after each step (the next step's)
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            lrs.append((state.global_step, optimizer.param_groups[0]["lr"]))

    args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, logging_steps=1,
                                          learning_rate=1e-2, per_device_train_batch_size=4, report_to="none",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=Items(), callbacks=[Spy()]).train()
    return out, model, {"input_ids": ids, "attention_mask": mask, "labels": y}, dict(lrs)


def test_trainer_folder_loads_with_steps_and_learning_rates(trainer_run):
    from safetensors.torch import load_file

    run, model, data, lrs = trainer_run
    ckpts = te.Checkpoints.from_dir(run)
    assert [c.step for c in ckpts] == [3, 6]
    # the rate of the steps that led to each checkpoint: the rate step N used (the optimizer's rate after
    # step N - 1), which the Trainer logged at step N; scheduler.pt holds the next step's (0 at the end)
    torch.testing.assert_close(ckpts.learning_rates, torch.tensor([lrs[2], lrs[5]], dtype=torch.float64))
    assert "log_history (step 3)" in ckpts[0].extra["learning_rate_from"]
    assert lrs[6] == 0.0  # the linear schedule ends at zero: reading the next step's rate would refuse it
    want = load_file(str(run / "checkpoint-6" / "model.safetensors"))
    got = ckpts.load(1)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    index = te.TracIn(model, ckpts, layers=["bert.pooler.dense", "classifier"]).index(data, progress=False)
    assert index.self_influence().shape == (16,) and torch.isfinite(index.self_influence()).all()

    # without trainer_state.json: the scheduler's last rate (the next step's) from scheduler.pt
    (run / "checkpoint-3" / "trainer_state.json").rename(run / "state.moved")
    try:
        one = te.Checkpoints.from_files([run / "checkpoint-3"])
        assert one[0].learning_rate == lrs[3]
        assert one[0].extra["learning_rate_from"].startswith("scheduler.pt")
    finally:
        (run / "state.moved").rename(run / "checkpoint-3" / "trainer_state.json")


def test_a_wrapper_around_the_model_still_loads_trainer_checkpoints(trainer_run):
    run, model, data, _ = trainer_run

    class Wrapper(nn.Module):  # the glue: a module holding the HF model as .m
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw).logits

    ckpts = te.Checkpoints.from_dir(run)
    plain = te.TracIn(model, ckpts, layers=["classifier"]).index(data, progress=False)
    wrapped = te.TracIn(Wrapper(model), ckpts, layers=["m.classifier"]).index(data, progress=False)
    torch.testing.assert_close(wrapped.self_influence(), plain.self_influence())


def test_lora_trainer_checkpoints_load_as_the_peft_model_and_score_as_its_full_states(tmp_path):
    """A PeftModel (LoRA on query/value, the classifier trained in full: modules_to_save) trained by the Trainer
    saves adapter_model.safetensors only, without the adapter's name in its keys. Checkpoints.from_dir reads
    them (steps, learning rates); the frozen base weights come from the model. Scores equal those from the
    PeftModel's own full state dicts after peft loads each adapter file (set_peft_model_state_dict)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = peft.get_peft_model(_tiny_bert(transformers, attn="eager"), config)
    ids = torch.randint(1, 30, (8, 6))
    y = (ids[:, 0] > 15).long()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": y[i]}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                                          logging_steps=1, learning_rate=5e-2, per_device_train_batch_size=4,
                                          report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=Items()).train()
    ckpts = te.Checkpoints.from_dir(tmp_path / "run")
    assert [c.step for c in ckpts] == [2, 4] and all(c.extra["adapter"] for c in ckpts)
    assert len(load_file(str(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors"))) == 6
    data = {"input_ids": ids, "labels": y}
    index = te.TracIn(model, ckpts).index(data, progress=False)
    assert index.tracin.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)

    states = []
    for c in ckpts:
        peft.set_peft_model_state_dict(model, load_file(str(c.source / "adapter_model.safetensors")))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert not torch.equal(states[0]["base_model.model.classifier.modules_to_save.default.weight"],
                           states[1]["base_model.model.classifier.modules_to_save.default.weight"])
    full = te.Checkpoints.from_state_dicts(states, [c.learning_rate for c in ckpts])
    want = te.TracIn(model, full).index(data, progress=False)
    torch.testing.assert_close(index.influence(data), want.influence(data), rtol=1e-5, atol=1e-7)

    class Wrapper(nn.Module):                                    # keys m.base_model.model...: prefix added
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            return self.m(**kw).logits

    wrapped = te.TracIn(Wrapper(model), ckpts).index(data, progress=False)
    torch.testing.assert_close(wrapped.self_influence(), index.self_influence())

    # the base model is part of an adapter checkpoint's identity: a store built on one base is refused on another
    te.TracIn(model, ckpts).index(data, store=tmp_path / "ix", progress=False)
    te.GradientIndex.load(tmp_path / "ix", te.TracIn(model, ckpts))              # same base: reopens
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.weight[0, 0] += 1.0
    with pytest.raises(te.TracInError, match=r"checkpoint 0 \(checkpoint-2\): base: stored"):
        te.GradientIndex.load(tmp_path / "ix", te.TracIn(model, ckpts))
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.weight[0, 0] -= 1.0

    # an adapter file that lacks a trainable parameter is refused, naming it
    bad = tmp_path / "bad"
    bad.mkdir()
    from safetensors.torch import save_file
    kept = {k: v for k, v in load_file(str(ckpts[0].source / "adapter_model.safetensors")).items()
            if "classifier" not in k}
    save_file(kept, str(bad / "adapter_model.safetensors"))
    one = te.Checkpoints.from_files([bad], learning_rates=[0.1])
    assert one[0].extra == {"adapter": True}
    with pytest.raises(te.TracInError, match=r"lacks trainable parameters of the model: "
                                             r"\['base_model.model.classifier"):
        te.TracIn(model, one).index(data, progress=False)


def test_lightning_ckpt_files_load_with_prefix_and_learning_rate(tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = net

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.5)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    L.Trainer(max_steps=4, accelerator="cpu", enable_progress_bar=False, logger=False, callbacks=[cb],
              enable_model_summary=False).fit(Lit(), loader)
    ckpts = te.Checkpoints.from_dir(tmp_path)
    assert [c.step for c in ckpts] == [2, 4]
    assert ckpts.learning_rates.tolist() == [0.5 * 0.5 ** 2, 0.5 * 0.5 ** 4]   # StepLR after 2 and 4 steps
    state = te.TracIn(net, ckpts).featurizer.prepare(ckpts.load(1))           # 'model.' prefix stripped
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert te.TracIn(net, ckpts).index((X, y), progress=False).self_influence().shape == (32,)


def test_safetensors_files_and_compiled_or_parallel_prefixes(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    sd = net.state_dict()
    paths = []
    for i, prefix in enumerate(["", "_orig_mod.", "module."]):
        p = tmp_path / f"w{i}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(p), metadata={"learning_rate": "0.25"})
        paths.append(p)
    ckpts = te.Checkpoints.from_files(paths)
    assert ckpts.learning_rates.tolist() == [0.25] * 3
    tr = te.TracIn(net, ckpts)
    for i in range(3):
        state = tr.featurizer.prepare(ckpts.load(i))
        assert all(torch.equal(state[k], v) for k, v in sd.items())


def test_ambiguous_prefixes_are_listed_and_unmatched_keys_reported():
    net = nn.Linear(2, 2)
    state = {f"{p}{k}": v for p in ("teacher.", "student.") for k, v in net.state_dict().items()}
    with pytest.raises(te.TracInError, match=r"several prefix rules.*'student\.'.*'teacher\.'"):
        match_keys(state, net.state_dict())
    ckpts = te.Checkpoints.from_state_dicts([{"other.weight": torch.zeros(2, 2)}], [1.0])
    with pytest.raises(te.TracInError, match="missing keys"):
        te.TracIn(net, ckpts).featurizer.prepare(ckpts.load(0))


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.ckpt", "evil.pt"):
        p = tmp_path / name
        with open(p, "wb") as f:
            pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": Evil(), "learning_rate": 1.0}, f)
        with pytest.raises(te.TracInError, match="weights_only|could not read"):
            te.Checkpoints.from_files([p])
    assert not marker.exists()
