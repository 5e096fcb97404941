"""Build the tutorial notebooks from their reviewable sources in notebooks/src/*.py.

    python notebooks/build.py            # write notebooks/NN_name.ipynb (no outputs)
    python notebooks/build.py --check    # exit 1 if a notebook is missing, stale, or holds outputs

A source is a Python file in "percent" format: `# %%` opens a code cell, `# %% [markdown]` opens a
markdown cell whose lines are written as comments (`# text`). Text before the first marker is dropped
(use it for a module docstring). The .py files run as plain scripts too, except IPython magics
(lines starting with `%`), which are written as comments `# %load_ext ...` and uncommented here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
MAGIC = "# %"  # "# %load_ext x" in a code cell becomes "%load_ext x" (but "# %%" is a cell marker)


def parse(text: str) -> list[tuple[str, str]]:
    """Source text -> [(kind, body)], kind "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines]
        else:
            lines = [l[2:] if l.startswith(MAGIC) and not l.startswith("# %%") else l for l in lines]
        body = "\n".join(lines).strip("\n")
        if body:
            out.append((kind, body))
    return out


def build_one(src: Path) -> nbformat.NotebookNode:
    cells = [new_markdown_cell(b) if k == "markdown" else new_code_cell(b) for k, b in parse(src.read_text())]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{src.stem[:2]}-{i:03d}"  # stable ids: rebuilding gives identical files
    nbformat.validate(nb)
    return nb


def target(src: Path) -> Path:
    return HERE / f"{src.stem}.ipynb"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    problems = []
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        text = nbformat.writes(build_one(src)) + "\n"
        dest = target(src)
        if check:
            if not dest.exists() or dest.read_text() != text:
                problems.append(f"{dest.name} is missing or out of date; run python notebooks/build.py")
        else:
            dest.write_text(text)
            print("wrote", dest.relative_to(HERE.parent))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
