"""Every MLP schedule of the parallel model (plain, overlap, SUMMA) against the one-process model in float64:
the output, every gradient, and every parameter after 5 Adam steps with clipping, on layouts with uneven
sizes; the bytes each schedule sends per block against `pmatmul.block_bytes`; saved activations per rank; the ring
primitive under every overlapped exchange against the collectives, and the shape of pmatmul's autograd functions.

Runs on in-process thread ranks (`jigsaw_ref.ranks.run_ranks`: the same `Group` code as MPI, messages between
threads) and, for the 2x2 grid, once more under `mpiexec -n 4`."""
import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jigsaw_ref import parallel, pmatmul
from jigsaw_ref.comm import Group, make_groups
from jigsaw_ref.config import preset, shard_range, split_sizes
from jigsaw_ref.grid import Grid
from jigsaw_ref.loss import lat_weights_cos, variable_weights
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.parallel import JigsawMixer, block_of, complete_grads, gather_state, loss_count, loss_share
from jigsaw_ref.pmatmul import Ring
from jigsaw_ref.probe import saved_bytes
from jigsaw_ref.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]
# 12 longitude patches (uneven over p = 3... and even over 2), 22 inputs / 20 outputs over q = 2, H = 30, S = 0.3 * 96,
# G = 0.75 * 30 = 22: every split of a 2x2 grid uneven somewhere
UNEVEN = preset("tiny", n_lat=8, n_lon=48, hidden=30, f_s=0.3, f_c=0.75, out_pad=1, blocks=2, rollout=(1, 2))
STEPS, TOL = 5, 1e-10


def _data(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, 2, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    y = torch.randn(STEPS, 2, cfg.n_out, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    return x, y


def _serial(cfg):
    "The one-process run: 5 Adam steps with clipping at 1 on batches of 2, rollout k = 1, 2, 1, 2, 1."
    x, y = _data(cfg)
    m = WeatherMixer(cfg, dtype=torch.float64).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=3e-6)
    lw, vw = lat_weights_cos(torch.linspace(-80, 80, cfg.n_lat)), variable_weights(cfg)
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = loss_share(m(x[s], k=1 + s % 2, key=s), y[s], lw, vw, y[s].numel())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step(); losses.append(float(loss.detach()))
    return losses, {n: t.detach().clone() for n, t in m.state().items()}


def _rank(comm, cfg, p, q, schedule):
    "One rank of the same run on a p x q group (dp fills the rest: each replica takes its share of the batch)."
    grid = Grid.named(f"{p}x{q}", comm.Get_size())
    g = make_groups(grid, comm=comm)
    d, i, j = grid.coords(comm.Get_rank())
    x, y = _data(cfg)
    m = JigsawMixer(cfg, g["tensor"], g["domain"], dtype=torch.float64, schedule=schedule).train()
    opt = m.guard(torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=3e-6))
    lw, vw = lat_weights_cos(torch.linspace(-80, 80, cfg.n_lat)), variable_weights(cfg)[slice(*shard_range(cfg.n_out, q, j))]
    b0, b1 = shard_range(2, grid.dp, d)
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        share = loss_share(m(block_of(cfg, x[s, b0:b1], p, q, i, j), k=1 + s % 2, key=s, sample0=b0),
                           block_of(cfg, y[s, b0:b1], p, q, i, j), lw, vw, loss_count(m, b1 - b0, grid.dp))
        share.backward()
        complete_grads(m, g, clip=1.0)
        opt.step()
        losses.append(float(g["world"].all_reduce(share.detach().reshape(1))[0]))
    return losses, gather_state(m, g["model"])


LAYOUTS = [(1, 2, 2, "plain"), (1, 2, 2, "overlap"), (2, 2, 4, "plain"), (2, 2, 4, "overlap"), (2, 2, 4, "summa"),
           (2, 1, 4, "overlap"), (3, 2, 6, "overlap"), (3, 3, 9, "summa"), (2, 2, 8, "summa")]


@pytest.fixture(scope="module")
def serial():
    return {name: _serial(cfg) for name, cfg in (("uneven", UNEVEN), ("dropout", UNEVEN.replace(dropout=0.2)))}


@pytest.mark.parametrize("cfg_name", ["uneven", "dropout"])
@pytest.mark.parametrize("p,q,world,schedule", LAYOUTS, ids=[f"{p}x{q}-w{w}-{s}" for p, q, w, s in LAYOUTS])
def test_schedule_equals_one_process_after_adam_steps(serial, cfg_name, p, q, world, schedule):
    "Losses and every parameter after 5 Adam steps (clipping, weight decay, rollout 1 and 2) equal the 1-way run to 1e-10."
    cfg = UNEVEN if cfg_name == "uneven" else UNEVEN.replace(dropout=0.2)
    want_losses, want = serial[cfg_name]
    for losses, got in run_ranks(world, _rank, cfg, p, q, schedule):
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) < TOL, (losses, want_losses)
        top = max(float(t.abs().max()) for t in want.values())
        # tok2.b adds a constant over the channels of each token, which every LayerNorm downstream removes: its gradient
        # is zero in exact arithmetic, Adam divides round-off by its own tiny second moment, so compare on the top scale
        scale = lambda n, t: top if n.endswith("tok2.b") else max(float(t.abs().max()), 1e-3 * top)
        bad = {n: float((got[n] - t).abs().max() / scale(n, t)) for n, t in want.items()}
        assert max(bad.values()) < TOL, {n: e for n, e in bad.items() if e >= TOL}


def _ring(comm):
    "A gather ring and a scatter ring on thread ranks, beside the group's own collectives on the same blocks."
    g = Group(comm)
    n, r, sizes = g.size, g.rank, split_sizes(7, g.size)
    x = torch.arange(21.0, dtype=torch.float64).view(7, 3) * (r + 1)  # rank r's summand
    ring = Ring.gather(g, x.split(sizes)[r], 0, sizes, tag=1)
    order = [fr for fr, _ in ring]
    gathered = torch.cat([x.split(sizes)[r] if k == r else ring.got[k] for k in range(n)])
    summed = Ring.scatter(g, lambda to: x.split(sizes)[to], 0, sizes[r], tag=2).fold(x.split(sizes)[r])
    sent = g.sent
    return order, gathered, summed, sent, g.all_gather(x.split(sizes)[r], 0, sizes), g.reduce_scatter(x, 0, sizes), g.sent - sent


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_is_the_collectives_in_a_fixed_order(n):
    "`pmatmul.Ring`: gathered blocks = all_gather, folded partial blocks = reduce_scatter, the rounds' order, the same bytes."
    for r, (order, gathered, summed, sent, ag, rs, coll_sent) in enumerate(run_ranks(n, _ring)):
        assert order == [(r - d) % n for d in range(1, n)]
        assert torch.equal(gathered, ag) and torch.equal(summed, rs) and sent == coll_sent


def test_autograd_functions_are_their_algebra_and_no_function_takes_the_clump():
    "Every autograd function of pmatmul is at most 25 lines (the exchanges are `Ring`s); the MLPs take a `Layout`."
    src = inspect.getsource(pmatmul)
    tree = ast.parse(src)
    fns = [n for n in tree.body if isinstance(n, ast.ClassDef) and any("Function" in ast.unparse(b) for b in n.bases)]
    assert len(fns) >= 7 and all(f.end_lineno - f.lineno + 1 <= 25 for f in fns), {f.name: f.end_lineno - f.lineno + 1 for f in fns}
    for mod in (pmatmul, parallel):
        for name, f in inspect.getmembers(mod, inspect.isfunction):
            params = set(inspect.signature(f).parameters)
            assert not {"tensor", "domain", "t_sizes"} <= params, (mod.__name__, name)
    assert set(inspect.signature(pmatmul.token_mlp).parameters) == {"x", "w1", "b1", "w2", "b2", "lay", "drop"}


def test_summa_needs_a_square_group():
    def build(comm):
        g = make_groups(Grid(1, 1, 2), comm=comm)
        JigsawMixer(UNEVEN, g["tensor"], g["domain"], schedule="summa")
    with pytest.raises(Exception, match="square model group"):
        run_ranks(2, build)


def _activations(comm, cfg, p, q, schedule):
    g = make_groups(Grid(1, p, q), comm=comm)
    m = JigsawMixer(cfg, g["tensor"], g["domain"], schedule=schedule)
    x = block_of(cfg, torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j)
    with saved_bytes() as sb: m(x)
    return sb.bytes


def test_saved_activations_per_rank_are_one_nth():
    "Saved-for-backward bytes per rank <= 1.15 x (1-way)/n for the overlapped and SUMMA schedules (a small-grid stand-in for medium)."
    cfg = preset("small", hidden=256, blocks=2)  # 1024 tokens of 256 features: the blocks dominate, as on medium
    one = run_ranks(1, _activations, cfg, 1, 1, "overlap")[0]
    for p, q, schedule in ((1, 2, "overlap"), (2, 2, "overlap"), (2, 2, "summa")):
        worst = max(run_ranks(p * q, _activations, cfg, p, q, schedule))
        assert worst <= 1.15 * one / (p * q), (p, q, schedule, worst / (one / (p * q)))


MPI_SCRIPT = """
import torch, sys
sys.path.insert(0, "tests")
from mpi4py import MPI
from test_schedules import UNEVEN, _rank, _serial
want_losses, want = _serial(UNEVEN)
losses, got = _rank(MPI.COMM_WORLD, UNEVEN, 2, 2, "summa")
top = max(float(t.abs().max()) for t in want.values())
err = max(float((got[n] - t).abs().max() / (top if n.endswith("tok2.b") else max(float(t.abs().max()), 1e-3 * top))) for n, t in want.items())
ok = err < 1e-10 and max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses)) < 1e-10
print("rank", MPI.COMM_WORLD.Get_rank(), "max error", err, "ok" if ok else "FAIL", flush=True)
sys.exit(0 if ok else 1)
"""


def test_summa_under_mpiexec():
    "The same 5-step SUMMA run on 4 MPI processes equals the 1-way run."
    exe = Path(sys.executable).with_name("mpiexec")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    r = subprocess.run([str(exe if exe.exists() else "mpiexec"), "-n", "4", sys.executable, "-c", MPI_SCRIPT], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count(" ok") == 4, r.stdout + r.stderr[-3000:]
