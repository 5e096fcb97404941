"""Source of notebooks/06_theory.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 06 · Theory: TracInIdeal, the first-order approximation, and checkpoints
#
# TracIn starts from an exact definition. Train with SGD; at step $t$ the weights move from $w_t$ to
# $w_{t+1}$ using a batch $B_t$. The **ideal** influence of training example $z$ on test example $z'$ is
# the total change of the test loss over the steps that used $z$:
#
# $$\mathrm{TracInIdeal}(z, z') = \sum_{t:\, z \in B_t} \big(\ell(w_t, z') - \ell(w_{t+1}, z')\big)
# \quad\text{(a batch's change split over its examples).}$$
#
# It needs the test example *while training*, so it is a yardstick, not a tool. Three approximations turn
# it into something usable after training:
#
# 1. **First order.** With $w_{t+1} - w_t = -\frac{\eta_t}{|B_t|} \sum_{b} \nabla \ell(w_t, z_b)$,
#    a Taylor step gives $\ell(w_t, z') - \ell(w_{t+1}, z') \approx \frac{\eta_t}{|B_t|} \sum_b \langle \nabla \ell(w_t, z'), \nabla \ell(w_t, z_b) \rangle$,
#    with an error of order $\eta_t^2$.
# 2. **Every example at every step.** Summing over all steps instead of only those that sampled $z$ removes
#    the dependence on the batch order (and only rescales on average).
# 3. **Checkpoints.** Keep only $C$ saved weights $w_i$ with learning rates $\eta_i$:
#    $\mathrm{TracInCP}(z, z') = \sum_i \eta_i \langle \nabla \ell(w_i, z), \nabla \ell(w_i, z') \rangle$.
#
# This notebook measures each step on a small problem where the ideal can be recorded exactly, with
# `tracin_engine.methods.ideal.TracInIdealRecorder`.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.examples import MLP, load_digits_split
from tracin_engine.methods.ideal import TracInIdealRecorder

split = load_digits_split(seed=0)
X_train, y_train = split.train[0][:200].flatten(1), split.train[1][:200]
X_test, y_test = split.test[0][:30].flatten(1), split.test[1][:30]


def spearman(a, b):
    """Mean over rows of the Spearman rank correlation of a[i] and b[i] (rows: test examples)."""
    ra = a.argsort(1).argsort(1).double()
    rb = b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean().item()


# %% [markdown]
# ## 1 · Train while recording TracInIdeal, and keep the weights of every step
# The learning rate decays by 30% every epoch, so the checkpoints carry different $\eta_i$.

# %%
torch.manual_seed(0)
model = MLP(64, 10, hidden=32)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
recorder = TracInIdealRecorder(model, F.cross_entropy, (X_test, y_test), n_train=len(X_train))
states, lrs = [], []
for epoch in range(6):
    for idx in torch.randperm(len(X_train)).split(10):
        lr = optimizer.param_groups[0]["lr"]
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})  # w_t
        lrs.append(lr)
        optimizer.zero_grad()
        F.cross_entropy(model(X_train[idx]), y_train[idx]).backward()
        with recorder.step(idx, X_train[idx], y_train[idx], lr=lr):
            optimizer.step()
    scheduler.step()
with torch.no_grad():
    print(f"{recorder.steps} steps; test accuracy {(model(X_test).argmax(1) == y_test).float().mean():.2f}")
ideal, first_order = recorder.ideal, recorder.first_order          # (30, 200) each

# %% [markdown]
# ## 2 · Approximation 1: the first-order term
# `recorder.first_order` sums $\frac{\eta_t}{|B_t|}\langle \nabla\ell(w_t, z'), \nabla\ell(w_t, z)\rangle$
# over the steps that used $z$: the same steps as the ideal, only linearized.

# %%
r = torch.corrcoef(torch.stack([ideal.flatten(), first_order.flatten()]))[0, 1].item()
fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(ideal.flatten(), first_order.flatten(), s=3, alpha=0.4)
lim = ideal.abs().max().item()
ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.5)
ax.set(xlabel="TracInIdeal (measured loss change)", ylabel="first-order TracIn", title=f"Pearson r = {r:.3f}")
plt.show()
print(f"first order vs ideal: Pearson {r:.3f}, Spearman {spearman(ideal, first_order):.3f}")

# %% [markdown]
# The error of a single step shrinks like $\eta^2$. Take the trained model (in float64, so round-off
# does not hide the small errors) and one batch, step it with different learning rates, and compare the
# measured loss change of a test example with the first-order prediction:

# %%
import copy

model64 = copy.deepcopy(model).double()
x_b, y_b = X_train[:10].double(), y_train[:10]
x_t = X_test[:1].double()
params = dict(model64.named_parameters())
loss_b = F.cross_entropy(model64(x_b), y_b)
g_b = torch.autograd.grad(loss_b, list(params.values()))
g_t = torch.autograd.grad(F.cross_entropy(model64(x_t), y_test[:1]), list(params.values()))
predicted_per_lr = sum((a * b).sum() for a, b in zip(g_t, g_b)).item()
etas = torch.logspace(-4, 0, 9, dtype=torch.float64)
errors = []
with torch.no_grad():
    before = F.cross_entropy(model64(x_t), y_test[:1]).item()
    for eta in etas.tolist():
        stepped = {n: p - eta * g for (n, p), g in zip(params.items(), g_b)}
        after = F.cross_entropy(torch.func.functional_call(model64, stepped, (x_t,)), y_test[:1]).item()
        errors.append(abs((before - after) - eta * predicted_per_lr))
fig, ax = plt.subplots(figsize=(4, 3))
ax.loglog(etas, errors, "o-", label="|measured - first order|")
ax.loglog(etas, errors[-1] * (etas / etas[-1]) ** 2, "--", color="grey", label=r"slope 2 ($\propto \eta^2$)")
ax.set(xlabel="learning rate of the step", ylabel="error")
ax.legend()
plt.show()
log_e, log_eta = torch.log(torch.tensor(errors[:5])), torch.log(etas[:5])
slope = ((log_eta - log_eta.mean()) * (log_e - log_e.mean())).sum() / ((log_eta - log_eta.mean()) ** 2).sum()
print(f"log-log slope of the error for learning rates 1e-4 .. 1e-2: {slope.item():.2f}")

# %% [markdown]
# ## 3 · Approximations 2 and 3: all examples, fewer checkpoints
# Every recorded $w_t$ becomes a checkpoint with its learning rate. `index.influence_per_checkpoint`
# returns the terms $\eta_i \langle \nabla\ell(w_i, z), \nabla\ell(w_i, z')\rangle$, shape `(C, n_test, n_train)`,
# so any subset of checkpoints, and any weighting, is a sum away.

# %%
ckpts = te.Checkpoints.from_state_dicts(states, learning_rates=lrs)
tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
index = tracin.index((X_train, y_train), progress=False)
terms = index.influence_per_checkpoint((X_test, y_test))        # (C, 30, 200)
etas_c = index.learning_rates.to(terms.dtype)
C = len(ckpts)
print(f"{C} checkpoints; TracIn over all of them vs ideal: Spearman {spearman(ideal, terms.sum(0)):.3f}")

counts = [1, 2, 4, 8, 16, 40, C]
with_lr, uniform = [], []
for c in counts:
    chosen = torch.linspace(C - 1, 0, c).round().long().unique()   # evenly spaced, always the last one
    with_lr.append(spearman(ideal, terms[chosen].sum(0)))
    uniform.append(spearman(ideal, (terms[chosen] / etas_c[chosen, None, None]).sum(0)))
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogx(counts, with_lr, "o-", label=r"TracInCP, weights $\eta_i$")
ax.semilogx(counts, uniform, "s--", label="uniform weights")
ax.axhline(spearman(ideal, first_order), color="grey", lw=0.8, label="first order (sampled steps)")
ax.set(xlabel="checkpoints used", ylabel="Spearman vs TracInIdeal")
ax.legend()
plt.show()
for c, a, b in zip(counts, with_lr, uniform):
    print(f"{c:>4} checkpoints: Spearman {a:.3f} with learning-rate weights, {b:.3f} uniform")

# %% [markdown]
# What to take away:
# * The first-order term tracks the measured loss change closely: the approximation error per step is
#   second order in the learning rate.
# * Summing over *all* training examples at every checkpoint loses the batch-sampling detail of the ideal
#   and costs some agreement, but it is what makes the score computable after training.
# * Agreement grows with the number of checkpoints and levels off well before every step is kept.
# * Learning-rate weights are what the derivation asks for: with many checkpoints, TracInCP with weights
#   $\eta_i$ is a sum over steps like the ideal, and agrees with it slightly better than uniform weights.
#   With only a few checkpoints, *which* checkpoints you keep matters as much as how you weight them.
