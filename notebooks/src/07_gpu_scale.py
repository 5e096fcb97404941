"""Source of notebooks/07_gpu_scale.ipynb (build with python notebooks/build.py)."""

# %% [markdown]
# # 07 · Scale: a CIFAR-sized model, a projected on-disk index, a GPU when there is one
#
# The engine's design is *featurize once, query many*: one pass computes every training example's
# gradient at every checkpoint, projects it to `proj_dim` numbers with a seeded random projection
# (inner products are preserved in expectation: $\mathbb{E}[\langle Rg, Rg' \rangle] = \langle g, g' \rangle$),
# and writes the features memory-mapped to disk (`store=path`). An interrupted run resumes where it
# stopped; a finished index reopens in milliseconds; a query is a matrix-vector product against the
# stored features plus a streaming top-k.
#
# This notebook uses **CIFAR-shaped synthetic data** (3×32×32 images, 10 classes, generated here so
# nothing is downloaded): 50,000 training images on a GPU, 2,000 on a CPU so it finishes in about a
# minute. The numbers it prints are measured on whatever machine runs it. Synthetic images are fine for
# timing, but their galleries mean little: notebook 10 measures the projection's accuracy, and shows its
# galleries, on real digits.

# %%
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
import tracin_widgets as tw

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = device.type == "cuda"
N_TRAIN, N_TEST = (50_000, 2_000) if ON_GPU else (2_000, 200)
EPOCHS, WIDTH, PROJ_DIM = (4, 64, 4096) if ON_GPU else (3, 16, 512)
print(f"device {device}: {N_TRAIN} train / {N_TEST} test images, width {WIDTH}, proj_dim={PROJ_DIM}")

# %% [markdown]
# ## 1 · Synthetic CIFAR-shaped data
# Each class has a smooth random colour template; an image is its class template, randomly shifted,
# plus noise. Hard enough that the model needs a few epochs, easy enough to learn on a CPU.

# %%
def make_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(123)),
                              size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    X = torch.empty(n, 3, 32, 32)
    for i0 in range(0, n, 4096):
        idx = slice(i0, min(i0 + 4096, n))
        base = templates[y[idx]]
        for dx in range(-2, 3):   # roll each image by its own shift (grouped by dx, then dy)
            for dy in range(-2, 3):
                m = (shifts[idx, 0] == dx) & (shifts[idx, 1] == dy)
                if m.any():
                    base[m] = base[m].roll((dx, dy), dims=(2, 3))
        X[idx] = base + 0.8 * torch.randn(base.shape, generator=g)
    return X, y


train_data = make_images(N_TRAIN, seed=0)
test_data = make_images(N_TEST, seed=1)
print("train", tuple(train_data[0].shape), "test", tuple(test_data[0].shape))


# %% [markdown]
# ## 2 · A small CNN, trained with checkpoints

# %%
class SmallConvNet(nn.Module):
    """conv 3->w -> conv w->2w /2 -> conv 2w->4w /2 -> global average pool -> fc 4w->10."""

    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


torch.manual_seed(0)
model = SmallConvNet(WIDTH).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
run_dir = Path(tempfile.mkdtemp(prefix="tracin-scale-"))
recorder = te.CheckpointRecorder(run_dir)
X, y = train_data[0].to(device), train_data[1].to(device)
t0, step = time.perf_counter(), 0
for epoch in range(EPOCHS):
    model.train()
    for idx in torch.randperm(N_TRAIN, device=device).split(64):
        optimizer.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        optimizer.step()
        step += 1
    recorder.save(model, optimizer, step)
model.eval()
with torch.no_grad():
    acc = (model(test_data[0].to(device)).argmax(1).cpu() == test_data[1]).float().mean().item()
train_s = time.perf_counter() - t0
print(f"{EPOCHS} epochs in {train_s:.1f} s; test accuracy {acc:.3f}; "
      f"{sum(p.numel() for p in model.parameters())} parameters")

# %% [markdown]
# We trained with momentum 0.9. Momentum multiplies every step's effective learning rate by about
# $1/(1-\beta)$, the same factor for every checkpoint here, so it rescales all scores and leaves every
# ranking unchanged.
#
# ## 3 · Featurize once, to disk
# `projection="factored"` projects each Linear/Conv2d layer's gradient with a Kronecker-factored
# random matrix computed from the layer's inputs and output gradients, so the flat per-example gradient
# (about 25 thousand numbers on a CPU here, 370 thousand on a GPU) is never formed: featurizing costs about a training step. `store=path`
# writes features (float16 when projected), squared norms and a done-mask, plus metadata that is
# checked when the index is reopened (same model, checkpoints, `proj_dim`, seed).
#
# **Predict first.** Featurizing computes one gradient per example per checkpoint. How will its time
# compare with the training time printed above: a tenth, about the same, or ten times more?

# %%
ckpts = te.Checkpoints.from_dir(run_dir)
# On a GPU a projected index uses TF32 convolutions by default (tf32="auto"; about 3x faster there):
# their ~1e-3 relative error is far below the projection's own (~1/sqrt(proj_dim)). Exact mode keeps
# TF32 off, so CUDA equals the CPU to float32; pass tf32=False to compare a projected index that way.
tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=PROJ_DIM, projection="factored",
                   device=device)
print("tracin.tf32 =", tracin.tf32, "(used on a GPU only)")
store_dir = Path(tempfile.mkdtemp(prefix="tracin-index-")) / "index"
t0 = time.perf_counter()
index = tracin.index(train_data, store=store_dir, progress=False)
if ON_GPU:
    torch.cuda.synchronize()
featurize_s = time.perf_counter() - t0
size_mb = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file()) / 2**20
print(f"featurized {N_TRAIN} examples x {len(ckpts)} checkpoints in {featurize_s:.1f} s "
      f"({N_TRAIN * len(ckpts) / featurize_s:,.0f} example-checkpoints/s); "
      f"training took {train_s:.1f} s for {EPOCHS} epochs")
print(f"index on disk: {size_mb:.1f} MB in {store_dir}")
index

# %% [markdown]
# ## 4 · Query many

# %%
queries = (test_data[0][:100], test_data[1][:100])
index.top_k((queries[0][:1], queries[1][:1]), k=10)  # warm-up
t0 = time.perf_counter()
result = index.top_k(queries, k=10)
query_s = time.perf_counter() - t0
print(f"top-10 proponents and opponents for 100 test images over {N_TRAIN} training images: "
      f"{query_s * 1000:.0f} ms ({100 / query_s:,.0f} queries per second)")
same = (train_data[1][result.proponents.indices[:, 0]] == queries[1]).float().mean().item()
print(f"top proponent shares the test label for {same:.0%} of the queries")

# %% [markdown]
# ## 5 · Reopen from disk
# A later session (or another process) reopens the index without featurizing again. The metadata check
# refuses an index built for a different model, checkpoints or projection.
#
# **Predict first.** The index on disk holds a few MB (hundreds on a GPU run). How long will reopening it
# take?

# %%
t0 = time.perf_counter()
reopened = te.GradientIndex.load(store_dir, tracin)
print(f"reopened from disk in {1000 * (time.perf_counter() - t0):.0f} ms: {reopened}")
again = reopened.top_k(queries, k=10)
assert torch.equal(again.proponents.indices, result.proponents.indices)
self_inf = reopened.self_influence()
print("highest self-influence:", self_inf.argsort(descending=True)[:8].tolist())

# %%
tw.InfluenceExplorer(reopened, train_data, test_data, k=8)

# %% [markdown]
# Reopening maps the files into memory instead of reading them, so it takes milliseconds whatever the
# size; the first query then reads what it needs.
#
# ## Try this
# **Try 1. A smaller projection.** Index the same data in memory with `proj_dim=128`. Self-check: the
# top-10 proponents it shares with the stored index (the measured error of a projection is in notebook 10).

# %%
small = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=128, projection="factored",
                  device=device).index(train_data, progress=False)
small_top = small.top_k(queries, k=10).proponents.indices
common = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(small_top, result.proponents.indices)) / small_top.numel()
print(f"proj_dim=128 vs {PROJ_DIM}: {common:.0%} of the top-10 proponents in common")

# %% [markdown]
# **Try 2. One query, timed.** The explorer answers one click at a time. Self-check: time
# `reopened.top_k((queries[0][:1], queries[1][:1]), k=10)`; it should take milliseconds, not seconds.

# %%
t0 = time.perf_counter()
reopened.top_k((queries[0][:1], queries[1][:1]), k=10)
print(f"one query: {1000 * (time.perf_counter() - t0):.0f} ms over {N_TRAIN} training images")

# %% [markdown]
# ## Questions
# 1. What costs the most when you scale to 50,000 images: featurizing, storing, or querying? Which of them
#    grows with `proj_dim`?
# 2. Why does momentum 0.9 leave every ranking unchanged here, and when would it not?
# 3. An interrupted `tracin.index(..., store=path)` resumes. What must stay the same for that to be safe?

# %%
shutil.rmtree(store_dir.parent, ignore_errors=True)
shutil.rmtree(run_dir, ignore_errors=True)
