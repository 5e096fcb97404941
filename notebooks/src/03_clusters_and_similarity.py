"""Source of notebooks/03_clusters_and_similarity.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 03 · TracIn clusters and similarity versus embedding neighbours
#
# Two training examples are *TracIn-similar* when their loss gradients point the same way at the saved
# checkpoints: a step on one also lowers the loss of the other. Normalizing each gradient to unit length
# and averaging the per-checkpoint cosines with learning-rate weights gives a similarity in $[-1, 1]$:
#
# $$\mathrm{sim}(z, z') = \frac{\sum_i \eta_i \cos\big(\nabla \ell(w_i, z), \nabla \ell(w_i, z')\big)}{\sum_i \eta_i},
# \qquad \mathrm{distance} = 1 - \mathrm{sim} .$$
#
# The usual alternative is the penultimate-layer **embedding**: the features the final linear layer sees.
# The TracIn paper and blog contrast the two: embedding neighbours are examples that *look* alike to the
# model, whatever their labels; influence splits them into proponents (similar, same label: they helped)
# and opponents (similar, other label: they hurt).
#
# This notebook clusters the digits both ways, compares the clusters, then compares the neighbours.
# One thing to expect: for a cross-entropy loss the last layer's gradient is
# $(p - \mathrm{onehot}(y))\, a^\top$, so gradient *directions* carry the label the example was trained with.
# TracIn clusters therefore split by label first; within a label, the direction also depends on *which
# other class competes* for the example, the structure that decides who helps and who hurts whom.

# %%
import tempfile

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.analysis.embeddings import embed, nearest_neighbors
from tracin_engine.examples import DigitsCNN, load_digits_split, train

# %load_ext tracin_widgets
split = load_digits_split(seed=0)
y_train, y_test = split.train[1], split.test[1]
torch.manual_seed(0)
model = DigitsCNN()
run_dir = tempfile.mkdtemp(prefix="tracin-clusters-")
train(model, split.train, run_dir, epochs=8, n_checkpoints=4, lr=0.1, lr_decay=0.85)
# Clustering compares every example with every cluster centre for many iterations, so it pays to keep the
# rows short: a projected index (512 numbers per checkpoint, Kronecker-factored per layer) keeps
# cosines within a few hundredths and makes clustering take seconds instead of minutes.
tracin = te.TracIn(model, te.Checkpoints.from_dir(run_dir), loss_fn=F.cross_entropy, proj_dim=512,
                   projection="factored")
index = tracin.index(split.train, progress=False)
index

# %% [markdown]
# ## 1 · TracIn clusters
# `index.cluster(n)` clusters the stored, normalized gradients (distance $1 - \mathrm{sim}$). It returns
# `labels` (one cluster per training example), `sizes`, `representatives` (the most central members of
# each cluster) and `members(k)`. With the extension loaded and the data named by `%tracin use`, the
# result displays as a table of sizes, label mix and representatives.

# %%
# %tracin use split.train class_names=split.class_names
N_CLUSTERS = 20
clusters = index.cluster(N_CLUSTERS)
clusters

# %% [markdown]
# ## 2 · Embedding clusters
# k-means on the unit-normalized penultimate-layer embeddings of the last checkpoint (cosine geometry,
# like the TracIn side).

# %%
E_train = F.normalize(embed(tracin, split.train), dim=1)
emb_labels = torch.as_tensor(KMeans(N_CLUSTERS, n_init=4, random_state=0).fit_predict(E_train.numpy()))
with torch.no_grad():
    logits = model(split.train[0])
    logits[torch.arange(len(y_train)), y_train] = -float("inf")
    runner_up = logits.argmax(1)           # the class that competes most with the label


def purity(cluster_labels, target):
    """Share of examples whose `target` is the most common one in their cluster."""
    hits = sum(int(torch.bincount(target[cluster_labels == c]).max()) for c in cluster_labels.unique())
    return hits / len(target)


tracin_labels = torch.as_tensor(clusters.labels)
print(f"{'':>18} {'digit purity':>12} {'(digit, runner-up) purity':>26} {'adjusted Rand index vs digits':>30}")
for name, lab in (("TracIn clusters", tracin_labels), ("embedding k-means", emb_labels)):
    print(f"{name:>18} {purity(lab, y_train):12.3f} {purity(lab, 10 * y_train + runner_up):26.3f} "
          f"{adjusted_rand_score(y_train, lab):30.3f}")
print(f"adjusted Rand index between the two clusterings: {adjusted_rand_score(tracin_labels, emb_labels):.3f}")

# %% [markdown]
# With 20 clusters for 10 digits, each TracIn cluster holds a single digit (a mislabeled example would
# sit with its *given* label), while embedding clusters follow appearance and mix digits. Within a digit,
# the TracIn clusters follow the competing class (the 3s the model might take for a 5 apart from those it
# might take for an 8) only a little more often than the embedding clusters: the runner-up column.
# The gallery shows each TracIn cluster as a strip, most central members first, with its label mix.

# %%
gallery = tw.ClusterGallery(index, split.train, n_clusters=N_CLUSTERS, clusters=clusters,
                            class_names=split.class_names)
gallery

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for ax, (name, lab) in zip(axes, (("TracIn clusters", tracin_labels), ("embedding k-means", emb_labels))):
    counts = torch.zeros(N_CLUSTERS, 10)
    for c in range(N_CLUSTERS):
        counts[c] = torch.bincount(y_train[lab == c], minlength=10)
    ax.imshow(counts / counts.sum(1, keepdim=True).clamp(min=1), cmap="Blues", aspect="auto")
    ax.set(title=name, xlabel="digit", xticks=range(10))
axes[0].set_ylabel("cluster")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · Neighbours of a test example: similarity, proponents, opponents, embedding
# For every test digit take its 10 nearest training examples four ways and ask how often they carry the
# test digit's label, and how close they are in the embedding.

# %%
K = 10
E_test = F.normalize(embed(tracin, split.test), dim=1)
test_features = tracin.features(split.test)   # (checkpoints, n_test, dim): compute once, query twice
top = index.top_k(k=K, features=test_features)
sim_idx = index.similarity(features=test_features).topk(K, dim=1).indices
views = {"TracIn similarity": sim_idx, "TracIn proponents": top.proponents.indices,
         "TracIn opponents": top.opponents.indices,
         "embedding neighbours": nearest_neighbors(E_train, E_test, k=K).indices,
         "random": torch.randint(0, len(y_train), (len(y_test), K), generator=torch.Generator().manual_seed(0))}
print(f"{'':>21} {'same label':>10} {'embedding cosine to the test digit':>36}")
for name, idx in views.items():
    same = (y_train[idx] == y_test[:, None]).float().mean().item()
    cos = (E_train[idx] * E_test[:, None, :]).sum(-1).mean().item()
    print(f"{name:>21} {same:10.1%} {cos:36.3f}")

# %% [markdown]
# Read the last two columns together. Proponents share the test label and sit close in the embedding.
# Opponents carry *other* labels, yet they are far closer to the test digit in the embedding than random
# training examples are: they are the look-alikes of another class, the examples the embedding view
# lumps in with the true neighbours and the influence view sets apart.
