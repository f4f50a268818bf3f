"""Launch the tests in tests/mpi under `mpiexec -n N`: every rank runs the same pytest session, and the
ranks agree on each verdict (see mpi_util.agree), so a failure fails every rank and nothing hangs.
2, 4 and 8 ranks (dp 2 x 4-way and 2 x 4, oversubscribed on 2 cores) all run by default: the shapes are tiny."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpiexec():
    "The mpiexec next to this Python (the MPI wheel's), not whatever is first on PATH."
    exe = Path(sys.executable).with_name("mpiexec")
    return str(exe) if exe.exists() else "mpiexec"


def run_mpi(n, target, timeout=900, extra=()):
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           f"--timeout={timeout}", *extra, target]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} {target} did not finish in {timeout + 60} s:\n{(e.stdout or '')[-3000:]}")
    assert r.returncode == 0, f"mpiexec -n {n} {target} failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("suite", ["test_comm_mpi.py", "test_layers_mpi.py", "test_model_mpi.py"])
def test_under_mpiexec(n, suite):
    out = run_mpi(n, f"tests/mpi/{suite}")
    assert " passed" in out
