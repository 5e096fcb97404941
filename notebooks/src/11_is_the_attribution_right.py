"""Source of notebooks/11_is_the_attribution_right.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 11 · Is the attribution right? Check it by retraining
#
# An influence score is a *prediction*: "if this training example had not been there, the test loss
# would be this much higher (proponent) or lower (opponent)". Retraining is the only way to check a
# prediction like that, and on a small problem a CPU can afford it. This notebook does two checks on a
# digits classifier:
#
# 1. **Remove and retrain.** For a few test examples, drop their top-k proponents, their top-k
#    opponents, or k random examples, retrain, and measure the test loss. Because retraining with
#    another seed moves the loss too, we first measure that **seed noise**: an effect smaller than it
#    proves nothing.
# 2. **Linear datamodeling score (LDS)** (Park et al., TRAK, 2023). Train on 50 random halves $S_m$ of
#    the training set. A score $\tau(z, z')$ predicts the test loss of each run, up to a constant, as
#    $-\sum_{z \in S_m} \tau(z, z')$. The LDS is the Spearman correlation, over the 50 runs, between
#    predicted and actual test loss, averaged over test examples: 1 is perfect, 0 is no better than
#    chance. We compare TracInCP with learning-rate weights, the last checkpoint alone, uniform
#    weights and SOURCE.
#
# The model is a small MLP so that 84 retrainings fit in about a minute.

# %%
import tempfile

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.examples import MLP, load_digits_split, train

torch.set_num_threads(1)   # a model this small trains fastest on one thread (and leaves the other core free)
split = load_digits_split(seed=0)
X_train, y_train = split.train[0].flatten(1), split.train[1]
X_test, y_test = split.test[0].flatten(1), split.test[1]
n = len(y_train)
EPOCHS, CKPTS = 15, 6


def fit(keep=None, seed=0):
    """Train MLP(64 -> 32 -> 32 -> 10) on the kept training examples; returns (model, run_dir)."""
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep
    torch.manual_seed(seed)
    model = MLP(64, 10, hidden=32)
    run_dir = tempfile.mkdtemp(prefix="tracin-retrain-")
    train(model, (X_train[keep], y_train[keep]), run_dir, epochs=EPOCHS, n_checkpoints=CKPTS, lr=0.2,
          lr_decay=0.85, seed=seed)
    return model, run_dir


def test_losses(model):
    """Cross-entropy of every test example: Tensor (n_test,)."""
    with torch.no_grad():
        return F.cross_entropy(model(X_test), y_test, reduction="none")


model, run_dir = fit()
base = test_losses(model)
acc = (model(X_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {acc:.3f}, mean test loss {base.mean():.3f}")
tracin = te.TracIn(model, te.Checkpoints.from_dir(run_dir), loss_fn=F.cross_entropy)
index = tracin.index((X_train, y_train), progress=False)

# %% [markdown]
# ## 1 · Seed noise: how much does the test loss move when nothing changes?
# Retrain on the full training set with 4 other seeds (the batch order and the initialization change).
#
# **Predict first.** The mean test loss is about 0.2. Will another seed move a test example's loss by
# about 1%, 10% or 50% of itself?

# %%
seed_runs = torch.stack([test_losses(fit(seed=s)[0]) for s in range(1, 5)])      # (4, n_test)
noise = (seed_runs - base).abs()
print(f"mean |change of a test loss| between seeds: {noise.mean():.3f} "
      f"(relative to the loss itself: median {(noise / base.clamp(min=1e-3)).median():.0%})")

# %% [markdown]
# About half of the loss itself: a network retrained with another seed differs from the original by far
# more than any single training example could explain. So in the removal test below we (a) remove groups of examples, not one, (b) retrain with
# the **same seed** as the original run, so only the removal differs, and (c) compare the effect with
# a random removal of the same size.
#
# ## 2 · Remove the top-k and retrain
# For 10 test examples (those with the highest loss, where removing help should show most), retrain
# without their 30 strongest proponents, their 30 strongest opponents, or 30 random examples.
#
# **Predict first.** TracIn says removing proponents *raises* the test loss and removing opponents
# *lowers* it. For how many of the 10 will each prediction hold?

# %%
K, queries = 30, base.argsort(descending=True)[:10]
top = index.top_k((X_test[queries], y_test[queries]), k=K)
g = torch.Generator().manual_seed(0)
change = {"proponents removed": [], "opponents removed": [], "random removed": []}
for row, j in enumerate(queries.tolist()):
    drops = {"proponents removed": top.proponents.indices[row], "opponents removed": top.opponents.indices[row],
             "random removed": torch.randperm(n, generator=g)[:K]}
    for name, drop in drops.items():
        keep = torch.ones(n, dtype=torch.bool)
        keep[drop] = False
        change[name].append((test_losses(fit(keep)[0])[j] - base[j]).item())
for name, values in change.items():
    v = torch.tensor(values)
    print(f"{name:>19}: median change {v.median():+.3f}, raised the loss for {int((v > 0).sum())} of {len(v)}")

fig, ax = plt.subplots(figsize=(5.5, 3))
ax.boxplot(list(change.values()))
ax.set_xticks(range(1, 4), list(change))
ax.axhline(0, color="grey", lw=0.5)
ax.set_ylabel("change of the test loss")
plt.show()

# %% [markdown]
# Removing proponents raises the loss of almost every one of these hard test examples, by far more than
# seed noise or a random removal. Opponents are the weak half: removing them lowers the loss for only
# about half of the queries, with a median change below the random removal's but no reliable effect per
# query. TracIn ranks proponents much better than opponents here; an opponent's score is often dominated
# by its own large gradient (notebook 09), which says little about what its absence would change.
#
# ## 3 · A small linear datamodeling score
# 50 retrainings on random halves of the training set (same seed each time), then the Spearman
# correlation per test example between the actual test loss and each method's prediction.

# %%
M = 50
masks = torch.rand(M, n, generator=torch.Generator().manual_seed(1)) < 0.5        # (M, n_train)
actual = torch.stack([test_losses(fit(masks[m])[0]) for m in range(M)])          # (M, n_test)

terms = index.influence_per_checkpoint((X_test, y_test)).double()                 # (C, n_test, n_train)
etas = index.learning_rates.double()
source = tracin.index((X_train, y_train), method="source", segments=2, progress=False)
scores = {
    "TracInCP (learning-rate weights)": terms.sum(0),
    "last checkpoint only": terms[-1] / etas[-1],
    "uniform weights": (terms / etas[:, None, None]).sum(0),
    "SOURCE (2 segments)": source.influence((X_test, y_test)).double(),
    "random scores (reference)": torch.randn(terms.shape[1:], generator=g, dtype=torch.float64),
}


def ranks(a):
    return a.argsort(0).argsort(0).double()


def lds(score):
    """Mean over test examples of Spearman(actual loss over runs, -sum of scores over each run's subset)."""
    predicted = -(masks.double() @ score.T)                                         # (M, n_test)
    ra, rp = ranks(actual.double()), ranks(predicted)
    ra, rp = ra - ra.mean(0), rp - rp.mean(0)
    return ((ra * rp).sum(0) / (ra.norm(dim=0) * rp.norm(dim=0))).mean().item()


for name, score in scores.items():
    print(f"{name:>33}: LDS {lds(score):+.3f}")

# %% [markdown]
# Read it like this: 0 means the scores carry no information about what retraining does, 1 means they
# order the 50 retrained models perfectly. Attribution methods on real networks typically land between
# 0.1 and 0.4 on such tests (retraining itself is noisy: section 1). Compare the rows, not the absolute
# value. On this model the checkpoints matter most: one checkpoint halves the LDS, while learning-rate
# weights beat uniform ones only slightly, and SOURCE's curvature correction adds a little more.
#
# ## Try this
# **Try 1.** Does the LDS depend on the number of checkpoints? Sum `terms[-2:]` (the last two) and
# compute `lds(...)`. Self-check: the value should lie between "last checkpoint only" and TracInCP.

# %%
two_last = lds(terms[-2:].sum(0))
lo, hi = lds(scores["last checkpoint only"]), lds(scores["TracInCP (learning-rate weights)"])
print(f"last two checkpoints: LDS {two_last:+.3f}; between one checkpoint and all of them: {lo <= two_last <= hi}")

# %% [markdown]
# **Try 2.** Change `K` in section 2 to 5, rerun that cell. Self-check: the changes shrink towards the
# random row, and the count of raised losses for proponents falls towards the seed-noise level.
#
# **Try 3.** Replace the test loss by the *margin* (the correct logit minus the largest other logit) in
# `test_losses` and rerun sections 2 and 3. Datamodels are often fitted on margins because the loss
# saturates. Self-check: the ranking of methods should stay close.
#
# ## Questions
# 1. Why do we retrain with the same seed in section 2 but not in section 1?
# 2. The LDS uses 50 halves of the data. Why halves rather than removing a single example 50 times?
# 3. A method with a higher LDS can still give a worse top-10 gallery. How?
