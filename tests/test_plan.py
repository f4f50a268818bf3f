"""`jigsaw_ref.plan`: the per-rank terms equal what the model allocates and saves, the planned peak is within 10% of
every mpiexec rank's measured peak resident set, the paper's 2.57 B model fits 4-way on four 40 GB GPUs and not 1-way,
and the trainer's check refuses a run that cannot fit, with the plan, before anything is allocated."""
import json
import math
import os
import resource
import subprocess
import sys
import time

import pytest
import torch

from jigsaw_ref.config import ConfigError, preset
from jigsaw_ref.grid import Grid
from jigsaw_ref.parallel import shard_spec
from jigsaw_ref.plan import (Setup, check, dims, layout_memory, main, parse_devices, plan, preflight, rank_params, recv_elems,
                             saved_elems)

UNEVEN = preset("tiny", n_lon=48, hidden=20, out_pad=1)  # 12 patches, 19 inputs, 20 outputs


@pytest.mark.parametrize("p,q", [(1, 1), (1, 2), (2, 2), (3, 2), (2, 3)])
def test_rank_params_are_the_blocks_shard_spec_lays_out(p, q):
    for mode in ("exact", "faithful"):
        for s in ("overlap", "plain") + (("summa",) if p == q else ()):
            for i in range(p):
                for j in range(q):
                    want = sum(math.prod(len(ix) for ix in idx) for idx, _, _ in shard_spec(UNEVEN, p, q, i, j, mode, s).values())
                    assert rank_params(UNEVEN, p, q, i, j, mode, s) == want, (mode, s, i, j)


def _step_counts(comm, cfg, p, q, schedule, recompute, B):
    "Saved activation bytes (less parameters) and receive-buffer peak of one forward and backward on this thread rank."
    from jigsaw_ref.comm import make_groups
    from jigsaw_ref.parallel import JigsawMixer, block_of
    from jigsaw_ref.pmatmul import saved_bytes
    g = make_groups(Grid(1, p, q), comm=comm)
    m = JigsawMixer(cfg, g["tensor"], g["domain"], "exact", torch.float32, schedule=schedule, recompute=recompute).train()
    x = block_of(cfg, torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j)
    y = block_of(cfg, torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j)
    from jigsaw_ref.parallel import loss_share
    with saved_bytes() as sb:
        loss = loss_share(m(x, k=2, key=3), y, torch.ones(cfg.n_lat), torch.ones(y.shape[1]), 1)
    loss.backward()
    own = sum(t.untyped_storage().nbytes() for t in m.parameters() if t.untyped_storage().data_ptr() in sb.seen)
    return m.i, m.j, sb.bytes - own, g["tensor"].recv_peak + g["domain"].recv_peak


@pytest.mark.parametrize("p,q,schedule,recompute", [(1, 2, "overlap", False), (2, 2, "plain", False), (2, 2, "summa", True),
                                                    (3, 2, "overlap", True), (2, 1, "plain", True)])
def test_saved_activations_and_receive_buffers_equal_the_counts(p, q, schedule, recompute):
    from jigsaw_ref.ranks import run_ranks
    cfg = UNEVEN  # no dropout: its saved positions are a random count (`plan.dropout_saved` is their expectation)
    for i, j, saved, recv in run_ranks(p * q, _step_counts, cfg, p, q, schedule, recompute, 2):
        assert saved == 4 * saved_elems(cfg, p, q, i, j, schedule, "exact", recompute, 2, 2)
        assert recv == 4 * sum(recv_elems(cfg, p, q, i, j, schedule, "exact", 2))


def test_the_paper_4way_model_fits_four_40GB_gpus_4way_and_not_1way():
    pl = plan(preset("c4_4way"), parse_devices("4x40GB"), Setup(precision="tf32"))
    rows = {r["layout"]: r for r in pl["rows"]}
    assert rows["Jigsaw 2x2"]["fits"] and not rows["Jigsaw 1x1"]["fits"] and not rows["DDP"]["fits"]
    assert pl["best"]["fits"] and pl["best"]["kind"] == "jigsaw"


def test_planned_c3_peak_is_within_10_percent_of_the_h200_measurement():
    from pathlib import Path
    r = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "gpu_check_h200.json").read_text())
    for prec in ("tf32", "bf16"):
        planned = layout_memory(preset("c3"), 1, 1, Setup(precision=prec, device="cuda"))["peak"]
        assert abs(planned / (r["steps"][prec]["peak_mem_gib"] * 2**30) - 1) < 0.10, prec


def test_jigsaw_plan_json(capsys):
    assert main(["--model", "c4_4way", "--devices", "4x40GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] and {"Jigsaw 2x2", "DDP", "FSDP", "Megatron-1D 4"} <= {r["layout"] for r in out["rows"]}
    r = next(r for r in out["rows"] if r["layout"] == "Jigsaw 2x2")
    parts = ("params", "grads", "adam", "activations", "recv", "workspace", "batch", "overhead")
    assert abs(sum(r[k] for k in parts) - r["peak"]) < 1 and r["samples_s"] > 0


def test_preflight_refuses_a_model_that_cannot_fit_before_allocating():
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"memory: rank 0 would need .* GiB .* but 6\.00 GiB are available"):
        preflight(preset("tiny", hidden=60000), Grid(1, 1, 1), have=6 * 2**30)
    assert time.perf_counter() - t < 10
    assert preflight(preset("tiny"), Grid(1, 1, 1), have=6 * 2**30)["peak"] < 2**30
    with pytest.raises(ConfigError, match="use --way 1x2 on the same 2 ranks"):
        preflight(preset("small"), Grid(2, 1, 1), have=150 * 2**20)


def test_preflight_under_an_address_space_limit_refuses_with_the_plan_not_an_allocator_error():
    "In a process limited to 6 GB of address space (ulimit -v), the check reads the limit itself and refuses."
    code = ("import resource, time, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, resource.RLIM_INFINITY))\n"
            "from jigsaw_ref.config import preset, ConfigError\nfrom jigsaw_ref.grid import Grid\nfrom jigsaw_ref.plan import preflight\n"
            "t = time.perf_counter()\n"
            "try: preflight(preset('tiny', hidden=60000), Grid(1, 1, 1), ranks_here=1)\n"
            "except ConfigError as e: print('REFUSED', round(time.perf_counter() - t, 2), e); sys.exit(0)\n"
            "print('NOT REFUSED'); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "REFUSED" in r.stdout, r.stdout + r.stderr
    assert "address-space limit 6.0 GiB" in r.stdout and "Error" not in r.stderr
    assert float(r.stdout.split()[1]) < 10


def _within_10_percent(rows):
    bad = [(r["model"], r["way"], r["schedule"], r["recompute"], round(r["ratio"], 3)) for r in rows if abs(r["ratio"] - 1) > 0.10]
    assert not bad, bad


def test_planned_peak_within_10_percent_of_measured_tiny():
    "tiny on 1, 2 and 4 mpiexec ranks, with and without recomputation, plain and overlap: every rank's VmHWM."
    rows = check(("tiny",), (1, 2, 4))
    assert len(rows) == 10
    _within_10_percent(rows)


@pytest.mark.slow
def test_planned_peak_within_10_percent_of_measured_small_and_medium():
    _within_10_percent(check(("small", "medium"), (1, 2, 4)))


def test_the_trainer_refuses_a_run_that_cannot_fit_before_allocating_it():
    "jigsaw-train --model tiny --set hidden=60000 under a 6 GB address-space limit: one line naming the shortfall, in < 10 s."
    import resource, subprocess, sys, time
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (6_000_000_000, 6_000_000_000))  # noqa: E731
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "jigsaw_ref.cli", "--model", "tiny", "--set", "hidden=60000", "--progress", "false",
                        "--out", "/nonexistent/never-written"], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    wall = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-2000:]
    assert "ConfigError: memory: rank 0 would need" in r.stderr and "available" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-2000:]
    assert wall < 10 + 10, wall  # the check itself takes a few seconds; imports under load take the rest
