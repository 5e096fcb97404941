"""Source of notebooks/01_quickstart.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 01 · Quickstart: which training examples made my model say this?
#
# **TracIn** (Pruthi et al., NeurIPS 2020) answers that question by *tracing gradient descent*.
# Every SGD step on a training example $z$ moves the weights by $-\eta_t \nabla \ell(w_t, z)$.
# To first order that step changes the loss on a test example $z'$ by
# $-\eta_t \langle \nabla \ell(w_t, z'), \nabla \ell(w_t, z) \rangle$.
# Adding these changes over the checkpoints $w_1 \dots w_C$ saved during training gives
#
# $$\mathrm{TracInCP}(z, z') = \sum_{i=1}^{C} \eta_i \, \langle \nabla \ell(w_i, z),\; \nabla \ell(w_i, z') \rangle .$$
#
# * A **proponent** has a **positive** score: training on it *lowered* the test loss (it pushed the model
#   towards the answer it gives for $z'$'s label).
# * An **opponent** has a **negative** score: training on it *raised* the test loss.
#
# In this notebook you will
# 1. train a small CNN on scikit-learn's handwritten digits with a visible training loop that saves
#    checkpoints with `CheckpointRecorder`,
# 2. build a gradient index once (the expensive part),
# 3. query proponents and opponents (cheap) and browse them in the `InfluenceExplorer`.
#
# Everything runs on a laptop CPU in well under a minute.

# %%
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.examples import DigitsCNN, load_digits_split

torch.manual_seed(0)
# %load_ext tracin_widgets

# %% [markdown]
# ## 1 · Data
# 1,797 8×8 grey-scale digits ship inside scikit-learn, so nothing is downloaded.
# `load_digits_split` returns tensors: images `(N, 1, 8, 8)` in $[0, 1]$ and labels `(N,)`.

# %%
split = load_digits_split(seed=0)
X_train, y_train = split.train
X_test, y_test = split.test
print("train", tuple(X_train.shape), "test", tuple(X_test.shape))

# %% [markdown]
# ## 2 · Train, saving checkpoints
# TracInCP needs the weights at a few points along training **and the learning rate used after each
# of them** (the $\eta_i$ above). `CheckpointRecorder.save(model, optimizer, step)` writes both into
# `run_dir/checkpoint-<step>.pt`. Here the learning rate decays every epoch, and we save at the end of
# every other epoch: 4 checkpoints.

# %%
run_dir = Path(tempfile.mkdtemp(prefix="tracin-quickstart-"))
model = DigitsCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.85)
recorder = te.CheckpointRecorder(run_dir)

epochs, batch_size, step = 8, 32, 0
for epoch in range(epochs):
    model.train()
    for idx in torch.randperm(len(X_train)).split(batch_size):
        optimizer.zero_grad()
        F.cross_entropy(model(X_train[idx]), y_train[idx]).backward()
        optimizer.step()
        step += 1
    if epoch % 2 == 1:
        recorder.save(model, optimizer, step)  # weights + the learning rate the next steps use
    scheduler.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch}: test accuracy {acc:.3f}")

# %%
ckpts = te.Checkpoints.from_dir(run_dir)
ckpts

# %% [markdown]
# ## 3 · Featurize once
# `tracin.index(train_data)` computes the per-example gradient of every training example at every
# checkpoint and stores it (here exactly, in memory; pass `proj_dim=` for a random projection and
# `store=path` for an on-disk index, see notebook 07). This is the only pass over the training set:
# it costs about as much as one training epoch per checkpoint.

# %%
tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
t0 = time.perf_counter()
index = tracin.index(split.train, progress=False)
print(f"featurized {index.n_train} examples x {len(ckpts)} checkpoints in {time.perf_counter() - t0:.1f} s")
index

# %% [markdown]
# ## 4 · Query: proponents and opponents
# A query costs one gradient per checkpoint for the test example plus a product with the stored
# features. `index.top_k(test_data, k)` returns a `TopK` with `.proponents` and `.opponents`
# (`indices` and `scores`, shape `(n_test, k)`, best first).
#
# With the `tracin_widgets` extension loaded (`%load_ext tracin_widgets`, first cell), a `TopK`
# displays as a gallery once the magic knows which data the indices refer to:

# %%
# %tracin use split.train split.test
result = index.top_k(split.test, k=6)
result[0]  # test example 0: its 6 strongest proponents (top row) and opponents (bottom row)

# %% [markdown]
# **How to read it.** Proponents of a test digit are mostly the same digit, written the same way: their
# gradients point the same way as the test gradient, so each step on them also lowered this test loss.
# Opponents are typically *other* digits that share strokes with it (for a 6, often 0s), or training
# examples whose label is surprising: a step on them pulled the shared features towards a different
# class. Scores add over checkpoints; a checkpoint with a larger learning rate counts more.
#
# A quick check over the whole test set: the strongest proponent should usually share the test
# example's label, the strongest opponent usually should not.

# %%
top = index.top_k(split.test, k=1)
same_pro = (y_train[top.proponents.indices[:, 0]] == y_test).float().mean().item()
same_opp = (y_train[top.opponents.indices[:, 0]] == y_test).float().mean().item()
print(f"top proponent has the test label: {same_pro:.1%};  top opponent: {same_opp:.1%}")

# %% [markdown]
# The raw scores are available too: `index.influence(test_data)` is the full `(n_test, n_train)`
# matrix, and `index.self_influence()` scores each training example against itself
# ($\sum_i \eta_i \lVert \nabla \ell(w_i, z) \rVert^2$; notebook 02 uses it to find mislabeled data).

# %%
scores = index.influence(split.test)
print(tuple(scores.shape), "largest score", f"{scores.max().item():.3f}")
torch.testing.assert_close(scores[0, result.proponents.indices[0]].float(), result.proponents.scores[0].float())

# %% [markdown]
# ## 5 · Explore
# The `InfluenceExplorer` puts it together: pick a test example on the left, see its proponents and
# opponents. Click any tile; `explorer.selected` holds your picks for later code.

# %%
explorer = tw.InfluenceExplorer(index, split.train, split.test, k=8)
explorer

# %% [markdown]
# ## What next
# * `02_mislabeled_examples`: self-influence finds flipped labels.
# * `03_clusters_and_similarity`: TracIn clusters versus embedding clusters.
# * `%tracin help` lists the notebook shortcuts.

# %%
# %tracin help
