# %%
#| default_exp ranks

# %%
#| export
from __future__ import annotations
import pickle, threading, time, traceback
import numpy as np

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# # In-process ranks
#
# > A communicator whose ranks are threads of one process, with the part of mpi4py's interface that `comm.Group` uses, so the notebooks run the real partitioned code on 2 and 4 ranks without MPI.

# %% [markdown]
# Every parallel layer of this project is written against `comm.Group`, which sends numpy views of
# tensors through an mpi4py communicator: `Isend`/`Irecv` for the paper's point-to-point exchanges,
# `Allgatherv`/`Reduce_scatter`/`Allreduce` for the library collectives, `Split` for sub-communicators.
# `ThreadComm` implements exactly those calls between threads. A `Group` built on it runs the very same
# code as on MPI: the same blocks are cut, the same messages are posted and waited for, the same bytes
# are counted, the same sums are taken in the same order. Only the transport differs, a dictionary of
# mailboxes instead of a network, so results are bitwise those of an `mpiexec` run.
#
# Semantics kept from MPI, because the layers rely on them:
#
# - messages between two ranks with the same tag arrive in the order they were sent, and a receive
#   matches the sends in the order the receives were *posted* (not waited for);
# - a receive buffer must be exactly as large as the message (MPI would report a truncation);
# - collectives and `Split` are matched by call order on every member;
# - a send copies its buffer at once (as an MPI buffered send), so the sender may reuse it.
#
# What it adds for notebooks: when one rank raises, every other rank's pending wait raises too, and a
# wait that never completes is reported with the rank, partner and tag it was stuck on, instead of
# hanging the kernel.

# %%
#| export
class RankFailed(RuntimeError):
    "Raised in a thread rank whose partner failed or that waited past the timeout."

# %%
#| export
class _World:
    "State shared by the thread ranks of one communicator: mailboxes, collective slots, sub-communicators."
    def __init__(self, size: int, timeout: float, root=None):
        self.size, self.timeout = size, timeout
        self.root = root or self  # failures are shared by every communicator split from one world
        self.cv = threading.Condition() if root is None else root.cv
        self.boxes, self.sent, self.posted = {}, {}, {}  # (src, dst, tag, seq) -> array; counters per (src, dst, tag)
        self.slots, self.calls = {}, [0] * size  # collective number -> {rank: value}; calls made per rank
        self.children = {}  # (collective number, colour) -> _World of a Split
        self.failed = None  # (rank, message) of the first failure, on the root

    def wait_for(self, ready, what: str):
        "Block (holding `cv`) until `ready()`; raise `RankFailed` if any rank failed or on timeout."
        t0 = time.monotonic()
        while not ready():
            if self.root.failed is not None:
                raise RankFailed(f"stopped waiting for {what}: rank {self.root.failed[0]} failed")
            left = self.timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RankFailed(f"waited {self.timeout:g} s for {what}: a deadlock, or a partner that never sent")
            self.cv.wait(min(left, 0.05))

# %% [markdown]
# Point-to-point messages. A send stores a copy under `(source, dest, tag, n)`, where `n` counts the sends
# on that channel; a receive takes the next number on its channel when it is posted, and its `Wait` waits
# for that message and copies it into the receive buffer.

# %%
#| export
class _Done:
    "A request that completed when it was made (a send: the data is already copied)."
    def Wait(self): return None
    def Test(self): return True

# %%
#| export
class _Recv:
    "A posted receive: `Wait` blocks until its message is there and copies it into the buffer."
    def __init__(self, world, key, buf):
        self.world, self.key, self.buf, self.done = world, key, buf, False

    def Test(self):
        with self.world.cv: return self.done or self.key in self.world.boxes

    def Wait(self):
        if self.done: return
        w, (src, dst, tag, n) = self.world, self.key
        with w.cv:
            w.wait_for(lambda: self.key in w.boxes, f"message {n} from rank {src} to rank {dst} (tag {tag})")
            data = w.boxes.pop(self.key)
        if data.size != self.buf.size:
            raise RankFailed(f"message from rank {src} (tag {tag}) has {data.size} elements but the receive buffer "
                             f"on rank {dst} has {self.buf.size}: the block sizes disagree between the ranks")
        np.copyto(self.buf.reshape(-1), data.reshape(-1))
        self.done = True

# %% [markdown]
# Collectives: the $k$-th collective call of every member deposits its value in slot $k$; when all members
# have deposited, each reads the whole slot. Sums are taken in rank order, the same on every rank.

# %%
#| export
class ThreadComm:
    "The part of an mpi4py communicator that `comm.Group` uses, between the threads of one process."
    SUM = "sum"  # the reduction op `Group` passes (`MPI.SUM` on MPI)
    cuda_aware = False  # messages are host numpy arrays: `Group` stages device tensors for it

    def __init__(self, world: _World, rank: int):
        self.world, self.rank = world, rank

    def Get_rank(self): return self.rank
    def Get_size(self): return self.world.size

    def Isend(self, buf, dest: int, tag: int = 0):
        w, ch = self.world, (self.rank, dest, tag)
        data = np.array(buf, copy=True)
        with w.cv:
            n = w.sent.get(ch, 0); w.sent[ch] = n + 1
            w.boxes[ch + (n,)] = data
            w.cv.notify_all()
        return _Done()

    def Irecv(self, buf, source: int, tag: int = 0):
        w, ch = self.world, (source, self.rank, tag)
        with w.cv:
            n = w.posted.get(ch, 0); w.posted[ch] = n + 1
        return _Recv(w, ch + (n,), buf)

    def _exchange(self, value, what: str) -> list:
        "Deposit `value` in this rank's next collective slot and return every member's, in rank order."
        w = self.world
        with w.cv:
            k = w.calls[self.rank]; w.calls[self.rank] += 1
            slot = w.slots.setdefault(k, {})
            slot[self.rank] = value
            w.cv.notify_all()
            w.wait_for(lambda: len(slot) >= w.size, f"collective {k} ({what}) on rank {self.rank}")
            out = [slot[r] for r in range(w.size)]
            slot.setdefault("read", set()).add(self.rank)
            if len(slot["read"]) == w.size: del w.slots[k]
        return out

# %% [markdown]
# The collectives themselves, with mpi4py's argument conventions (`Allgatherv` takes `[recvbuf, counts]`):

# %%
#| export
def _allgather(self, obj): return [pickle.loads(b) for b in self._exchange(pickle.dumps(obj), "allgather")]

# %%
#| export
def _bcast(self, obj, root: int = 0): return pickle.loads(self._exchange(pickle.dumps(obj), "bcast")[root])

# %%
#| export
def _barrier(self): self._exchange(None, "barrier")

# %%
#| export
def _allgatherv(self, sendbuf, recv):
    recvbuf, counts = recv
    parts = self._exchange(np.array(sendbuf, copy=True).reshape(-1), "Allgatherv")
    np.copyto(recvbuf.reshape(-1), np.concatenate(parts))

# %%
#| export
def _sum(parts):
    out = parts[0].copy()
    for p in parts[1:]: out += p  # rank order on every rank
    return out

# %%
#| export
def _allreduce(self, sendbuf, recvbuf, op=None):
    np.copyto(recvbuf.reshape(-1), _sum(self._exchange(np.array(sendbuf, copy=True).reshape(-1), "Allreduce")))

# %%
#| export
def _reduce_scatter(self, sendbuf, recvbuf, counts, op=None):
    total = _sum(self._exchange(np.array(sendbuf, copy=True).reshape(-1), "Reduce_scatter"))
    a = sum(counts[: self.rank])
    np.copyto(recvbuf.reshape(-1), total[a: a + counts[self.rank]])


ThreadComm.allgather, ThreadComm.bcast, ThreadComm.Barrier = _allgather, _bcast, _barrier
ThreadComm.Allgatherv, ThreadComm.Allreduce, ThreadComm.Reduce_scatter = _allgatherv, _allreduce, _reduce_scatter

# %% [markdown]
# `Split(colour, key)` is a collective too: every member learns every member's colour and key, the members
# of one colour are ordered by `(key, rank)`, and the first of them to get there creates their shared world.

# %%
#| export
def _split(self, color: int = 0, key: int = 0):
    w = self.world
    k = w.calls[self.rank]  # the number this collective will get
    info = self._exchange((color, key), "Split")
    members = sorted((kk, r) for r, (c, kk) in enumerate(info) if c == color)
    with w.cv:
        sub = w.children.setdefault((k, color), _World(len(members), w.timeout, w.root))
    return ThreadComm(sub, [r for _, r in members].index(self.rank))

# %%
#| export
def _abort(self, code: int = 1):
    with self.world.cv:
        if self.world.root.failed is None: self.world.root.failed = (self.rank, f"Abort({code})")
        self.world.cv.notify_all()
    raise RankFailed(f"rank {self.rank} called Abort({code})")


ThreadComm.Split, ThreadComm.Abort = _split, _abort

# %% [markdown]
# ## Running a function on $n$ thread ranks
#
# `run_ranks(n, fn)` calls `fn(comm)` on `n` threads, each with its own `ThreadComm`, and returns the
# results in rank order. If a rank raises, the others are released from their waits and the first error
# is raised again here with its rank and traceback.

# %%
#| export
def run_ranks(n: int, fn, *args, timeout: float = 120.0, **kw) -> list:
    "`[fn(comm_0, *args, **kw), ..., fn(comm_{n-1}, ...)]`, each on its own thread rank of one `ThreadComm` world."
    world = _World(n, timeout)
    results, errors = [None] * n, [None] * n

    def target(r):
        try: results[r] = fn(ThreadComm(world, r), *args, **kw)
        except BaseException as e:  # noqa: BLE001 -- re-raised below, after every rank has stopped
            errors[r] = (e, traceback.format_exc())
            with world.cv:
                if world.failed is None: world.failed = (r, repr(e))
                world.cv.notify_all()

    threads = [threading.Thread(target=target, args=(r,), daemon=True, name=f"rank{r}") for r in range(n)]
    for t in threads: t.start()
    for t in threads: t.join(timeout + 5)
    hung = [r for r, t in enumerate(threads) if t.is_alive()]
    if hung: raise RankFailed(f"thread ranks {hung} did not finish within {timeout:.0f} s")
    first = world.failed[0] if world.failed else None
    if first is not None:
        e, tb = errors[first]
        raise RankFailed(f"rank {first} of {n} failed: {type(e).__name__}: {e}\n{tb}") from e
    return results

# %% [markdown]
# Four ranks swap their numbers in a ring, sum them in a collective and split into two pairs:

# %%
def _demo(comm):
    r, n = comm.Get_rank(), comm.Get_size()
    got = np.zeros(1)
    req = comm.Irecv(got, source=(r - 1) % n, tag=1)
    comm.Isend(np.array([10.0 * r]), dest=(r + 1) % n, tag=1)
    req.Wait()
    total = np.zeros(1); comm.Allreduce(np.array([float(r)]), total)
    pair = comm.Split(r // 2, r)
    return float(got[0]), float(total[0]), pair.Get_rank(), pair.allgather(r)

test_eq(run_ranks(4, _demo), [(30.0, 6.0, 0, [0, 1]), (0.0, 6.0, 1, [0, 1]), (10.0, 6.0, 0, [2, 3]), (20.0, 6.0, 1, [2, 3])])

# %% [markdown]
# A failing rank does not hang its partners, and a receive that never gets its message says where it waited:

# %%
def _fails(comm):
    if comm.Get_rank() == 1: raise ValueError("bad input on rank 1")
    comm.Barrier()

test_fail(lambda: run_ranks(2, _fails), contains="rank 1 of 2 failed: ValueError: bad input on rank 1")
test_fail(lambda: run_ranks(2, lambda c: c.Irecv(np.zeros(1), source=1 - c.Get_rank()).Wait(), timeout=0.5),
          contains="waited 0.5 s for message 0 from rank")
