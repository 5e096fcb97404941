"""Source of notebooks/04_text_classification.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 04 · Text classification, and influence for inputs without labels
#
# **The data.** The usual text benchmarks (IMDB, SST, 20 Newsgroups) are downloaded at run time, which
# this tutorial must not do. `chatterbot-corpus` is a small, real, hand-written English dialog corpus
# whose YAML files ship inside the pip package (`pip install chatterbot-corpus`, 345 KB, no other
# dependencies). Every utterance sits in a topic file (`ai.yml`, `emotion.yml`, ...), which gives a
# labelled topic-classification task. It is small and quirky (chat-bot small talk), but it is real
# text, and small enough to train on a CPU in seconds.
#
# **The model.** Token ids padded into a tensor, an `nn.Embedding`, mean pooling over the real tokens,
# and a linear layer. TracIn needs nothing special for text: per-example gradients come from
# `torch.func`, whatever the layers. The embedding table has one gradient row per vocabulary word, so we
# index a seeded **random projection** of the gradients (`proj_dim=`): inner products, and so scores,
# are preserved in expectation.
#
# **Unlabeled inputs.** For a sentence nobody labelled, there is no test loss. TracIn's *prediction*
# form replaces $\nabla \ell(w_i, z')$ by the gradient of the model's output for the class it predicts:
# `index.top_k(new_texts, target="prediction")`. Proponents are the training sentences whose training
# steps raised that output.

# %%
import importlib.util
import re
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import tracin_engine as te
import tracin_widgets as tw

torch.manual_seed(0)

# %% [markdown]
# ## 1 · Load the corpus from the installed package

# %%
CORPUS = Path(importlib.util.find_spec("chatterbot_corpus").origin).parent / "data" / "english"
TOPICS = ["ai", "computers", "emotion", "food", "literature", "money", "movies", "psychology",
          "science", "sports"]

texts, labels = [], []
for label, topic in enumerate(TOPICS):
    conversations = yaml.safe_load((CORPUS / f"{topic}.yml").read_text())["conversations"]
    utterances = dict.fromkeys(u.strip() for conv in conversations for u in conv if isinstance(u, str))
    for text in utterances:  # each distinct utterance once, in file order
        texts.append(text)
        labels.append(label)
print(len(texts), "utterances;", dict(Counter(TOPICS[l] for l in labels)))

# %% [markdown]
# ## 2 · Tokenize and pad
# Lower-case words; id 0 is padding, id 1 an unknown word. The vocabulary comes from the training split
# only.

# %%
def tokenize(text):
    return re.findall(r"[a-z0-9']+", text.lower())


perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
n_test = len(texts) // 5
test_ids, train_ids = perm[:n_test], perm[n_test:]
vocab = ["<pad>", "<unk>"] + sorted({w for i in train_ids for w in tokenize(texts[i])})
word_id = {w: i for i, w in enumerate(vocab)}
MAX_LEN = 32


def encode(batch):
    """list of str -> LongTensor (n, MAX_LEN) of token ids, 0-padded."""
    out = torch.zeros(len(batch), MAX_LEN, dtype=torch.long)
    for r, text in enumerate(batch):
        ids = [word_id.get(w, 1) for w in tokenize(text)][:MAX_LEN]
        out[r, : len(ids)] = torch.tensor(ids or [1])
    return out


def decode(ids):
    return " ".join(vocab[int(t)] for t in ids if int(t) != 0)


y_all = torch.tensor(labels)
train_texts = [texts[i] for i in train_ids]
test_texts = [texts[i] for i in test_ids]
train = (encode(train_texts), y_all[train_ids])
test = (encode(test_texts), y_all[test_ids])
print("vocabulary", len(vocab), "| train", tuple(train[0].shape), "| test", tuple(test[0].shape))


# %% [markdown]
# ## 3 · Model and training loop with checkpoints

# %%
class MeanEmbeddingClassifier(nn.Module):
    """ids (B, L) -> embedding (B, L, d) -> mean over non-padding tokens (B, d) -> logits (B, classes)."""

    def __init__(self, vocab_size, n_classes, dim=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.out = nn.Linear(dim, n_classes)

    def embed(self, ids):
        mask = (ids != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        return (self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, ids):
        return self.out(self.embed(ids))


model = MeanEmbeddingClassifier(len(vocab), len(TOPICS))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
run_dir = Path(tempfile.mkdtemp(prefix="tracin-text-"))
recorder = te.CheckpointRecorder(run_dir)
X, y = train
step = 0
for epoch in range(30):
    model.train()
    for idx in torch.randperm(len(X)).split(32):
        optimizer.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        optimizer.step()
        step += 1
    if epoch % 6 == 5:
        recorder.save(model, optimizer, step)
model.eval()
with torch.no_grad():
    test_acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
print(f"test accuracy {test_acc:.3f} over {len(TOPICS)} topics (chance {1 / len(TOPICS):.2f})")

# %% [markdown]
# We trained with Adam. TracInCP was derived for SGD; with an adaptive optimizer it is still the common
# heuristic (weight each checkpoint by the learning rate in use), which is what the recorded
# `learning_rate` gives. Here all five checkpoints share lr = 0.01, so the ranking is the plain sum of
# gradient dot products over checkpoints.

# %%
ckpts = te.Checkpoints.from_dir(run_dir)
tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=1024)
index = tracin.index(train, progress=False)
index

# %% [markdown]
# ## 4 · Proponents and opponents of a labelled test sentence
#
# **Predict first.** The model only averages word vectors. Will the proponents of a test sentence share its
# topic, its words, or both? And what will the opponents have in common with it?

# %%
def show(i_test, result, row=0, k=4):
    rows = [("test", test_texts[i_test] if i_test is not None else new_texts[row], "", "")]
    for kind, nb in (("proponent", result.proponents), ("opponent", result.opponents)):
        for j, s in zip(nb.indices[row, :k].tolist(), nb.scores[row, :k].tolist()):
            rows.append((kind, train_texts[j], TOPICS[int(train[1][j])], f"{s:+.3f}"))
    return pd.DataFrame(rows, columns=["role", "text", "topic", "score"])


result = index.top_k(test, k=4)
i = 0
print("true topic:", TOPICS[int(test[1][i])])
show(i, result, row=i)

# %% [markdown]
# Proponents carry the test sentence's topic. Opponents carry other topics; when they share words with
# the test sentence (check the table), a step on them pulled those words' vectors away from this topic.
#
# ## 5 · Unlabeled sentences: `target="prediction"`
#
# **Predict first.** What topic will the model give "can a robot ever be conscious"? (The topics are
# listed in section 1.) Then look at which training sentences support that prediction.

# %%
new_texts = ["I feel so lonely and sad today", "how much money should I save every month",
             "who wrote the great gatsby", "can a robot ever be conscious"]
new = (encode(new_texts),)            # no labels
with torch.no_grad():
    predicted = model(new[0]).argmax(1)
result_new = index.top_k(new, k=4, target="prediction")
for r, text in enumerate(new_texts):
    print(f"{text!r} -> predicted topic {TOPICS[int(predicted[r])]}")
show(None, result_new, row=0)

# %%
show(None, result_new, row=3)

# %% [markdown]
# ## Try this
# **Try 1. A smaller projection.** Rebuild the index with `proj_dim=256` instead of 1024 and compare the top
# 4 proponents of test sentence 0. Self-check: print how many of the four are the same.

# %%
small = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=256).index(train, progress=False)
a = set(result.proponents.indices[0].tolist())
b = set(small.top_k((test[0][:1], test[1][:1]), k=4).proponents.indices[0].tolist())
print(f"top-4 proponents in common between proj_dim 1024 and 256: {len(a & b)} of 4")

# %% [markdown]
# **Try 2. Loss or prediction?** For a *labelled* test sentence that the model gets right, the loss form and
# the prediction form should mostly agree. Self-check: compare the top-10 proponents of the first 20 test
# sentences both ways, separately for those predicted right and wrong.

# %%
with torch.no_grad():
    right = model(test[0][:20]).argmax(1) == test[1][:20]
by_loss = index.top_k((test[0][:20], test[1][:20]), k=10).proponents.indices
by_pred = index.top_k((test[0][:20],), k=10, target="prediction").proponents.indices
common = torch.tensor([len(set(p.tolist()) & set(q.tolist())) / 10 for p, q in zip(by_loss, by_pred)])
print(f"top-10 in common: {common[right].mean():.0%} when the prediction is right, "
      f"{common[~right].mean() if (~right).any() else float('nan'):.0%} when it is wrong")

# %% [markdown]
# ## 6 · Explore
# The widgets render token ids as text with `render=decode`; labels show as topic names.

# %%
tw.InfluenceExplorer(index, train, test, k=6, render=decode, class_names=TOPICS)

# %% [markdown]
# ## Questions
# 1. Why does `target="prediction"` need no label, and what does a proponent mean then?
# 2. For a sentence the model gets *wrong*, the loss form and the prediction form disagree (Try 2). Which
#    one explains the mistake?
# 3. The embedding table has a gradient row only for the words a sentence contains. What does that imply
#    for which training sentences can be proponents of a test sentence?
