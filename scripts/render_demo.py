"""Static demo for machines without a browser: train a digits CNN, build the index, and write the
galleries' static HTML (artifacts/demo.html) plus a screenshot (artifacts/demo.png, via headless
Chromium when it is installed).  Usage: python scripts/render_demo.py [out_dir]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.examples import DigitsCNN, load_digits_split, train


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    model = DigitsCNN()
    run = Path(tempfile.mkdtemp(prefix="tracin_demo_"))
    print("training a small CNN on sklearn digits (4 checkpoints) ...")
    train(model, data.train, run, epochs=6, n_checkpoints=4, lr=0.1, lr_decay=0.8)
    tracin = te.TracIn(model, te.Checkpoints.from_dir(run), loss_fn=F.cross_entropy)
    index = tracin.index(data.train, progress=True)
    print(index)
    preds = tracin.predictions(data.test[0])
    wrong = int((preds != data.test[1]).nonzero()[0]) if (preds != data.test[1]).any() else 0
    explorer = tw.InfluenceExplorer(index, data.train, data.test, k=8, test_index=wrong)
    outliers = tw.SelfInfluenceGallery(index, data.train)
    clusters = tw.ClusterGallery(index, data.train, n_clusters=6)
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>tracin demo</title>
<style>body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; }}</style></head><body>
<h1>tracin: which training examples made the model do this?</h1>
<p>{index}. Test example {wrong} is one the model gets wrong (label {int(data.test[1][wrong])},
predicted {int(preds[wrong])}); below, the training examples that pushed it there (proponents)
and against it (opponents).</p>
<h2>Proponents and opponents</h2>{explorer._repr_html_()}
<h2>Highest self-influence (candidate mislabels and rare examples)</h2>{outliers._repr_html_()}
<h2>TracIn clusters</h2>{clusters._repr_html_()}
</body></html>"""
    page = out / "demo.html"
    page.write_text(html)
    print("wrote", page)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser:
        shot = out / "demo.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
                        f"--screenshot={shot.resolve()}", "--window-size=1200,1800", page.resolve().as_uri()],
                       check=False, capture_output=True, timeout=120)
        if shot.exists():
            print("wrote", shot)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts"))
