# %%
#| default_exp checkpoint

# %%
#| export
from __future__ import annotations
import argparse, ctypes, errno, hashlib, io, itertools, json, math, os, shutil, signal, sys, time, uuid
from dataclasses import asdict
from pathlib import Path
import numpy as np
import torch
import zarr
from fastcore.basics import patch
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore, WrapperStore
from jigsaw_ref.config import MixerConfig
from jigsaw_ref.mixer import param_shapes
from jigsaw_ref.comm import Group

# %%
#| hide
import dataclasses, subprocess, tempfile
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc
from jigsaw_ref.config import preset
from jigsaw_ref.grid import Grid
from jigsaw_ref.comm import make_groups
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.parallel import JigsawMixer, take

# %% [markdown]
# # Checkpoints
#
# > A sharded, layout-independent checkpoint store: each rank writes only its own blocks of the weights and Adam moments, any layout reads back only the slices it needs, every chunk is checksummed, and a checkpoint is either complete or invisible.

# %% [markdown]
# Jigsaw exists so that a model too big for one device trains with nothing large replicated. A checkpoint that
# gathers the whole model on every rank (as `jigsaw_ref`'s first format did, and as the released code's one file
# per rank avoids only by being unusable on another layout) defeats that: for the paper's 2.57 B 4-way model it
# is about 31 GB in every rank's process. This module writes and reads checkpoints so that
#
# - **each rank writes only its blocks** of the parameters and of both Adam moments (a block replicated over
#   partners once, in exact mode), and the small replicated state (config, step, scheduler, data position, ...)
#   goes once into a manifest;
# - **any layout reads it back**: 1-, 2-, 4-way, any $p \times q$, any data parallelism; a rank reads only the
#   chunks that hold elements it owns, never a full tensor it does not own;
# - **it is complete or invisible**: the ranks write into a temporary folder, agree that every write succeeded,
#   rank 0 writes the manifest last and renames the folder into place; a crash or a full disk at any moment
#   leaves the previous checkpoint as it was;
# - **it cannot lie**: every chunk carries a CRC32C checksum, verified when it is read, and the manifest carries
#   a SHA-256 of itself; a mismatch names the tensor and the block.
#
# ### Why zarr
#
# The store is a [zarr](https://zarr.readthedocs.io) v3 group: one array per (tensor, writer block), chunked
# in pieces of at most `CHUNK_BYTES`, each chunk followed by its CRC32C (`zarr.codecs.Crc32cCodec`). zarr is
# already how `jigsaw_ref` reads its data; its orthogonal selection (`array.oindex[rows, cols]`) fetches exactly
# the chunks a selection touches, which is what lets a 2-way rank read the halves of two 4-way blocks without
# reading the other halves; the chunk checksums come with the format; and the result is a plain folder that
# `zarr`, `xarray` or a shell can inspect.
#
# The two alternatives considered: `torch.distributed.checkpoint` reshards between layouts too, but it needs a
# `torch.distributed` process group (the MPI and in-process thread groups here have none), describes shards as
# `DTensor`/`ShardedTensor` placements (regular splits: our blocks include non-contiguous rows, such as the
# decoder weight's two halves, and per-rank copies of biases that faithful mode keeps), and verifies no checksums.
# `safetensors` files read slices cheaply, but a file is one writer's flat header with no checksums; an index over
# the files of all writers and a resharding reader would be ours to hand-make, which is what zarr provides.

# %% [markdown]
# ## Errors and fault points
#
# Every problem with a checkpoint is one `CheckpointError` whose message names the file (and the tensor, block
# and chunk where there is one) and what to do. `fault_point` is how the reliability tests break a run at a
# chosen place on a chosen rank: the trainer calls it in the data, forward and backward passes and before each
# metrics write, and the writer calls it halfway through each rank's share of a checkpoint. Besides raising, a
# fault can be a full disk, a signal the rank sends itself (SIGTERM, SIGINT, SIGUSR1: a scheduler's stop;
# SIGSTOP: a stalled node; SIGKILL: the out-of-memory killer) or a pause (a slow file system).

# %%
#| export
class CheckpointError(ValueError):
    "A checkpoint that cannot be used or written; the message names the file and the problem."

# %%
#| export
FAULT_SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT, "usr1": signal.SIGUSR1, "stop": signal.SIGSTOP, "kill": signal.SIGKILL}


def fault_point(where: str,  # 'data', 'forward', 'backward', 'checkpoint' or 'metrics'
                rank: int,  # the rank calling
                step: int):  # the optimizer step it is in
    """Fault injection for the reliability tests, from `JIGSAW_FAULT` (comma-separated `KIND-WHERE@RANK[:STEP]`):
    `forward@1:2` raises on rank 1 at step 2; `kill-checkpoint@0` sends SIGKILL to rank 0 halfway through its
    share of a checkpoint; `enospc-checkpoint@1:3` raises `OSError(ENOSPC)` there, as a full disk does; `term-`,
    `int-`, `usr1-` and `stop-` send that signal to the rank itself (`stop`: SIGSTOP, a stalled node);
    `sleep5-checkpoint@0` sleeps 5 s there (a slow file system)."""
    spec = os.environ.get("JIGSAW_FAULT")
    if not spec: return
    for item in spec.split(","):
        what, _, at = item.partition("@")
        r, _, st = at.partition(":")
        how, _, point = what.rpartition("-")
        if point != where or int(r) != rank or (st and int(st) != step): continue
        if how in FAULT_SIGNALS: os.kill(os.getpid(), FAULT_SIGNALS[how]); continue
        if how.startswith("sleep"): time.sleep(float(how[5:] or 1)); continue
        if how == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {where} on rank {rank}, step {step})")
        raise RuntimeError(f"injected fault at {where} on rank {rank}, step {step} (JIGSAW_FAULT={spec})")

# %%
os.environ["JIGSAW_FAULT"] = "forward@1:2,enospc-checkpoint@0,sleep0.01-metrics@0"
fault_point("forward", 0, 2); fault_point("forward", 1, 3)  # another rank or step: nothing happens
test_fail(lambda: fault_point("forward", 1, 2), contains="injected fault at forward on rank 1, step 2")
test_fail(lambda: fault_point("checkpoint", 0, 7), contains="No space left on device")
_t0 = time.monotonic(); fault_point("metrics", 0, 1); assert time.monotonic() - _t0 >= 0.01
del os.environ["JIGSAW_FAULT"]

# %% [markdown]
# ## The first format: one file
#
# Before the sharded store, a checkpoint was one file: an 8-byte magic, the SHA-256 of the payload in hex, and a
# `torch.save` payload holding the *full* model and Adam moments. Such files still load everywhere a checkpoint
# is accepted, and `jigsaw-ckpt convert OLD NEW` turns one into a store. `save_checkpoint` is kept for small
# payloads and for tests.

# %%
#| export
MAGIC = b"JIGSAWCK"


def save_checkpoint(path, payload: dict):
    "Write `payload` to the single file `path` atomically (temp file, fsync, rename) with a SHA-256 checksum."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO(); torch.save(payload, buf); data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(data).hexdigest().encode() + data[: len(data) // 2])
            f.flush()
            fault_point("checkpoint", 0, payload.get("step", -1) if isinstance(payload, dict) else -1)
            f.write(data[len(data) // 2:]); f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, I/O error, an injected fault: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)

# %%
#| export
def _fsync_dir(folder):
    "Make a rename in `folder` durable (best effort: not every file system allows it)."
    try:
        fd = os.open(folder, os.O_RDONLY)
        try: os.fsync(fd)
        finally: os.close(fd)
    except OSError: pass

# %%
#| export
def read_file(path) -> dict:
    "The verified payload of a single-file checkpoint written by `save_checkpoint`."
    path = Path(path)
    if not path.is_file(): raise CheckpointError(f"{path}: no such checkpoint file")
    raw = path.read_bytes()
    if len(raw) < 72 or raw[:8] != MAGIC:
        raise CheckpointError(f"{path}: not a jigsaw_ref checkpoint (bad header; truncated or another format)")
    want, data = raw[8:72].decode(errors="replace"), raw[72:]
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted or truncated; resume from an earlier checkpoint")
    try:  # weights_only: plain containers and tensors only, so a crafted file cannot run code
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a jigsaw_ref checkpoint (payload cannot be read: {type(e).__name__})") from None

# %%
_d = Path(tempfile.mkdtemp())
save_checkpoint(_d / "a.ckpt", {"x": torch.arange(3)})
test_eq(read_file(_d / "a.ckpt")["x"], torch.arange(3))
_raw = bytearray((_d / "a.ckpt").read_bytes()); _raw[-1] ^= 1; (_d / "b.ckpt").write_bytes(_raw)
test_fail(lambda: read_file(_d / "b.ckpt"), contains="checksum mismatch")
(_d / "c.ckpt").write_bytes(_raw[:40])
test_fail(lambda: read_file(_d / "c.ckpt"), contains="bad header")

# %% [markdown]
# ## The store's layout
#
# A store is a folder holding a zarr group and a `manifest.json`:
#
# ```
# step0000100.ckpt/
#   manifest.json                 written last: replicated state, every block's place, its own SHA-256
#   zarr.json
#   params/enc.w/i0j0/            one array per (kind, tensor, writer block): the block written by the rank
#   params/enc.w/i0j1/            at domain index i, tensor index j of the writing layout
#   exp_avg/enc.w/i0j0/ ...       the Adam moments, blocked exactly like the weights
#   exp_avg_sq/enc.w/i0j0/ ...
# ```
#
# A block is the Cartesian product of one index list per dimension (`parallel.shard_spec`), stored as runs of
# `[start, stop)` so that the decoder weight's two halves (rows $H_j$ and $H + H_j$) are two runs of one block.
# Each block also records its global shape, its chunks, and, for a tensor replicated over partners, its
# replica index (the writer's coordinate on the replica axis).

# %%
#| export
FORMAT = "jigsaw_ref/2"
KINDS = ("params", "exp_avg", "exp_avg_sq")  # the weights and Adam's two moments, blocked alike
CHUNK_BYTES = 4 << 20  # largest chunk; also what bounds the temporary buffers of a read or a write
PROGRESS_BYTES = 256 << 20  # a rank writing more than this shows a progress bar (rank 0, when asked)
FSYNC = os.environ.get("JIGSAW_FSYNC", "1") != "0"  # fsync every chunk before the commit (JIGSAW_FSYNC=0: tests on a busy disk only)

# %%
#| export
def nbytes(b: dict) -> int:
    "Bytes of the values of block record `b`."
    return math.prod(b["shape"]) * np.dtype(b["dtype"]).itemsize


def stored_bytes(b: dict) -> int:
    "Bytes of block record `b` on disk: every chunk whole (zarr pads the edge chunks) and its 4-byte CRC32C."
    n = math.prod(-(-s // c) for s, c in zip(b["shape"], b["chunks"]))
    return n * (math.prod(b["chunks"]) * np.dtype(b["dtype"]).itemsize + 4)

# %%
#| export
def to_runs(ix) -> list[list[int]]:
    "An index list as `[start, stop)` runs: `[0, 1, 2, 7, 8]` -> `[[0, 3], [7, 9]]`."
    out = []
    for k in map(int, ix):
        if out and out[-1][1] == k: out[-1][1] += 1
        else: out.append([k, k + 1])
    return out


def from_runs(runs) -> np.ndarray:
    "The index array of `runs` (inverse of `to_runs`)."
    return np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, np.int64)

# %%
test_eq(to_runs([0, 1, 2, 7, 8]), [[0, 3], [7, 9]])
test_eq(from_runs(to_runs([3, 4, 9])).tolist(), [3, 4, 9])

# %% [markdown]
# Chunks are boxes of at most `CHUNK_BYTES`: the largest extent is halved until one fits. Near-square boxes keep
# every cut cheap: a reader of any part of a block (a row band for a tensor split, a column band for a domain
# split) opens only the chunks that part touches, and each read or write of one chunk bounds the temporary
# buffer it needs.

# %%
#| export
def chunk_shape(shape, itemsize: int, target: int = CHUNK_BYTES) -> tuple[int, ...]:
    "Chunks of at most `target` bytes (or one element): the largest extent halved until they fit."
    chunk = [max(1, s) for s in shape]
    while math.prod(chunk) * itemsize > target and max(chunk) > 1:
        d = chunk.index(max(chunk)); chunk[d] = -(-chunk[d] // 2)
    return tuple(chunk)

# %%
test_eq(chunk_shape((100, 64), 8, 1024), (13, 8))
test_eq(chunk_shape((3, 4), 8), (3, 4))
test_eq(chunk_shape((2160, 17280), 4), (540, 1080))  # a 4-way block of the paper's token weight: 4 x 4 chunks of 2.2 MiB

# %% [markdown]
# What a rank writes. Data-parallel replicas are identical (their gradients are summed), so only the first
# replica (`d == 0`) writes. In exact mode the copies of a tensor replicated over the `domain` or `tensor`
# partners are identical too, and only replica 0 writes; in faithful mode (the released code: LayerNorm over the
# local half, untied per-rank biases) the copies differ and every copy is kept.

# %%
#| export
def written_by(model, d: int) -> dict[str, int | None]:
    "Tensors this rank writes -> replica index of its copy (None: not replicated), for data-parallel index `d`."
    if d != 0: return {}
    out = {}
    for name, (_, rep, _) in model.spec.items():
        r = None if rep is None else getattr(model, rep).rank
        if model.mode == "exact" and r not in (None, 0): continue
        out[name] = r
    return out

# %%
#| export
def block_record(kind: str, name: str, idx, replica, writer: str, dtype: torch.dtype, chunk_bytes: int = CHUNK_BYTES) -> dict:
    "The manifest entry of one block: where it is, which global indices it holds, its chunks."
    shape = [len(ix) for ix in idx]
    item = torch.empty((), dtype=dtype).element_size()
    return dict(kind=kind, name=name, path=f"{kind}/{name}/{writer}", writer=writer, replica=replica,
                index=[to_runs(ix) for ix in idx], shape=shape, chunks=list(chunk_shape(shape, item, chunk_bytes)),
                dtype=str(dtype).removeprefix("torch."))

# %%
test_eq(block_record("params", "dec.w", [[0, 1, 4, 5], [0], [0, 1]], None, "i0j0", torch.float64)["index"][0], [[0, 2], [4, 6]])

# %% [markdown]
# ## Writing
#
# One block is one zarr array, written one chunk at a time (so the temporary buffer is one chunk: the chunk's
# values copied off a GPU, or encoded with its checksum), with zeros where a tensor has no Adam moment yet
# (before the first step). Every chunk is written, zeros included (`write_empty_chunks`), so a chunk file that is
# missing later is an error and not silently zero.

# %%
#| export
def chunk_slices(shape, chunks):
    "The index box (a tuple of slices) of every chunk of an array of `shape` cut in `chunks`, in order."
    return itertools.product(*[[slice(a, min(a + c, n)) for a in range(0, n, c)] for n, c in zip(shape, chunks)])

# %%
#| export
def write_block(root, b: dict, t: torch.Tensor | None, bar=None) -> int:
    "Write block `b` (a `block_record`) into the zarr group `root` with the values of `t` (None: zeros); bytes stored."
    attrs = {k: b[k] for k in ("kind", "name", "writer", "replica", "index")}
    arr = root.create_array(b["path"], shape=b["shape"], chunks=b["chunks"], dtype=b["dtype"], fill_value=0,
                            compressors=[Crc32cCodec()], config={"write_empty_chunks": True}, attributes=attrs)
    if t is None: arr[...] = 0; return stored_bytes(b)
    for box in chunk_slices(b["shape"], b["chunks"]):
        piece = t[box].detach().cpu().numpy()
        arr[box] = piece
        if bar is not None: bar.update(piece.nbytes)
    return stored_bytes(b)

# %% [markdown]
# The ranks agree at three points, each a small `allgather` of verdicts, so that a failure on one rank (a full
# disk, an I/O error) is known to all of them and none waits forever: after rank 0 has made the temporary folder,
# after every rank has written its blocks, and after rank 0 has written the manifest and committed.

# %%
#| export
def _verdicts(world: Group, fn, *args):
    "Run `fn(*args)` here; (every rank's result, this rank's error or None, [(rank, 'Type: message')] of the ranks that failed)."
    try: out, err = fn(*args), None
    except Exception as e: out, err = None, e
    got = world.allgather_obj((out, None if err is None else f"{type(err).__name__}: {err}"))
    return [o for o, _ in got], err, [(r, e) for r, (_, e) in enumerate(got) if e]

# %%
#| export
def _begin(path: Path, shapes: dict) -> Path:
    "Rank 0: a fresh temporary folder beside `path` with the zarr group of every (kind, tensor) made."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes={"format": FORMAT})
    for kind in KINDS:  # the groups first, so writers never race to create a shared parent
        for name in shapes: root.require_group(f"{kind}/{name}")
    return tmp

# %%
#| export
def _fsync_tree(folder):
    "fsync every file under `folder` (the chunks a rank wrote), so the rename after them is durable."
    if not FSYNC: return
    for dirpath, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try: os.fsync(fd)
            finally: os.close(fd)


def _write_parts(tmp: Path, parts, rank: int, step: int, progress: bool) -> tuple[list, int]:
    "One rank's share: write each `(record, tensor)` of `parts`, with the fault point halfway; (records, bytes)."
    root = zarr.open_group(str(tmp), mode="r+", zarr_format=3)
    total = sum(nbytes(b) for b, _ in parts)
    bar = None
    if progress and total > PROGRESS_BYTES:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"checkpoint {tmp.name.split('.tmp-')[0][1:]}", leave=False)
    done, half = 0, False
    for b, t in parts:
        done += write_block(root, b, t, bar)
        if not half and done >= total / 2: half = True; fault_point("checkpoint", rank, step)
    if not half: fault_point("checkpoint", rank, step)
    for b, _ in parts: _fsync_tree(tmp / b["path"])
    if bar is not None: bar.close()
    return [b for b, _ in parts], done

# %% [markdown]
# The manifest is written last, by rank 0, once every rank has reported success: the replicated state, the
# list of every block, and a SHA-256 of its own canonical JSON. Then the temporary folder is renamed to the
# checkpoint's name. A rename within a folder is atomic; when a checkpoint of that name exists already
# (`final.ckpt` written again after a resume) the two are swapped atomically with Linux's
# `renameat2(RENAME_EXCHANGE)` and the old one deleted, so a reader sees the old checkpoint or the new one, never
# neither (elsewhere: the old one is moved aside first).

# %%
#| export
def _canon(body) -> str: return json.dumps(body, sort_keys=True, separators=(",", ":"))


def write_manifest(folder: Path, body: dict):
    "Write `manifest.json` (the body and the SHA-256 of its canonical JSON) into `folder`, durably."
    text = json.dumps({"format": FORMAT, "sha256": hashlib.sha256(_canon(body).encode()).hexdigest(), "manifest": body})
    with open(folder / "manifest.json", "w") as f:
        f.write(text); f.flush(); os.fsync(f.fileno())

# %%
#| export
def _exchange(a: Path, b: Path) -> bool:
    "Atomically swap the paths `a` and `b` (Linux renameat2 RENAME_EXCHANGE); False where unsupported."
    try: fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError): return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0: return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EXDEV): return False
    raise OSError(e, os.strerror(e), str(b))


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink(): shutil.rmtree(p, ignore_errors=True)
    else: p.unlink(missing_ok=True)

# %%
#| export
def commit(tmp: Path, path: Path):
    "Make the finished folder `tmp` (its manifest written) the checkpoint `path`, replacing any old one; `recover` completes a killed one."
    if not os.path.lexists(path): os.rename(tmp, path)
    elif not os.environ.get("JIGSAW_NO_EXCHANGE") and _exchange(tmp, path): _remove(tmp)  # tmp now holds the old checkpoint
    else:  # no atomic exchange (NFS, ...): two renames; a kill between them is completed by `recover`
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
        fault_point("commit", 0, -1)  # between the two renames: only .old-* and the committed .tmp-* exist
        os.rename(tmp, path); _remove(old)
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.tmp-*"): _remove(stale)  # left by a writer killed earlier


# %%
_a, _b = _d / "new", _d / "x.ckpt"
_a.mkdir(); (_a / "m").write_text("new"); _b.mkdir(); (_b / "m").write_text("old")
commit(_a, _b)
test_eq(((_b / "m").read_text(), _a.exists()), ("new", False))


# %%
#| export
def _finish(tmp: Path, path: Path, records: list, meta: dict):
    "Rank 0: write the manifest (every rank's blocks) and commit."
    write_manifest(tmp, {**meta, "format": FORMAT, "blocks": sorted(records, key=lambda b: b["path"])})
    commit(tmp, path)

# %%
#| export
def write_store(path,  # the checkpoint folder to create (or replace)
                parts: list,  # this rank's `(block_record, tensor or None)` pairs
                meta: dict,  # the replicated state (rank 0's is written); must hold 'shapes'
                world: Group,  # every rank of the job (collective)
                step: int = -1,  # for the fault point
                progress: bool = False) -> dict:  # a progress bar on rank 0 for a large share
    "Write every rank's blocks into a temporary folder and commit it as `path` (collective); this rank's bytes and seconds."
    path, t0, me = Path(path), time.perf_counter(), world.rank
    outs, err, bad = _verdicts(world, _begin if me == 0 else (lambda *a: None), path, meta["shapes"])
    tmp = outs[0]
    if not bad: outs, err, bad = _verdicts(world, _write_parts, tmp, parts, me, step, progress and me == 0)
    if not bad:
        nbytes = outs[me][1]
        records = [b for o in outs for b in o[0]]
        _, err, bad = _verdicts(world, _finish if me == 0 else (lambda *a: None), tmp, path, records, meta)
    if bad: _abandon(world, tmp, path, err, bad)
    return dict(path=path, bytes=nbytes, seconds=time.perf_counter() - t0)

# %%
#| export
def _abandon(world: Group, tmp, path: Path, err, bad):
    "A write failed somewhere: rank 0 removes the temporary folder; every rank raises, naming the rank and the fix."
    if world.rank == 0 and tmp is not None and Path(tmp).exists(): _remove(Path(tmp))
    world.barrier()  # nobody raises (and aborts the job) before the folder is gone
    keep = "the previous checkpoint is intact"
    if isinstance(err, OSError):
        fix = "free disk space or write checkpoints elsewhere (--out)" if err.errno == errno.ENOSPC else "check the file system"
        raise CheckpointError(f"{path}: checkpoint not written: rank {world.rank}: {err.strerror or err} "
                              f"({err.filename or path.parent}); {keep}; {fix}") from err
    if err is not None: raise err
    r, msg = bad[0]
    raise CheckpointError(f"{path}: checkpoint not written: rank {r} failed ({msg}); {keep}")

# %% [markdown]
# ## Reading
#
# A reader opens the manifest (verifying its checksum), then reads, for each tensor it needs, the elements at
# its index lists from whichever blocks hold them: for each block it intersects the block's global indices with
# the needed ones dimension by dimension, skips a block with an empty intersection without opening it, and reads
# the intersection with zarr's orthogonal selection one chunk at a time, straight into the destination tensor. The store it reads through counts every byte (as `data.CountingStore` counts the data
# reader's), and treats a missing chunk as the error it is.

# %%
#| export
class MissingChunk(LookupError):
    "A chunk file that the array's metadata says is there, and is not."


class ReadStore(WrapperStore):
    "A zarr store wrapper that counts chunk and metadata bytes read (`chunk_bytes`, `meta_bytes`, `keys`) and refuses missing chunks."
    def __init__(self, store):
        super().__init__(store); self.reset()
    def reset(self): self.chunk_bytes, self.meta_bytes, self.keys = 0, 0, []
    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        chunk = "/c/" in key
        if buf is None and chunk: raise MissingChunk(key)
        if buf is not None:
            if chunk: self.chunk_bytes += len(buf); self.keys.append(key)
            else: self.meta_bytes += len(buf)
        return buf

# %%
#| export
def read_manifest(path, root=None) -> dict:
    "The verified manifest of the store at `path` (read through `root`, a pinned name of it, if given), or a `CheckpointError`."
    path = Path(path)
    if not path.exists(): raise CheckpointError(f"{path}: no such checkpoint file or folder")
    f = Path(root or path) / "manifest.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: not a committed checkpoint (no manifest.json): a write that was interrupted, "
                              f"or not a jigsaw_ref checkpoint folder; resume from another checkpoint")
    try: doc = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError): doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), dict) or \
            hashlib.sha256(_canon(doc["manifest"]).encode()).hexdigest() != doc.get("sha256"):
        raise CheckpointError(f"{path / 'manifest.json'}: checksum mismatch: the manifest is corrupted or truncated; resume from an earlier checkpoint")
    body = doc["manifest"]
    if body.get("format") != FORMAT: raise CheckpointError(f"{path}: format {body.get('format')!r} is not {FORMAT!r}")
    return body

# %% [markdown]
# A reader must never mix two checkpoints. A run that resumes replaces `final.ckpt` while `jigsaw-eval` may be
# reading it; every chunk passes its own checksum, so a reader that keeps opening files *by path* after the swap
# would read some tensors of the old checkpoint and some of the new one and never know. So a `Reader` pins the
# folder it opened: it holds a descriptor of the directory and reads everything, manifest and chunks, through it
# (`/proc/self/fd/N` on Linux), so after a commit it still reads the checkpoint it started on. If that one is
# removed under it (the writer deletes the replaced folder), the read fails with a clear "read it again" error,
# never a mix. `tests/test_checkpoint.py` races readers against 30 commits by 2 ranks.

# %%
#| export
def pin(path: Path) -> tuple[Path, int | None]:
    "A name for the folder `path` names now that keeps naming it after `path` is replaced (Linux: `/proc/self/fd/N`), and N."
    try: fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError: return path, None
    pinned = Path(f"/proc/self/fd/{fd}")
    if (pinned / ".").is_dir(): return pinned, fd
    os.close(fd); return path, None  # no /proc: read by path


class Reader:
    "An open checkpoint store: its manifest, and counted reads of any slice of any tensor, all from the folder as it was opened."
    def __init__(self, path):
        self.path = Path(path)
        self.root, self._fd = pin(self.path) if self.path.is_dir() else (self.path, None)
        self.man = read_manifest(self.path, self.root)
        self.store = ReadStore(LocalStore(str(self.root), read_only=True))
        self.blocks, self._arrays, self.notes = {}, {}, []
        for b in self.man["blocks"]: self.blocks.setdefault((b["kind"], b["name"]), []).append(b)

    def __del__(self):
        if getattr(self, "_fd", None) is not None: os.close(self._fd); self._fd = None

    def replaced(self) -> bool:
        "Whether `path` names another folder now than the one this reader opened (a newer checkpoint was committed)."
        if self._fd is None: return False
        try: return os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except OSError: return True

    def gone(self, where: str) -> CheckpointError:
        "The error for a block or chunk that is not there: replaced while being read (retry), or a damaged checkpoint."
        if self.replaced():
            return CheckpointError(f"{where}: {self.path} was replaced by a newer checkpoint while being read and the one "
                                   f"opened was removed; read it again (nothing of the two was mixed)")
        return CheckpointError(f"{where}: missing; the checkpoint is damaged, resume from an earlier one")

    def _open(self, b):
        if b["path"] not in self._arrays:
            try: self._arrays[b["path"]] = zarr.open_array(self.store, path=b["path"], mode="r", zarr_format=3)
            except Exception as e:
                if self.replaced(): raise self.gone(f"{self.path}: {b['kind']} of {b['name']!r}, block {b['writer']}") from None
                raise CheckpointError(f"{self.path}: {b['kind']} of {b['name']!r}, block {b['writer']}: its array cannot be "
                                      f"opened ({type(e).__name__}: {e}); the checkpoint is damaged") from None
        return self._arrays[b["path"]]

# %% [markdown]
# Which copies a reader takes: every block for the tensor that holds a needed element, among replica 0's copies
# (exact mode writes only those); except that a faithful checkpoint resumed on the layout that wrote it
# restores each rank's own copies (`writer`), since there the copies differ and each is the state of its rank.

# %%
#| export
def _sel(pos):
    "A slice for a run of consecutive positions, else the positions."
    return slice(int(pos[0]), int(pos[-1]) + 1) if len(pos) and pos[-1] - pos[0] + 1 == len(pos) else pos


def _put(out, dst, piece):
    "`out` at the orthogonal positions `dst` (one array per dim) = `piece`."
    sel = tuple(_sel(p) for p in dst)
    if sum(not isinstance(s, slice) for s in sel) > 1: sel = np.ix_(*dst)
    out[sel] = piece

# %%
#| export
@patch
def _copy(self: Reader, b: dict, src: list, dst: list, out: np.ndarray):
    "Copy block `b` at positions `src` (one array per dim) into `out` at `dst`, one chunk at a time."
    arr = self._open(b)
    per_dim = []  # for each dim: the (source, destination) positions falling in each chunk along it
    for s, d, c in zip(src, dst, b["chunks"]):
        band = s // c
        per_dim.append([(s[band == k], d[band == k], int(k)) for k in np.unique(band)])
    for cell in itertools.product(*per_dim):
        where = f"{self.path}: {b['kind']} of {b['name']!r}, block {b['writer']}, chunk {tuple(k for _, _, k in cell)}"
        try: piece = arr.oindex[tuple(_sel(s) for s, _, _ in cell)]
        except MissingChunk: raise self.gone(where) from None
        except ValueError as e:
            if "checksum" not in str(e): raise
            raise CheckpointError(f"{where}: checksum mismatch: the chunk is corrupted or truncated; "
                                  f"resume from an earlier checkpoint") from None
        _put(out, [d for _, d, _ in cell], piece)

# %%
#| export
@patch
def read(self: Reader, kind: str, name: str, need, out: np.ndarray, writer: str | None = None):
    "Fill `out` with the elements of tensor `name` at index lists `need` (one per dim), reading only what holds them."
    blocks = self.blocks.get((kind, name), [])
    own = [b for b in blocks if b["writer"] == writer]
    blocks = own if own else [b for b in blocks if b["replica"] in (None, 0)]
    need, got = [np.asarray(ix, dtype=np.int64) for ix in need], 0
    for b in blocks:
        pos = [np.intersect1d(from_runs(r), n, assume_unique=True, return_indices=True) for r, n in zip(b["index"], need)]
        if any(len(p[0]) == 0 for p in pos): continue  # holds nothing of ours: never opened
        got += math.prod(len(p[0]) for p in pos)
        self._copy(b, [p[1] for p in pos], [p[2] for p in pos], out)
    if got != math.prod(len(n) for n in need):
        raise CheckpointError(f"{self.path}: {kind} of {name!r}: its blocks hold {got} of the "
                              f"{math.prod(len(n) for n in need)} elements needed; the checkpoint is incomplete")

# %%
show_doc(Reader.read)

# %% [markdown]
# ## The model's state
#
# `save_sharded` is what every rank of a training job calls: the blocks it writes (`written_by`), each with the
# weight and both Adam moments, and the replicated state the trainer passes in. `load_sharded` fills a model of
# any layout, and its Adam state, from a store.
#
# **Memory.** A save adds no copy of the state: each chunk goes from the tensor to the file, one at a time (a
# view on CPU, one chunk's device-to-host copy on a GPU), so a rank's peak is its state share plus a few chunk
# buffers (the chunk and its encoded copy with the checksum: about `3 * CHUNK_BYTES` = 12 MiB). A load writes
# straight into the model's own parameters and into the Adam moments it allocates (the rest of the state share),
# one chunk at a time: the same bound. `benchmarks/scale_run.py` measures both on the paper's grid (`benchmarks/results/scale_run.txt`).

# %%
#| export
def save_sharded(path, model, opt, meta: dict, world: Group, d: int = 0, step: int = -1,
                 chunk_bytes: int = CHUNK_BYTES, progress: bool = False) -> dict:
    "Write this rank's blocks of `model`'s parameters and of `opt`'s Adam moments (`d`: data-parallel index) and commit (collective)."
    st, w = model.state(), f"i{model.i}j{model.j}"
    parts = []
    for name, rep in written_by(model, d).items():
        t = st[name]
        for kind in KINDS:
            v = t if kind == "params" else opt.state.get(t, {}).get(kind) if opt is not None else None
            parts.append((block_record(kind, name, model.spec[name][0], rep, w, t.dtype, chunk_bytes), v))
    adam_step = max((float(s["step"]) for s in opt.state.values()), default=0.0) if opt is not None else 0.0
    meta = {**meta, "config": asdict(model.cfg), "shapes": {n: list(s) for n, s in param_shapes(model.cfg).items()}, "mode": model.mode,
            "blocks_layout": [model.p, model.q], "adam_step": adam_step}
    return write_store(path, parts, meta, world, step, progress)

# %%
#| export
def _fill(t: torch.Tensor, fn):
    "Call `fn(numpy array)` to fill tensor `t` in place (through a host buffer when `t` is on a GPU)."
    if t.device.type == "cpu": fn(t.detach().numpy()); return
    buf = torch.empty(t.shape, dtype=t.dtype); fn(buf.numpy()); t.detach().copy_(buf)


def own_writer(man: dict, model) -> str | None:
    "The writer whose copies this rank restores: its own, for a faithful checkpoint on the layout that wrote it."
    same = man.get("mode") == "faithful" and list(man.get("blocks_layout", [])) == [model.p, model.q]
    return f"i{model.i}j{model.j}" if same else None

# %%
#| export
@torch.no_grad()
def load_sharded(src, model, opt=None) -> dict:
    "Fill `model`'s blocks (and `opt`'s Adam state) from the store `src` (path or `Reader`); what was read."
    r, t0 = src if isinstance(src, Reader) else Reader(src), time.perf_counter()
    man, writer = r.man, own_writer(r.man, model)
    want = {n: list(s) for n, s in param_shapes(model.cfg).items()}
    if man["shapes"] != want:
        raise CheckpointError(f"{r.path}: its tensors do not match this model (shapes differ for "
                              f"{sorted(n for n in set(want) | set(man['shapes']) if want.get(n) != man['shapes'].get(n))[:5]})")
    for name, t in model.state().items():
        need = model.spec[name][0]
        _fill(t, lambda a: r.read("params", name, need, a, writer))
        if opt is None: continue
        s = opt.state[t] = {"step": torch.tensor(float(man["adam_step"])),
                            "exp_avg": torch.empty_like(t), "exp_avg_sq": torch.empty_like(t)}
        for kind in KINDS[1:]: _fill(s[kind], lambda a: r.read(kind, name, need, a, writer))
    if man.get("mode") == "faithful" and writer is None and any(b["replica"] not in (None, 0) for b in man["blocks"]):
        r.notes.append(f"{r.path}: faithful checkpoint written on layout {man['blocks_layout'][0]}x{man['blocks_layout'][1]}; "
                       f"this {model.p}x{model.q} layout takes replica 0's copy of each per-rank tensor")
    return dict(chunk_bytes=r.store.chunk_bytes, meta_bytes=r.store.meta_bytes, chunks=len(r.store.keys),
                seconds=time.perf_counter() - t0, notes=r.notes, manifest=man)

# %% [markdown]
# A round trip on in-process ranks (`ranks.run_ranks`: the real groups and the real code, on threads): a 2x2
# model group writes a store of the float64 `tiny` model with random weights and moments; a 1x2 group and one
# process read it back. Every rank's blocks are bit-identical to the same blocks cut from the full tensors, and
# each 1x2 rank reads half of the chunk bytes, not all of them; one process reads exactly what the four wrote.

# %%
_cfg = preset("tiny")
_g = torch.Generator().manual_seed(1)
FULL = {k: {n: torch.randn(s, generator=_g, dtype=torch.float64) for n, s in param_shapes(_cfg).items()} for k in KINDS}

def _model(comm, grid, mode="exact"):
    "This rank's float64 `tiny` model on `grid`, its Adam state set to the blocks of FULL; (model, Adam, groups)."
    g = make_groups(grid, comm=comm)
    m = JigsawMixer(_cfg, g["tensor"], g["domain"], mode, torch.float64)
    opt = torch.optim.Adam(m.parameters())
    for n, t in m.state().items():
        t.data.copy_(take(FULL["params"][n], m.spec[n][0]))
        opt.state[t] = {"step": torch.tensor(3.0), **{k: take(FULL[k][n], m.spec[n][0]) for k in KINDS[1:]}}
    return m, opt, g

def _write(comm, grid, path):
    m, opt, g = _model(comm, grid)
    return save_sharded(path, m, opt, {"step": 3}, g["world"], grid.coords(comm.Get_rank())[0], chunk_bytes=8192)["bytes"]

def _check(comm, grid, path):
    g = make_groups(grid, comm=comm)
    m = JigsawMixer(_cfg, g["tensor"], g["domain"], "exact", torch.float64, init=False)
    opt = torch.optim.Adam(m.parameters())
    got = load_sharded(path, m, opt)
    same = all(torch.equal(t, take(FULL["params"][n], m.spec[n][0])) and
               all(torch.equal(opt.state[t][k], take(FULL[k][n], m.spec[n][0])) for k in KINDS[1:]) for n, t in m.state().items())
    return same, got["chunk_bytes"]

_path = _d / "step0000003.ckpt"
written = run_ranks(4, _write, Grid(1, 2, 2), _path)
print(f"bytes written per rank (2x2): {written}")
for grid, n in ((Grid(1, 1, 2), 2), (Grid(1, 1, 1), 1)):
    res = run_ranks(n, _check, grid, _path)
    print(f"read on {grid.domain}x{grid.tensor}: bit-exact {[s for s, _ in res]}, chunk bytes read per rank {[b for _, b in res]}")
    assert all(s for s, _ in res)
test_eq(run_ranks(1, _check, Grid(1, 1, 1), _path)[0][1], sum(written))

# %%
show_doc(save_sharded)

# %%
show_doc(load_sharded)

# %% [markdown]
# ## The one-process model and the first format
#
# `load_full` gives the whole model of a checkpoint in either format, for the one-process model
# (`mixer.WeatherMixer`, `jigsaw-eval`, notebooks); `moments=True` adds the full Adam moments. `load_checkpoint`
# is the first format's interface over both: one dict with the full tensors.

# %%
#| export
def _full(r: Reader, kind: str, name: str) -> torch.Tensor:
    shape = r.man["shapes"][name]
    dt = next(b["dtype"] for b in r.blocks.get((kind, name), [{"dtype": "float32"}]))
    out = torch.empty(shape, dtype=getattr(torch, dt))
    r.read(kind, name, [range(n) for n in shape], out.numpy())
    return out

# %%
#| export
def load_full(path, moments: bool = False) -> tuple[MixerConfig, dict, dict]:
    "The one-process model of a checkpoint in either format: (config, name -> full tensor, everything else)."
    p = Path(path)
    if p.is_dir():
        r = Reader(p)
        meta = {k: v for k, v in r.man.items() if k != "blocks"}
        params = {n: _full(r, "params", n) for n in r.man["shapes"]}
        if moments: meta["adam"] = {"step": r.man["adam_step"], **{k: {n: _full(r, k, n) for n in r.man["shapes"]} for k in KINDS[1:]}}
    else:
        ck = read_file(p)
        if not isinstance(ck, dict) or not {"config", "params"} <= set(ck):
            raise CheckpointError(f"{p}: not a jigsaw_ref training checkpoint (no 'config'/'params' entries)")
        params, meta = ck["params"], {k: v for k, v in ck.items() if k != "params" and (moments or k != "adam")}
    try: cfg = MixerConfig(**(meta["config"]))
    except (TypeError, ValueError) as e: raise CheckpointError(f"{p}: its model config cannot be built: {e}") from None
    return cfg, params, meta

# %%
#| export
def load_checkpoint(path) -> dict:
    "A checkpoint in either format as one dict of full tensors (`config`, `params`, `adam`, `step`, ...): small models only."
    p = Path(path)
    if not p.is_dir(): return read_file(p)
    cfg, params, meta = load_full(p, moments=True)
    meta["adam"] = {"step": meta["adam"]["step"], "exp_avg": meta["adam"]["exp_avg"], "exp_avg_sq": meta["adam"]["exp_avg_sq"]}
    return {**meta, "params": params}

# %%
_cfg1, _params, _meta = load_full(_path)
test_eq((_cfg1, _meta["step"]), (_cfg, 3))
assert all(torch.equal(_params[n], FULL["params"][n]) for n in _params)
assert torch.equal(load_checkpoint(_path)["adam"]["exp_avg_sq"]["enc.w"], FULL["exp_avg_sq"]["enc.w"])

# %% [markdown]
# `convert` turns a single-file checkpoint into a store with one writer holding every tensor whole (any
# layout then reads its slices of it); a faithful file keeps the one copy of each per-rank tensor it had.

# %%
#| export
def convert(old, new, chunk_bytes: int = CHUNK_BYTES) -> Path:
    "Write the single-file checkpoint `old` as the store `new`; returns `new`."
    ck = read_file(old)
    if not isinstance(ck, dict) or not {"config", "params", "adam"} <= set(ck):
        raise CheckpointError(f"{old}: not a jigsaw_ref training checkpoint (needs 'config', 'params' and 'adam')")
    shapes = param_shapes(MixerConfig(**ck["config"]))
    parts = []
    for kind in KINDS:
        src = ck["params"] if kind == "params" else ck["adam"][kind]
        for n, s in shapes.items():
            parts.append((block_record(kind, n, [range(k) for k in s], None, "full", src[n].dtype, chunk_bytes), src[n]))
    meta = {k: v for k, v in ck.items() if k not in ("params", "adam", "format", "rng")}
    meta |= {"shapes": {n: list(s) for n, s in shapes.items()}, "blocks_layout": [1, 1], "converted_from": str(old),
             "adam_step": float(ck["adam"].get("step", 0.0)), "rng": "not kept (the first format's torch RNG state)"}
    write_store(new, parts, meta, Group())
    return Path(new)

# %%
save_checkpoint(_d / "old.ckpt", {"format": "jigsaw_ref/1", "config": dataclasses.asdict(_cfg),
                                  "params": FULL["params"], "adam": {"step": 3.0, **{k: FULL[k] for k in KINDS[1:]}},
                                  "step": 3, "mode": "exact", "layout": (1, 2, 2)})
convert(_d / "old.ckpt", _d / "new.ckpt")
_c = run_ranks(4, _check, Grid(1, 2, 2), _d / "new.ckpt")
assert all(s for s, _ in _c)
test_eq(load_full(_d / "new.ckpt")[2]["converted_from"], str(_d / "old.ckpt"))

# %% [markdown]
# ## Damage is named
#
# A flipped byte in a chunk, a truncated chunk, a missing chunk, a damaged manifest, and an uncommitted
# (interrupted) folder each give one `CheckpointError` that names the tensor and block where there is one:

# %%
def _damage(how):
    bad = _d / f"bad-{how}.ckpt"; shutil.copytree(_path, bad)
    chunk = next((bad / "exp_avg/blocks.1.tok1.w/i1j0/c").rglob("*"))
    while chunk.is_dir(): chunk = next(chunk.iterdir())
    if how == "flip": raw = bytearray(chunk.read_bytes()); raw[3] ^= 0x10; chunk.write_bytes(raw)
    if how == "truncate": chunk.write_bytes(chunk.read_bytes()[:-9])
    if how == "missing": chunk.unlink()
    if how == "manifest": (bad / "manifest.json").write_text((bad / "manifest.json").read_text().replace('"step": 3', '"step": 4'))
    if how == "uncommitted": (bad / "manifest.json").unlink()
    return bad

for how, msg in (("flip", "exp_avg of 'blocks.1.tok1.w', block i1j0, chunk (0, 0): checksum mismatch"), ("truncate", "checksum mismatch"),
                 ("missing", "missing; the checkpoint is damaged"), ("manifest", "manifest is corrupted"), ("uncommitted", "not a committed checkpoint")):
    test_fail(lambda: load_checkpoint(_damage(how)), contains=msg)
try: load_checkpoint(_d / "bad-flip.ckpt")
except CheckpointError as e: print(e)

# %% [markdown]
# ## The checkpoints of a run folder
#
# A run folder holds the checkpoints its trainer wrote: `stepNNNNNNN.ckpt` every `ckpt_every` steps and at a
# signal, `final.ckpt` at the end (or at a time limit). `find_checkpoints` lists every committed one with its
# step, newest first, whatever its name, and names the ones whose manifest does not verify; `--resume auto`
# takes the newest that loads. `prune` is keep-last-k retention: it removes all but the newest `keep` step
# checkpoints (never `final.ckpt`), and only ever after a newer one has been committed.

# %%
#| export
def recover(folder) -> list[str]:
    "Complete the commits a kill interrupted between two renames: the newest committed `.NAME.tmp-*` (else `.NAME.old-*`) becomes NAME."
    folder, done = Path(folder), []
    if not folder.is_dir(): return done
    names = {p.name.split(".tmp-")[0][1:] for p in folder.glob(".*.ckpt.tmp-*")} | {p.name.split(".old-")[0][1:] for p in folder.glob(".*.ckpt.old-*")}
    for name in sorted(n for n in names if not os.path.lexists(folder / n)):
        def step(p):
            try: return int(read_manifest(p).get("step", -1))
            except CheckpointError: return None
        tmps = [(step(p), p) for p in folder.glob(f".{name}.tmp-*")]
        olds = [(step(p), p) for p in folder.glob(f".{name}.old-*")]
        best = max((sp for sp in tmps if sp[0] is not None), default=None, key=lambda sp: sp[0]) or \
            max((sp for sp in olds if sp[0] is not None), default=None, key=lambda sp: sp[0])
        if best is None: continue
        os.rename(best[1], folder / name); _fsync_dir(folder)
        done.append(f"{name}: completed an interrupted commit from {best[1].name}")
        for _, p in olds:
            if p.exists(): _remove(p)  # the replaced checkpoint, now that NAME is whole again
    return done


# %% [markdown]
# Where a folder cannot be exchanged atomically (NFS and other network file systems), `commit` renames the old
# checkpoint away and the new one in: a kill between the two leaves no `NAME`, only `.NAME.old-*` and the
# new, complete `.NAME.tmp-*` (its manifest is written before the commit starts). `recover`, which
# `find_checkpoints` (and so `--resume auto`) runs first, completes such a commit: the newest tmp folder whose
# manifest verifies becomes `NAME` (else the old one goes back). Here the kill is forced between the renames:

# %%
_k = _d / "nfs"; _k.mkdir()
for _n, _txt in (("old", "old"), ("new", "new")):
    (_k / _n).mkdir(); write_manifest(_k / _n, {"format": FORMAT, "step": len(_txt) + (_n == "new"), "blocks": []})
os.rename(_k / "old", _k / "final.ckpt"); os.rename(_k / "new", _k / ".final.ckpt.tmp-abcd1234")
_r = subprocess.run([sys.executable, "-c", f"from jigsaw_ref.checkpoint import commit; from pathlib import Path; "
                     f"commit(Path({str(_k / '.final.ckpt.tmp-abcd1234')!r}), Path({str(_k / 'final.ckpt')!r}))"],
                    env=dict(os.environ, JIGSAW_NO_EXCHANGE="1", JIGSAW_FAULT="kill-commit@0"))
test_eq(_r.returncode, -9)
test_eq(sorted(p.name[:16] for p in _k.iterdir()), [".final.ckpt.old-", ".final.ckpt.tmp-"])  # no final.ckpt
print(recover(_k))
test_eq((read_manifest(_k / "final.ckpt")["step"], sorted(p.name for p in _k.iterdir())), (4, ["final.ckpt"]))


# %%
#| export
def checkpoint_step(path) -> int:
    "The step of the committed checkpoint at `path` (its verified manifest, or the verified single file)."
    p = Path(path)
    if p.is_dir(): return int(read_manifest(p).get("step", -1))
    ck = read_file(p)
    if not isinstance(ck, dict) or "step" not in ck: raise CheckpointError(f"{p}: not a jigsaw_ref training checkpoint (no 'step')")
    return int(ck["step"])


def find_checkpoints(folder) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    "The committed `*.ckpt` in `folder` as [(step, path)], newest first; and [(path, why)] of those that do not verify."
    good, bad = [], []
    recover(folder)  # a commit a kill interrupted between two renames
    for p in sorted(Path(folder).glob("*.ckpt")) if Path(folder).is_dir() else []:
        try: good.append((checkpoint_step(p), p))
        except CheckpointError as e: bad.append((p, str(e)))
    return sorted(good, key=lambda sp: (sp[0], sp[1].name.startswith("step")), reverse=True), bad

# %%
#| export
def prune(folder, keep: int, upto: int | None = None) -> list[Path]:
    "Remove all but the newest `keep` step checkpoints in `folder` (of step <= `upto`); the paths removed."
    if keep <= 0: return []
    steps = sorted((int(p.name[4:-5]), p) for p in Path(folder).glob("step*.ckpt") if p.name[4:-5].isdigit())
    steps = [(s, p) for s, p in steps if upto is None or s <= upto]
    gone = [p for _, p in steps[:-keep]]
    for p in gone: _remove(p)
    return gone

# %%
_run = _d / "run"; _run.mkdir()
for _s in (1, 2, 3): save_checkpoint(_run / f"step{_s:07d}.ckpt", {"step": _s})
save_checkpoint(_run / "final.ckpt", {"step": 3}); (_run / "step0000004.ckpt").write_bytes(b"junk")
_good, _bad = find_checkpoints(_run)
test_eq([(s, p.name) for s, p in _good], [(3, "step0000003.ckpt"), (3, "final.ckpt"), (2, "step0000002.ckpt"), (1, "step0000001.ckpt")])
test_eq([p.name for p, _ in _bad], ["step0000004.ckpt"])
test_eq([p.name for p in prune(_run, 2, upto=3)], ["step0000001.ckpt"])
test_eq(sorted(p.name for p in _run.glob("*.ckpt")), ["final.ckpt", "step0000002.ckpt", "step0000003.ckpt", "step0000004.ckpt"])

# %% [markdown]
# ## The command line
#
# `jigsaw-ckpt convert OLD NEW` converts a single-file checkpoint; `jigsaw-ckpt info PATH` prints what a
# checkpoint holds; `jigsaw-ckpt verify PATH` reads every chunk and checks every checksum.

# %%
#| export
def info(path) -> str:
    "A few lines on what the checkpoint at `path` holds."
    p = Path(path)
    if not p.is_dir():
        ck = read_file(p)
        return f"{p}: single file (format {ck.get('format')}), step {ck.get('step')}, layout {ck.get('layout')}, mode {ck.get('mode')}"
    m = read_manifest(p)
    total = sum(nbytes(b) for b in m["blocks"])
    writers = sorted({b["writer"] for b in m["blocks"]})
    return (f"{p}: {FORMAT} store, step {m.get('step')}, mode {m.get('mode')}, layout {m.get('layout')}, "
            f"{len(m['shapes'])} tensors in {len(m['blocks'])} blocks from writers {writers}, {total / 2**20:.1f} MiB")

# %%
#| export
def verify(path) -> int:
    "Read every chunk of every block of the store at `path` (checking its checksum); the bytes read."
    r = Reader(path)
    for b in r.man["blocks"]:
        out = np.empty(b["shape"], dtype=b["dtype"])
        r._copy(b, [np.arange(n) for n in b["shape"]], [np.arange(n) for n in b["shape"]], out)
    return r.store.chunk_bytes

# %%
#| export
def main(argv=None) -> int:
    "Entry point of `jigsaw-ckpt`."
    ap = argparse.ArgumentParser("jigsaw-ckpt", description="Convert, inspect and verify jigsaw_ref checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write a single-file checkpoint (the first format) as a sharded store")
    c.add_argument("old", help="the single-file checkpoint"); c.add_argument("new", help="the store folder to write")
    sub.add_parser("info", help="print what a checkpoint holds").add_argument("path")
    sub.add_parser("verify", help="read every chunk and check every checksum").add_argument("path")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "convert": print(f"wrote {convert(a.old, a.new)}")
        elif a.cmd == "info": print(info(a.path))
        elif Path(a.path).is_dir(): print(f"{a.path}: every chunk verified ({verify(a.path):,} bytes)")
        else: read_file(a.path); print(f"{a.path}: checksum verified (single file)")
    except CheckpointError as e:
        print(f"jigsaw-ckpt: error: {e}", file=sys.stderr)
        return 2
    return 0

# %%
test_eq(main(["verify", str(_path)]), 0)
test_eq(main(["info", str(_d / "bad-uncommitted.ckpt")]), 2)
print(info(_path))

# %%
#| hide
shutil.rmtree(_d, ignore_errors=True)
