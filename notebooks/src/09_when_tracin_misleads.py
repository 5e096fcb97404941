"""Source of notebooks/09_when_tracin_misleads.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 09 · When TracIn misleads you, and what to use instead
#
# A TracIn score is a sum of dot products, and a dot product is a product of two lengths and a cosine:
#
# $$\eta_i \langle g_i(z), g_i(z') \rangle = \eta_i\, \lVert g_i(z) \rVert\, \lVert g_i(z') \rVert \cos\theta_i .$$
#
# For one test example $z'$, the factor $\lVert g_i(z') \rVert$ is the same for every training example, but
# $\lVert g_i(z) \rVert$ is not: a training example the model fits badly (a wrong label, an odd drawing) has
# a gradient many times longer than a typical one. Such an example can top the proponent or opponent list
# of *many* test examples, whether or not it resembles them. Users of the original TracIn code report
# exactly this: the same few training examples come back for every query.
#
# This notebook makes that happen on purpose, measures it, fixes it with two normalized scores
# (`index.similarity` and `index.renormalized_top_k`), and then compares four attribution methods on the
# same query: TracIn, SOURCE, embedding neighbours and a dropout ensemble.

# %%
import tempfile

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.analysis.embeddings import embed, nearest_neighbors
from tracin_engine.examples import DigitsCNN, load_digits_split, train

torch.set_num_threads(1)   # these small models run fastest on one thread
split = load_digits_split(seed=0)
X_train, y_clean = split.train
X_test, y_test = split.test
n, n_test = len(y_clean), len(y_test)

# Real data sets hold a few wrong labels: flip 2% of them (to another random digit).
g = torch.Generator().manual_seed(3)
flipped = torch.randperm(n, generator=g)[: n // 50]
y_train = y_clean.clone()
y_train[flipped] = (y_clean[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
is_flipped = y_train != y_clean
train_data = (X_train, y_train)


class DropoutDigitsCNN(DigitsCNN):
    """DigitsCNN with dropout before the last layer (used by the dropout ensemble in section 4)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def embed(self, x):
        return self.drop(super().embed(x))


torch.manual_seed(0)
model = DropoutDigitsCNN()
run_dir = tempfile.mkdtemp(prefix="tracin-misleads-")
train(model, train_data, run_dir, epochs=8, n_checkpoints=4, lr=0.1, lr_decay=0.85)
tracin = te.TracIn(model, te.Checkpoints.from_dir(run_dir), loss_fn=F.cross_entropy)
index = tracin.index(train_data, progress=False)
test_features = tracin.features(split.test)          # (checkpoints, n_test, dim): computed once, reused
with torch.no_grad():
    print(f"{int(is_flipped.sum())} flipped labels; test accuracy "
          f"{(model(X_test).argmax(1) == y_test).float().mean():.3f}")

# %% [markdown]
# ## 1 · Do a few training examples dominate?
# Take the strongest proponent and the strongest opponent of each of the 297 test digits.
#
# **Predict first.** If every test digit had its own "most similar" training examples, we would see
# close to 297 distinct top-1 opponents. How many distinct ones do you expect: about 250, 100 or 40?

# %%
top1 = index.top_k(k=1, features=test_features)


def dominance(pro, opp):
    """Summary of top-1 proponents / opponents (LongTensors (n_test,)) over the test set."""
    who, count = opp.unique(return_counts=True)
    return {"distinct top-1 proponents": len(pro.unique()), "distinct top-1 opponents": len(who),
            "tests led by the most common opponent": int(count.max()),
            "top-1 opponents that are flipped labels": f"{is_flipped[opp].float().mean():.0%}"}


pd.Series(dominance(top1.proponents.indices[:, 0], top1.opponents.indices[:, 0]), name="TracIn")

# %% [markdown]
# A few dozen training examples cover all 297 test digits, and most of them are the flipped labels we
# planted. Who are they? Their **gradient norm** tells: the square root of the self-influence,
# $\sqrt{\sum_i \eta_i \lVert g_i(z) \rVert^2}$, is a learning-rate-weighted gradient length.

# %%
norm = index.self_influence().sqrt()
norm_rank = norm.argsort(descending=True).argsort()       # 0 = longest gradient
who, count = top1.opponents.indices[:, 0].unique(return_counts=True)
order = count.argsort(descending=True)[:6]
pd.DataFrame({"training example": who[order].tolist(), "top-1 opponent of n tests": count[order].tolist(),
              "label (given)": y_train[who[order]].tolist(), "true label": y_clean[who[order]].tolist(),
              "gradient-norm rank (of 1500)": norm_rank[who[order]].tolist()})

# %% [markdown]
# The dominant opponents sit among the longest gradients of the training set. Over every training
# example: how often it appears among the top-10 opponents of some test digit, against its gradient norm.

# %%
top10 = index.top_k(k=10, features=test_features)
appearances = torch.bincount(top10.opponents.indices.flatten(), minlength=n)
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.scatter(norm[~is_flipped], appearances[~is_flipped], s=6, alpha=0.5, label="correct label")
ax.scatter(norm[is_flipped], appearances[is_flipped], s=14, color="red", label="flipped label")
ax.set(xscale="log", xlabel="gradient norm (sqrt of self-influence)", ylabel="times in a top-10 opponent list")
ax.legend()
plt.show()

# %% [markdown]
# Is that wrong? Not as a statement about training: a long gradient really does move the weights a lot,
# so a wrong label really did push many test losses up. It is wrong as an answer to the question most
# people ask of a gallery, "which training examples are *like* this one and taught the model about it?".
#
# ## 2 · Two normalized scores
# * `index.similarity(test)`: the learning-rate-weighted mean **cosine** of the gradients; both lengths
#   drop out. Proponents are the most similar, opponents the most anti-similar.
# * `index.renormalized_top_k(test, k)`: $\sum_i \eta_i \langle g_i(z'), g_i(z) \rangle / \lVert g_i(z) \rVert$,
#   (Diffusion-ReTrac's renormalization) divides by the *training* gradient's length only, so the test
#   example's own scale still weighs the checkpoints.
#
# **Predict first.** With the training example's length removed, will the top-1 opponents still be
# mostly flipped labels? And will the proponents still carry the test digit's label?

# %%
sim = index.similarity(features=test_features)
renorm = index.renormalized_top_k(k=10, features=test_features)
sim_pro, sim_opp = sim.topk(10, dim=1).indices, (-sim).topk(10, dim=1).indices
views = {"TracIn": (top10.proponents.indices, top10.opponents.indices),
         "renormalized": (renorm.proponents.indices, renorm.opponents.indices),
         "cosine similarity": (sim_pro, sim_opp)}
table = pd.DataFrame({name: {**dominance(pro[:, 0], opp[:, 0]),
                             "top-10 proponents with the test label": f"{(y_train[pro] == y_test[:, None]).float().mean():.1%}"}
                      for name, (pro, opp) in views.items()})
table

# %% [markdown]
# Both normalized scores spread the top-1 opponents over about twice as many training examples, and far
# fewer of them are flipped labels: the opponents become the look-alikes of another class, which is what
# a reader of the gallery wants. The proponents keep the test label.
#
# **Which one to use.**
#
# | question | score |
# |---|---|
# | which examples moved this test loss the most (counterfactual, includes the long gradients) | `influence`, `top_k` |
# | which training examples resemble this one, as the model sees it (galleries, clusters) | `similarity` |
# | proponents / opponents without the long-gradient bias, keeping the test's checkpoint weighting | `renormalized_top_k` |
# | which training examples are suspicious in themselves | `outliers()` (notebook 02) |
#
# ## 3 · Try this
# **Try 1.** Is the dominance a property of the flipped labels only? Recount the raw TracIn top-1
# opponents with the flipped examples excluded (set their scores to $+\infty$ so they cannot be opponents).
# Self-check: the distinct count rises, and the new dominant opponents still have above-median norms.

# %%
scores = index.influence(features=test_features)
scores[:, is_flipped] = float("inf")
opp_clean = scores.argmin(1)
who_c, count_c = opp_clean.unique(return_counts=True)
print(f"distinct top-1 opponents without the flipped labels: {len(who_c)} "
      f"(with them: {len(top1.opponents.indices.unique())})")
print("median gradient-norm rank of the 5 most common:",
      int(norm_rank[who_c[count_c.argsort(descending=True)[:5]]].median()), "of", n)

# %% [markdown]
# **Try 2.** Change `k=10` to `k=50` in section 2's views and count how many distinct training
# examples appear anywhere in the TracIn and the cosine opponent lists. Self-check: cosine still covers
# more distinct examples.
#
# ## 4 · Same query, four methods
# Attribution methods disagree, and comparing them on one query is the quickest way to see what each
# assumes.
# * **TracIn** (this index): gradients along the training run.
# * **SOURCE** (Bae et al., 2024): an influence-function-like correction per segment of the run, with
#   EK-FAC curvature; built by the same `tracin.index(..., method="source", segments=2)`.
# * **Embedding neighbours**: nearest training examples in the penultimate layer of the final model
#   (no labels, no training dynamics).
# * **Dropout ensemble** (Deng et al., 2024): four TracIn indexes, each with a fixed dropout mask, averaged;
#   cheaper than training four models and smoother than one.
#
# **Predict first.** Which two methods will agree most on the top-10 proponents?

# %%
source = tracin.index(train_data, method="source", segments=2, progress=False)
ensemble = te.dropout_ensemble(tracin, train_data, n_members=4, progress=False)
E_train = F.normalize(embed(tracin, train_data), dim=1)
E_test = F.normalize(embed(tracin, split.test), dim=1)
K = 10
lists = {"TracIn": top10.proponents.indices, "SOURCE": source.top_k(split.test, k=K).proponents.indices,
         "dropout ensemble": ensemble.top_k(split.test, k=K).proponents.indices,
         "embedding": nearest_neighbors(E_train, E_test, k=K).indices}


def overlap(a, b):
    """Mean share of common members between two (n_test, K) lists."""
    return sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a, b)) / a.numel()


pd.DataFrame({a: {b: f"{overlap(lists[a], lists[b]):.0%}" for b in lists} for a in lists})

# %% [markdown]
# The table is the mean share of the top-10 proponents two methods have in common. The gradient methods
# agree with each other far more than with the embedding: the embedding finds examples that *look* alike
# to the final model, whatever their labels and whatever they did during training. SOURCE changes the
# order within the same neighbourhood; the dropout ensemble stays closest to plain TracIn.
#
# One query, side by side (its label and the labels of each method's top 5 proponents):

# %%
q = 5
print("test digit", int(y_test[q]))
for name, idx in lists.items():
    print(f"{name:>17}: {idx[q, :5].tolist()}  labels {y_train[idx[q, :5]].tolist()}")

# %% [markdown]
# In the explorer, the **method** menu switches between indexes built on the same training data (here
# TracIn and SOURCE); switch on the same test example and compare the strips.

# %%
tw.InfluenceExplorer(index, train_data, split.test, k=8, methods={"SOURCE": source}, test_index=q)

# %% [markdown]
# ## Questions
# 1. A training example has the largest self-influence in the data set. Why is it likely to be a top
#    opponent of many test examples, and why does that say little about any one of them?
# 2. Cosine similarity ignores both gradient lengths. What does it lose that `renormalized_top_k` keeps?
# 3. For which question would you *want* the raw TracIn ranking, long gradients included?
# 4. Embedding neighbours need no checkpoints at all. What can they not tell you that TracIn can?
