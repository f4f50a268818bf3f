"""Devices per rank, CUDA-aware MPI detection and host staging, tested on CPU (jigsaw_ref.comm).

No GPU here: each GPU-only branch is run with a stand-in. `FakeCuda` is a CPU tensor that says `is_cuda`
(what `Group` asks before it stages a message); `torch.cuda.is_available`, `device_count`, `current_stream`,
`torch.distributed.init_process_group` and the MPI library handle are replaced where a branch needs them.
What this proves: the staging logic (when a message is staged, that the pool is reused, that the stream is
synchronised before MPI reads a buffer, that a receive is copied back at `wait()`), the device choice from
the launcher's variables, and the detection logic. What it cannot: pinned-memory and device-copy behaviour
on a real GPU (benchmarks/gpu_parallel_check.py, written, not verified on a GPU, is the check for that; its
CPU dry run is tested here). The MPI parts run under `mpiexec -n 2`, launched by `test_devices_under_mpiexec`."""
import ctypes
import json
import subprocess
import sys
import threading

import pytest
import torch

import jigsaw_ref.comm as comm
from jigsaw_ref.comm import (_LOCAL_RANK_VARS, Group, StagingPool, TorchGroup, cuda_aware_mpi, init_torch_distributed,
                             local_device, local_rank)
from jigsaw_ref.config import ConfigError, split_sizes
from jigsaw_ref.ranks import RankFailed, run_ranks
from mpi_util import COMM, RANK, WORLD, agree
from test_mpi import ROOT, mpiexec, run_mpi

one_process = pytest.mark.skipif(WORLD > 1, reason="one-process test")
under_mpi = pytest.mark.skipif(WORLD == 1, reason="runs under mpiexec (launched by test_devices_under_mpiexec)")
LAUNCHER_VARS = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"]


@one_process
def test_devices_under_mpiexec():
    out = run_mpi(2, "tests/test_devices.py", timeout=300)
    assert " passed" in out and " failed" not in out, out[-2000:]


@pytest.fixture
def no_launcher(monkeypatch):
    "An environment without any launcher's local-rank variable (mpiexec sets some)."
    for k in _LOCAL_RANK_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


class FakeCuda(torch.Tensor):
    "A CPU tensor that reports `is_cuda` (torch keeps the subclass through views, copies and `new_empty`)."
    @property
    def is_cuda(self):
        return True


def fake(t):
    return t.clone().as_subclass(FakeCuda)


def plain(t):
    return t.as_subclass(torch.Tensor)


_TRACE = threading.local()  # each rank's (thread's) event log


def _traced_sync(t):
    "Stands in for `comm._sync`: records that the stream of a device tensor would be synchronised here."
    if t.is_cuda and getattr(_TRACE, "log", None) is not None:
        _TRACE.log.append(("sync", type(t).__name__))


@pytest.fixture
def traced_sync(monkeypatch):
    monkeypatch.setattr(comm, "_sync", _traced_sync)


# ---------------------------------------------------------------- local rank and device

@one_process
@pytest.mark.parametrize("var", LAUNCHER_VARS)
def test_local_rank_from_each_launcher_variable(no_launcher, var):
    assert var in _LOCAL_RANK_VARS
    no_launcher.setenv(var, "3")
    assert local_rank() == 3
    assert local_rank(COMM) == 3  # the launcher's word wins over the shared-memory split


@one_process
def test_local_rank_precedence_and_garbage(no_launcher):
    no_launcher.setenv("LOCAL_RANK", "2")
    no_launcher.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert local_rank() == 1  # the first variable of _LOCAL_RANK_VARS that is set
    no_launcher.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "")
    assert local_rank() == 2  # empty: ignored
    no_launcher.setenv("SLURM_LOCALID", "x1")
    assert local_rank() == 2  # not a number: ignored


@one_process
def test_local_rank_fallbacks(no_launcher):
    assert local_rank() == 0  # nothing to go on
    assert local_rank(COMM) == 0  # the shared-memory split of a one-process world
    assert run_ranks(2, local_rank) == [0, 0]  # thread ranks: no Split_type, one process


@under_mpi
def test_local_rank_shared_memory_split(no_launcher):
    "Without a launcher variable every rank asks MPI which ranks share its node: here all of them, one node."
    def check():
        mine = local_rank(COMM)
        assert mine == RANK, (mine, RANK)
        assert sorted(COMM.allgather(mine)) == list(range(WORLD))
    agree(check)


@one_process
def test_local_device_on_cpu(no_launcher):
    assert local_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the no-GPU branches are not reachable")
    assert local_device() == torch.device("cpu")  # auto, no GPU
    with pytest.raises(ConfigError, match="no GPU"):
        local_device("cuda")
    with pytest.raises(ConfigError, match="choose auto, cuda or cpu"):
        local_device("gpu")


@one_process
@pytest.mark.parametrize("var,value,gpus,want", [("LOCAL_RANK", "3", 2, 1), ("SLURM_LOCALID", "2", 4, 2),
                                                  ("MPI_LOCALRANKID", "0", 1, 0), ("PMI_LOCAL_RANK", "5", 4, 1)])
def test_local_device_picks_local_rank_modulo_gpus(no_launcher, var, value, gpus, want):
    "GPU branch with a stand-in CUDA: device `local_rank % device_count`, for 'cuda' and for 'auto'."
    no_launcher.setattr(torch.cuda, "is_available", lambda: True)
    no_launcher.setattr(torch.cuda, "device_count", lambda: gpus)
    no_launcher.setenv(var, value)
    assert local_device("cuda") == torch.device("cuda", want)
    assert local_device() == torch.device("cuda", want)
    assert local_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- CUDA-aware MPI detection

@one_process
def test_cuda_aware_mpi_env_override(monkeypatch):
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", "1")
    assert cuda_aware_mpi() is True
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", "0")
    assert cuda_aware_mpi() is False
    monkeypatch.setattr(ctypes, "CDLL", lambda *_: _Lib(query=1))
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", "yes")  # not 0/1: ignored, the library is asked
    assert cuda_aware_mpi() is True


class _Lib:
    "A stand-in MPI library handle with Open MPI's and/or MPICH's CUDA query."
    def __init__(self, query=None, gpu=None, rc=0):
        self.kinds = []
        if query is not None:
            self.MPIX_Query_cuda_support = lambda: query  # Open MPI (mpi-ext.h)
        if gpu is not None:
            def gpu_query(kind, ref):  # MPICH: MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &is_supported)
                self.kinds.append(kind)
                ref._obj.value = gpu
                return rc
            self.MPIX_GPU_query_support = gpu_query


@one_process
@pytest.mark.parametrize("lib,want", [(_Lib(query=1), True), (_Lib(query=0), False), (_Lib(gpu=1), True),
                                      (_Lib(gpu=0), False), (_Lib(gpu=1, rc=1), False), (_Lib(), False)],
                         ids=["ompi-yes", "ompi-no", "mpich-yes", "mpich-no", "mpich-error", "neither"])
def test_cuda_aware_mpi_library_queries(monkeypatch, lib, want):
    monkeypatch.delenv("JIGSAW_CUDA_AWARE_MPI", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *_: lib)
    assert cuda_aware_mpi() is want
    assert lib.kinds in ([], [0])  # MPICH is asked about CUDA (kind 0), once at most


@one_process
def test_cuda_aware_mpi_no_library(monkeypatch):
    monkeypatch.delenv("JIGSAW_CUDA_AWARE_MPI", raising=False)
    def refuse(*_): raise OSError("no such library")
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert cuda_aware_mpi() is False


@one_process
def test_this_mpi_is_not_cuda_aware(monkeypatch):
    "The pip MPICH of this venv says itself that it is not CUDA-aware; cuda_aware_mpi() agrees."
    from mpi4py import MPI
    monkeypatch.delenv("JIGSAW_CUDA_AWARE_MPI", raising=False)
    lib = ctypes.CDLL(MPI.__file__)  # mpi4py's extension module: its handle reaches libmpi's symbols
    if hasattr(lib, "MPIX_Query_cuda_support"):
        assert lib.MPIX_Query_cuda_support() == 0
    assert cuda_aware_mpi() is False


@one_process
def test_cuda_aware_mpi_asks_the_loaded_mpi_library(monkeypatch):
    monkeypatch.delenv("JIGSAW_CUDA_AWARE_MPI", raising=False)
    real, seen = ctypes.CDLL, []
    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(ctypes, "CDLL", spy)
    cuda_aware_mpi()
    assert seen and any(hasattr(h, "MPIX_GPU_query_support") or hasattr(h, "MPIX_Query_cuda_support") for h in seen)


# ---------------------------------------------------------------- GPU-only helpers, with stand-ins

@one_process
def test_sync_waits_for_the_device_stream_of_device_tensors(monkeypatch):
    calls = []
    class Stream:
        def __init__(self, dev): self.dev = dev
        def synchronize(self): calls.append(self.dev)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    comm._sync(torch.ones(2))
    assert calls == []  # CPU tensor: nothing to wait for
    comm._sync(fake(torch.ones(2)))
    assert calls == [torch.device("cpu")]  # the stand-in's own device; a real CUDA tensor passes its GPU


@one_process
def test_staging_pool_reuses_buffers_and_pins_with_cuda(monkeypatch):
    real_empty, pinned = torch.empty, []
    def empty(*a, pin_memory=False, **kw):
        pinned.append(pin_memory)
        return real_empty(*a, **kw)  # this CPU build cannot pin
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "empty", empty)
    pool = StagingPool()
    a = pool.take(torch.zeros(2, 3))
    assert pinned == [True] and a.shape == (6,) and pool.allocated == 1
    pool.give(a)
    assert pool.take(torch.zeros(3, 2)) is a  # same dtype and numel: the same buffer
    b = pool.take(torch.zeros(6))  # `a` is taken: a second one
    c = pool.take(torch.zeros(6, dtype=torch.float32))
    assert b is not a and c.dtype == torch.float32 and pool.allocated == 3


@one_process
def test_init_torch_distributed_picks_nccl_with_cuda_and_rendezvous_over_mpi(monkeypatch):
    import torch.distributed as dist
    calls, lock = [], threading.Lock()
    def init(backend, **kw):
        with lock: calls.append((backend, kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init)
    for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    run_ranks(3, init_torch_distributed)  # rank and size from the communicator, rank 0's port broadcast
    assert sorted(kw["rank"] for _, kw in calls) == [0, 1, 2]
    assert {b for b, _ in calls} == {"nccl"} and {kw["world_size"] for _, kw in calls} == {3}
    assert len({kw["init_method"] for _, kw in calls}) == 1 and calls[0][1]["init_method"].startswith("tcp://")
    calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "0"); monkeypatch.setenv("RANK", "0")  # torchrun: its env:// rendezvous
    init_torch_distributed()
    assert calls == [("nccl", {})]
    calls.clear()
    run_ranks(2, init_torch_distributed, "gloo")  # an explicit backend wins; a communicator wins over torchrun's env
    assert [b for b, _ in calls] == ["gloo", "gloo"] and all("init_method" in kw for _, kw in calls)


# ---------------------------------------------------------------- staging: same results, pool reuse, copy-back at wait

def _exchanges(g, seed=0):
    "All-gather (even, uneven), reduce-scatter, all-reduce (pair or RS + AG) and a raw start/wait ring; name -> tensor."
    n, r, out = g.size, g.rank, {}
    gen = lambda *s, k: torch.randn(*s, generator=torch.Generator().manual_seed(seed + k), dtype=torch.float64)
    for extra in (0, 1):
        sizes = split_sizes(2 * n + extra, n)
        full = gen(2 * n + extra, 3, k=extra)
        out[f"ag{extra}"] = g.all_gather(full.split(sizes)[r].clone(), 0, sizes)
        out[f"rs{extra}"] = g.reduce_scatter(gen(2 * n + extra, 3, k=10 + r), 0, sizes)
        out[f"ar{extra}"] = g.all_reduce(gen(5 + extra, k=20 + r))
    buf = torch.zeros(4, dtype=torch.float64)
    g.wait(g.start(sends=[(gen(4, k=30 + r), (r + 1) % n)], recvs=[(buf, (r - 1) % n)], tag=5))
    out["ring"] = buf
    return out


def _staged_vs_plain(c, rounds=3):
    "Unstaged and always-staged groups on `c`: per round the results of both, the pool's allocations and free buffers."
    plain_g, staged = Group(c, "p2p"), Group(c, "p2p", staging="always")
    rec = []
    for _ in range(rounds):
        a, b = _exchanges(plain_g), _exchanges(staged)
        rec.append((a, b, staged.pool.allocated, sum(len(v) for v in staged.pool.free.values())))
    return rec, (plain_g.sent, staged.sent, plain_g.pool.allocated)


def _check_staged(rec, sent):
    for a, b, alloc, free in rec:
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        assert not bad, ("staged results differ", bad)
        assert free == alloc  # every staging buffer is back in the pool after its wait
    allocs = [alloc for _, _, alloc, _ in rec]
    assert allocs[0] > 0 and len(set(allocs)) == 1, ("the pool allocates on the first round only", allocs)
    assert sent[0] == sent[1] > 0 and sent[2] == 0, sent


@one_process
@pytest.mark.parametrize("n", [2, 3, 4])
def test_staging_always_thread_ranks(n):
    for rec, sent in run_ranks(n, _staged_vs_plain):
        _check_staged(rec, sent)


@under_mpi
def test_staging_always_mpi():
    agree(lambda: _check_staged(*_staged_vs_plain(COMM)))


def _copy_back_at_wait(c, make):
    "Rank 0 sends; rank 1 posts its staged receive and checks its buffer is written at `wait()`, not before."
    g = Group(c, "p2p", staging="always")
    x = torch.arange(1.0, 7.0, dtype=torch.float64)
    if g.rank == 0:
        g.wait(g.start(sends=[(make(x), 1)]))
        g.barrier()
        return None
    buf = make(torch.zeros(6, dtype=torch.float64))
    reqs = g.start(recvs=[(buf, 0)])
    g.barrier()  # the sender has finished: the message has arrived or is in flight to the host buffer
    before = plain(buf).clone()
    in_flight = sum(len(v) for v in g.pool.free.values())
    g.wait(reqs)
    return before, plain(buf).clone(), in_flight, sum(len(v) for v in g.pool.free.values()), g.pool.allocated


def _check_copy_back(res):
    before, after, in_flight, back, alloc = res
    assert torch.equal(before, torch.zeros(6, dtype=torch.float64)), before  # not copied before wait()
    assert torch.equal(after, torch.arange(1.0, 7.0, dtype=torch.float64)), after
    assert (in_flight, back, alloc) == (0, 1, 1), (in_flight, back, alloc)  # the buffer is lent until wait()


@one_process
@pytest.mark.parametrize("make", [lambda t: t, fake], ids=["cpu", "fake-cuda"])
def test_receive_copied_back_at_wait_thread_ranks(traced_sync, make):
    _check_copy_back(run_ranks(2, _copy_back_at_wait, make)[1])


@under_mpi
@pytest.mark.parametrize("make", [lambda t: t, fake], ids=["cpu", "fake-cuda"])
def test_receive_copied_back_at_wait_mpi(traced_sync, make):
    if WORLD != 2:
        pytest.skip("a two-rank exchange")
    def check():
        res = _copy_back_at_wait(COMM, make)
        if RANK == 1:
            _check_copy_back(res)
    agree(check)


# ---------------------------------------------------------------- a stand-in device tensor through `Group`

class Spy:
    "A communicator that logs its Isend/Irecv calls (and what they were handed) into `log`."
    def __init__(self, c, log):
        self.c, self.log = c, log

    def Isend(self, buf, dest, tag=0):
        self.log.append(("Isend", type(buf).__name__))
        return self.c.Isend(buf, dest=dest, tag=tag)

    def Irecv(self, buf, source, tag=0):
        self.log.append(("Irecv", type(buf).__name__))
        return self.c.Irecv(buf, source=source, tag=tag)

    def __getattr__(self, k):
        return getattr(self.c, k)


def _device_run(c, staging):
    "Primitives on stand-in device tensors through a spied `Group`, checked against CPU; returns the log and pool count."
    _TRACE.log = log = []
    g, ref = Group(Spy(c, log), "p2p", staging=staging), Group(c, "p2p")
    n, r = g.size, g.rank
    for extra in (0, 1):
        sizes = split_sizes(2 * n + extra, n)
        full = torch.randn(2 * n + extra, 3, generator=torch.Generator().manual_seed(extra), dtype=torch.float64)
        parts = torch.randn(2 * n + extra, 3, generator=torch.Generator().manual_seed(10 + r), dtype=torch.float64)
        got = {"ag": g.all_gather(fake(full.split(sizes)[r]), 0, sizes), "rs": g.reduce_scatter(fake(parts), 0, sizes),
               "ar": g.all_reduce(fake(parts))}
        want = {"ag": ref.all_gather(full.split(sizes)[r].clone(), 0, sizes), "rs": ref.reduce_scatter(parts, 0, sizes),
                "ar": ref.all_reduce(parts)}
        bad = [k for k in want if not torch.equal(plain(got[k]), want[k])]
        assert not bad, ("device-tensor results differ from CPU", extra, bad)
    return log, g.pool.allocated


def _check_staged_log(log, alloc):
    "Staged: MPI only ever sees host numpy buffers, each send's stream synchronised before it is handed over."
    assert alloc > 0
    assert {t for e, t in log if e in ("Isend", "Irecv")} == {"ndarray"}, log
    last = None
    for e, _ in log:
        if e == "Isend": assert last == "sync", log  # the host copy of the block is complete before MPI reads it
        last = e


@one_process
def test_fake_device_tensors_are_staged_thread_ranks(monkeypatch, traced_sync):
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", "0")
    for log, alloc in run_ranks(2, _device_run, "auto"):
        _check_staged_log(log, alloc)


@under_mpi
@pytest.mark.parametrize("aware", ["0", "1"])
def test_fake_device_tensors_mpi(monkeypatch, traced_sync, aware):
    "Not CUDA-aware: staged through the host pool. CUDA-aware: the device tensor itself goes to MPI, stream synchronised."
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", aware)
    def check():
        log, alloc = _device_run(COMM, "auto")
        if aware == "0":
            _check_staged_log(log, alloc)
        else:
            assert alloc == 0
            assert {t for e, t in log if e in ("Isend", "Irecv")} == {"FakeCuda"}, log
            assert all(prev == ("sync", "FakeCuda") for prev, cur in zip(log, log[1:]) if cur[0] in ("Isend", "Irecv")), log
    agree(check)


@under_mpi
def test_staging_never_hands_device_tensors_to_mpi(monkeypatch, traced_sync):
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", "0")  # ignored: `never` means the MPI is trusted with device memory
    def check():
        log, alloc = _device_run(COMM, "never")
        assert alloc == 0 and {t for e, t in log if e in ("Isend", "Irecv")} == {"FakeCuda"}, log
    agree(check)


@one_process
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, on ThreadComm copying a tensor it was not meant to see
def test_thread_ranks_stage_device_tensors_even_with_cuda_aware_mpi(monkeypatch, traced_sync):
    monkeypatch.setenv("JIGSAW_CUDA_AWARE_MPI", "1")
    for log, alloc in run_ranks(2, _device_run, "auto", timeout=20):
        _check_staged_log(log, alloc)


@under_mpi
def test_torch_group_reduce_scatter_device_branch():
    "TorchGroup's coll reduce-scatter on a tensor that reports a CUDA device takes dist.reduce_scatter (gloo has it too)."
    class OnDevice(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    def check():
        init_torch_distributed(COMM)
        g = TorchGroup(None, "coll")
        sizes = split_sizes(2 * WORLD + 1, WORLD)
        x = torch.randn(sum(sizes), 3, generator=torch.Generator().manual_seed(RANK), dtype=torch.float64)
        got = plain(g.reduce_scatter(x.clone().as_subclass(OnDevice), 0, sizes))
        want = g.reduce_scatter(x, 0, sizes)  # the CPU branch: all-reduce, keep my block
        assert torch.allclose(got, want, rtol=1e-14, atol=0), (got, want)
    agree(check)


# ---------------------------------------------------------------- benchmarks/gpu_parallel_check.py, CPU dry run

@one_process
def test_gpu_parallel_check_cpu_dry_run(tmp_path):
    "The GPU script's every path on CPU: 2 ranks (mpiexec -n 2) with forced staging, gloo and MPI, against the float64 1-way model."
    cmd = [sys.executable, "benchmarks/gpu_parallel_check.py", "--cpu-dry-run", "--out", str(tmp_path)]
    env = dict(__import__("os").environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_parallel_cpu.json").read_text())
    assert res["verified_on_gpu"] is False and res["dry_run"] is True and res["device"] == "cpu"
    assert res["torch"] == torch.__version__ and "not verified on a GPU" in res["note"]
    assert res["mpiexec"] == mpiexec()
    runs = res["shared_gpu"]["runs"] + res["multi_gpu"]["runs"]
    assert {(x["ranks"], x["backend"]) for x in runs} == {(2, "mpi"), (2, "gloo")}
    assert res["shared_gpu"]["runs"][0]["staging"] == "always"
    for x in runs:
        errs = x["errors"]
        assert set(errs) == {"float64", "float32", "tf32"}
        assert errs["float64"]["output"] < 1e-12 and errs["float64"]["weight_grads"] < 1e-10, errs["float64"]
        assert 0 < errs["float32"]["output"] < 1e-4 and errs["float32"]["input_grad"] < 1e-4, errs["float32"]
        assert all(e["pass"] for e in errs.values()), errs
        assert x["sent_bytes"] > 0
    sc = res["multi_gpu"]["scaling"]
    assert sc["preset"] == "tiny" and set(sc["s_per_step"]) == {"1", "2-mpi", "2-gloo"}
    assert all(v[p] > 0 for v in sc["s_per_step"].values() for p in ("fp32", "tf32"))
    assert set(sc["speedup"]) == {"2-mpi", "2-gloo"} and sc["paper_speedup_a100"]["fp32"] == {"2": 1.92, "4": 2.70}
    assert res["all_pass"] is True


@one_process
def test_gpu_parallel_check_helpers():
    "The script's file naming and its refusal to run without a GPU unless asked for a dry run."
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_parallel_check", ROOT / "benchmarks" / "gpu_parallel_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert [mod.slug(n) for n in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "cpu")] == ["h200", "a100-sxm4-80gb", "cpu"]
    assert mod.mpiexec() == mpiexec()
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, "benchmarks/gpu_parallel_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--cpu-dry-run" in r.stderr, r.stderr[-500:]
