"""The prepared GPU check behind scripts/gpu-check: runs the gpu-marked tests and the scale benchmark
under time limits and prints one JSON report (also written to --out).

Report: {"cuda", "device", "torch", "tests": {passed, failed, skipped, errors, cases: [{name, outcome,
seconds, properties (the numbers each test recorded: relative errors, tolerances, sync counts)}]},
"scale": bench_scale.py's JSON (or its error), "targets": {...}, "wall_s"}.
Budget: tests 360 s, benchmark 210 s: under 10 minutes in all on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_LIMIT_S, BENCH_LIMIT_S = 360, 210


def _value(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def parse_junit(path: Path) -> dict:
    """pytest's junit XML -> {passed, failed, skipped, errors, cases}."""
    cases, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = tc.find(tag)
            if node is not None:
                outcome = name
                message = (node.get("message") or "")[:500]
                break
        else:
            message = ""
        counts[outcome] += 1
        props = {p.get("name"): _value(p.get("value")) for p in tc.iter("property")}
        cases.append({"name": tc.get("name"), "outcome": outcome.rstrip("s") if outcome == "errors" else outcome,
                      "seconds": round(float(tc.get("time") or 0), 2), "properties": props,
                      **({"message": message} if message else {})})
    return {**counts, "cases": cases}


def run_tests(workdir: Path) -> dict:
    junit = workdir / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_LIMIT_S)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"tests ran past {TEST_LIMIT_S} s", "tail": (exc.stdout or "")[-2000:]}
    if not junit.exists():
        return {"error": f"pytest exited {run.returncode} without a report", "tail": (run.stdout + run.stderr)[-3000:]}
    return {"returncode": run.returncode, **parse_junit(junit)}


def run_bench(device: str) -> dict:
    cmd = [sys.executable, "benchmarks/bench_scale.py", "--device", device, "--only", "gpu-check"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BENCH_LIMIT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"bench_scale.py ran past {BENCH_LIMIT_S} s"}
    try:
        return json.loads(run.stdout)
    except ValueError:
        return {"error": f"bench_scale.py exited {run.returncode}", "tail": (run.stdout + run.stderr)[-3000:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "gpu-check.json"))
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (the gpu tests are then skipped)")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    report = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)",
              "torch": torch.__version__}
    if not cuda and not args.allow_cpu:
        report["error"] = "no CUDA device: nothing to check (pass --allow-cpu to exercise the script)"
        print(json.dumps(report, indent=1))
        return 2
    env_note = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env_note is not None:
        report["cuda_visible_devices"] = env_note
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        report["tests"] = run_tests(Path(tmp))
    if not args.skip_bench:
        scale = run_bench("cuda" if cuda else "cpu")
        report["scale"] = scale
        ratio, q = scale.get("ratio_factored_to_training"), scale.get("query_scoring_top10_ms")
        report["targets"] = {
            "featurize_ge_0.75x_training_at_proj_dim_4096": None if ratio is None else ratio >= 0.75,
            "featurize_tf32_off_ge_0.75x_training": (
                None if scale.get("ratio_factored_tf32_off_to_training") is None
                else scale["ratio_factored_tf32_off_to_training"] >= 0.75),
            "top10_over_50k_x_4_checkpoints_lt_20ms": (None if scale.get("query_top10_total_ms") is None
                                                       else scale["query_top10_total_ms"] < 20),
            "scoring_only_ms": q,
        }
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    Path(args.out).write_text(text)
    print(text)
    tests = report["tests"]
    return 0 if "error" not in tests and tests["failed"] == 0 and tests["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
