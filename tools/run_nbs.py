"""Execute notebooks in place so their saved outputs (tables, plots) appear on the docs site.

Cells flagged `#| mpi`, `#| slow` or `#| eval: false` are skipped, as `nbdev_test` skips them; the MPI
notebook keeps whatever outputs it had. Run from the repository root: `python tools/run_nbs.py [NAME ...]`."""
import re
import sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"^\s*#\|\s*(mpi|slow|eval:\s*false)\b", re.M)


def skip(cell):
    return cell.cell_type == "code" and (SKIP.search(cell.source) or cell.source.lstrip().startswith("%%px"))


def run(path: Path):
    nb = read_nb(path)
    shell = CaptureShell(path=path.parent)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if skip(cell):
            continue
        shell.cell(cell)
        if shell.exc:
            raise RuntimeError(f"{path.name}: a cell failed:\n{cell.source[:300]}\n{shell.exc}")
    write_nb(nb, path)
    print("executed", path.relative_to(ROOT), flush=True)


if __name__ == "__main__":
    names = sys.argv[1:]
    paths = [ROOT / "nbs" / (n if n.endswith(".ipynb") else n + ".ipynb") for n in names] if names else \
        sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_") and "mpi_notebook" not in p.name)
    for p in paths:
        run(p)
