"""Run the interactive MPI notebook (ipyparallel, 4 MPI engines) with its `mpi` cells enabled, inside a
timeout, with a private IPYTHONDIR, and stop any cluster it left behind even when a cell failed."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_mpi_notebook_runs_and_matches_one_process(tmp_path):
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"), MPIR_CVAR_ENABLE_HEAVY_YIELD="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        r = subprocess.run([str(BIN / "nbdev_test"), "--path", "nbs/14_mpi_notebook.ipynb", "--flags", "mpi", "--do_print"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "Success" in r.stdout + r.stderr
    finally:
        subprocess.run([str(BIN / "ipcluster"), "stop", "--all"], cwd=ROOT, env=env, capture_output=True, timeout=120)
