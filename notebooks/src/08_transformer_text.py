"""Source of notebooks/08_transformer_text.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 08 · Your own transformer: a Hugging Face classifier and a small language model
#
# Tutorial 04 wrote its text model by hand. Here the model, the tokenizer, the batches and the
# checkpoints all come from the Hugging Face libraries, used the ordinary way, and TracIn reads them
# as they are:
#
# * **batches** are what a tokenizer returns (a dict of `input_ids`, `attention_mask`), with the labels
#   under `labels`; the model is called as `model(**batch)`;
# * **outputs** are `ModelOutput`s; TracIn takes their `logits`;
# * **checkpoints** are the `checkpoint-N/` folders a `transformers.Trainer` writes; one call reads
#   each folder's weights (`model.safetensors`), its step, and the learning rate of the steps that led
#   to it;
# * **losses** are named: classification is the default; `loss_fn="causal_lm"` for a language model
#   (next-token cross-entropy, averaged over each sequence's own, non-padded tokens).
#
# Nothing is downloaded: the text is the chatterbot corpus (as in tutorial 04), the tokenizer is
# trained on it in a second, and both models are built from a small config and trained from scratch.
# Cells marked **Predict first** ask you to guess before you run the next cell; **Try this** cells give
# you a change to make and a number to check.

# %%
import importlib.util
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          PreTrainedTokenizerFast, Trainer, TrainingArguments)
from transformers.utils import logging as hf_logging

import tracin_engine as te
import tracin_widgets as tw

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")
torch.manual_seed(0)

# %% [markdown]
# ## 1 · Text and a tokenizer, offline

# %%
CORPUS = Path(importlib.util.find_spec("chatterbot_corpus").origin).parent / "data" / "english"
TOPICS = ["ai", "emotion", "food", "money", "movies", "science", "sports", "history"]
texts, labels = [], []
for label, topic in enumerate(TOPICS):
    conversations = yaml.safe_load((CORPUS / f"{topic}.yml").read_text())["conversations"]
    for text in dict.fromkeys(u.strip() for conv in conversations for u in conv if isinstance(u, str)):
        texts.append(text)
        labels.append(label)

perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
n_test = len(texts) // 5
train_texts, test_texts = [texts[i] for i in perm[n_test:]], [texts[i] for i in perm[:n_test]]
y_train = torch.tensor([labels[i] for i in perm[n_test:]])
y_test = torch.tensor([labels[i] for i in perm[:n_test]])

# a word-level tokenizer trained on the training texts (the `tokenizers` library, no download)
word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
word_level.normalizer = None
word_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
word_level.train_from_iterator([t.lower() for t in train_texts],
                               trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]"]))
word_level.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]",
                                    cls_token="[CLS]")


def encode(batch_texts, max_length=24):
    return tokenizer([t.lower() for t in batch_texts], padding="max_length", truncation=True,
                     max_length=max_length, return_tensors="pt")


train_enc, test_enc = encode(train_texts), encode(test_texts)
print(len(train_texts), "training and", len(test_texts), "test utterances;", tokenizer.vocab_size, "words;",
      {k: tuple(v.shape) for k, v in train_enc.items()})

# %% [markdown]
# ## 2 · A BERT classifier from a config, trained with the `Trainer`
#
# Two small transformer layers (hidden size 32). The `Trainer` saves `checkpoint-N/` folders every
# 85 steps (4 per run); the learning rate decays linearly, so the checkpoints carry different rates.

# %%
model = BertForSequenceClassification(BertConfig(
    vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=32, num_labels=len(TOPICS)))


class Encoded(torch.utils.data.Dataset):
    """Items as the Trainer wants them: dicts of tensors with the label under 'labels'."""

    def __init__(self, enc, y):
        self.enc, self.y = enc, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.y[i]}


run_dir = Path(tempfile.mkdtemp(prefix="tracin-bert-"))
args = TrainingArguments(output_dir=str(run_dir), num_train_epochs=20, per_device_train_batch_size=32,
                         learning_rate=5e-3, warmup_steps=10, save_steps=85, save_only_model=True,
                         logging_steps=85, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
Trainer(model=model, args=args, train_dataset=Encoded(train_enc, y_train)).train()
model.eval()
with torch.no_grad():
    test_acc = (model(**test_enc).logits.argmax(1) == y_test).float().mean().item()
print(f"test accuracy {test_acc:.2f} over {len(TOPICS)} topics (chance {1 / len(TOPICS):.2f})")
print(sorted(p.name for p in run_dir.iterdir()))

# %% [markdown]
# ## 3 · One call reads the run
#
# `Checkpoints.from_dir` finds the `checkpoint-N/` folders, takes N as the step, and the learning rate
# of the steps that led to the checkpoint from `trainer_state.json`'s log (the Trainer logs, at step s,
# the rate step s used). Weights are read from `model.safetensors`; nothing pickled is ever executed.
#
# **Predict first.** The rate warms up for 10 steps to 5e-3, then decays linearly to 0 at step 340;
# checkpoints were saved at steps 85, 170, 255 and 340. Which checkpoint will weigh least in TracInCP,
# and will its weight be exactly 0?

# %%
ckpts = te.Checkpoints.from_dir(run_dir)
print([(c.step, round(c.learning_rate, 5)) for c in ckpts])
ckpts

# %% [markdown]
# **Which parameters.** Every gradient here comes from one batched forward and backward pass (about a
# training step) when the selected layers are `Linear` layers fed one vector per example: the pooler
# and the classifier. Their gradients are exact and cheap, and they are what decides the topic
# from the sentence representation. Layers that act on every token (attention, feed-forward,
# embeddings, layer norms) can be added with `layers=None`: their per-example gradients come from the
# same batched pass (one layer handler per layer kind, docs/handlers.md), still exact, but each row then
# holds every parameter of the model; for a large model add `proj_dim=` (a projection of every layer).
#
# The data are the tokenizer's dict plus the labels: exactly what the model was trained on.

# %%
train = {**train_enc, "labels": y_train}
test = {**test_enc, "labels": y_test}
tracin = te.TracIn(model, ckpts, layers=["bert.pooler.dense", "classifier"])
index = tracin.index(train, progress=False)
index

# %% [markdown]
# ## 4 · Proponents and opponents of a test sentence
#
# **Predict first.** With 8 topics, a random training sentence has the test sentence's topic about 12%
# of the time. How often will the *strongest proponent* share it: closer to 12%, 50% or 90%?

# %%
def show(query_text, result, row=0, k=4):
    rows = [("test", query_text, "", "")]
    for kind, nb in (("proponent", result.proponents), ("opponent", result.opponents)):
        for j, s in zip(nb.indices[row, :k].tolist(), nb.scores[row, :k].tolist()):
            rows.append((kind, train_texts[j], TOPICS[int(y_train[j])], f"{s:+.4f}"))
    return pd.DataFrame(rows, columns=["role", "text", "topic", "score"])


result = index.top_k(test, k=4)
same = (y_train[result.proponents.indices[:, 0]] == y_test).float().mean().item()
print(f"the top proponent has the test sentence's topic for {same:.0%} of test sentences")
print("true topic:", TOPICS[int(y_test[0])])
show(test_texts[0], result, row=0)

# %% [markdown]
# Unlabeled sentences work as in tutorial 04: `target="prediction"` attributes the predicted class.

# %%
new_texts = ["i feel so lonely and sad today", "how much money should i save every month"]
new = dict(encode(new_texts))                          # no labels
with torch.no_grad():
    predicted = model(**new).logits.argmax(1)
result_new = index.top_k(new, k=4, target="prediction")
print([f"{t!r} -> predicted topic {TOPICS[int(p)]}" for t, p in zip(new_texts, predicted)])
show(new_texts[0], result_new, row=0)

# %% [markdown]
# **Try 1. All layers, factored.** So far only the pooler and the classifier were attributed. Attribute
# through every layer (embeddings, attention, feed-forward) with the factored projection: `proj_dim=512`
# projects each layer's per-example gradient as $P_g^\top \, dW \, P_a$ from one batched pass, never
# forming it (`projection="auto"` picks it wherever a layer handler exists). Self-check: compare the
# share of test sentences whose top proponent has their topic with the number above. Which layers'
# gradients would you expect to reward sentences that merely share *words* with the test sentence?

# %%
all_layers = te.TracIn(model, ckpts, proj_dim=512)
print("projection:", all_layers.featurizer.projection_kind, "| row length per checkpoint:", all_layers.dim)
index_all = all_layers.index(train, progress=False)
best_all = index_all.top_k(test, k=1)
same_all = (y_train[best_all.proponents.indices[:, 0]] == y_test).float().mean().item()
print(f"top proponent has the test topic: {same_all:.0%} with all layers vs {same:.0%} with pooler + classifier")

# %% [markdown]
# ## 5 · Explore
# Tiles show the decoded text (`render=`), labels the topic names. Words the tokenizer never saw in
# training show as `[UNK]`: that is what the model reads.

# %%
def render(x):
    return tokenizer.decode(x["input_ids"][x["attention_mask"].bool()][1:])   # drop [CLS] and padding


explorer = tw.InfluenceExplorer(index, train, test, k=6, render=render, class_names=TOPICS)
explorer

# %% [markdown]
# ## 6 · A small language model: which training sentences made a continuation likely?
#
# A GPT-2 shaped model (2 layers, hidden size 64) learns the same utterances as plain text, this time
# with a plain PyTorch loop and `te.CheckpointRecorder` (the other way to save checkpoints). The batch
# is again the tokenizer's dict; with `loss_fn="causal_lm"` the targets are the `input_ids` themselves,
# shifted by one, and padded positions (`attention_mask == 0`) never count.
#
# For a prompt, the model generates a continuation. `target="prediction"` then attributes the
# log-probability of that continuation: the prompt's tokens are labelled -100 (not scored), the
# generated tokens are the targets. Proponents are the training sentences whose training steps raised
# that log-probability the most.

# %%
lm = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=64, n_layer=2,
                                n_head=2, bos_token_id=2, eos_token_id=0, pad_token_id=0,
                                attn_implementation="eager"))
optimizer = torch.optim.AdamW(lm.parameters(), lr=5e-3)
lm_dir = Path(tempfile.mkdtemp(prefix="tracin-lm-"))
recorder = te.CheckpointRecorder(lm_dir)
ids, mask = train_enc["input_ids"], train_enc["attention_mask"]
step = 0
for epoch in range(20):
    lm.train()
    for idx in torch.randperm(len(ids), generator=torch.Generator().manual_seed(epoch)).split(32):
        labels_lm = ids[idx].masked_fill(mask[idx] == 0, -100)
        loss = lm(input_ids=ids[idx], attention_mask=mask[idx], labels=labels_lm).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    if epoch % 5 == 4:
        recorder.save(lm, optimizer, step)
lm.eval()
print(f"final training loss {loss.item():.2f} (uniform guess: {torch.log(torch.tensor(tokenizer.vocab_size)).item():.2f})")

# %%
prompt = tokenizer(["[CLS] do you"], add_special_tokens=False, return_tensors="pt")
with torch.no_grad():
    generated = lm.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
n_prompt = prompt["input_ids"].shape[1]
continuation_labels = generated.clone()
continuation_labels[:, :n_prompt] = -100                       # score the generated tokens only
query = {"input_ids": generated, "attention_mask": torch.ones_like(generated), "labels": continuation_labels}
print("prompt:", tokenizer.decode(generated[0, :n_prompt], skip_special_tokens=True),
      "| generated:", tokenizer.decode(generated[0, n_prompt:], skip_special_tokens=True))

lm_tracin = te.TracIn(lm, te.Checkpoints.from_dir(lm_dir), loss_fn="causal_lm",
                      layers=["transformer.h.1.mlp.c_proj"])   # the last block's output projection
lm_index = lm_tracin.index(dict(train_enc), progress=False)
lm_result = lm_index.top_k(query, k=5, target="prediction")
pd.DataFrame({"training sentence": [train_texts[j] for j in lm_result.proponents.indices[0].tolist()],
              "score": [f"{s:+.4f}" for s in lm_result.proponents.scores[0].tolist()]})

# %% [markdown]
# **Try 2. Another prompt.** Change `"[CLS] do you"` above to `"[CLS] what is"` (or any words of the
# corpus) and run the two cells again. Self-check: count how many of the top-5 proponents contain all of
# the generated words, with the line below. Do the proponents explain the continuation by copying it?

# %%
words = tokenizer.decode(generated[0, n_prompt:], skip_special_tokens=True).split()
hits = sum(all(w in train_texts[j].lower().split() for w in words) for j in lm_result.proponents.indices[0].tolist())
print(f"{hits} of the top-5 proponents contain every generated word {words}")

# %% [markdown]
# The selection `layers=["transformer.h.1.mlp.c_proj"]` keeps the per-example gradients small (one
# weight matrix of the last block, about 16k numbers per sentence and checkpoint); `layers=None`
# attributes through every weight, including the token embeddings that GPT-2 shares with its output
# layer (tied weights are handled), at a higher cost (or with `proj_dim=` to project).
#
# **Your own model, in short.** A Hugging Face model: pass the tokenizer's dict (labels under
# `labels`), a `Trainer` output folder to `Checkpoints.from_dir`, and a named loss when the task is
# not classification. A PyTorch Lightning run: `Checkpoints.from_dir(folder_of_ckpt_files)` (the
# `model.` prefix of the LightningModule is removed). Anything else: `output_fn=` picks the output
# tensor and `batch_fn=` maps a batch to `(inputs, targets)`.
#
# ## Questions
#
# 1. The last checkpoint carries the smallest learning rate. What would its weight be if the reader took
#    the rate of the *next* step (scheduler.pt's), and what would TracInCP then ignore?
# 2. Restricting the attribution to the pooler and the classifier made the proponents share the topic
#    more often than all layers did. What kind of similarity do the embedding and attention gradients
#    add, and when would you want it?
# 3. For the language model, the prompt tokens were labelled -100. What would change if they were
#    scored too?
