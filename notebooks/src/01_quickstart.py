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
# Everything runs on a laptop CPU in well under a minute. Along the way, cells marked **Predict first**
# ask you to guess before you run the next cell, and **Try this** cells give you a change to make and a
# check to run.

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
# TracInCP needs the weights at a few points along training **and a learning rate for each** (the
# $\eta_i$ above). `CheckpointRecorder.save(model, optimizer, step)` writes the weights and the
# optimizer's *current* learning rate into `run_dir/checkpoint-<step>.pt`.
#
# Which rate is the right one? In the TracIn paper a checkpoint's gradient stands in for the steps taken
# *since the previous checkpoint*, so it is weighted by the learning rate of those steps. Below, the
# learning rate decays after every epoch (`scheduler.step()` at the end of the epoch) and we save at the
# end of every other epoch, **before** `scheduler.step()`: each checkpoint records the rate the epoch's
# steps just used. (Calling `save` after `scheduler.step()` would record the next epoch's rate instead,
# one decay lower.) 4 checkpoints.

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
        recorder.save(model, optimizer, step)  # weights + the learning rate these steps used (before the decay)
    scheduler.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch}: test accuracy {acc:.3f}")

# %% [markdown]
# **Predict first.** The learning rate starts at 0.1 and is multiplied by 0.85 after every epoch; we saved
# after epochs 1, 3, 5 and 7 (counting from 0). Which four learning rates will the checkpoints carry?

# %%
ckpts = te.Checkpoints.from_dir(run_dir)
ckpts  # 0.1 * 0.85**1, 0.85**3, 0.85**5, 0.85**7

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
# displays as a gallery once the magic knows which data the indices refer to.
#
# **Predict first.** Test example 0 is a 6. What will its proponents look like? And its opponents: other
# 6s drawn differently, or other digits?

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
# **Predict first.** Over the whole test set, how often does the strongest proponent share the test
# example's label? And the strongest opponent?

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
# ## 6 · Try this
# **Try 1. Drop the learning-rate weights.** `index.influence_per_checkpoint(test)` returns the terms
# $\eta_i \langle g_i(z), g_i(z') \rangle$, shape `(C, n_test, n_train)`. Divide each by its $\eta_i$ and
# sum: uniform weights. Self-check: how many test examples keep the same top proponent? (The later,
# smaller-rate checkpoints gain weight; the top proponent rarely changes.)

# %%
terms = index.influence_per_checkpoint(split.test)                     # (C, n_test, n_train)
uniform = (terms / index.learning_rates.to(terms.dtype)[:, None, None]).sum(0)
same_top = (uniform.argmax(1) == scores.argmax(1)).float().mean().item()
print(f"same top proponent with uniform weights: {same_top:.0%} of the test examples")

# %% [markdown]
# **Try 2. Use one checkpoint.** Replace `uniform` by `terms[-1]` (the last checkpoint only) or `terms[0]`
# (the first). Self-check: print the share of test examples whose top proponent has the test label, as in
# section 4. Which checkpoint alone comes closest to all four?

# %%
for name, s in (("first checkpoint", terms[0]), ("last checkpoint", terms[-1]), ("all four", terms.sum(0))):
    print(f"{name:>16}: top proponent has the test label for {(y_train[s.argmax(1)] == y_test).float().mean():.1%}")

# %% [markdown]
# **Try 3. Change k.** In section 4, ask for `k=20` and look at where the opponents stop being
# look-alikes. Self-check: `index.top_k(split.test, k=20).proponents.scores[0]` is sorted, highest first.
#
# ## Questions
# 1. A checkpoint saved right after a learning-rate drop, with `save` called after `scheduler.step()`,
#    records which rate? Why does TracInCP want the other one?
# 2. Why are the opponents of a 6 mostly *other* digits, and not badly drawn 6s?
# 3. The index took about as long as one epoch per checkpoint; a query took milliseconds. What would it
#    cost to answer the same query without an index?
#
# ## What next
# * `02_mislabeled_examples`: self-influence finds flipped labels.
# * `03_clusters_and_similarity`: TracIn clusters versus embedding clusters.
# * `09_when_tracin_misleads`: when a few training examples top every list, and what to use instead.
# * `%tracin help` lists the notebook shortcuts.

# %%
# %tracin help
