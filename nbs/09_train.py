# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import dataclasses, errno, json, math, os, sys, time, uuid, warnings
from dataclasses import asdict
from pathlib import Path
import numpy as np
import torch
from fastcore.basics import patch
import jigsaw_ref.mixer as mixer
from jigsaw_ref.config import ConfigError, MixerConfig, shard_range
from jigsaw_ref.comm import Group, Watchdog, local_device, local_rank, make_groups
from jigsaw_ref.loss import lat_weights_cos, variable_weights
from jigsaw_ref.parallel import JigsawMixer, complete_grads, loss_count, loss_share, scatter_state, take
from jigsaw_ref.data import BadSampleError, DataError
from jigsaw_ref.settings import TrainConfig, agree, check_launch, check_settings
from jigsaw_ref.runfolder import STALE_S, RunFolderError, Stopper, check_claim, claim_folder, lock_info, release_folder
from jigsaw_ref.checkpoint import (CheckpointError, Reader, fault_point, find_checkpoints, load_sharded, prune, read_file,
                                   read_manifest, save_sharded)

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.runfolder import LOCK_NAME, read_lock
from jigsaw_ref.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from jigsaw_ref.config import preset
from jigsaw_ref.grid import Grid
torch.set_num_threads(1)
ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # the groups of a one-rank job
work = Path(tempfile.mkdtemp(prefix="jigsaw-train-"))


# %% [markdown]
# # The distributed trainer
#
# > `jigsaw-train`: any layout (1-, 2-, 4-way, p x q) times data parallelism, randomized or cyclic latent rollout, Adam with warm-up and cosine decay, clipping, sharded checkpoints that any layout resumes from, and a run that survives preemption, stalled ranks and bad samples.

# %% [markdown]
# ## Randomness that survives resharding
#
# Every random choice is a pure function of the seed and the position in the run: the sample order of an
# epoch, the rollout length $k$ of a step (identical on every rank of a model group, as it must be: all ranks
# of a group run the processor the same number of times) and the dropout masks (`mixer.dropout_key(seed,
# step)` and each element's global index). No random generator carries state from one step to the next, so a
# checkpoint has none to keep, and a resumed run draws exactly what the uninterrupted one would have drawn, in
# any layout.

# %%
#| export
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    "The sample order of `epoch`: a permutation of `range(n)` shared by every rank."
    return np.random.default_rng([seed, epoch, 0x5A]).permutation(n)


# %%
#| export
def rollout_k(kmin: int, kmax: int, mode: str, seed: int, step: int) -> int:
    "Latent rollout steps for optimizer `step`: drawn uniformly ('random') or cycled ('cyclic')."
    if mode == "cyclic": return kmin + step % (kmax - kmin + 1)
    if mode != "random": raise ConfigError(f"rollout={mode!r}: choose 'random' or 'cyclic'")
    return int(np.random.default_rng([seed, step, 0xA7]).integers(kmin, kmax + 1))


# %%
test_eq(sorted(epoch_order(5, 0, 1)), list(range(5)))
test_eq([rollout_k(1, 3, "cyclic", 0, s) for s in range(4)], [1, 2, 3, 1])
assert {rollout_k(1, 3, "random", 0, s) for s in range(50)} == {1, 2, 3}


# %% [markdown]
# ## Optimizer and schedule
#
# Adam with two parameter groups (processor `lr`, encoder/decoder/residual `lr_encdec`), linear warm-up then
# cosine decay to zero over the run, built from torch's own schedulers. Each rank's Adam sees only its blocks,
# so its moments are sharded exactly like the weights. The schedule is a function of its length and warm-up
# alone, so a resumed run can rebuild it and step it to any position (`--reschedule`, below).

# %%
#| export
def make_optimizer(model, tc: TrainConfig) -> torch.optim.Adam:
    "Adam with a processor group (`lr`) and an encoder/decoder/residual group (`lr_encdec`)."
    st = model.state()
    encdec = [st[n] for n in st if n.startswith(("enc.", "dec.", "res."))]
    proc = [st[n] for n in st if n.startswith("blocks.")]
    return torch.optim.Adam([{"params": proc, "lr": tc.lr}, {"params": encdec, "lr": tc.lr_encdec}], weight_decay=tc.weight_decay)


# %%
#| export
def make_schedule(opt, total_steps: int, warmup_steps: int):
    "Linear warm-up over `warmup_steps`, then cosine decay to zero at `total_steps` (from each group's `initial_lr`)."
    S = torch.optim.lr_scheduler
    cos = S.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup_steps))
    if not warmup_steps: return cos
    return S.SequentialLR(opt, [S.LinearLR(opt, 1e-3, 1.0, total_iters=warmup_steps), cos], milestones=[warmup_steps])


# %%
#| export
def schedule_plan(tc: TrainConfig, steps_per_epoch: int, global_batch: int) -> dict:
    "The settings that define a run's optimisation, as used: the schedule's length and warm-up, learning rates, batch, seed, ..."
    total = steps_per_epoch * tc.epochs
    total = min(total, tc.max_steps) if tc.max_steps else total
    warm = steps_per_epoch if tc.warmup_steps < 0 else tc.warmup_steps
    return dict(total_steps=total, warmup_steps=max(0, min(warm, total - 1)), lr=tc.lr, lr_encdec=tc.lr_encdec,
                weight_decay=tc.weight_decay, global_batch=global_batch, seed=tc.seed, rollout=tc.rollout, clip=tc.clip)


# %%
_plan = schedule_plan(TrainConfig(max_steps=10, warmup_steps=-1), steps_per_epoch=4, global_batch=2)
test_eq((_plan["total_steps"], _plan["warmup_steps"]), (4, 3))  # one epoch of 4 steps, its warm-up capped at 3
_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
_s = make_schedule(_opt, 10, 2)
_lrs = [_opt.param_groups[0]["lr"]] + [(_opt.step(), _s.step(), _opt.param_groups[0]["lr"])[2] for _ in range(10)]
test_close(_lrs[2], 1.0); test_close(_lrs[10], 0.0); assert _lrs[0] < _lrs[1] < _lrs[2] > _lrs[6] > _lrs[10]


# %% [markdown]
# ## The trainer
#
# `Trainer` puts the pieces together on one rank. Each step: every model group takes its `batch` samples of the
# global batch (the global order is shared), each rank reads only its block of each sample, runs the forward
# pass with the step's $k$, back-propagates its loss share, completes its gradients (`parallel.complete_grads`:
# replicas, data parallelism, clipping, and in faithful mode the released LayerNorm averaging) and steps its
# Adam. The class is built up below a concern at a time: setting up, the data, one step, validation,
# checkpoints and resuming, and the loop.

# %%
#| export
class NonFiniteError(FloatingPointError):
    "A loss or gradient that is NaN or infinite."


class ResumeError(CheckpointError):
    "A checkpoint that is intact but does not belong to this run's settings (model, mode, schedule)."


# %%
#| export
def memory_check(tc: TrainConfig, cfg: MixerConfig, grid, rank: int):
    "Refuse (`ConfigError`, one line) a run whose planned peak per rank (`plan.preflight`) exceeds what the rank has; no collective."
    if not tc.memory_check: return
    from jigsaw_ref.plan import preflight, tame_allocator
    if tc.device == "cpu": tame_allocator()  # freed tensors go back to the system, as the plan assumes
    gpu = torch.device("cuda", local_rank() % torch.cuda.device_count()) if tc.device == "cuda" else None
    preflight(cfg, grid, batch=tc.batch, k=cfg.rollout[1], recompute=tc.recompute, schedule=tc.schedule, mode=tc.mode,
              dtype=tc.dtype, precision=tc.precision, device=tc.device, rank=rank, gpu=gpu)


# %%
#| export
def job_groups(tc: TrainConfig, comm=None) -> dict[str, Group]:
    "The groups of this rank of a job launched by mpiexec/srun (`backend='mpi'`) or torchrun, after the settings are checked."
    if tc.backend == "mpi":
        from mpi4py import MPI
        comm = comm or MPI.COMM_WORLD
        world = comm.Get_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "0"))  # set by torchrun
        if not world:  # launched by mpiexec/srun: the size comes from MPI
            from mpi4py import MPI
            world = MPI.COMM_WORLD.Get_size()
    check_launch(world, tc.backend)  # before the first collective
    cfg, grid = check_settings(tc, world)
    rank = comm.Get_rank() if comm is not None else int(os.environ.get("RANK") or os.environ.get("PMI_RANK") or 0)
    memory_check(tc, cfg, grid, rank)  # before make_groups: no collective has run, nothing is allocated
    wire = {"same": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[tc.comm_dtype]
    return make_groups(grid, tc.backend, tc.algo, comm, wire=wire)


# %%
#| export
class Trainer:
    "One rank's share of a training run."
    def __init__(self, tc: TrainConfig,
                 groups: dict | None = None,  # the groups of this rank (`comm.make_groups`); default: the job's
                 comm=None,  # the job's communicator, when `groups` is not given (default: MPI's world)
                 stopper: Stopper | None = None):  # catches the stop signals (default: one for `tc.stop_signals`)
        self.tc = tc
        given = groups is not None
        groups = groups if given else job_groups(tc, comm)
        self.cfg, self.grid = check_settings(tc, groups["world"].size)
        if given: memory_check(tc, self.cfg, self.grid, groups["world"].rank)  # job_groups checked a launched job's
        self.g, self.rank = groups, groups["world"].rank
        self.d, self.i, self.j = self.grid.coords(self.rank)
        self.device = local_device(tc.device, getattr(groups["world"], "comm", None))
        if tc.precision == "tf32": torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.out, self.dtype = Path(tc.out), getattr(torch, tc.dtype)
        self.stopper = stopper or Stopper(tc.stop_signals, self.rank)
        self.run_id = self.g["world"].allgather_obj(uuid.uuid4().hex[:12])[0]
        self._claim()  # before anything long: a second job on this folder is refused at once
        try:
            self._setup_data()
            self._setup_model()
            self.step, self.history, self.last_save, self.last_load = 0, [], None, None
            self._metrics_at, self._metrics_n = None, None  # when rank 0 last rewrote the metrics, and how many steps they held
            self.samples, self.epoch, self.epoch_pos = 0, 0, 0  # samples consumed: in all, and in the current epoch
            self.bad, self.schedule_changes, self.stopped, self.watchdog = [], [], None, None
            self.resumed_from = self.saved_path = self.saved_step = None
            self.total_steps = self._bound()
            if tc.resume: self._resume()
        except BaseException:
            self.release(); raise  # a run that cannot start leaves no claim behind


# %% [markdown]
# ### Setting up: the run folder, the data and the model
#
# The folder: rank 0 claims it (above: `claim_folder`) and every rank learns the verdict. Before the first
# write, and then before every write, `_guard` checks that the claim still holds; the first time it also
# refuses (or, with `--overwrite`, deletes) what another run left in the folder.

# %%
#| export
@patch
def _claim(self: Trainer):
    "Rank 0 claims the run folder; every rank raises if it cannot."
    self.lock = lock_info(self.run_id, self.tc)
    stale = max(STALE_S, 2 * self.tc.step_timeout)
    note = agree(self.g["world"], lambda: claim_folder(self.out, self.lock, stale) if self.rank == 0 else None)
    if note: print(f"jigsaw-train: {note}", file=sys.stderr, flush=True)
    self._guarded = False


@patch
def release(self: Trainer):
    "Rank 0 gives the run folder up (at the end of the run, and on every error that ends it)."
    if self.rank == 0: release_folder(self.out, self.lock)


# %%
#| export
def run_of(path) -> str | None:
    "The run id a checkpoint (store or single file) or a `summary.json` was written by (None: before run ids, or unreadable)."
    p = Path(path)
    try:
        if p.name == "summary.json": return json.loads(p.read_text()).get("run_id")
        return (read_manifest(p) if p.is_dir() else read_file(p)).get("run_id")
    except (CheckpointError, OSError, ValueError, AttributeError): return None


def foreign(folder, run_id: str, resumed: bool) -> list[tuple[Path, str | None]]:
    "What another run left in `folder`: [(checkpoint or summary.json, its run id)] (a resumed run accepts those without one)."
    cands = sorted(Path(folder).glob("*.ckpt")) + [p for p in [Path(folder) / "summary.json"] if p.exists()]
    found = [(p, run_of(p)) for p in cands]
    return [(p, r) for p, r in found if r != run_id and not (resumed and r is None)]


# %%
#| export
@patch
def _check_folder(self: Trainer):
    "Rank 0, before a write: the claim holds; the first time, nothing of another run is in the folder (or it is deleted)."
    check_claim(self.out, self.lock)
    if self._guarded: return
    other = foreign(self.out, self.run_id, self.resumed_from is not None)
    if other and not self.tc.overwrite:
        names = ", ".join(p.name for p, _ in other[:4]) + (", ..." if len(other) > 4 else "")
        raise RunFolderError(f"{self.out} holds what another run wrote ({names}: run {other[0][1] or 'without a run id'}); "
                             f"to continue that run use --resume auto, to keep it choose another --out, or pass --overwrite "
                             f"to delete it and start afresh")
    for p, _ in other:
        if p.is_dir(): __import__("shutil").rmtree(p)
        else: p.unlink()
    if other: (self.out / "metrics.csv").unlink(missing_ok=True); print(f"jigsaw-train: --overwrite: deleted {[p.name for p, _ in other]}", file=sys.stderr)


# %%
#| export
@patch
def _guard(self: Trainer):
    "Before a collective write: every rank learns whether the folder is still this run's (collective)."
    agree(self.g["world"], lambda: self._check_folder() if self.rank == 0 else None)
    self._guarded = True


# %% [markdown]
# The data: rank 0 makes the default store if it is asked for, and computes the normalisation statistics of
# any store that has none (or stale ones: `data.ensure_stats`), while the others wait for its verdict; then
# every rank opens its block of the training and validation splits, checking every value it reads
# (`--data-check`).

# %%
#| export
@patch
def _data_path(self: Trainer) -> str:
    "The data's path, with fresh statistics beside it (rank 0 makes them; every rank learns the path or the error)."
    def prepare():
        if self.rank != 0: return None
        from jigsaw_ref.data import ensure_stats
        path = self.tc.data
        if path == "default":
            from jigsaw_ref.generator import default_dataset
            path = str(default_dataset(grid=(self.cfg.n_lat, self.cfg.n_lon), verbose=True))
        ensure_stats(path, self.cfg, check=self.tc.data_check)
        return path
    path = agree(self.g["world"], prepare)
    return self.g["world"].allgather_obj(path)[0]


# %%
#| export
@patch
def _datasets(self: Trainer):
    from jigsaw_ref.data import Era5Dataset
    kw = dict(lon_parts=self.grid.domain, lon_index=self.i, ch_parts=self.grid.tensor, ch_index=self.j, check=self.tc.data_check)
    return (Era5Dataset(self.path, self.cfg, "train", **kw), Era5Dataset(self.path, self.cfg, "val", max_lead=1, **kw))


# %%
#| export
@patch
def _setup_data(self: Trainer):
    "Open this rank's blocks of the data, and its latitude and variable weights."
    self.path = self._data_path()
    self.train_ds, self.val_ds = agree(self.g["world"], self._datasets)
    lat = torch.as_tensor(self.train_ds.lat)
    self.lat_w = lat_weights_cos(lat) if self.tc.lat_weights == "cos" else torch.as_tensor(self.train_ds.area_weights, dtype=torch.float64)
    self.var_w = variable_weights(self.cfg)[slice(*shard_range(self.cfg.n_out, self.grid.tensor, self.j))]
    self.global_batch = self.tc.batch * self.grid.dp
    self.steps_per_epoch = len(self.train_ds) // self.global_batch
    if self.steps_per_epoch < 1:
        raise ConfigError(f"{len(self.train_ds)} training samples cannot fill one global batch of {self.global_batch}")


# %% [markdown]
# The model: this rank's blocks of the same initial weights on every layout (with the exchange schedule and
# recomputation asked for), Adam, and its schedule over the run's bound (`schedule_plan`; `_bound`: the steps
# left in this epoch, the later epochs, capped by `max_steps`).

# %%
#| export
@patch
def _setup_model(self: Trainer):
    "This rank's blocks of the model, and Adam with its schedule."
    tc = self.tc
    self.model = JigsawMixer(self.cfg, self.g["tensor"], self.g["domain"], tc.mode, self.dtype, self.device, tc.seed,
                             schedule=tc.schedule, recompute=tc.recompute)
    self.plan = schedule_plan(tc, self.steps_per_epoch, self.global_batch)
    self.opt = make_optimizer(self.model, tc)
    self.sched = make_schedule(self.opt, self.plan["total_steps"], self.plan["warmup_steps"])


# %%
#| export
@patch
def _bound(self: Trainer) -> int:
    "The step at which the run ends: the rest of this epoch and the later ones, capped by `max_steps`."
    left = (len(self.train_ds) - self.epoch_pos) // self.global_batch + self.steps_per_epoch * (self.tc.epochs - self.epoch - 1)
    return min(self.step + left, self.tc.max_steps) if self.tc.max_steps else self.step + left


# %%
TINY = dict(model="tiny", dtype="float64", lr=1e-3, lr_encdec=1e-3, warmup_steps=2, progress=False, val_batches=2)
t = Trainer(TrainConfig(**TINY, max_steps=4, out=str(work / "one")), groups=ONE())
test_eq((t.total_steps, t.steps_per_epoch, t.global_batch), (4, len(t.train_ds), 1))
test_eq(sum(x.numel() for x in t.model.parameters()), mixer.param_count(t.cfg))
test_eq(read_lock(t.out)[0]["run_id"], t.run_id)


# %% [markdown]
# ### The data of a step
#
# The position in the data is *samples consumed*: in all (`samples`) and in the current epoch (`epoch_pos`).
# A step takes the next global batch of the epoch's shared order; model group `d` takes its `batch` of them.
# An epoch ends when what is left cannot fill a global batch. Since the position counts samples and not steps, a
# run resumed with another data parallelism (another global batch) continues from the same sample.

# %%
#| export
@patch
def next_indices(self: Trainer) -> np.ndarray:
    "This model group's samples of the next global batch (moving to the next epoch when this one cannot fill it)."
    if self.epoch_pos + self.global_batch > len(self.train_ds): self.epoch, self.epoch_pos = self.epoch + 1, 0
    g0 = self.epoch_pos + self.d * self.tc.batch
    return epoch_order(len(self.train_ds), self.tc.seed, self.epoch)[g0: g0 + self.tc.batch]


# %%
#| export
@patch
def batch(self: Trainer, ds, idx, k):
    "Stack this rank's blocks of samples `idx` at lead `k`: (B, C_j, lat, lon_i), (B, V_j, lat, lon_i)."
    fault_point("data", self.rank, self.step)
    if self.watchdog is not None: self.watchdog.beat(f"step {self.step + 1}: reading samples {[int(i) for i in idx]}")
    xs, ys = zip(*(ds.get(int(i), k) for i in idx))
    return (torch.stack(xs).to(self.device, self.dtype), torch.stack(ys).to(self.device, self.dtype))


# %% [markdown]
# A sample that fails its check (`data.BadSampleError`: a NaN, an absurd or out-of-range value, a chunk that
# does not decode) is usually seen by one rank only, the one whose block holds it. The ranks that run the
# sample together agree on every batch (`_read_agreed`: one small all-reduce), so all of them take the same
# branch: with `--bad-samples stop` every rank raises the error (naming the store, variable, time and file);
# with `skip` every rank skips the step, the samples count as consumed (a requeued run does not meet them
# again) and the count is kept in the checkpoint; more than `--max-bad-samples` stops the run.

# %%
#| export
@patch
def _read_agreed(self: Trainer, ds, idx, k, group: Group):
    "This rank's batch of `idx`, or None on every rank of `group` when a sample is bad on any (skip), or an error on all (stop)."
    try: xy, err = self.batch(ds, idx, k), None
    except BadSampleError as e: xy, err = None, e
    if not group.all_reduce(torch.tensor([float(err is not None)], dtype=torch.float64))[0] > 0: return xy
    r, msg = next((r, m) for r, m in enumerate(group.allgather_obj(None if err is None else str(err))) if m)
    if self.tc.bad_samples == "stop":
        if err is not None: raise err
        raise BadSampleError(f"(seen on rank {r}) {msg}")
    key = [ds is self.val_ds, [int(i) for i in idx]]
    if key not in [b.get("key") for b in self.bad]: self.bad.append(dict(key=key, step=self.step, message=msg))
    if self.rank == 0:
        print(f"jigsaw-train: step {self.step + 1}: skipped a bad sample ({len(self.bad)} so far, at most "
              f"{self.tc.max_bad_samples}): {msg}", file=sys.stderr, flush=True)
    if len(self.bad) > self.tc.max_bad_samples:
        raise DataError(f"{len(self.bad)} bad samples, more than --max-bad-samples {self.tc.max_bad_samples}; the last: {msg}")
    return None


# %%
show_doc(Trainer.next_indices)

# %%
test_eq(t.next_indices(), epoch_order(len(t.train_ds), 0, 0)[:1])
x, y = t.batch(t.train_ds, t.next_indices(), 1)
test_eq((x.shape, y.shape, x.dtype), ((1, t.cfg.n_in, 16, 32), (1, t.cfg.n_out, 16, 32), torch.float64))


# %% [markdown]
# ### One step
#
# Dropout masks come from `mixer.dropout_key(seed, step)` and the global index of each element (the global
# batch position of this rank's first sample is `d * batch`), so they are the same bits on every layout and the
# trainer never touches torch's global random generator. The loss share's denominator is
# `parallel.loss_count`: the global element count in exact mode, the released code's per-rank mean in faithful
# mode (whose reported loss is then the mean over the model group's ranks).

# %%
#| export
@patch
def _forward(self: Trainer, x, k: int):
    "The model's prediction `k` steps ahead, with this step's dropout key (no random generator state involved)."
    return self.model(x, k=k, key=mixer.dropout_key(self.tc.seed, self.step), sample0=self.d * self.tc.batch)


# %%
#| export
@patch
def _all_finite(self: Trainer, loss: float, norm: float) -> bool:
    "Whether the loss and gradients are finite on every rank (every rank must take the same branch)."
    ok = math.isfinite(loss) and (not self.tc.clip or math.isfinite(norm))
    if not self.tc.clip: ok = ok and all(torch.isfinite(t.grad).all() for t in self.model.parameters())
    return bool(self.g["world"].all_reduce(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64))[0] == 0)


# %%
#| export
@patch
def _advance(self: Trainer):
    "One global batch consumed: the step count and the data position move on."
    self.step, self.samples, self.epoch_pos = self.step + 1, self.samples + self.global_batch, self.epoch_pos + self.global_batch


# %%
#| export
@patch
def _skip_nonfinite(self: Trainer, msg: str):
    "`--nonfinite`: raise (stop), or drop the step's gradients, unless too many of the run's steps were dropped."
    tc = self.tc
    if tc.nonfinite == "stop": raise NonFiniteError(msg + "; the last checkpoint is intact. Lower --lr or use --nonfinite skip")
    n = 1 + sum(h.get("skipped", 0) for h in self.history)
    if n > tc.max_skip_fraction * self.total_steps:
        raise NonFiniteError(f"{msg}: {n} of the run's {self.total_steps} steps skipped, more than --max-skip-fraction "
                             f"{tc.max_skip_fraction:g}; the last checkpoint is intact. Lower --lr, or raise --max-skip-fraction")
    self.opt.zero_grad()


# %%
#| export
@patch
def train_step(self: Trainer, idx, k: int) -> dict:
    "Forward, backward, gradient completion, clipping and an optimizer step on this rank's samples `idx` (one global batch consumed)."
    tc, m = self.tc, self.model
    m.train()
    xy = self._read_agreed(self.train_ds, idx, k, self.g["world"])
    if xy is None:  # a bad sample: the step is skipped on every rank
        self._advance(); return dict(step=self.step, k=k, loss=float("nan"), grad_norm=float("nan"), skipped=0, bad_sample=1)
    x, y = xy
    self.opt.zero_grad(set_to_none=False)
    with torch.autocast("cuda", torch.bfloat16, enabled=tc.precision == "bf16"):
        pred = self._forward(x, k)
    fault_point("forward", self.rank, self.step)
    share = loss_share(pred.float() if tc.precision == "bf16" else pred, y, self.lat_w, self.var_w, loss_count(m, len(idx), self.grid.dp))
    share.backward()
    fault_point("backward", self.rank, self.step)
    norm = complete_grads(m, self.g, tc.clip)
    loss = float(self.g["world"].all_reduce(share.detach().double().reshape(1).cpu())[0]) / (1 if tc.mode == "exact" else self.grid.group_size)
    skipped = not self._all_finite(loss, norm)
    if skipped: self._skip_nonfinite(f"non-finite loss or gradient at step {self.step} (loss {loss}, grad norm {norm}) on rank {self.rank}")
    else: self.opt.step(); self.sched.step()
    self._advance()
    return dict(step=self.step, k=k, loss=loss, grad_norm=norm, skipped=int(skipped), bad_sample=0)


# %%
show_doc(Trainer.train_step)

# %%
_l0 = t.train_step(t.next_indices(), 1)["loss"]
test_eq((t.step, t.samples, len(t.opt.state)), (1, 1, len(t.model.state())))
assert math.isfinite(_l0) and _l0 > 0


# %% [markdown]
# ### Validation
#
# The validation samples are dealt round-robin over the model groups; every rank adds up its share of the loss
# and of the squared errors per variable (latitude-weighted, physical units), and one all-reduce gives the
# totals. A bad validation sample is refused or skipped like a training one (the totals then count the samples
# actually used).

# %%
#| export
@patch
@torch.no_grad()
def validate(self: Trainer) -> dict:
    "Loss and latitude-weighted RMSE per variable (physical units) at lead `dt` on the validation split."
    m, cfg, ds = self.model, self.cfg, self.val_ds
    m.eval()
    n = len(ds) if not self.tc.val_batches else min(len(ds), self.tc.val_batches * self.grid.dp)
    c0, c1 = shard_range(cfg.n_out, self.grid.tensor, self.j)
    se, loss, used = torch.zeros(cfg.n_out, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    lw = self.lat_w.to(torch.float64)[:, None]
    for i in range(self.d, n, self.grid.dp):  # counts use n itself, whatever this group's share
        xy = self._read_agreed(ds, [i], 1, self.g["model"])
        if xy is None: continue
        x, y = xy
        pred = m(x, k=1)
        loss += loss_share(pred, y, self.lat_w, self.var_w, n * cfg.n_out * cfg.n_lat * cfg.n_lon).double().cpu()
        err = (ds.denormalize(pred[0].cpu()) - ds.denormalize(y[0].cpu())).double()  # (V_j, lat, lon_i)
        se[c0:c1] += (err.square() * lw).sum((1, 2))
        used += 1 / self.grid.group_size
    tot = self.g["world"].all_reduce(torch.cat([loss, se, used]))
    good = round(float(tot[-1]))
    if good == 0: return {"val_loss": float("nan")}
    scale = 1.0 if good == n else n / good
    rmse = (tot[1:-1] / (good * cfg.n_lat * cfg.n_lon)).sqrt()
    return {"val_loss": float(tot[0]) * scale, **{f"rmse_{c}": float(r) for c, r in zip(cfg.variables, rmse)}}


# %%
show_doc(Trainer.validate)

# %%
_v = t.validate()
assert _v["val_loss"] > 0 and set(_v) == {"val_loss", *(f"rmse_{c}" for c in t.cfg.variables)}


# %% [markdown]
# ### Checkpoints
#
# A checkpoint is a store of the `checkpoint` module: every rank writes its own blocks of the weights and of
# both Adam moments, and the manifest keeps the small replicated state below, including what the run actually
# used: its settings, its schedule plan, and every change `--reschedule` made. A store written on any layout
# resumes on any other; a faithful store resumed on its own layout restores every rank's own copies. The first
# format (one file holding the full model) still resumes. With `--keep-last K` only the newest K step
# checkpoints stay (the older ones are deleted once a newer one is committed; `final.ckpt` always stays).

# %%
#| export
@patch
def run_state(self: Trainer) -> dict:
    "The small replicated state of the run that a checkpoint keeps beside the tensors."
    return {"step": self.step, "scheduler": self.sched.state_dict(), "lrs": [g["lr"] for g in self.opt.param_groups],
            "data": {"samples": self.samples, "epoch": self.epoch, "epoch_samples": self.epoch_pos, "global_batch": self.global_batch},
            "history": self.history, "train": asdict(self.tc), "layout": list(dataclasses.astuple(self.grid)),
            "run_id": self.run_id, "schedule": self.plan, "schedule_changes": self.schedule_changes, "bad_samples": self.bad,
            "dtype": self.tc.dtype, "rng": "none: sample order, rollout k and dropout masks are functions of (seed, step)"}


# %%
#| export
@patch
def save(self: Trainer, name: str | None = None) -> Path:
    "Write a checkpoint of the current state to `out/NAME` (collective: every rank writes its blocks; rank 0 commits)."
    path = self.out / (name or f"step{self.step:07d}.ckpt")
    self._guard()
    if self.watchdog is not None: self.watchdog.beat(f"writing {path.name}")
    self.last_save = save_sharded(path, self.model, self.opt, self.run_state(), self.g["world"], self.d, self.step,
                                  progress=self.tc.progress)
    if self.watchdog is not None: self.watchdog.beat(f"wrote {path.name}")
    self.saved_step, self.saved_path = self.step, path
    if self.rank == 0 and self.tc.keep_last and path.name.startswith("step"): prune(self.out, self.tc.keep_last, upto=self.step)
    return path


# %%
show_doc(Trainer.save)

# %%
_p = t.save()
test_eq((_p.name, _p.is_dir(), load_checkpoint(_p)["step"]), ("step0000001.ckpt", True, 1))
test_eq((load_checkpoint(_p)["run_id"], load_checkpoint(_p)["schedule"]["total_steps"]), (t.run_id, 4))


# %% [markdown]
# ### Resuming
#
# `--resume PATH` continues from that checkpoint; `--resume auto` from the newest one in `--out` by step (a
# step checkpoint, a signal-time one, or `final.ckpt`) that loads: one whose manifest or chunks do not verify is
# skipped, and named, and the next older one is tried; with none at all the run starts fresh and says so. Either
# way the first line says what was resumed: `resumed from X at step N`.

# %%
#| export
@patch
def _resume(self: Trainer):
    "Resume as `tc.resume` says (a path, or 'auto': the newest checkpoint in `out` that verifies; none: start fresh)."
    tc, world = self.tc, self.g["world"]
    if tc.resume != "auto": return self._resumed(self.load(tc.resume), [])
    good, bad = world.allgather_obj(agree(world, lambda: find_checkpoints(self.out) if self.rank == 0 else None))[0]
    if not good and not bad:
        if self.rank == 0: print(f"jigsaw-train: --resume auto: no checkpoint in {self.out}: starting fresh", file=sys.stderr, flush=True)
        return
    skipped = list(bad)
    for _, path in good:
        try: return self._resumed(self.load(path), skipped)
        except ResumeError: raise  # intact, but of another model, mode or schedule: never silently an older one
        except CheckpointError as e: skipped.append((path, str(e)))
    raise CheckpointError(f"--resume auto: none of the {len(skipped)} checkpoints in {self.out} can be used ("
                          + "; ".join(f"{p.name}: {why}" for p, why in skipped) + "); resume from a copy with --resume PATH, "
                          f"or start afresh without --resume, with --overwrite")


# %%
#| export
@patch
def _resumed(self: Trainer, path: Path, skipped: list):
    "Say what was resumed (and what was skipped); the lock now names the run resumed."
    self.resumed_from = self.saved_path = Path(path)
    self.saved_step = self.step
    self.lock = dict(self.lock, run_id=self.run_id)
    agree(self.g["world"], lambda: claim_folder(self.out, self.lock) if self.rank == 0 else None)
    if self.rank == 0:
        note = "; skipped, newest first: " + "; ".join(f"{Path(p).name} ({why})" for p, why in skipped) if skipped else ""
        print(f"jigsaw-train: resumed from {path} at step {self.step} (run {self.run_id}){note}", file=sys.stderr, flush=True)


# %%
#| export
@patch
def _check_model(self: Trainer, path, config: dict, mode: str | None):
    "Refuse a checkpoint of another model or another mode, naming what differs."
    theirs = MixerConfig(**config)
    if theirs != self.cfg:
        diff = {f: (getattr(theirs, f), getattr(self.cfg, f)) for f in asdict(self.cfg) if getattr(theirs, f) != getattr(self.cfg, f)}
        raise ResumeError(f"{path}: written for another model ({{field: (checkpoint, this run)}} {diff}); "
                          f"use the same --model and --set options")
    if mode is not None and mode != self.tc.mode:
        raise ResumeError(f"{path}: written in mode {mode!r}, this run is --mode {self.tc.mode}; resume with --mode {mode}")


# %% [markdown]
# Resuming is faithful to the run or refuses. The settings that define the optimisation (`schedule_plan`: the
# schedule's length, which `--max-steps` and `--epochs` set, its warm-up, both learning rates, the weight
# decay, the global batch `batch x dp`, the seed, the rollout mode and the clipping) are compared with the
# checkpoint's. If any differs the resume is refused, naming each difference and the setting that restores it,
# unless `--reschedule` is given: then the run continues *deliberately* on the new settings. The schedule is
# rebuilt from them and stepped to the checkpoint's position, so the learning rate from then on is the one a
# run with the new settings from the start would have had at that step (a longer `--max-steps` stretches the
# cosine instead of letting the restored one climb back up); the change is recorded in the checkpoint's
# `schedule_changes`, and the data position continues from the samples consumed.

# %%
#| export
def _plan_hint(k: str, v) -> str:
    "The setting that gives the schedule-plan entry `k` the value `v`."
    if k == "total_steps": return f"a bound of {v} steps (--max-steps, --epochs)"
    if k == "global_batch": return f"a global batch of {v} (--batch x data parallelism)"
    return f"--{k.replace('_', '-')} {v}"


@patch
def _schedule_diff(self: Trainer, path, st: dict) -> dict:
    "What this run's `plan` changes against checkpoint `st`'s; refused (`ResumeError`) unless `--reschedule`."
    theirs = st.get("schedule")
    if not isinstance(theirs, dict): return {}  # written before plans were kept: nothing to compare
    diff = {k: (theirs[k], v) for k, v in self.plan.items() if k in theirs and theirs[k] != v}
    if diff and not self.tc.reschedule:
        raise ResumeError(f"{path}: these settings change the run it continues ({{setting: (checkpoint, this run)}} {diff}); "
                          f"resume with the checkpoint's ({', '.join(_plan_hint(k, a) for k, (a, _) in diff.items())}), or add "
                          f"--reschedule to continue on the new settings (the schedule re-derived at step {st.get('step')})")
    return diff


# %%
#| export
@patch
def _reschedule(self: Trainer, st: dict, diff: dict):
    "Continue on the new settings: the schedule rebuilt from them, stepped to the checkpoint's position; the change recorded."
    tc = self.tc
    for g, lr in zip(self.opt.param_groups, (tc.lr, tc.lr_encdec)): g["initial_lr"] = g["lr"] = lr; g["weight_decay"] = tc.weight_decay
    self.sched = make_schedule(self.opt, self.plan["total_steps"], self.plan["warmup_steps"])
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": only a replay here
        warnings.simplefilter("ignore")
        for _ in range(int(st["scheduler"].get("last_epoch", self.step))): self.sched.step()
    self.schedule_changes.append(dict(step=self.step, changed={k: list(v) for k, v in diff.items()}))
    if self.rank == 0:
        print(f"jigsaw-train: --reschedule at step {self.step}: {diff}; learning rates now "
              f"{[round(g['lr'], 10) for g in self.opt.param_groups]}", file=sys.stderr, flush=True)


# %%
#| export
@patch
def _restore(self: Trainer, st: dict, diff: dict | None = None):
    "The replicated state of checkpoint `st`: scheduler, learning rates, step, history, data position, run id and counts."
    self.sched.load_state_dict(st["scheduler"])
    for g, lr in zip(self.opt.param_groups, st["lrs"]): g["lr"] = lr
    self.step, self.history = int(st["step"]), list(st.get("history", []))
    if "data" in st: self.samples, self.epoch, self.epoch_pos = (int(st["data"][k]) for k in ("samples", "epoch", "epoch_samples"))
    else:  # the first format: the position was step x global batch
        self.epoch, s = divmod(self.step, self.steps_per_epoch)
        self.samples, self.epoch_pos = self.step * self.global_batch, s * self.global_batch
    self.run_id = st.get("run_id") or self.run_id
    self.bad, self.schedule_changes = list(st.get("bad_samples", [])), list(st.get("schedule_changes", []))
    if diff: self._reschedule(st, diff)
    self.total_steps = self._bound()


# %%
#| export
@patch
def _load_file(self: Trainer, path: Path):
    "Resume from a single-file checkpoint of the first format (the full model, resharded here)."
    ck = agree(self.g["world"], read_file, path)
    missing = {"format", "config", "params", "adam", "scheduler", "step", "lrs"} - set(ck if isinstance(ck, dict) else ())
    if missing: raise CheckpointError(f"{path}: not a jigsaw_ref training checkpoint (missing {sorted(missing)})")
    if ck.get("format") != "jigsaw_ref/1": raise CheckpointError(f"{path}: format {ck.get('format')!r} is not 'jigsaw_ref/1'")
    self._check_model(path, ck["config"], None)
    diff = self._schedule_diff(path, ck)
    m = self.model
    scatter_state(m, ck["params"])
    for n, t in m.state().items():
        self.opt.state[t] = {"step": torch.tensor(ck["adam"]["step"]), **{k: take(ck["adam"][k][n], m.spec[n][0]).to(t)
                                                                        for k in ("exp_avg", "exp_avg_sq")}}
    self._restore(ck, diff)


# %%
#| export
@patch
def load(self: Trainer, path) -> Path:
    "Resume from a checkpoint (store folder or single file) written by any layout: every rank reads only its slices."
    path = Path(path)
    if path.is_file(): self._load_file(path); return path
    r = agree(self.g["world"], Reader, path)  # the manifest, verified on every rank
    self._check_model(path, r.man["config"], r.man.get("mode"))
    diff = self._schedule_diff(path, r.man)
    self.last_load = agree(self.g["world"], load_sharded, r, self.model, self.opt)
    self._restore(r.man, diff)
    if self.rank == 0:
        for note in self.last_load["notes"]: print(f"jigsaw-train: {note}", file=sys.stderr)
    return path


# %%
show_doc(Trainer.load)


# %% [markdown]
# The checkpoint of the one-rank trainer above, resumed by a 2-way job (two in-process ranks): both ranks get
# the step, the data position and their blocks of the weights and moments (the chunk bytes each read are counted:
# the `tiny` model's tensors are one chunk each, so here each rank reads them all; see `checkpoint` for
# slices of larger tensors).

# %%
def _resume(comm, path, way, **kw):
    grid = Grid.named(way, comm.Get_size())
    r = Trainer(TrainConfig(**{**TINY, "max_steps": 4, **kw}, way=way, out=str(work / "two"), resume=str(path)), groups=make_groups(grid, comm=comm))
    full = {n: take(p, r.model.spec[n][0]) for n, p in load_checkpoint(path)["params"].items()}
    return r.step, r.samples, all(torch.equal(v, full[n]) for n, v in r.model.state().items()), r.last_load["chunk_bytes"]

got = run_ranks(2, _resume, _p, "2")
print(got)
test_eq([g[:3] for g in got], [(1, 1, True)] * 2)

# %% [markdown]
# The same checkpoint resumed with a longer run (`max_steps` 8 instead of 4) is refused, naming the change and
# both ways on; with `--reschedule` the learning rate is the one an 8-step run has after its first step.

# %%
test_fail(lambda: Trainer(TrainConfig(**TINY, max_steps=8, out=str(work / "three"), resume=str(_p)), groups=ONE()),
          contains="'total_steps': (4, 8)")
_r = Trainer(TrainConfig(**TINY, max_steps=8, out=str(work / "three"), resume=str(_p), reschedule=True), groups=ONE())
_fresh = Trainer(TrainConfig(**TINY, max_steps=8, out=str(work / "four")), groups=ONE())
with warnings.catch_warnings(): warnings.simplefilter("ignore"); _fresh.sched.step()
test_eq([g["lr"] for g in _r.opt.param_groups], [g["lr"] for g in _fresh.opt.param_groups])
test_eq(_r.schedule_changes, [dict(step=1, changed={"total_steps": [4, 8]})])


# %% [markdown]
# ### The loop
#
# `fit` runs steps until the bound (`max_steps`, the epochs, or `max_minutes` agreed by all ranks), validates at
# the end of each epoch and at the end, writes `metrics.csv` and `summary.json` (replaced atomically, never left
# empty), checkpoints every `ckpt_every` steps and at the end (`final.ckpt`; a time limit that ends the run before
# its bound says so, and `--resume auto` continues from that `final.ckpt`). With a time limit the progress bar's
# total is the number of steps the time left allows, re-estimated every step.
#
# At every step boundary the ranks agree (one all-reduce) on whether the time limit passed and whether any rank
# caught a stop signal. On a signal they write `stepNNNNNNN.ckpt` (unless the state is already saved), the
# metrics and a `summary.json` that says why the run stopped, release the folder, and `jigsaw-train` exits with
# `--requeue-exit-code`. All the while a `comm.Watchdog` on every rank ends the job if the rank makes no progress
# for `--step-timeout` seconds (a step, reading a sample, a validation sample, a checkpoint write each count as
# progress), printing the step and the partners and tags it waited for.

# %%
#| export
@patch
def _one_step(self: Trainer) -> dict:
    "The next step of the run (its samples and rollout k, then `train_step`) and its record."
    idx, tc = self.next_indices(), self.tc
    k = rollout_k(*self.cfg.rollout, tc.rollout, tc.seed, self.step)
    t0 = time.perf_counter()
    rec = self.train_step(idx, k)
    dt = time.perf_counter() - t0
    end = self.epoch_pos + self.global_batch > len(self.train_ds) or self.step >= self.total_steps
    return rec | dict(epoch=self.epoch, samples=self.samples, lr=self.sched.get_last_lr()[0], step_time=dt,
                      samples_per_s=self.global_batch / dt, end_of_epoch=int(end),
                      gflops=mixer.train_step_flops(self.cfg, self.global_batch, k) / dt / 1e9)


# %%
#| export
@patch
def _tick(self: Trainer, bar, rec: dict, elapsed: float, done: int):
    "Advance the progress bar (`done` steps in `elapsed` s so far); under a time limit its total is what the time left allows."
    if bar is None: return
    if self.tc.max_minutes:
        left = 60 * self.tc.max_minutes - elapsed
        bar.total = min(self.total_steps, self.step + max(0, int(left * done / elapsed)))
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", k=rec["k"], s_per_step=f"{rec['step_time']:.2f}")


# %%
#| export
@patch
def _agree_stop(self: Trainer, elapsed: float) -> tuple[bool, tuple | None]:
    "Whether every rank stops now: (the time limit passed, (rank, signal) of a stop signal any rank caught, or None)."
    late = self.tc.max_minutes > 0 and elapsed > 60 * self.tc.max_minutes
    flags = self.g["world"].all_reduce(torch.tensor([float(late), float(self.stopper.signal is not None)]))
    if not flags[1] > 0: return bool(flags[0] > 0), None
    got = self.g["world"].allgather_obj(self.stopper.signal)
    return bool(flags[0] > 0), next((r, s) for r, s in enumerate(got) if s)


# %%
#| export
@patch
def _stop(self: Trainer, by: tuple):
    "A stop signal: a checkpoint of this state (unless saved already), the metrics, and why the run stopped."
    saved = None if self.step == 0 else self.saved_path if self.saved_step == self.step else self.save()
    self.stopped = dict(signal=by[1], rank=by[0], step=self.step, checkpoint=str(saved) if saved else None)
    if self.rank == 0:
        self._write_metrics()
        print(f"jigsaw-train: stopped by {by[1]} (rank {by[0]}) at step {self.step}" +
              (f": checkpoint {saved}; continue with --resume auto" if saved else ": nothing trained yet, nothing saved"), file=sys.stderr, flush=True)


# %%
#| export
@patch
def fit(self: Trainer) -> list[dict]:
    "Train until `epochs`, `max_steps`, `max_minutes` or a stop signal; validate each epoch; checkpoint; return the history."
    tc = self.tc
    self._guard()
    installed = self.stopper.install()
    self.watchdog = Watchdog(tc.step_timeout, self.rank, self.g)
    bar = None
    if self.rank == 0 and tc.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
    t_start, done = time.perf_counter(), 0
    try:
        _, by = self._agree_stop(0.0)  # a signal during the set-up
        while by is None and self.step < self.total_steps:
            self.watchdog.beat(f"step {self.step + 1}")
            rec, done = self._one_step(), done + 1
            elapsed = time.perf_counter() - t_start
            late, by = self._agree_stop(elapsed)
            if (rec["end_of_epoch"] or late) and by is None:
                self.watchdog.beat(f"validation after step {self.step}"); rec |= self.validate()
            self.history.append(rec)
            self._tick(bar, rec, elapsed, done)
            ckpt = bool(tc.ckpt_every) and self.step % tc.ckpt_every == 0
            if self.rank == 0 and self._metrics_due(rec, ckpt or late or self.step >= self.total_steps): self._write_metrics()
            if ckpt: self.save()
            if late: break
        if by is not None and self.step < self.total_steps: self._stop(by)
        else:
            self.save("final.ckpt")
            if self.step < self.total_steps and self.rank == 0:  # the time limit ended it early: say so
                print(f"jigsaw-train: --max-minutes {tc.max_minutes:g} reached at step {self.step} of {self.total_steps}: "
                      f"checkpoint {self.saved_path}; continue with --resume auto", file=sys.stderr, flush=True)
    except BaseException:  # an error ends the run: the steps it made since the last rewrite are not lost
        if self.rank == 0 and self._metrics_n != len(self.history):
            try: self._write_metrics()
            except Exception: pass  # the error that ended the run is the one to report
        raise
    finally:
        if bar is not None: bar.close()
        self.watchdog.stop()
        if installed: self.stopper.uninstall()
        self.release()  # ended, stopped or failed: the folder is free for the next launch
    return self.history


# %%
#| export
def _write_atomic(path: Path, text: str):
    "Replace `path` by `text` in one step (a reader sees the old file or the new one, never an empty one)."
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try: tmp.write_text(text); os.replace(tmp, path)
    except BaseException: tmp.unlink(missing_ok=True); raise


# %% [markdown]
# Rewriting `metrics.csv` costs time proportional to the steps so far, so rank 0 rewrites it (and `summary.json`)
# at most every `metrics_every` seconds, and always after the first step, a validation, a checkpoint, a stop and
# the last step: a long run spends $O(\text{steps})$ on its metrics in all, not $O(\text{steps}^2)$.

# %%
#| export
@patch
def _metrics_due(self: Trainer, rec: dict, forced: bool) -> bool:
    "Rank 0: is it time to rewrite the metrics (forced, the first step of this run, a validation, or `metrics_every` s)?"
    now, last = time.monotonic(), self._metrics_at
    if not (forced or last is None or "val_loss" in rec or now - last >= self.tc.metrics_every): return False
    self._metrics_at = now
    return True


# %%
#| export
@patch
def _write_metrics(self: Trainer):
    "Rank 0: `metrics.csv` (every step so far) and `summary.json`, each replaced atomically; a failed write is one clear error."
    check_claim(self.out, self.lock)
    keys = list(dict.fromkeys(k for r in self.history for k in r))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in self.history]
    last_val = next((r for r in reversed(self.history) if "val_loss" in r), {})
    summary = {"run_id": self.run_id, "steps": self.step, "samples": self.samples, "mode": self.tc.mode,
               "layout": dict(zip(("dp", "domain", "tensor"), dataclasses.astuple(self.grid))), "stopped": self.stopped,
               "bad_samples": len(self.bad), "final": self.history[-1] if self.history else None, "last_validation": last_val,
               "train": asdict(self.tc)}
    for name, text in (("metrics.csv", "\n".join(lines) + "\n"), ("summary.json", json.dumps(summary, indent=1, default=str))):
        try: fault_point("metrics", self.rank, self.step); _write_atomic(self.out / name, text)
        except OSError as e:
            fix = "free disk space or choose another --out (--keep-last K bounds the checkpoints kept)" if e.errno == errno.ENOSPC else "check the file system"
            raise RunFolderError(f"{self.out / name}: not written ({e.strerror or e}); {fix}; the previous {name} and the "
                                 f"checkpoints are intact") from None
    self._metrics_n = len(self.history)  # the steps on disk


# %%
show_doc(Trainer.fit)

# %%
h = t.fit()
test_eq([r["step"] for r in h], [2, 3, 4])
test_eq(sorted(p.name for p in t.out.glob("*.ckpt")), ["final.ckpt", "step0000001.ckpt"])
assert "val_loss" in h[-1] and (t.out / "metrics.csv").read_text().count("\n") == 4
test_eq(read_lock(t.out)[0], None)  # released at the end


# %% [markdown]
# A stop signal, as a thread rank sees one (`request`; under a launcher a real signal does the same): one of
# two ranks of a 2-way run is asked to stop after its second step; both stop at that boundary with a checkpoint
# of step 2, and a `--resume auto` run continues from it to the end of the run.

# %%
def _stopped(comm, out, after, **kw):
    tc = TrainConfig(**TINY, way="2", max_steps=5, out=str(out), **kw)
    r = Trainer(tc, groups=make_groups(Grid.named("2", comm.Get_size()), comm=comm))
    if comm.Get_rank() == 1:
        step = r.train_step
        r.train_step = lambda idx, k: (step(idx, k), r.step == after and r.stopper.request("SIGTERM"))[0]
    r.fit()
    return r.stopped, r.step

_s = run_ranks(2, _stopped, work / "stop", 2)
print(_s[0])
test_eq([s["step"] for s, _ in _s], [2, 2])
test_eq(sorted(p.name for p in (work / "stop").glob("*.ckpt")), ["step0000002.ckpt"])
test_eq([s for _, s in run_ranks(2, _stopped, work / "stop", 99, resume="auto")], [5, 5])

# %% [markdown]
# A full disk (injected) when the metrics are written: one line naming the file and the fix, and the previous
# metrics are still there.

# %%
t2 = Trainer(TrainConfig(**TINY, max_steps=3, out=str(work / "full"), metrics_every=0), groups=ONE())
os.environ["JIGSAW_FAULT"] = "enospc-metrics@0:2"
try: test_fail(t2.fit, contains=f"{work / 'full' / 'metrics.csv'}: not written (No space left on device")
finally: del os.environ["JIGSAW_FAULT"]
test_eq((work / "full" / "metrics.csv").read_text().count("\n"), 2)  # the header and step 1

# %% [markdown]
# With the default `metrics_every` a short run rewrites its metrics after its first and its last step only (a
# full disk injected at step 3 is never met), and an error that ends a run still leaves every step it made:

# %%
def _metrics_rows(out): return [int(l.split(",")[0]) for l in (out / "metrics.csv").read_text().splitlines()[1:]]

os.environ["JIGSAW_FAULT"] = "enospc-metrics@0:3"
try: Trainer(TrainConfig(**TINY, max_steps=5, out=str(work / "sparse"), metrics_every=3600), groups=ONE()).fit()
finally: del os.environ["JIGSAW_FAULT"]
test_eq(_metrics_rows(work / "sparse"), [1, 2, 3, 4, 5])
os.environ["JIGSAW_FAULT"] = "forward@0:4"
try: test_fail(Trainer(TrainConfig(**TINY, max_steps=6, out=str(work / "broken"), metrics_every=3600), groups=ONE()).fit)
finally: del os.environ["JIGSAW_FAULT"]
test_eq(_metrics_rows(work / "broken"), [1, 2, 3, 4])  # the forward after step 4 raised: all four finished steps

# %%
#| hide
import shutil; shutil.rmtree(work, ignore_errors=True)

# %%
#| export
#| eval: false
if __name__ == "__main__":  # `python -m jigsaw_ref.train`: the same as `python -m jigsaw_ref.cli` (jigsaw-train)
    import runpy; runpy.run_module("jigsaw_ref.cli", run_name="__main__", alter_sys=True)
