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

torch.set_num_threads(1)   # a model this small trains fastest on one thread (section 4 retrains it 70 times)

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
    residual_train = model(train_data[0]).squeeze(-1) - train_data[1]    # prediction - target
    residual_test = model(test_data[0]).squeeze(-1) - test_data[1]
print(f"test patient {i}: target {test_data[1][i]:+.2f}, residual (prediction - target) "
      f"{residual_test[i]:+.2f} (standardized)")
rows = [("test", i, test_data[1][i].item(), residual_test[i].item(), float("nan"), *test_data[0][i].tolist())]
for kind, nb in (("proponent", result.proponents), ("opponent", result.opponents)):
    for j, s in zip(nb.indices[i].tolist(), nb.scores[i].tolist()):
        rows.append((kind, j, train_data[1][j].item(), residual_train[j].item(), s, *train_data[0][j].tolist()))
pd.DataFrame(rows, columns=["role", "index", "target", "residual", "score", *d.feature_names]).round(2)

# %% [markdown]
# **Why these signs.** The gradient of a squared error is the residual times the gradient of the network's
# output: $\nabla (f(x) - y)^2 = 2\,(f(x) - y)\,\nabla f(x)$. So each checkpoint's term is
#
# $$\eta_i \cdot 4\, r_i(z)\, r_i(z') \,\langle \nabla f_{w_i}(x), \nabla f_{w_i}(x') \rangle, \qquad r = f(x) - y .$$
#
# When the network treats the two patients alike ($\langle \nabla f, \nabla f' \rangle > 0$), a step on $z$
# moves both predictions the same way: towards $z$'s target. That helps $z'$ when both predictions are off
# in the same direction (residuals of the **same sign**: a proponent) and hurts when they are off in
# opposite directions (an opponent). Compare the `residual` column (at the final model; the score sums
# the same product over checkpoints): proponents mostly share the test patient's residual sign, opponents
# mostly have the opposite one. The target alone does not decide it: a patient with a high target that
# the model *over*-predicts has a positive residual.
#
# **Predict first.** Of the five proponents above, how many have a residual of the same sign as the test
# patient's? Check with the next cell.

# %%
same_sign = (residual_train[result.proponents.indices] * residual_test[:, None] > 0).float().mean().item()
opp_sign = (residual_train[result.opponents.indices] * residual_test[:, None] > 0).float().mean().item()
print(f"over all {len(residual_test)} test patients: top-5 proponents share the residual sign {same_sign:.0%}, "
      f"top-5 opponents {opp_sign:.0%}")

# %% [markdown]
# ## 4 · Do the scores predict retraining? A counterfactual check
# For 15 test patients and 2 training seeds, retrain three times each: without the patient's 20 strongest
# proponents, without its 20 strongest opponents, and without 20 random training patients (5 random sets
# per seed, shared by the patients: 70 retrainings). Each change is measured against the model trained with the *same* seed on all the
# data, so only the removal differs.
#
# **Predict first.** TracIn predicts that removing proponents *raises* that patient's loss and removing
# opponents *lowers* it. For what share of the 30 (patient, seed) pairs will each prediction hold?

# %%
def loss_on(model, j):
    return test_mse(model, (test_data[0][j : j + 1], test_data[1][j : j + 1]))


k, queries, seeds = 20, range(15), (0, 1)
g = torch.Generator().manual_seed(1)
change = {"proponents removed": [], "opponents removed": [], "random removed": []}
for seed in seeds:
    seed_model, seed_dir = fit(train_data, seed) if seed else (model, run_dir)
    seed_index = te.TracIn(seed_model, te.Checkpoints.from_dir(seed_dir), loss_fn=mse).index(train_data, progress=False)
    top = seed_index.top_k(test_data, k=k)

    def retrain_without(drop):
        keep = torch.ones(len(train_data[0]), dtype=torch.bool)
        keep[drop] = False
        return fit((train_data[0][keep], train_data[1][keep]), seed)[0]

    # a random removal does not depend on the patient: 5 random sets per seed, shared by the patients
    randoms = [retrain_without(torch.randperm(len(train_data[0]), generator=g)[:k]) for _ in range(5)]
    for j in queries:
        base = loss_on(seed_model, j)
        change["proponents removed"].append(loss_on(retrain_without(top.proponents.indices[j]), j) - base)
        change["opponents removed"].append(loss_on(retrain_without(top.opponents.indices[j]), j) - base)
        change["random removed"].append(loss_on(randoms[j % 5], j) - base)

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
# **Takeaway.** On this regression the scores predict retraining in direction almost every time: removing a
# patient's top proponents raised its loss and removing its top opponents lowered it, for nearly every
# (patient, seed) pair, while removing 20 random patients moved the loss up or down about evenly and by
# much less. The magnitudes are less reliable than the signs (the boxes are wide), and this is a small,
# nearly linear model; notebook 11 runs the same check, and a linear datamodeling score, on a classifier.
#
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

# %% [markdown]
# ## Try this
# **Try 1. Only the last checkpoint.** Build the scores from `index.influence_per_checkpoint(test_data)[-1]`
# and count how often the top-5 proponents share the test patient's residual sign. Self-check: compare
# with the all-checkpoint figure in section 3.

# %%
last = index.influence_per_checkpoint(test_data)[-1]
pro_last = last.topk(5, dim=1).indices
print(f"last checkpoint only: top-5 proponents share the residual sign "
      f"{(residual_train[pro_last] * residual_test[:, None] > 0).float().mean():.0%} (all checkpoints: {same_sign:.0%})")

# %% [markdown]
# **Try 2. Fewer removed.** Set `k = 5` in section 4 and rerun it. Self-check: the proponent and opponent
# boxes move towards the random box; do the signs still hold for most pairs?
#
# ## Questions
# 1. A training patient with the same target as the test patient can be an opponent. How?
# 2. Why is the random removal's mean change slightly positive?
# 3. Self-influence here is $\sum_i \eta_i \cdot 4 r_i(z)^2 \lVert \nabla f_{w_i}(x) \rVert^2$. Which patients does
#    it flag: large residuals, unusual measurements, or both?
