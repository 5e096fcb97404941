"""Real-model benchmark (issue 11): layer handlers against the same model's training step, CPU or GPU.

Prints one JSON object. Run from the repository root:
    PYTHONPATH=.:tests .venv/bin/python benchmarks/bench_real_models.py [--models resnet,bert,gpt2,vit,lstm,gru] [--small]
Models (tests/models.py; "bert" and "gpt2" are transformers models from configs when transformers is
installed, else the tests' own BERT/GPT-2-style modules):
    resnet  ResNet-18-shaped CNN with BatchNorm (eval mode), 3x32x32 inputs, 10 classes
    bert    BERT-style encoder, 4 layers, hidden 256, sequence 128, attention masks from padding
    gpt2    GPT-2-style causal LM, 4 layers, hidden 256, sequence 128, lm_head tied to the embedding
    vit     small ViT (patch 4 on 3x32x32, dim 192, 4 blocks, 3 heads, cls_token and pos_embed)
    lstm    LSTM text classifier (embedding 128, 2 bidirectional layers of 256, sequence 128, packed)
    gru     GRU text classifier (embedding 128, 2 layers of 256, sequence 128, padded tensors)
    torch_encoder  PyTorch's own nn.TransformerEncoder (4 layers, hidden 256, 4 heads, feed-forward
            1024, sequence 128, a padding mask; nn.MultiheadAttention inside)
    llama   transformers LlamaForCausalLM (4 layers, hidden 256, 4 heads / 2 key-value heads, SwiGLU 688,
            sequence 128, untied head; its RMSNorm class is known by structure: handlers/affine_norm.py)
    convnext  transformers ConvNextForImageClassification (widths 48/96/192/384, depths 2/2/2/2, patch 2,
            3x32x32, 10 classes: depthwise 7x7 convolutions, channels-first LayerNorm, layer scales)
    mixtral transformers MixtralForCausalLM (4 layers, hidden 256, 8 experts of 512 with top-2 routing, sequence 128,
            untied head; fused expert weights in transformers' default grouped_mm kernel: handlers/experts.py)
    opt     transformers OPTForCausalLM (4 layers, hidden 256, feed-forward 1024, sequence 128, tied head;
            positions counted from the mask, MLP on the batch folded into its positions)
Per model, on the same batch (after a few SGD steps, so the checkpoint is not the initialization):
    train_examples_per_s        forward + backward + optimizer step (SGD, momentum 0.9), median of repeats
    backward_s                  loss.backward() of the summed loss alone, timed after a grad-mode forward
                                (fwd_bwd_s minus the no_grad forward_s overstates it: a forward that
                                records the graph is slower than forward_s)
    factored_examples_per_s     TracIn(proj_dim=4096) (projection="auto" -> factored) rows of the batch,
                                incl. squared norms and the finiteness check; ratio_factored_to_training
                                under the engine's default TF32 policy (tf32="auto": on for this projected
                                index, as PyTorch's default for the training step's cuDNN convolutions);
                                on CUDA also factored_tf32_off_*: TracIn(tf32=False), IEEE float32
    exact_s, ...                exact rows under exact mode's default (TF32 off)
    exact_s, ratio_exact_to_backward   exact rows (layer handlers) of the batch, bookkeeping included
    exact_reused_buffer_s       the same rows written into one buffer already mapped (Featurizer.rows(rows_out=)):
                                without the first-touch page faults of fresh memory, which exact_s (a fresh
                                buffer per call) and the index (a fresh store) pay
    index_exact_s_per_batch     tracin.index (exact) of 4 batches into an in-memory store, per batch
    bookkeeping_s               squared norms of the exact rows (they are also the finiteness screen)
    top10_overlap               top-10 proponents of n_test examples over n_train: factored(4096) vs exact
--small: half the sizes (documented in docs/benchmarks.md when used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.devices import tf32_mode
from tracin_engine.store.writer import non_finite_rows

from models import (Attending, CausalLM, Encoder, HFImages, Recurrent, ResNet, ViT, hf_bert, hf_gpt2, hf_llama, hf_moe,
                    hf_opt, lm_loss, token_batch)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def images(n: int, topics: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 32, 32) images and labels in 0..9: noise, or (topics) one fixed random pattern per class
    plus as much noise, so examples of a class have related gradients."""
    y = torch.randint(0, 10, (n,))
    X = torch.randn(n, 3, 32, 32)
    if topics:
        X = X + 1.0 * torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(7))[y]
    return X, y


def tokens(n: int, seq: int, vocab: int, data: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, seq) ids with trailing padding 0, and a class in 0..3:
    random   uniform tokens in 2..vocab-1, random class;
    topics   half the tokens drawn from a block of vocab/5 words of the example's topic, half from
             shared words (a bag of words: next tokens are unpredictable within the topic);
    phrases  one of 8 fixed token sequences of its topic (from the topic's words) with 15% of the
             tokens replaced by shared words: near-duplicates, as fine-tuning sets have."""
    ids = token_batch(n, seq, vocab, pad=0, seed=1)
    y = torch.randint(0, 4, (n,))
    real = ids > 1
    width = vocab // 5
    if data == "random":
        ids[real] = torch.randint(2, vocab, (int(real.sum()),))
        return ids, y
    shared = torch.randint(2, width, ids.shape)
    if data == "topics":
        own = width * (1 + y).unsqueeze(1) + torch.randint(0, width, ids.shape)       # the topic's words
        pick = torch.where(torch.rand(ids.shape) < 0.5, own, shared)
    else:
        gen = torch.Generator().manual_seed(3)
        phrases = width * (1 + torch.arange(4)).view(4, 1, 1) + torch.randint(0, width, (4, 8, seq), generator=gen)
        own = phrases[y, torch.randint(0, 8, (n,))]
        pick = torch.where(torch.rand(ids.shape) < 0.85, own, shared)
    ids[real] = pick[real]
    return ids, y


def build(name: str, small: bool, data: str = "random"):
    """(model, data (X, y), loss_fn, description)."""
    torch.manual_seed(0)
    s = 2 if small else 1
    n = 256
    if name == "resnet":
        model = ResNet(width=64 // s, blocks=(2, 2, 2, 2))
        return model, images(n, data != "random"), F.cross_entropy, f"ResNet-18 shape, width {64 // s}, BatchNorm, 3x32x32"
    if name == "convnext":
        if not _has_transformers():
            raise SystemExit("--models convnext needs transformers")
        from transformers import ConvNextConfig, ConvNextForImageClassification
        cfg = ConvNextConfig(num_channels=3, hidden_sizes=[48 // s, 96 // s, 192 // s, 384 // s], depths=[2, 2, 2, 2],
                             num_labels=10, patch_size=2)
        return HFImages(ConvNextForImageClassification(cfg)), images(n, data != "random"), F.cross_entropy, \
            f"transformers ConvNextForImageClassification, widths {48 // s}-{384 // s}, depths 2/2/2/2, 3x32x32"
    if name == "vit":
        model = ViT(dim=192 // s, depth=4, heads=3, patch=4, image=32)
        return model, images(n, data != "random"), F.cross_entropy, f"ViT dim {192 // s}, 4 blocks, patch 4, 3x32x32"
    seq, dim, vocab = 128 // s, 256 // s, 5000
    ids, topic = tokens(n, seq, vocab, data)
    hf = _has_transformers()
    if name == "lstm":
        model = Recurrent("LSTM", vocab, dim // 2, dim, layers=2, bidirectional=True, packed=True, classes=4)
        return model, (ids, topic), F.cross_entropy, \
            f"LSTM text classifier: embedding {dim // 2}, 2 bidirectional layers of {dim}, seq {seq}, " \
            f"vocab {vocab}, packed sequences"
    if name == "gru":
        model = Recurrent("GRU", vocab, dim // 2, dim, layers=2, classes=4)
        return model, (ids, topic), F.cross_entropy, \
            f"GRU text classifier: embedding {dim // 2}, 2 layers of {dim}, seq {seq}, vocab {vocab}, padded"
    if name == "torch_encoder":
        model = Attending("encoder", vocab, dim, 4, classes=4, layers=4, ff=4 * dim)
        return model, (ids, topic), F.cross_entropy, \
            f"nn.TransformerEncoder: 4 layers, hidden {dim}, 4 heads, seq {seq}, vocab {vocab}, padding mask"
    if name == "mixtral":
        if not hf:
            raise SystemExit("--models mixtral needs transformers")
        model = hf_moe("mixtral", vocab, dim, 4, 4, seq, experts=8, implementation="grouped_mm")
        y = torch.cat([ids[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
        y[y == 0] = -100
        return model, (ids, y), lm_loss, f"transformers MixtralForCausalLM: 4 layers, hidden {dim}, 8 experts of " \
            f"{2 * dim}, top 2, seq {seq}, vocab {vocab}, grouped_mm experts"
    if name in ("llama", "opt"):
        if not hf:
            raise SystemExit(f"--models {name} needs transformers")
        model = (hf_llama if name == "llama" else hf_opt)(vocab, dim, 4, 4, seq)
        y = torch.cat([ids[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
        y[y == 0] = -100
        return model, (ids, y), lm_loss, f"transformers {type(model.model).__name__}: 4 layers, hidden {dim}, " \
            f"seq {seq}, vocab {vocab}"
    if name == "bert":
        model = hf_bert(vocab, dim, 4, 4, seq, 4) if hf else Encoder(vocab, dim, 4, 4, seq, 4)
        y = topic
        return model, (ids, y), F.cross_entropy, \
            f"{'transformers BertForSequenceClassification' if hf else 'BERT-style'}: 4 layers, hidden {dim}, " \
            f"seq {seq}, vocab {vocab}, attention masks"
    model = hf_gpt2(vocab, dim, 4, 4, seq) if hf else CausalLM(vocab, dim, 4, 4, seq)
    y = torch.cat([ids[:, 1:], torch.zeros(n, 1, dtype=torch.long)], 1)
    y[y == 0] = -100
    return model, (ids, y), lm_loss, \
        f"{'transformers GPT2LMHeadModel' if hf else 'GPT-2-style'}: 4 layers, hidden {dim}, seq {seq}, " \
        f"vocab {vocab}, tied lm_head"


def batch_loss(loss_fn, out, y):
    if loss_fn is lm_loss:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)
    return loss_fn(out, y)


def fit(model, X, y, loss_fn, topics: bool, steps: int | None, B: int, dev: torch.device) -> tuple[int, list[float]]:
    """Train in place so the checkpoint is not the initialization: `steps` (default 40 AdamW lr 1e-3 steps
    for structured data, 3 SGD momentum steps for random data) on consecutive batches of B; returns
    (steps, the batch losses). The model is left in train mode."""
    model.train()
    steps = steps if steps is not None else (40 if topics else 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3) if topics else \
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for s in range(steps):
        lo = (s * B) % max(1, len(X) - B)
        opt.zero_grad()
        loss = batch_loss(loss_fn, model(X[lo:lo + B].to(dev)), y[lo:lo + B].to(dev))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return steps, losses


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_model(name: str, args) -> dict:
    topics = args.data != "random"
    model, (X, y), loss_fn, desc = build(name, args.small, args.data)
    dev = torch.device(args.device)
    model.to(dev)
    B = args.batch
    xb, yb = X[:B].to(dev), y[:B].to(dev)
    steps, losses = fit(model, X, y, loss_fn, topics, args.steps, B, dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)    # the timed step (lr 0: weights kept)

    def step():
        opt.zero_grad()
        batch_loss(loss_fn, model(xb), yb).backward()
        opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            batch_loss(loss_fn, model(xb), yb)
        sync()

    def fwd_bwd():
        model.zero_grad()
        batch_loss(loss_fn, model(xb), yb).backward()
        sync()

    def bwd() -> float:                                  # the backward alone, after a grad-mode forward
        model.zero_grad()
        loss = batch_loss(loss_fn, model(xb), yb)
        sync()
        t0 = time.perf_counter()
        loss.backward()
        sync()
        return time.perf_counter() - t0

    train_s = median_time(lambda: (step(), sync()), args.repeats)
    model.eval()                                         # the engine attributes in eval mode
    fwd_s = median_time(fwd, args.repeats)
    fb_s = median_time(fwd_bwd, args.repeats)
    bwd()
    bwd_s = statistics.median(bwd() for _ in range(args.repeats))
    ckpts = te.Checkpoints.from_state_dicts([{k: v.detach().clone() for k, v in model.state_dict().items()}], [1.0])
    out = {"model": desc, "data": args.data, "fit_steps": steps,
           "fit_loss_first_last": [round(losses[0], 3), round(sum(losses[-4:]) / len(losses[-4:]), 3)],
           "batch": B, "params": sum(p.numel() for p in model.parameters()),
           "train_examples_per_s": round(B / train_s, 1), "forward_s": round(fwd_s, 4),
           "backward_s": round(bwd_s, 4), "fwd_bwd_s": round(fb_s, 4)}

    fact = te.TracIn(model, ckpts, loss_fn=loss_fn, proj_dim=args.proj_dim, device=dev)
    fz = fact.featurizer
    state = fact.state(0)
    fz.resolve(state, xb, yb)

    def featurize(f, tf32: bool):
        def go():                                        # the engine's TF32 policy (TracIn.tf32)
            with tf32_mode(tf32):
                r = f.rows(state, xb, yb)
                sq = f.sq_norms(r.features)
                assert not non_finite_rows(r.features, sq)   # featurization's screen (store/writer.py)
                sync()
            return sq
        return go

    fact_s = median_time(featurize(fz, fact.tf32), args.repeats)
    out.update({"projection": fz.projection_kind, "factored_row_dim": fact.dim,
                "factored_examples_per_s": round(B / fact_s, 1),
                "ratio_factored_to_training": round(train_s / fact_s, 3)})
    if dev.type == "cuda":
        out["tf32"] = fact.tf32   # the training step ran with PyTorch's TF32 defaults; also IEEE featurization
        fact_ieee_s = median_time(featurize(fz, False), args.repeats)
        out.update({"training_tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                                      "matmul": torch.backends.cuda.matmul.allow_tf32},
                    "factored_tf32_off_examples_per_s": round(B / fact_ieee_s, 1),
                    "ratio_factored_tf32_off_to_training": round(train_s / fact_ieee_s, 3)})

    exact = te.TracIn(model, ckpts, loss_fn=loss_fn, device=dev)
    ez = exact.featurizer
    ez.resolve(state, xb, yb)
    exact_s = median_time(featurize(ez, exact.tf32), args.repeats)
    rows = ez.rows(state, xb, yb).features
    book_s = median_time(lambda: (non_finite_rows(rows, ez.sq_norms(rows)), sync()), args.repeats)
    warm = torch.zeros_like(rows)                        # written once: its pages are mapped before timing

    def reused():                                        # the rows of each batch into one buffer (featurize.rows)
        with tf32_mode(exact.tf32):
            r = ez.rows(state, xb, yb, rows_out=warm).features
            assert not non_finite_rows(r, ez.sq_norms(r))
            sync()
    reused_s = median_time(reused, args.repeats)
    out.update({"exact_mode": ez.mode, "exact_row_dim": exact.dim, "exact_s": round(exact_s, 4),
                "ratio_exact_to_backward": round(exact_s / max(bwd_s, 1e-9), 2),
                "ratio_exact_to_fwd_bwd": round(exact_s / fb_s, 2), "bookkeeping_s": round(book_s, 4),
                "exact_reused_buffer_s": round(reused_s, 4),
                "ratio_exact_reused_buffer_to_backward": round(reused_s / max(bwd_s, 1e-9), 2)})
    del rows, warm
    # the product path: tracin.index of 4 batches into an in-memory store (rows written in place), warm
    nb = min(4, len(y) // B)
    few = (X[:nb * B].to(dev), y[:nb * B].to(dev))
    idx_s = median_time(lambda: (exact.index(few, progress=False, batch_size=B), sync()), 2) / nb
    out.update({"index_exact_s_per_batch": round(idx_s, 4),
                "ratio_index_exact_to_backward": round(idx_s / max(bwd_s, 1e-9), 2)})

    if args.n_train:
        train = (X[:args.n_train], y[:args.n_train])
        test = (X[-args.n_test:], y[-args.n_test:])
        t0 = time.perf_counter()
        ex_idx = exact.index(train, progress=False, batch_size=B)
        ex_index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fa_idx = fact.index(train, progress=False, batch_size=B)
        fa_index_s = time.perf_counter() - t0
        a = ex_idx.top_k(test, k=10).proponents.indices
        out.update({"n_train": args.n_train, "n_test": args.n_test,
                    "top10_overlap": overlap(a, fa_idx.top_k(test, k=10).proponents.indices),
                    "index_exact_examples_per_s": round(args.n_train / ex_index_s, 1),
                    "index_factored_examples_per_s": round(args.n_train / fa_index_s, 1)})
        # the same projection with equal shares per layer (no calibration): what calibration adds
        eq = te.TracIn(model, ckpts, loss_fn=loss_fn, proj_dim=args.proj_dim, device=dev)
        eq.featurizer.resolve(state, xb[:2], yb[:2])
        eq.featurizer.projection.calibrate([1.0] * len(eq.featurizer.projection.blocks))
        out["top10_overlap_equal_shares"] = overlap(a, eq.index(train, progress=False, batch_size=B)
                                                    .top_k(test, k=10).proponents.indices)
        if args.dense_ceiling:
            out["top10_overlap_dense_gaussian"] = dense_ceiling(ex_idx, exact, test, a, args.proj_dim)
    return out


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of shared indices between rows of a and b (m, k)."""
    return round(sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(len(a))) / a.numel(), 3)


def dense_ceiling(ex_idx, exact, test, top_exact: torch.Tensor, k: int, seeds: int = 2) -> list[float]:
    """Top-10 overlap with exact mode of the ideal data-oblivious projection: the exact flat gradients
    times a dense i.i.d. N(0, 1) matrix (P, k) (torch.randn, drawn in row chunks), one value per seed."""
    hf = exact.featurizer.hooks
    F_tr = hf.expand(ex_idx.features(0).float()) if hf is not None else ex_idx.features(0).float()
    T = exact.features(test)[0].float()
    F_te = hf.expand(T) if hf is not None else T
    out = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        z_tr, z_te = torch.zeros(len(F_tr), k), torch.zeros(len(F_te), k)
        for s in range(0, F_tr.shape[1], 16384):
            R = torch.randn(min(16384, F_tr.shape[1] - s), k, generator=gen)
            z_tr += F_tr[:, s:s + len(R)] @ R
            z_te += F_te[:, s:s + len(R)] @ R
        out.append(overlap(top_exact, (z_te.double() @ z_tr.double().T).topk(10, 1).indices))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet,bert,gpt2,vit,lstm,gru")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--data", choices=("random", "topics", "phrases"), default="random",
                    help="random: uniform tokens / noise images, random labels; topics / phrases: classes with "
                         "structure (see tokens(); images: one pattern per class for both)")
    ap.add_argument("--steps", type=int, default=None, help="training steps before the checkpoint "
                    "(default 3 with SGD for random data, else 40 with AdamW lr 1e-3)")
    ap.add_argument("--dense-ceiling", action="store_true",
                    help="also the overlap of a dense Gaussian projection of the exact gradients (slow)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": args.device,
                          "load_avg_start": [round(v, 2) for v in os.getloadavg()]},
              "settings": vars(args), "models": {}}
    if args.device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    for name in args.models.split(","):
        result["models"][name] = run_model(name, args)
        print(json.dumps({name: result["models"][name]}), file=sys.stderr, flush=True)
    result["machine"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
