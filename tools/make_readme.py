"""Render README.md from nbs/index.ipynb (what `nbdev_readme` does, without Quarto): execute, convert to
Markdown, drop the code cells' input prompts. Run from the repository root: `python tools/make_readme.py`."""
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter
from nbconvert.preprocessors import ExecutePreprocessor

root = Path(__file__).resolve().parents[1]
nb = nbformat.read(root / "nbs" / "index.ipynb", as_version=4)
ExecutePreprocessor(timeout=120).preprocess(nb, {"metadata": {"path": str(root / "nbs")}})
body, _ = MarkdownExporter().from_notebook_node(nb)
header = "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n"
(root / "README.md").write_text(header + body)
print("wrote README.md")
