"""`TorchGroup` (torch.distributed, gloo on CPU) against the MPI `Group`, bit for bit, both with the p2p algorithm.

In one mpiexec run every rank builds each group twice, once as `comm.Group` on the mpi4py communicator and once as
`comm.TorchGroup` on a torch.distributed process group with the same members (`mpi_util.make_group`), runs the
same float64 computation on both and asserts that every output and every gradient is `torch.equal` and that each
group counted the same bytes (`group.sent`): every primitive (all-gather, reduce-scatter, all-reduce; even and
uneven blocks; sizes given and asked of the partners; forward and backward), every schedule of the partitioned
token and channel MLPs and the exact LayerNorm (jigsaw_ref.pmatmul), and one training step of the whole
`JigsawMixer`, on every layout of 2, 4 and 8 ranks. The p2p algorithm sums each partner's block in a fixed order
on both transports, so equality is exact, not a tolerance. As one process, this file launches itself under
`mpiexec -n 2/4/8` (tests/test_mpi.py's launcher)."""
import os

import pytest
import torch
import torch.nn.functional as F

from jigsaw_ref.comm import TorchGroup, all_gather, all_reduce, reduce_scatter
from jigsaw_ref.config import preset, shard_range, split_sizes
from jigsaw_ref.pmatmul import layer_norm
from mpi_util import COMM, RANK, WORLD, agree, block, comms_for, layouts, lid, make_group, rel_err
from test_mpi import run_mpi

under_mpi = pytest.mark.skipif(WORLD == 1, reason="runs under mpiexec (launched by test_gloo_bit_equal_to_mpi)")


def mlp_variants(kind, schedules=("", "_overlap")):
    "name -> `call(x, w1, b1, w2, b2, tensor, domain, T, H, K)` of pmatmul's `kind` MLP per schedule (K: its hidden width)."
    from jigsaw_ref import pmatmul
    def sized(fn):
        def call(x, w1, b1, w2, b2, tensor, domain, T, H, K):  # K is S (cut over q) or G (cut over p)
            return fn(x, w1, b1, w2, b2, pmatmul.Layout.split(tensor, domain, T, H, K, K))
        return call
    return {f"{kind}_mlp{s}": sized(getattr(pmatmul, f"{kind}_mlp{s}")) for s in schedules}


TOKEN, CHANNEL = mlp_variants("token"), mlp_variants("channel")


SHM_ALL = os.environ.get("JIGSAW_GLOO_SHM_MIN") == "1"  # every non-empty gloo message through shared memory


@pytest.mark.skipif(WORLD > 1, reason="the launcher runs as one process")
@pytest.mark.parametrize("n,shm", [(2, "gloo-default"), (4, "gloo-default"), (8, "gloo-default"), (2, "gloo-shm-all"),
                                   pytest.param(4, "gloo-shm-all", marks=pytest.mark.slow)])
def test_gloo_bit_equal_to_mpi(n, shm):
    "Default: these small messages go through gloo itself; shm-all: every one through `comm.ShmLink`'s shared memory."
    out = run_mpi(n, "tests/test_torch_group.py", env={"JIGSAW_GLOO_SHM_MIN": "1"} if shm == "gloo-shm-all" else None)
    assert " passed" in out and " failed" not in out, out[-2000:]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _both(comm, wire=None):
    "The mpi4py communicator `comm` as an MPI `Group` and as a `TorchGroup` on the same ranks (both p2p; `wire`: message dtype)."
    mg, tg = make_group(comm, "p2p", "mpi"), make_group(comm, "p2p", "torch")
    mg.wire = tg.wire = wire
    assert isinstance(tg, TorchGroup) and (tg.rank, tg.size) == (mg.rank, mg.size), (tg.rank, tg.size, mg.rank, mg.size)
    return mg, tg


def _assert_same(mpi: dict, torch_: dict, what: str):
    "Every entry bitwise equal (dtype, shape and bits); something non-trivial compared."
    assert mpi.keys() == torch_.keys(), (what, sorted(set(mpi) ^ set(torch_)))
    bad = [k for k in mpi if mpi[k].dtype != torch_[k].dtype or not torch.equal(mpi[k], torch_[k])]
    assert not bad, (what, "differ between MPI and torch.distributed", bad)
    assert any(t.numel() and t.abs().max() > 0 for t in mpi.values()), (what, "nothing was compared")


def _primitives(g, tag):
    "Every primitive on group `g`, forward and backward; name -> tensor (outputs and input gradients)."
    n, r, out = g.size, g.rank, {}
    for extra in (0, 1):  # even and uneven blocks
        rows = 2 * n + extra
        sizes = split_sizes(rows, n)
        a = sum(sizes[:r])
        for dim in (0, 1):
            full = _rand(rows, 3, seed=1 + extra).movedim(0, dim).contiguous()
            for given in (sizes, None):  # None: every rank's extent is asked of the partners
                k = f"{tag}.ag.{extra}.{dim}.{'given' if given else 'asked'}"
                mine = full.narrow(dim, a, sizes[r]).clone().requires_grad_(True)
                y = all_gather(mine, g, dim, given)
                assert torch.equal(y, full), k
                (y * _rand(*y.shape, seed=100 + r)).sum().backward()
                out[k], out[k + ".grad"] = y.detach(), mine.grad
        for given in (sizes, None):  # None: split_sizes
            k = f"{tag}.rs.{extra}.{'given' if given else 'default'}"
            part = _rand(rows, 3, seed=10 + r).requires_grad_(True)  # rank r's summand
            y = reduce_scatter(part, g, 0, given)
            (y * _rand(*y.shape, seed=200)).sum().backward()
            out[k], out[k + ".grad"] = y.detach(), part.grad
        for shape in ((5, 3), (2 * n + extra + 1,)):  # the pair exchange (n = 2) or RS + AG over uneven blocks
            k = f"{tag}.ar.{extra}.{len(shape)}"
            part = _rand(*shape, seed=20 + r).requires_grad_(True)
            y = all_reduce(part, g)
            (y * _rand(*shape, seed=300 + r)).sum().backward()
            out[k], out[k + ".grad"] = y.detach(), part.grad
    return out


@under_mpi
def test_primitives_world():
    def check():
        mg, tg = _both(COMM)
        _assert_same(_primitives(mg, "world"), _primitives(tg, "world"), "primitives on the world")
        assert mg.sent == tg.sent > 0, (mg.sent, tg.sent)
    agree(check)


@under_mpi
@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_primitives_subgroups(layout):
    def check():
        c = comms_for(layout)
        for kind in ("tensor", "domain", "model", "dp"):
            mg, tg = _both(getattr(c, kind))
            _assert_same(_primitives(mg, kind), _primitives(tg, kind), f"primitives on the {kind} group of {layout}")
            assert mg.sent == tg.sent, (kind, mg.sent, tg.sent)
    agree(check)


SIZES = {"even": dict(B=2, T=8, H=4, S=4, G=4), "uneven": dict(B=2, T=10, H=5, S=3, G=7)}


# how each schedule cuts the MLP weights: per tensor, (dim, axis) with axis i (domain, p parts) or j (tensor, q parts),
# a repeated dim cut again inside the first cut (a bias shard within a block)
CUTS = {"plain": dict(w1=[(0, "j"), (1, "i")], b1=[(0, "j"), (0, "i")], w2=[(0, "i"), (1, "j")], b2=[(0, "i"), (0, "j")],
                      wa=[(0, "j"), (1, "i")], ba=[(0, "i"), (0, "j")], wb=[(0, "i"), (1, "j")], bb=[(0, "j"), (0, "i")]),
        "summa": dict(w1=[(0, "i"), (1, "j")], b1=[(0, "i")], w2=[(0, "i"), (1, "j")], b2=[(0, "i")],  # square grids
                      wa=[(0, "i"), (1, "j")], ba=[(0, "j")], wb=[(0, "i"), (1, "j")], bb=[(0, "j")])}


def _layers(layout, coords, tg, dg):
    "Every partitioned layer on this rank's blocks (SUMMA on square grids); name -> output or gradient."
    dp, p, q = layout
    d, i, j = coords
    out = {}
    cut = lambda t, spec: block(t, spec).clone().requires_grad_(True)
    spec = lambda name, sched: [(dim, p, i) if ax == "i" else (dim, q, j) for dim, ax in CUTS[sched][name]]
    fns = [(n, f, "plain") for n, f in (TOKEN | CHANNEL).items()]
    if p == q:
        fns += [(n, f, "summa") for n, f in (mlp_variants("token", ("_summa",)) | mlp_variants("channel", ("_summa",))).items()]
    for sname, sz in SIZES.items():
        B, T, H, S, G_ = (sz[k] for k in "BTHSG")
        if T < p or H < q or S < q:
            continue
        X, U = _rand(B, T, H, seed=1), _rand(B, T, H, seed=6)  # input and upstream gradient
        xs = [(1, p, i), (2, q, j)]
        W = dict(w1=_rand(S, T, seed=2), b1=_rand(S, seed=3), w2=_rand(T, S, seed=4), b2=_rand(T, seed=5),
                 wa=_rand(H, G_, seed=2), ba=_rand(G_, seed=3), wb=_rand(G_, H, seed=4), bb=_rand(H, seed=5))
        serial = {"token": torch.einsum("ts,bsh->bth", W["w2"], F.gelu(torch.einsum("st,bth->bsh", W["w1"], X) + W["b1"][:, None]))
                  + W["b2"][:, None], "channel": F.gelu(X @ W["wa"] + W["ba"]) @ W["wb"] + W["bb"]}
        for name, fn, sched in fns:
            kind = name.split("_")[0]
            names = ("w1", "b1", "w2", "b2") if kind == "token" else ("wa", "ba", "wb", "bb")
            x, ws = cut(X, xs), [cut(W[k], spec(k, sched)) for k in names]
            y = fn(x, *ws, tg, dg, T, H, S if kind == "token" else G_)
            assert rel_err(y, block(serial[kind], xs)) < (1e-11 if tg.wire is None else 5e-2), (name, sname)
            (y * block(U, xs)).sum().backward()
            out |= {f"{name}.{sname}.y": y.detach(), f"{name}.{sname}.x": x.grad}
            out |= {f"{name}.{sname}.{k}": w.grad for k, w in zip(names, ws)}
    H = 7  # uneven over every q
    X, w, b, U = _rand(2, 6, H, seed=1), _rand(H, seed=2), _rand(H, seed=3), _rand(2, 6, H, seed=4)
    x, wl, bl = cut(X, [(2, q, j)]), cut(w, [(0, q, j)]), cut(b, [(0, q, j)])
    y = layer_norm(x, wl, bl, tg, H, exact=True)
    (y * block(U, [(2, q, j)])).sum().backward()
    want = F.layer_norm(X, (H,), w, b)
    assert rel_err(y, block(want, [(2, q, j)])) < (1e-12 if tg.wire is None else 1e-2)  # right, not merely equal
    out |= {"layer_norm.y": y.detach(), "layer_norm.x": x.grad, "layer_norm.w": wl.grad, "layer_norm.b": bl.grad}
    return out


@under_mpi
@pytest.mark.parametrize("wire", [None, torch.bfloat16], ids=["float64", "bf16-wire"])
@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_partitioned_layers(layout, wire):
    "float64 layers; and with their messages sent in bfloat16 (`wire`), the same rounding on both transports."
    def check():
        c = comms_for(layout)
        (mt, tt), (md, td) = _both(c.tensor, wire), _both(c.domain, wire)
        got_m, got_t = _layers(layout, c.coords, mt, md), _layers(layout, c.coords, tt, td)
        _assert_same(got_m, got_t, f"layers on {layout}")
        assert (mt.sent, md.sent) == (tt.sent, td.sent), ((mt.sent, md.sent), (tt.sent, td.sent))
        for g in (tt, td):  # which transport carried them: shared memory exactly when asked for
            used = g.shm is not None and len(g.shm.slots) > 0
            assert used == (SHM_ALL and g.size > 1), (g.size, SHM_ALL, g.shm and len(g.shm.slots))
        if layout[1] * layout[2] > 1:
            assert mt.sent + md.sent > 0
    agree(check)


MODEL = preset("tiny", n_lat=8, n_lon=40, hidden=30, f_s=0.3, f_c=0.75, out_pad=1, blocks=2)  # uneven everywhere


def _model_step(layout, c, groups, **kw):
    "One forward (2 rollout steps) and backward of the JigsawMixer, gradients completed; name -> tensor."
    from jigsaw_ref.loss import lat_weights_cos, variable_weights
    from jigsaw_ref.parallel import JigsawMixer, loss_share, sync_grads, token_sizes
    cfg, (dp, p, q), (d, i, j) = MODEL, layout, c.coords
    tg, dg, dpg = groups
    B = 2 * dp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    y = torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    ts = token_sizes(cfg, p)
    l0 = sum(ts[:i]) // cfg.n_lat * cfg.patch
    l1 = l0 + ts[i] // cfg.n_lat * cfg.patch
    b0, b1 = shard_range(B, dp, d)
    local = lambda t, ch: t[b0:b1, slice(*shard_range(ch, q, j)), :, l0:l1]
    par = JigsawMixer(cfg, tg, dg, mode="exact", dtype=torch.float64, seed=3, **kw)
    pred = par(local(x, cfg.n_in), k=2)
    lw = lat_weights_cos(torch.linspace(-80, 80, cfg.n_lat, dtype=torch.float64))
    vw = variable_weights(cfg)[slice(*shard_range(cfg.n_out, q, j))]
    loss_share(pred, local(y, cfg.n_out), lw, vw, y.numel()).backward()
    sync_grads(par, dpg)
    return {"pred": pred.detach()} | {n: t.grad for n, t in par.state().items()}


def _schedules(p, q):
    "The JigsawMixer keyword sets to compare: each exchange schedule (SUMMA on square grids only)."
    from jigsaw_ref.parallel import SCHEDULES
    return [{"schedule": s} for s in SCHEDULES if s != "summa" or p == q]


@under_mpi
@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_model_step(layout):
    def check():
        c = comms_for(layout)
        pairs = [_both(c.tensor), _both(c.domain), _both(c.dp)]
        for kw in _schedules(*layout[1:]):
            mpi_groups, torch_groups = [m for m, _ in pairs], [t for _, t in pairs]
            got_m, got_t = _model_step(layout, c, mpi_groups, **kw), _model_step(layout, c, torch_groups, **kw)
            _assert_same(got_m, got_t, f"JigsawMixer step on {layout} {kw}")
        assert [m.sent for m, _ in pairs] == [t.sent for _, t in pairs], ([m.sent for m, _ in pairs], [t.sent for _, t in pairs])
    agree(check)


@under_mpi
def test_shm_link_agrees_cleans_up_and_moves_every_dtype():
    "The probe finds every rank of this host on both sides; messages of every dtype arrive intact; no file is left."
    from jigsaw_ref.comm import ShmLink
    def check():
        g = make_group(COMM, "p2p", "torch")
        link = ShmLink(g, 1)
        assert link.peers == [k != RANK for k in range(WORLD)], link.peers  # one host: every other rank
        g.shm = link
        peer_to, peer_from = (RANK + 1) % WORLD, (RANK - 1) % WORLD
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.int64):
            for rep in range(3):  # the same size again: the acknowledged slot is reused
                x = (torch.arange(1000, dtype=torch.float64) * (RANK + 1) + rep).to(dtype)
                got = torch.empty_like(x)
                g.wait(g.start(sends=[(x, peer_to)], recvs=[(got, peer_from)], tag=7))
                want = (torch.arange(1000, dtype=torch.float64) * (peer_from + 1) + rep).to(dtype)
                assert torch.equal(got, want), (dtype, rep)
        assert 0 < len(link.slots) <= 4 * 2, len(link.slots)  # a new slot only while an acknowledgement is on its way
        g.barrier()
        link.close()
        left = [p for p in link.paths if os.path.exists(p)]
        assert not left, left
    agree(check)


@under_mpi
def test_shm_can_be_turned_off():
    "`shm_min=-1`: no shared memory; gloo carries every message (and the results are the same)."
    from jigsaw_ref.comm import TorchGroup
    def check():
        tg = make_group(COMM, "p2p", "torch")
        off = TorchGroup(tg.pg, "p2p", shm_min=-1)
        assert off.shm is None and off.gloo
        x = torch.randn(4096, generator=torch.Generator().manual_seed(RANK), dtype=torch.float64)
        assert torch.equal(off.all_reduce(x), tg.all_reduce(x))
    agree(check)
