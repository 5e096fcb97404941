"""Source of notebooks/05_tabular_regression.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 05 · Tabular regression: which patients shaped this prediction?
#
# TracIn is not tied to classification. Any differentiable loss works; here a small MLP predicts disease
# progression one year after baseline from 10 measurements (scikit-learn's bundled **diabetes** data,
# 442 patients) with a mean-squared-error loss:
#
# $$\mathrm{TracInCP}(z, z') = \sum_i \eta_i \langle \nabla (f_{w_i}(x) - y)^2, \nabla (f_{w_i}(x') - y')^2 \rangle .$$
#
# A proponent is a training patient whose steps moved the prediction for the test patient *towards* its
# true value; an opponent moved it away. The TracIn paper makes the same point on a structured-data
# regression task. At the end we check the scores against what actually happens when we retrain
# without the top proponents or opponents.

# %%
import tempfile

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.examples import MLP, train

# %% [markdown]
# ## 1 · Data: standardized features and target

# %%
d = load_diabetes()
X_all = torch.tensor(d.data, dtype=torch.float32)
y_all = torch.tensor(d.target, dtype=torch.float32)
X_all = (X_all - X_all.mean(0)) / X_all.std(0)
y_mean, y_std = y_all.mean(), y_all.std()
y_all = (y_all - y_mean) / y_std
perm = torch.randperm(len(X_all), generator=torch.Generator().manual_seed(0))
train_data = (X_all[perm[:350]], y_all[perm[:350]])
test_data = (X_all[perm[350:]], y_all[perm[350:]])
print("features:", d.feature_names)
print("train", tuple(train_data[0].shape), "test", tuple(test_data[0].shape))


# %% [markdown]
# ## 2 · Train with checkpoints
# `loss_fn` sees one example at a time in TracIn: output `(1, 1)`, target `(1,)`.

# %%
def mse(output, target):
    return F.mse_loss(output.squeeze(-1), target)


def fit(data, seed=0):
    """MLP(10 -> 32 -> 32 -> 1) trained by SGD; returns (model, run_dir)."""
    torch.manual_seed(seed)
    model = MLP(10, 1, hidden=32)
    run_dir = tempfile.mkdtemp(prefix="tracin-diabetes-")
    train(model, data, run_dir, epochs=40, n_checkpoints=5, lr=0.02, batch_size=16, loss_fn=mse,
          seed=seed, lr_decay=0.97)
    return model, run_dir


def test_mse(model, data=test_data):
    with torch.no_grad():
        return mse(model(data[0]), data[1]).item()


model, run_dir = fit(train_data)
print(f"test MSE {test_mse(model):.3f} (standardized target; predicting the mean scores about 1.0)")

# %%
ckpts = te.Checkpoints.from_dir(run_dir)
tracin = te.TracIn(model, ckpts, loss_fn=mse)
index = tracin.index(train_data, progress=False)
index

# %% [markdown]
# ## 3 · Proponents and opponents of one test patient

# %%
i = 0
result = index.top_k(test_data, k=5)
with torch.no_grad():
    pred = model(test_data[0][i : i + 1]).item()
print(f"test patient {i}: target {test_data[1][i]:+.2f}, prediction {pred:+.2f} (standardized)")
rows = [("test", i, test_data[1][i].item(), float("nan"), *test_data[0][i].tolist())]
for kind, nb in (("proponent", result.proponents), ("opponent", result.opponents)):
    for j, s in zip(nb.indices[i].tolist(), nb.scores[i].tolist()):
        rows.append((kind, j, train_data[1][j].item(), s, *train_data[0][j].tolist()))
pd.DataFrame(rows, columns=["role", "index", "target", "score", *d.feature_names]).round(2)

# %% [markdown]
# Compare the `target` column: the proponents' targets lie on the same side of the average as the test
# patient's, the opponents' on the other side, so each step on an opponent pulled this prediction the
# wrong way. The features matter too: the gradient of the squared error is the residual times the
# gradient of the network's output, so a patient only counts when the network treats its measurements
# like the test patient's.
#
# ## 4 · Do the scores predict retraining? A counterfactual check
# For 12 test patients, retrain three times each: without its 20 strongest proponents, without its 20
# strongest opponents, and without 20 random training patients. TracIn predicts that removing
# proponents *raises* that patient's loss and removing opponents *lowers* it.

# %%
def loss_on(model, j):
    return test_mse(model, (test_data[0][j : j + 1], test_data[1][j : j + 1]))


k, queries = 20, range(12)
top = index.top_k(test_data, k=k)
g = torch.Generator().manual_seed(1)
change = {"proponents removed": [], "opponents removed": [], "random removed": []}
for j in queries:
    base = loss_on(model, j)
    drops = {"proponents removed": top.proponents.indices[j], "opponents removed": top.opponents.indices[j],
             "random removed": torch.randperm(len(train_data[0]), generator=g)[:k]}
    for name, drop in drops.items():
        keep = torch.ones(len(train_data[0]), dtype=torch.bool)
        keep[drop] = False
        retrained, _ = fit((train_data[0][keep], train_data[1][keep]))
        change[name].append(loss_on(retrained, j) - base)

fig, ax = plt.subplots(figsize=(5, 3))
ax.boxplot(list(change.values()))
ax.set_xticks(range(1, 4), list(change))
ax.axhline(0, color="grey", lw=0.5)
ax.set_ylabel("change of the test patient's loss")
plt.show()
for name, values in change.items():
    v = torch.tensor(values)
    print(f"{name:>19}: mean change {v.mean():+.3f}, raised the loss for {int((v > 0).sum())} of {len(v)}")

# %% [markdown]
# ## 5 · Outliers and the explorer
# Self-influence flags patients the model finds hard to fit (unusual measurements or an unusual
# outcome). Tabular rows render as "feature = value" tiles; pass `feature_names=`.

# %%
self_inf = index.self_influence()
top_si = self_inf.argsort(descending=True)[:5]
pd.DataFrame(train_data[0][top_si].numpy(), columns=d.feature_names, index=top_si.tolist()).assign(
    target=train_data[1][top_si].numpy(), self_influence=self_inf[top_si].numpy()).round(2)

# %%
tw.InfluenceExplorer(index, train_data, test_data, k=6, feature_names=d.feature_names)
