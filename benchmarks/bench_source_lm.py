"""SOURCE (EK-FAC curvature) on language models of benchmark size: cost against the training step. Prints JSON.

    python benchmarks/bench_source_lm.py --models llama,gpt2 --n-train 64

A causal LM has T x V outputs per example (128 x 5000 here). Its output Hessian (T V x T V) cannot be
formed, so curvature "auto" samples one label per position from the model ("mc": Loss.fisher_sample,
one backward pass per batch). The script times, on the same batch of `--batch` sequences:
    train_s     one training step (forward, backward, SGD)
    capture_s   one EK-FAC capture (layer inputs and sampled output gradients of the selected layers)
    fit_s       fit_ekfac over --n-train sequences (two passes: factors, then the eigenvalue correction)
    index_s     tracin.index(method="source") over --n-train sequences (fit, then v(z) for each sequence;
                with --proj-dim, stored through the factored projection)
Layers: every layer with Kronecker factors used once (the blocks' Linear / transformers Conv1D layers, and
an untied output layer: Llama's lm_head, 256 x 5000); a tied output layer (GPT-2) is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tracin_engine as te  # noqa: E402
from tracin_engine.data import as_source  # noqa: E402
from tracin_engine.methods.ekfac import KronLayers, choose_curvature  # noqa: E402
from tracin_engine.methods.ekfac_fit import fit_ekfac  # noqa: E402
from models import hf_gpt2, hf_llama  # noqa: E402


def kron_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules with Kronecker factors that run once: Linear / Conv1D, not tied to an embedding."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [n for n, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Conv1D") and id(m.weight) not in emb]


def run(name: str, args) -> dict:
    torch.manual_seed(0)
    build = hf_llama if name == "llama" else hf_gpt2
    model = build(args.vocab, args.dim, 4, 4, args.seq)
    ids = torch.randint(2, args.vocab, (args.n_train, args.seq), generator=torch.Generator().manual_seed(1))
    ids[:, args.seq - 8:] = 0                                                 # some padding
    labels = ids.masked_fill(ids == 0, -100)
    B = args.batch
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = te.losses.resolve_loss("causal_lm")

    def step():
        opt.zero_grad()
        out = model(ids[:B])
        loss_fn(out.reshape(1, -1, out.shape[-1]), labels[:B].reshape(1, -1)).backward()
        opt.step()

    def timed(fn):
        fn()
        t = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return sorted(t)[len(t) // 2]

    train_s = timed(step)
    model.eval()
    names = kron_layers(model)
    ckpts = te.Checkpoints([te.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.01, 100)])
    tracin = te.TracIn(model, ckpts, loss_fn="causal_lm", layers=names, proj_dim=args.proj_dim)
    layers = KronLayers(tracin.featurizer.grads)
    gc = layers.grads
    state = gc.prepare(model.state_dict())
    source = as_source((ids, labels))
    curvature = choose_curvature("auto", layers, state, source)
    capture_s = timed(lambda: layers.capture(state, ids[:B], labels[:B], curvature, torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    fit_ekfac(layers, [state], source, curvature, batch_size=B)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = tracin.index((ids, labels), method="source", batch_size=B, progress=False)
    index_s = time.perf_counter() - t0
    scores = index.influence((ids[:2], labels[:2]))
    return {
        "model": name, "description": f"transformers {type(model.model).__name__}: 4 layers, hidden {args.dim}, "
                                      f"seq {args.seq}, vocab {args.vocab}",
        "params": sum(p.numel() for p in model.parameters()),
        "outputs_per_example": args.seq * args.vocab, "curvature": curvature,
        "layers": len(layers.plans), "layer_params": layers.num_params,
        "largest_factor": max(max(p.out_dim, p.cols) for p in layers.plans),
        "batch": B, "n_train": args.n_train,
        "train_s": train_s, "capture_s": capture_s, "capture_over_train": capture_s / train_s,
        "fit_s": fit_s, "fit_per_example_over_train": fit_s / args.n_train / (train_s / B),
        "index_s": index_s, "index_per_example_over_train": index_s / args.n_train / (train_s / B),
        "proj_dim": args.proj_dim, "row_dim": index.store.dim,
        "scores_finite": bool(torch.isfinite(scores).all()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--proj-dim", type=int, default=None, help="store v(z) projected (factored projection)")
    args = ap.parse_args()
    rows = [run(m, args) for m in args.models.split(",")]
    print(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__},
                      "args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
