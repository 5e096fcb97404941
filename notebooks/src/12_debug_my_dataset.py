"""Source of notebooks/12_debug_my_dataset.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 12 · Debug my dataset, end to end
#
# A data set rarely has one kind of fault. Here we plant three in the digits, the way they happen in
# practice, then find them with TracIn tools without peeking, fix them, retrain and report:
#
# 1. **Confusable label errors**: 4% of the labels are changed to the class the model finds *most
#    similar* (a 4 labelled 9, a 3 labelled 8), the errors annotators actually make. Harder to find than
#    random flips.
# 2. **Train/test leakage**: 20 test images also sit in the training set, slightly re-scanned (a little
#    noise). The test accuracy on them measures memory, not generalization.
# 3. **A backdoor**: 24 training images of other digits carry a small bright patch in a corner and the
#    label 7. A model trained on them learns "patch means 7"; any image with the patch becomes a 7.
#
# The tools: self-influence outliers (notebook 02), the test set's aggregated opponents, gradient
# similarity between test and training examples, and TracIn clusters.

# %%
import tempfile

import pandas as pd
import torch
import torch.nn.functional as F

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.examples import DigitsCNN, load_digits_split, train

torch.set_num_threads(1)   # a small CNN runs fastest on one thread
split = load_digits_split(seed=0)
X_clean, y_true = split.train
X_test, y_test = split.test
g = torch.Generator().manual_seed(7)


def fit(X, y, seed=0):
    """Train DigitsCNN on (X, y); returns (model, Checkpoints)."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    run_dir = tempfile.mkdtemp(prefix="tracin-debug-")
    train(model, (X, y), run_dir, epochs=10, n_checkpoints=5, lr=0.1, lr_decay=0.85, seed=seed)
    return model, te.Checkpoints.from_dir(run_dir)


def add_patch(X):
    """A 2x2 bright patch in the bottom-right corner: the backdoor trigger."""
    X = X.clone()
    X[:, :, 6:8, 6:8] = 1.0
    return X


# %% [markdown]
# ## 1 · Plant the faults (the answer key stays hidden until the report)

# %%
# 1. confusable label errors: each victim gets the runner-up class of a model trained on clean labels
clean_model, _ = fit(X_clean, y_true)
with torch.no_grad():
    logits = clean_model(X_clean)
logits[torch.arange(len(y_true)), y_true] = -float("inf")
perm = torch.randperm(len(y_true), generator=g)
victims = perm[:60]
y_train = y_true.clone()
y_train[victims] = logits[victims].argmax(1)

# 2. leakage: 20 test images, re-scanned with a little noise, appended to the training set
leaked = torch.randperm(len(y_test), generator=g)[:20]
X_leak = (X_test[leaked] + 0.03 * torch.randn(X_test[leaked].shape, generator=g)).clamp(0, 1)

# 3. backdoor: 24 images of digits other than 7, patched and labelled 7
others = perm[60:][y_true[perm[60:]] != 7][:24]
X_bd = add_patch(X_clean[others])

X_train = torch.cat([X_clean, X_leak, X_bd])
y_train = torch.cat([y_train, y_test[leaked], torch.full((24,), 7)])
n = len(y_train)
fault = ["ok"] * n                                     # the answer key, used only in the report
for i in victims.tolist():
    fault[i] = "label error"
for i in range(len(y_true), len(y_true) + 20):
    fault[i] = "leaked test image"
for i in range(len(y_true) + 20, n):
    fault[i] = "backdoor"
fault = pd.Series(fault)
shuffle = torch.randperm(n, generator=g)               # hide the faults' positions
X_train, y_train, fault = X_train[shuffle], y_train[shuffle], fault[shuffle.numpy()].reset_index(drop=True)
is_fault = {kind: torch.tensor((fault == kind).to_numpy()) for kind in fault.unique()}   # boolean masks
print(fault.value_counts().to_dict())


def report(model):
    """Clean test accuracy (leaked images excluded), accuracy on the leaked ones, backdoor success."""
    with torch.no_grad():
        pred = model(X_test).argmax(1)
        not7 = y_test != 7
        pred_patched = model(add_patch(X_test[not7])).argmax(1)
    rest = torch.ones(len(y_test), dtype=torch.bool)
    rest[leaked] = False
    return {"test accuracy (not leaked)": (pred[rest] == y_test[rest]).float().mean().item(),
            "accuracy on leaked test images": (pred[leaked] == y_test[leaked]).float().mean().item(),
            "patched non-7s classified as 7": (pred_patched == 7).float().mean().item()}


model, ckpts = fit(X_train, y_train)
before = report(model)
pd.Series(before).round(3)

# %% [markdown]
# The patch turns a large share of test digits into 7s, and the leaked images score perfectly. Now we
# look for the causes, with one index.

# %%
train_data = (X_train, y_train)
tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
index = tracin.index(train_data, progress=False)

# %% [markdown]
# ## 2 · Self-influence: examples the model had to fight
# **Predict first.** Of the three kinds of fault, which will self-influence find, and which will it
# miss? (Think about which ones the model finds hard to fit.)

# %%
outliers = index.outliers()
top_10pct = outliers.indices[: n // 10]
found_si = fault[top_10pct.numpy()].value_counts()
print(f"top 10% of self-influence ({n // 10} examples):", found_si.to_dict())
print("share of each fault found:",
      {k: f"{found_si.get(k, 0) / (fault == k).sum():.0%}" for k in ("label error", "backdoor", "leaked test image")})

# %% [markdown]
# Label errors stand out: the model keeps being pulled towards the right answer by every similar image.
# So do the backdoor examples: a patched 3 labelled 7 is, to the model, a 3 with a wrong label, until
# the patch is learnt, and the early checkpoints record that fight. The leaked images do not stand out
# at all: they are ordinary, well-labelled digits. Self-influence finds what is hard to fit, not what
# is harmful; about half of the top 10% is fine data (rare or badly drawn digits), so a person still
# has to look.
#
# ## 3 · Leakage: test examples with a twin in the training set
# A leaked image's gradient is almost the same as its twin's at every checkpoint, so its TracIn
# similarity (the learning-rate-weighted cosine) to some training example is close to 1.
#
# **Predict first.** Ordinary test digits also have very similar training digits. Will a threshold on the
# highest similarity separate the 20 leaked ones cleanly?

# %%
sim = index.similarity(split.test)                      # (n_test, n_train)
best, twin = sim.max(1)
order = best.argsort(descending=True)
is_leaked = torch.zeros(len(y_test), dtype=torch.bool)
is_leaked[leaked] = True
print("highest similarity, 25 test images with the highest:", [f"{v:.3f}" for v in best[order[:25]].tolist()])
print("leaked?                                             ", [int(v) for v in is_leaked[order[:25]].tolist()])
pixel_gap = (X_test - X_train[twin]).flatten(1).abs().mean(1)
print(f"mean pixel difference to the twin: leaked {pixel_gap[is_leaked].mean():.3f}, "
      f"others {pixel_gap[~is_leaked].mean():.3f}")

# %% [markdown]
# Gradient similarity alone ranks the leaked images high but ties them with ordinary close pairs (a
# well-fitted digit's gradient points in nearly the same direction as those of its class). The
# candidate list it gives is short, though, and a second, cheap check on the candidates settles it: the
# pixel difference to the twin. We flag a test image when its twin is both highly similar and nearly
# identical in pixels.

# %%
flag_leak = (best > 0.9) & (pixel_gap < 0.03)
twins = twin[flag_leak]
print(f"flagged {int(flag_leak.sum())} test images; truly leaked: {int((flag_leak & is_leaked).sum())} of 20")

# %% [markdown]
# ## 4 · The backdoor: who makes patched digits into 7s?
# Patch a few test digits that are *not* 7s, ask which training examples support the prediction "7"
# (`target="prediction"`), and add up the scores over these queries: a training example that helps
# every one of them is the common cause.
#
# **Predict first.** Will the top of this aggregated list be ordinary 7s (they teach "7" after all) or
# the patched images?

# %%
probe = add_patch(X_test[y_test != 7][:40])
with torch.no_grad():
    fooled = model(probe).argmax(1) == 7
support = index.influence((probe[fooled],), target="prediction").sum(0)       # (n_train,)
suspects = support.argsort(descending=True)[:40]
print(f"{int(fooled.sum())} of 40 patched probes predicted 7; the 40 strongest common proponents:",
      fault[suspects.numpy()].value_counts().to_dict())

# %% [markdown]
# The patched training images lead the list: they are the examples whose gradient points the same way
# for every patched probe, whatever the digit. TracIn clusters show a similar group without any probe:
# clusters are built from gradient directions, and the backdoor examples share much of theirs. Look in
# the gallery for a cluster labelled 7 whose pictures are other digits with a bright corner:

# %%
# clustering compares every example with every centre for many iterations: use short projected rows
# (notebook 10: at proj_dim=512 the factored projection keeps a Spearman correlation of 0.998 on digits)
short = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=512, projection="factored").index(
    train_data, progress=False)
clusters = short.cluster(24)
members = pd.DataFrame({"cluster": clusters.labels, "fault": fault})
backdoor_share = members.groupby("cluster")["fault"].apply(lambda f: (f == "backdoor").mean())
c_bd = int(backdoor_share.idxmax())
print(f"cluster {c_bd}: {int((members.cluster == c_bd).sum())} members, "
      f"{backdoor_share.max():.0%} of them backdoor images")
tw.ClusterGallery(short, train_data, n_clusters=24, clusters=clusters, class_names=split.class_names)

# %% [markdown]
# ## 5 · Aggregated opponents of the test set
# A last, general view: add every training example's scores over the whole clean test set. A strongly
# negative total means training on it raised the test loss overall.

# %%
total = index.influence(split.test).sum(0)
harmful = total.argsort()[:60]
print("60 most harmful in aggregate:", fault[harmful.numpy()].value_counts().to_dict())

# %% [markdown]
# ## 6 · Fix and retrain
# A reviewer looks at the candidates: the top 10% of self-influence and the 60 most harmful examples
# (relabelling those with a wrong label; we play the reviewer with the answer key, as in notebook 02),
# the training twins of flagged test images (removed), and the backdoor suspects (removed).
#
# **Predict first.** Which of the three before/after numbers will move the most?

# %%
y_fixed = y_train.clone()
truth = torch.cat([y_true, y_test[leaked], y_true[others]])[shuffle]        # the true digit of each row
reviewed = torch.cat([top_10pct, harmful]).unique()
relabel = reviewed[is_fault["label error"][reviewed]]
y_fixed[relabel] = truth[relabel]
keep = torch.ones(n, dtype=torch.bool)
keep[twins] = False
keep[suspects[is_fault["backdoor"][suspects]]] = False   # the reviewer sees the patch on these
fixed_model, _ = fit(X_train[keep], y_fixed[keep])
after = report(fixed_model)
print(f"relabelled {len(relabel)} of 60 label errors; removed {int((~keep).sum())} examples "
      f"({int((~keep & is_fault['backdoor']).sum())} of 24 backdoor, "
      f"{len(twins)} leaked twins)")
pd.DataFrame({"before": before, "after": after}).round(3)

# %% [markdown]
# The backdoor is gone (patched digits are read as what they are), the leaked images no longer count in
# the training set, and the relabelled errors give back some clean accuracy. The remaining label errors
# are the ones the review budget did not reach.
#
# ## Try this
# **Try 1.** Is the backdoor fully removed? Count the backdoor examples still in `keep`, and retrain
# without them. Self-check: `report(...)["patched non-7s classified as 7"]` should stay near the clean
# model's rate.

# %%
left = int((keep & is_fault["backdoor"]).sum())
print(f"backdoor examples still kept: {left}; clean model's rate: {report(clean_model)['patched non-7s classified as 7']:.3f}")

# %% [markdown]
# **Try 2.** Rank by the final model's loss instead of self-influence (`F.cross_entropy(model(X_train),
# y_train, reduction="none")`) and count the label errors in its top 10%. Self-check: compare with the
# count in section 2; confusable errors are where the loss tends to lose ground.
#
# **Try 3.** Replace the threshold `0.9` in section 3 by `0.8` and `0.95`. Self-check: the number of
# truly leaked images flagged changes little, because the pixel check does most of the filtering.
#
# ## Questions
# 1. Self-influence and the aggregated "7" proponents of patched probes both find the backdoor examples.
#    Which of the two would still find them if the patched images had been labelled with their *true*
#    digits plus a few 7s with the patch?
# 2. A leaked test image has a near-perfect twin. Why is gradient similarity alone not enough to flag it?
# 3. You have budget to review 100 examples by eye. Which of the lists above would you look at first,
#    and why?
