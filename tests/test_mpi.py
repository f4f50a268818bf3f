"""Launch the tests in tests/mpi under `mpiexec -n N`: every rank runs the same pytest session, and the
ranks agree on each verdict (see mpi_util.agree), so a failure fails every rank and nothing hangs.

Each suite runs on each backend and algorithm, chosen for the ranks by JIGSAW_TEST_BACKEND (`mpi`: `comm.Group`
on mpi4py; `torch`: `comm.TorchGroup` on gloo) and JIGSAW_TEST_ALGO (`p2p` or `coll`; the comm suite tests both
algorithms itself). By default: MPI p2p on 2 and 4 ranks, the layers also on 8 (dp 2 x 4-way and 2 x 4,
oversubscribed on 2 cores), and every other backend x algorithm on 4 ranks (the 2x2 layout and four others), except
the longest launches (`LONG`: the whole model on 8 ranks and with the library collectives, the comm suite on 8, the
layers with gloo's collectives),
which with the rest of the product are `slow` (`pytest -m slow tests/test_mpi.py`: all 30).
tests/test_torch_group.py checks the two backends bit for bit."""
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


def run_mpi(n, target, timeout=480, extra=(), env=None):
    """Run pytest on `target` under `mpiexec -n n` (with `env` added to the ranks' environment); return its stdout.

    The whole launch is limited to `timeout` + 60 s, under pytest.ini's 600 s, so that a hang ends here with the ranks'
    output, which includes every rank's stack (faulthandler) for a test stuck longer than `timeout` / 2: pytest-timeout
    cannot interrupt a rank blocked inside MPI."""
    extra_env = dict(env or {})
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra_env)
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           f"--timeout={timeout}", "-o", f"faulthandler_timeout={timeout // 2}", *extra, target]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"mpiexec -n {n} {target} {extra_env} did not finish in {timeout + 60} s:\n{out[-6000:]}")
    assert r.returncode == 0, f"mpiexec -n {n} {target} {extra_env} failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    return r.stdout


LONG = {"comm-mpi-both-n8", "model-mpi-p2p-n8", "model-mpi-coll-n4", "model-torch-coll-n4",  # 25-60 s each on 2 cores
        "layers-torch-coll-n4"}  # the library collectives on gloo: layers-mpi-coll-n4 runs the same layers on them


def _runs():
    "(suite, ranks, backend, algo) of every run; default: MPI p2p on every size, the other combinations on 4 ranks."
    for suite in ("test_comm_mpi.py", "test_layers_mpi.py", "test_model_mpi.py"):
        for backend in ("mpi", "torch"):
            for algo in (["both"] if suite == "test_comm_mpi.py" else ["p2p", "coll"]):
                for n in (2, 4, 8):
                    name = f"{suite[5:-7]}-{backend}-{algo}-n{n}"
                    default = ((backend, algo) in (("mpi", "p2p"), ("mpi", "both")) or n == 4) and name not in LONG
                    yield pytest.param(suite, n, backend, algo, marks=() if default else pytest.mark.slow, id=name)


@pytest.mark.parametrize("suite,n,backend,algo", list(_runs()))
def test_under_mpiexec(suite, n, backend, algo):
    env = {"JIGSAW_TEST_BACKEND": backend, "JIGSAW_TEST_ALGO": "p2p" if algo == "both" else algo}
    out = run_mpi(n, f"tests/mpi/{suite}", env=env)
    assert " passed" in out and " failed" not in out
