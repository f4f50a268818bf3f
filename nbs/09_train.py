# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import argparse, ast, dataclasses, importlib.util, json, math, os, re, sys, time, tomllib
from dataclasses import dataclass, asdict
from pathlib import Path
import numpy as np
import torch
from fastcore.basics import patch
import jigsaw_ref.mixer as mixer
from jigsaw_ref.config import ConfigError, MixerConfig, preset, shard_range
from jigsaw_ref.grid import Grid
from jigsaw_ref.comm import Group, launcher, make_groups
from jigsaw_ref.loss import lat_weights_cos, lat_weights_area, variable_weights
from jigsaw_ref.parallel import JigsawMixer, clip_grads, loss_share, scatter_state, sync_grads, take
from jigsaw_ref.checkpoint import (CheckpointError, MAGIC, Reader, fault_point, load_checkpoint, load_sharded,
                                   read_file, save_checkpoint, save_sharded)

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc
from jigsaw_ref.ranks import run_ranks
torch.set_num_threads(1)
ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # the groups of a one-rank job
work = Path(tempfile.mkdtemp(prefix="jigsaw-train-"))

# %% [markdown]
# # The distributed trainer
#
# > `jigsaw-train`: any layout (1-, 2-, 4-way, p x q) times data parallelism, randomized or cyclic latent rollout, Adam with warm-up and cosine decay, clipping, and sharded checkpoints that any layout resumes from.

# %% [markdown]
# ## Settings
#
# One frozen dataclass holds a run. Every field is also a command-line flag (`--lr-encdec`, ...) whose help
# line is the field's comment, and a TOML or JSON file can hold any of them (`--config run.toml`); flags
# override the file. `model` names a preset and `model_overrides` changes its fields (`--set hidden=128
# --set f_s=0.5`; a `--set` adds to the file's overrides).

# %%
#| export
@dataclass(frozen=True)
class TrainConfig:
    "Everything that defines a training run."
    model: str = "small"  # preset name (config.PRESETS)
    model_overrides: tuple = ()  # ("field=value", ...) applied to the preset
    data: str = "default"  # a WeatherBench2-layout zarr / netCDF path, or 'default' (generated on first use)
    way: str = "1"  # layout: 1, 2, 4 or 'PxQ'; data parallelism fills the remaining ranks
    mode: str = "exact"  # 'exact' (equals the 1-way model) or 'faithful' (released code)
    algo: str = "p2p"  # 'p2p' (the paper's point-to-point exchanges) or 'coll' (library collectives)
    backend: str = "mpi"  # 'mpi' (mpi4py) or 'torch' (torch.distributed: NCCL on GPU, gloo on CPU)
    batch: int = 1  # samples per model group per step (global batch = batch * dp)
    epochs: int = 1  # passes over the training split
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    max_minutes: float = 0.0  # stop after this many minutes of training (0: no limit; the result then depends on the machine)
    lr: float = 1e-4  # processor learning rate
    lr_encdec: float = 2e-5  # encoder / decoder / residual learning rate
    weight_decay: float = 3e-6  # Adam's L2 weight decay
    warmup_steps: int = -1  # linear warm-up steps; -1: one epoch, as in the released recipe
    clip: float = 1.0  # gradient-norm clipping (0: off)
    rollout: str = "random"  # 'random' (k drawn per step, same on every rank) or 'cyclic'
    lat_weights: str = "cos"  # 'cos' (released code) or 'area' (WeatherBench2)
    seed: int = 0  # seeds the initial weights, the sample order, the rollout draws and the dropout masks
    out: str = "runs/latest"  # run folder: metrics.csv, summary.json, checkpoints
    ckpt_every: int = 0  # steps between checkpoints (0: only at the end)
    resume: str = ""  # a checkpoint (store folder or single file), or 'auto' (the newest step*.ckpt in `out`)
    device: str = "cpu"  # 'cpu' or 'cuda'
    precision: str = "fp32"  # 'fp32', 'tf32' (CUDA) or 'bf16' (CUDA autocast)
    dtype: str = "float32"  # parameter dtype ('float64' for exactness checks)
    val_batches: int = 8  # validation samples per epoch (0: all)
    nonfinite: str = "stop"  # on a non-finite loss or gradient: 'stop' (keep the last good checkpoint) or 'skip' the step
    progress: bool = True  # progress bars (rank 0) for training and for the checkpoint writes of large models

# %%
#| export
def _override(base: MixerConfig, item: str) -> tuple[str, object]:
    "`(field, value)` of one `FIELD=VALUE` override of `base`, parsed as JSON where it can be, typed like the field."
    if "=" not in item: raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set hidden=128")
    k, v = item.split("=", 1)
    fields = {f.name for f in dataclasses.fields(MixerConfig)}
    if k not in fields: raise ConfigError(f"--set {k}=...: MixerConfig has no field {k!r}; fields: {sorted(fields)}")
    try: val = json.loads(v)
    except json.JSONDecodeError: val = v
    cur = getattr(base, k)
    try:
        if isinstance(cur, tuple): val = tuple(val) if isinstance(val, list) else tuple(x.strip() for x in str(val).split(","))
        elif isinstance(cur, float): val = float(val)
    except (TypeError, ValueError):
        raise ConfigError(f"--set {k}={v}: {k} needs a {type(cur).__name__}, e.g. --set {k}={cur!r}") from None
    return k, val

# %%
#| export
@patch
def model_config(self: TrainConfig) -> MixerConfig:
    "The preset with its overrides applied (later overrides of a field win)."
    base = preset(self.model)
    kw = dict(_override(base, item) for item in self.model_overrides)
    return base.replace(**kw) if kw else base

# %%
test_eq(TrainConfig(model="tiny", model_overrides=("hidden=16", "hidden=24")).model_config().hidden, 24)
test_fail(lambda: TrainConfig(model_overrides=("widht=3",)).model_config(), contains="no field 'widht'")

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
# so its moments are sharded exactly like the weights.

# %%
#| export
def make_optimizer(model, tc: TrainConfig, total_steps: int, steps_per_epoch: int):
    "Adam with encoder/decoder and processor groups, and its warm-up + cosine schedule."
    st = model.state()
    encdec = [st[n] for n in st if n.startswith(("enc.", "dec.", "res."))]
    proc = [st[n] for n in st if n.startswith("blocks.")]
    opt = torch.optim.Adam([{"params": proc, "lr": tc.lr}, {"params": encdec, "lr": tc.lr_encdec}],
                           weight_decay=tc.weight_decay)
    warm = steps_per_epoch if tc.warmup_steps < 0 else tc.warmup_steps
    warm = max(0, min(warm, total_steps - 1))
    S = torch.optim.lr_scheduler
    cos = S.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm))
    sched = S.SequentialLR(opt, [S.LinearLR(opt, 1e-3, 1.0, total_iters=warm), cos], milestones=[warm]) if warm else cos
    return opt, sched

# %% [markdown]
# ## Checks before any collective
#
# Everything that can be wrong with a run's settings is checked from the settings alone, identically on
# every rank, before the first collective: so every rank raises the same clear error and none waits forever
# for a partner that has already given up. Where a check needs a file (the data, a checkpoint), `agree`
# collects every rank's verdict first.

# %%
#| export
def _check_layout(cfg: MixerConfig, tc: TrainConfig, world: int) -> Grid:
    "The grid of `tc.way` on `world` ranks, if `cfg` can be cut that way."
    grid = Grid.named(tc.way, world)
    p, q = grid.domain, grid.tensor
    if cfg.n_lon_patches < p:
        raise ConfigError(f"way={tc.way}: {cfg.n_lon_patches} longitude patches cannot be split over {p} domain "
                          f"shards; use a layout with at most {cfg.n_lon_patches} domain shards")
    for n, what in ((cfg.n_in, "input channels"), (cfg.n_out, "output channels"), (cfg.hidden, "hidden"),
                    (cfg.token_hidden, "token-MLP hidden"), (cfg.channel_hidden, "channel-MLP hidden")):
        if n < max(p, q): raise ConfigError(f"way={tc.way}: {n} {what} cannot be split {max(p, q)} ways")
    return grid

# %%
#| export
def _check_values(tc: TrainConfig):
    "A `ConfigError` for the first field of `tc` whose value is not allowed."
    fin = math.isfinite
    for f, ok in (("mode", tc.mode in ("exact", "faithful")), ("algo", tc.algo in ("p2p", "coll")),
                  ("backend", tc.backend in ("mpi", "torch")), ("rollout", tc.rollout in ("random", "cyclic")),
                  ("lat_weights", tc.lat_weights in ("cos", "area")), ("device", tc.device in ("cpu", "cuda")),
                  ("precision", tc.precision in ("fp32", "tf32", "bf16")), ("dtype", tc.dtype in ("float32", "float64")),
                  ("nonfinite", tc.nonfinite in ("stop", "skip")), ("batch", tc.batch >= 1), ("epochs", tc.epochs >= 1),
                  ("clip", fin(tc.clip) and tc.clip >= 0), ("max_steps", tc.max_steps >= 0),
                  ("lr", fin(tc.lr) and tc.lr > 0), ("lr_encdec", fin(tc.lr_encdec) and tc.lr_encdec > 0),
                  ("weight_decay", fin(tc.weight_decay) and tc.weight_decay >= 0),
                  ("warmup_steps", tc.warmup_steps >= -1), ("ckpt_every", tc.ckpt_every >= 0),
                  ("val_batches", tc.val_batches >= 0), ("max_minutes", fin(tc.max_minutes) and tc.max_minutes >= 0)):
        if not ok: raise ConfigError(f"{f}={getattr(tc, f)!r} is not valid; see `jigsaw-train --help`")

# %%
#| export
def check_settings(tc: TrainConfig, world: int) -> tuple[MixerConfig, Grid]:
    "The model config and grid of `tc` on `world` ranks, or a `ConfigError` naming the problem."
    cfg = tc.model_config()
    grid = _check_layout(cfg, tc, world)
    _check_values(tc)
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no GPU: use --device cpu or install a CUDA build of torch")
    if tc.device == "cuda" and tc.backend == "mpi" and world > 1:
        raise ConfigError("device='cuda' with several ranks needs --backend torch (NCCL); mpi4py here moves CPU buffers")
    if tc.precision != "fp32" and tc.device != "cuda":
        raise ConfigError(f"precision={tc.precision!r} is for GPUs; on CPU use fp32 (bf16 matmul is ~100x slower here)")
    return cfg, grid

# %%
#| export
def agree(world: Group, fn, *args, **kw):
    "Run `fn` on every rank; if it raised anywhere, raise on every rank (the first error, with its rank)."
    try: out, err = fn(*args, **kw), None
    except Exception as e: out, err = None, e
    errs = world.allgather_obj(None if err is None else (type(err).__name__, str(err)))
    bad = [(r, e) for r, e in enumerate(errs) if e]
    if bad:
        if err is not None: raise err
        r, (name, msg) = bad[0]
        raise ConfigError(f"rank {r} failed: {name}: {msg}")
    return out

# %%
test_fail(lambda: check_settings(TrainConfig(model="tiny", way="4"), 6), contains="not a multiple of the model group size")
test_fail(lambda: check_settings(TrainConfig(model="tiny", way="16x1"), 16), contains="8 longitude patches cannot be split over 16")
test_fail(lambda: check_settings(TrainConfig(model="tiny", algo="ring"), 1), contains="algo='ring'")

# %% [markdown]
# ## The trainer
#
# `Trainer` puts the pieces together on one rank. Each step: every model group takes its `batch` samples of the
# global batch (the global order is shared), each rank reads only its block of each sample, runs the forward
# pass with the step's $k$, back-propagates its loss share, completes its gradients (replicas, then data
# parallelism), clips by the global norm and steps its Adam. The class is built up below a concern at a time:
# setting up, the data, one step, validation, checkpoints, and the loop.

# %%
#| export
class NonFiniteError(FloatingPointError):
    "A loss or gradient that is NaN or infinite."

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
    _, grid = check_settings(tc, world)  # before the first collective
    return make_groups(grid, tc.backend, tc.algo, comm)

# %%
#| export
class Trainer:
    "One rank's share of a training run."
    def __init__(self, tc: TrainConfig,
                 groups: dict | None = None,  # the groups of this rank (`comm.make_groups`); default: the job's
                 comm=None):  # the job's communicator, when `groups` is not given (default: MPI's world)
        self.tc = tc
        groups = groups if groups is not None else job_groups(tc, comm)
        self.cfg, self.grid = check_settings(tc, groups["world"].size)
        self.g, self.rank = groups, groups["world"].rank
        self.d, self.i, self.j = self.grid.coords(self.rank)
        self.device = torch.device("cuda", self.rank % max(1, torch.cuda.device_count())) if tc.device == "cuda" else torch.device("cpu")
        if tc.precision == "tf32": torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.out, self.dtype = Path(tc.out), getattr(torch, tc.dtype)
        self._setup_data()
        self._setup_model()
        self.step, self.history, self.last_save, self.last_load = 0, [], None, None
        self.samples, self.epoch, self.epoch_pos = 0, 0, 0  # samples consumed: in all, and in the current epoch
        self.total_steps = self._bound()
        if tc.resume: self.load(self._resume_path())

# %% [markdown]
# ### Setting up: data and model
#
# The data: rank 0 makes the default store if it is asked for (the others wait for its verdict), then every
# rank opens its block of the training and validation splits.

# %%
#| export
@patch
def _data_path(self: Trainer) -> str:
    if self.tc.data != "default": return self.tc.data
    path = None
    if self.rank == 0:  # one rank generates and computes statistics, the others wait for its verdict
        from jigsaw_ref.generator import default_dataset
        from jigsaw_ref.data import compute_stats, load_stats
        path = str(default_dataset(grid=(self.cfg.n_lat, self.cfg.n_lon), verbose=True))
        if load_stats(path) is None: compute_stats(path, self.cfg)
    return self.g["world"].allgather_obj(path)[0]

# %%
#| export
@patch
def _datasets(self: Trainer):
    from jigsaw_ref.data import Era5Dataset
    kw = dict(lon_parts=self.grid.domain, lon_index=self.i, ch_parts=self.grid.tensor, ch_index=self.j)
    return (Era5Dataset(self.path, self.cfg, "train", **kw), Era5Dataset(self.path, self.cfg, "val", max_lead=1, **kw))

# %%
#| export
@patch
def _setup_data(self: Trainer):
    "Open this rank's blocks of the data, and its latitude and variable weights."
    self.path = agree(self.g["world"], self._data_path)
    self.train_ds, self.val_ds = agree(self.g["world"], self._datasets)
    lat = torch.as_tensor(self.train_ds.lat)
    self.lat_w = (lat_weights_cos if self.tc.lat_weights == "cos" else lat_weights_area)(lat)
    self.var_w = variable_weights(self.cfg)[slice(*shard_range(self.cfg.n_out, self.grid.tensor, self.j))]
    self.global_batch = self.tc.batch * self.grid.dp
    self.steps_per_epoch = len(self.train_ds) // self.global_batch
    if self.steps_per_epoch < 1:
        raise ConfigError(f"{len(self.train_ds)} training samples cannot fill one global batch of {self.global_batch}")

# %% [markdown]
# The model: this rank's blocks of the same initial weights on every layout, Adam and its schedule over the
# run's bound (`_bound`: the steps left in this epoch, the later epochs, capped by `max_steps`).

# %%
#| export
@patch
def _setup_model(self: Trainer):
    "This rank's blocks of the model, and Adam with its schedule."
    tc = self.tc
    self.model = JigsawMixer(self.cfg, self.g["tensor"], self.g["domain"], tc.mode, self.dtype, self.device, tc.seed)
    total = self.steps_per_epoch * tc.epochs
    self.opt, self.sched = make_optimizer(self.model, tc, min(total, tc.max_steps) if tc.max_steps else total, self.steps_per_epoch)

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
    xs, ys = zip(*(ds.get(int(i), k) for i in idx))
    return (torch.stack(xs).to(self.device, self.dtype), torch.stack(ys).to(self.device, self.dtype))

# %%
#| export
@patch
def global_count(self: Trainer, B: int) -> int:
    "Elements of the global-batch prediction: the denominator of every rank's loss share."
    return B * self.grid.dp * self.cfg.n_out * self.cfg.n_lat * self.cfg.n_lon

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
# trainer never touches torch's global random generator.

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
def train_step(self: Trainer, idx, k: int) -> dict:
    "Forward, backward, gradient completion, clipping and an optimizer step on this rank's samples `idx` (one global batch consumed)."
    tc, m = self.tc, self.model
    m.train()
    x, y = self.batch(self.train_ds, idx, k)
    self.opt.zero_grad(set_to_none=False)
    with torch.autocast("cuda", torch.bfloat16, enabled=tc.precision == "bf16"):
        pred = self._forward(x, k)
    fault_point("forward", self.rank, self.step)
    share = loss_share(pred.float() if tc.precision == "bf16" else pred, y, self.lat_w, self.var_w, self.global_count(len(idx)))
    share.backward()
    fault_point("backward", self.rank, self.step)
    sync_grads(m, self.g["dp"])
    loss = float(self.g["world"].all_reduce(share.detach().double().reshape(1).cpu())[0])
    norm = clip_grads(m, self.g["model"], tc.clip) if tc.clip else float("nan")
    skipped = not self._all_finite(loss, norm)
    if skipped:
        msg = f"non-finite loss or gradient at step {self.step} (loss {loss}, grad norm {norm}) on rank {self.rank}"
        if tc.nonfinite == "stop": raise NonFiniteError(msg + "; the last checkpoint is intact. Lower --lr or use --nonfinite skip")
        self.opt.zero_grad()
    else: self.opt.step(); self.sched.step()
    self.step, self.samples, self.epoch_pos = self.step + 1, self.samples + self.global_batch, self.epoch_pos + self.global_batch
    return dict(step=self.step, k=k, loss=loss, grad_norm=norm, skipped=int(skipped))

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
# totals.

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
    se, loss = torch.zeros(cfg.n_out, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    lw = self.lat_w.to(torch.float64)[:, None]
    for i in range(self.d, n, self.grid.dp):  # counts use n itself, whatever this group's share
        x, y = self.batch(ds, [i], 1)
        pred = m(x, k=1)
        loss += loss_share(pred, y, self.lat_w, self.var_w, n * cfg.n_out * cfg.n_lat * cfg.n_lon).double().cpu()
        err = (ds.denormalize(pred[0].cpu()) - ds.denormalize(y[0].cpu())).double()  # (V_j, lat, lon_i)
        se[c0:c1] += (err.square() * lw).sum((1, 2))
    tot = self.g["world"].all_reduce(torch.cat([loss, se]))
    rmse = (tot[1:] / (n * cfg.n_lat * cfg.n_lon)).sqrt()
    return {"val_loss": float(tot[0]), **{f"rmse_{c}": float(r) for c, r in zip(cfg.variables, rmse)}}

# %%
show_doc(Trainer.validate)

# %%
_v = t.validate()
assert _v["val_loss"] > 0 and set(_v) == {"val_loss", *(f"rmse_{c}" for c in t.cfg.variables)}

# %% [markdown]
# ### Checkpoints
#
# A checkpoint is a store of the `checkpoint` module: every rank writes its own blocks of the weights and of
# both Adam moments, and the manifest keeps the small replicated state below. A store written on any layout
# resumes on any other; a faithful store resumed on its own layout restores every rank's own copies. The first
# format (one file holding the full model) still resumes.

# %%
#| export
@patch
def run_state(self: Trainer) -> dict:
    "The small replicated state of the run that a checkpoint keeps beside the tensors."
    return {"step": self.step, "scheduler": self.sched.state_dict(), "lrs": [g["lr"] for g in self.opt.param_groups],
            "data": {"samples": self.samples, "epoch": self.epoch, "epoch_samples": self.epoch_pos, "global_batch": self.global_batch},
            "history": self.history, "train": asdict(self.tc), "layout": list(dataclasses.astuple(self.grid)),
            "dtype": self.tc.dtype, "rng": "none: sample order, rollout k and dropout masks are functions of (seed, step)"}

# %%
#| export
@patch
def save(self: Trainer, name: str | None = None) -> Path:
    "Write a checkpoint of the current state to `out/NAME` (collective: every rank writes its blocks; rank 0 commits)."
    path = self.out / (name or f"step{self.step:07d}.ckpt")
    self.last_save = save_sharded(path, self.model, self.opt, self.run_state(), self.g["world"], self.d, self.step,
                                  progress=self.tc.progress)
    return path

# %%
show_doc(Trainer.save)

# %%
_p = t.save()
test_eq((_p.name, _p.is_dir(), load_checkpoint(_p)["step"]), ("step0000001.ckpt", True, 1))

# %%
#| export
@patch
def _resume_path(self: Trainer) -> Path:
    if self.tc.resume != "auto": return Path(self.tc.resume)
    found = sorted(self.out.glob("step*.ckpt"))
    if not found: raise CheckpointError(f"--resume auto: no step*.ckpt in {self.out}")
    return found[-1]

# %%
#| export
@patch
def _check_model(self: Trainer, path, config: dict, mode: str | None):
    "Refuse a checkpoint of another model or another mode, naming what differs."
    theirs = MixerConfig(**config)
    if theirs != self.cfg:
        diff = {f: (getattr(theirs, f), getattr(self.cfg, f)) for f in asdict(self.cfg) if getattr(theirs, f) != getattr(self.cfg, f)}
        raise CheckpointError(f"{path}: written for another model ({{field: (checkpoint, this run)}} {diff}); "
                              f"use the same --model and --set options")
    if mode is not None and mode != self.tc.mode:
        raise CheckpointError(f"{path}: written in mode {mode!r}, this run is --mode {self.tc.mode}; resume with --mode {mode}")

# %%
#| export
@patch
def _restore(self: Trainer, st: dict):
    "The replicated state of checkpoint `st`: scheduler, learning rates, step, history and data position."
    self.sched.load_state_dict(st["scheduler"])
    for g, lr in zip(self.opt.param_groups, st["lrs"]): g["lr"] = lr
    self.step, self.history = int(st["step"]), list(st.get("history", []))
    if "data" in st: self.samples, self.epoch, self.epoch_pos = (int(st["data"][k]) for k in ("samples", "epoch", "epoch_samples"))
    else:  # the first format: the position was step x global batch
        self.epoch, s = divmod(self.step, self.steps_per_epoch)
        self.samples, self.epoch_pos = self.step * self.global_batch, s * self.global_batch
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
    m = self.model
    scatter_state(m, ck["params"])
    for n, t in m.state().items():
        self.opt.state[t] = {"step": torch.tensor(ck["adam"]["step"]), **{k: take(ck["adam"][k][n], m.spec[n][0]).to(t)
                                                                        for k in ("exp_avg", "exp_avg_sq")}}
    self._restore(ck)

# %%
#| export
@patch
def load(self: Trainer, path):
    "Resume from a checkpoint (store folder or single file) written by any layout: every rank reads only its slices."
    path = Path(path)
    if path.is_file(): return self._load_file(path)
    r = agree(self.g["world"], Reader, path)  # the manifest, verified on every rank
    self._check_model(path, r.man["config"], r.man.get("mode"))
    self.last_load = agree(self.g["world"], load_sharded, r, self.model, self.opt)
    self._restore(r.man)
    if self.rank == 0:
        for note in self.last_load["notes"]: print(f"jigsaw-train: {note}", file=sys.stderr)

# %%
show_doc(Trainer.load)

# %% [markdown]
# The checkpoint of the one-rank trainer above, resumed by a 2-way job (two in-process ranks): both ranks get
# the step, the data position and their blocks of the weights and moments (the chunk bytes each read are counted:
# the `tiny` model's tensors are one chunk each, so here each rank reads them all; see `checkpoint` for
# slices of larger tensors).

# %%
def _resume(comm, path, way):
    grid = Grid.named(way, comm.Get_size())
    r = Trainer(TrainConfig(**TINY, way=way, max_steps=4, out=str(work / "two"), resume=str(path)), groups=make_groups(grid, comm=comm))
    full = {n: take(p, r.model.spec[n][0]) for n, p in load_checkpoint(path)["params"].items()}
    return r.step, r.samples, all(torch.equal(v, full[n]) for n, v in r.model.state().items()), r.last_load["chunk_bytes"]

got = run_ranks(2, _resume, _p, "2")
print(got)
test_eq([g[:3] for g in got], [(1, 1, True)] * 2)

# %% [markdown]
# ### The loop
#
# `fit` runs steps until the bound (`max_steps`, the epochs, or `max_minutes` agreed by all ranks), validates at
# the end of each epoch and at the end, writes `metrics.csv` and `summary.json` (replaced atomically, never left
# empty), checkpoints every `ckpt_every` steps and at the end (`final.ckpt`). With a time limit the progress
# bar's total is the number of steps the time left allows, re-estimated every step.

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
def fit(self: Trainer) -> list[dict]:
    "Train until `epochs`, `max_steps` or `max_minutes`; validate each epoch; checkpoint; return the history."
    tc, world = self.tc, self.g["world"]
    if self.rank == 0: self.out.mkdir(parents=True, exist_ok=True)
    bar = None
    if self.rank == 0 and tc.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
    t_start, done = time.perf_counter(), 0
    while self.step < self.total_steps:
        rec, done = self._one_step(), done + 1
        elapsed = time.perf_counter() - t_start
        stop = bool(world.all_reduce(torch.tensor([float(tc.max_minutes > 0 and elapsed > 60 * tc.max_minutes)]))[0] > 0)
        if rec["end_of_epoch"] or stop: rec |= self.validate()
        self.history.append(rec)
        self._tick(bar, rec, elapsed, done)
        if self.rank == 0: self._write_metrics()
        if tc.ckpt_every and self.step % tc.ckpt_every == 0: self.save()
        if stop: break
    if bar is not None: bar.close()
    self.save("final.ckpt")
    return self.history

# %%
#| export
def _write_atomic(path: Path, text: str):
    "Replace `path` by `text` in one step (a reader sees the old file or the new one, never an empty one)."
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text); os.replace(tmp, path)


@patch
def _write_metrics(self: Trainer):
    keys = list(dict.fromkeys(k for r in self.history for k in r))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in self.history]
    _write_atomic(self.out / "metrics.csv", "\n".join(lines) + "\n")
    last_val = next((r for r in reversed(self.history) if "val_loss" in r), {})
    summary = {"steps": self.step, "samples": self.samples, "layout": dict(zip(("dp", "domain", "tensor"), dataclasses.astuple(self.grid))),
               "mode": self.tc.mode, "final": self.history[-1], "last_validation": last_val, "train": asdict(self.tc)}
    _write_atomic(self.out / "summary.json", json.dumps(summary, indent=1, default=str))

# %%
show_doc(Trainer.fit)

# %%
h = t.fit()
test_eq([r["step"] for r in h], [2, 3, 4])
test_eq(sorted(p.name for p in t.out.glob("*.ckpt")), ["final.ckpt", "step0000001.ckpt"])
assert "val_loss" in h[-1] and (t.out / "metrics.csv").read_text().count("\n") == 4

# %% [markdown]
# ## The command line
#
# `jigsaw-train` under any launcher: `mpiexec -n 4 jigsaw-train --way 4 --model small`, `srun -n 8 jigsaw-train
# --way 4` (dp 2 x 4-way), `torchrun --nproc-per-node 4 jigsaw-train --backend torch --device cuda --way 4`.
# An error on any rank prints the rank and the message and ends the whole job (MPI `Abort`), so no rank is
# left waiting in a collective.

# %%
#| export
def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"): return True
    if v.lower() in ("0", "false", "no", "off"): return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")

# %%
#| export
def field_help(cls, module: str = "jigsaw_ref.train") -> dict[str, str]:
    "The trailing comment of each field of dataclass `cls`, read from the source of `module` (its flag's help line)."
    # read from the module's file: a class has no source of its own in a notebook kernel, and fastcore's `docments`
    # loses the comments when the module runs as `python -m jigsaw_ref.train`
    src = Path(importlib.util.find_spec(module).origin).read_text()
    lines, out = src.splitlines(), {}
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    for st in node.body:
        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
            m = re.search(r"#\s*(.+)$", lines[st.end_lineno - 1][st.end_col_offset:])
            if m: out[st.target.id] = m.group(1).strip()
    return out

# %%
test_eq(field_help(TrainConfig)["batch"], "samples per model group per step (global batch = batch * dp)")

# %%
#| export
def arg_parser() -> argparse.ArgumentParser:
    "The parser of `jigsaw-train`: one flag per `TrainConfig` field, its help line the field's comment."
    ap = argparse.ArgumentParser("jigsaw-train", description="Train WeatherMixer with Jigsaw parallelism (launch with mpiexec/srun/torchrun).")
    ap.add_argument("--config", help="TOML or JSON file with any of the settings below (flags override it)")
    ap.add_argument("--set", dest="model_overrides", action="append", metavar="FIELD=VALUE",
                    help="override a model config field, e.g. --set hidden=128 (repeatable; adds to the config file's model_overrides)")
    helps = field_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides": continue
        flag, h = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default!r})"
        if f.type in ("bool", bool): ap.add_argument(flag, type=_bool, default=None, metavar="BOOL", help=h)
        else: ap.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None, help=h)
    return ap

# %%
#| export
def _read_config(ap, path) -> dict:
    "The settings in the TOML or JSON file `path` (a usage error if it cannot be read or names unknown settings)."
    p = Path(path)
    if not p.is_file(): ap.error(f"--config {p}: no such file")
    try: kw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e: ap.error(f"--config {p}: cannot parse: {e}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(kw) - names
    if unknown: ap.error(f"--config {p}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
    return kw

# %%
#| export
def parse_args(argv=None) -> TrainConfig:
    "A `TrainConfig` from a config file (`--config`, TOML or JSON) and command-line flags (flags win; `--set` adds)."
    ap = arg_parser()
    a = ap.parse_args(argv)
    kw = _read_config(ap, a.config) if a.config else {}
    kw["model_overrides"] = tuple(kw.get("model_overrides", ())) + tuple(a.model_overrides or ())
    for f in dataclasses.fields(TrainConfig):
        v = getattr(a, f.name)
        if v is not None and f.name != "model_overrides": kw[f.name] = v
    try: return TrainConfig(**kw)
    except TypeError as e: ap.error(str(e))

# %%
test_eq(parse_args(["--model", "tiny", "--way", "4", "--set", "hidden=16", "--lr", "3e-4"]).lr, 3e-4)
(work / "run.toml").write_text('model = "tiny"\nmodel_overrides = ["hidden=64", "f_s=0.25"]\n')
test_eq(parse_args(["--config", str(work / "run.toml"), "--set", "hidden=48"]).model_overrides, ("hidden=64", "f_s=0.25", "hidden=48"))
test_eq(parse_args(["--config", str(work / "run.toml"), "--set", "hidden=48"]).model_config().hidden, 48)
assert all(a.help for a in arg_parser()._actions)

# %%
#| export
def _mpi_env():
    "Settings that must precede MPI initialisation: yield instead of spinning when ranks share cores."
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# %%
#| export
def install_abort_hook(world_comm=None):
    "On an uncaught exception: print it with the rank, then abort every rank of the job."
    prev = sys.excepthook

    def hook(tp, val, tb):
        rank = world_comm.Get_rank() if world_comm is not None else 0
        sys.stderr.write(f"\n[jigsaw_ref rank {rank}] {tp.__name__}: {val}\n")
        prev(tp, val, tb)
        sys.stderr.flush(); sys.stdout.flush()
        if world_comm is not None and world_comm.Get_size() > 1:
            time.sleep(1.0)  # let other ranks failing the same way print theirs before the job is torn down
            world_comm.Abort(1)
        else:  # torchrun / srun without MPI: exit at once; the launcher ends the other ranks of the job
            os._exit(1)
    sys.excepthook = hook

# %%
#| export
def main(argv=None):
    "Entry point of `jigsaw-train`."
    _mpi_env()
    tc = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("JIGSAW_THREADS", "1")))
    comm = None
    if tc.backend == "mpi" or launcher() == "mpiexec":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    install_abort_hook(comm)
    t = Trainer(tc, comm=comm)
    if t.rank == 0:
        print(f"jigsaw-train: {launcher()} world={t.grid.world} layout dp={t.grid.dp} x domain={t.grid.domain} x "
              f"tensor={t.grid.tensor} mode={tc.mode} model={tc.model} ({t.grid.dp} group(s) of "
              f"{t.grid.group_size}) steps={t.total_steps} data={t.path}", flush=True)
    hist = t.fit()
    if t.rank == 0:
        last = next((r for r in reversed(hist) if "val_loss" in r), hist[-1])
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}), flush=True)
        print(f"checkpoint: {t.out / 'final.ckpt'}", flush=True)
    return 0

# %% [markdown]
# ## The demo
#
# `jigsaw-demo` is the README's main job: 4-way Jigsaw training of the `demo` preset on the embedded default
# data on 4 MPI ranks for a fixed number of steps from a fixed seed, then the evaluation against persistence
# and climatology. Bounded by steps (not minutes), it gives the same scorecard on any machine (bit-identical on
# CPU), only sooner or later; `DEMO_STEPS` is sized so that a quiet 2-core machine trains in about 4 minutes.

# %%
#| export
DEMO_STEPS = 1500  # 4-way demo steps: about 4 minutes of training on a quiet 2-core machine


def demo(argv=None):
    "Entry point of `jigsaw-demo`: `mpiexec -n 4 jigsaw-train --way 4` on the default data, then `jigsaw-eval`."
    import subprocess
    ap = argparse.ArgumentParser("jigsaw-demo", description=demo.__doc__)
    ap.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps (the bound of the run)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, sample order and rollout draws")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="also stop after this many minutes (0: no limit; makes the result machine-dependent)")
    ap.add_argument("--out", default="runs/demo", help="run folder")
    ap.add_argument("--ranks", type=int, default=4, help="MPI ranks")
    ap.add_argument("--way", default="4", help="layout (1, 2, 4 or PxQ)")
    ap.add_argument("--model", default="demo", help="preset")
    a = ap.parse_args(argv)
    mpiexec = Path(sys.executable).with_name("mpiexec")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    train = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(a.ranks), sys.executable, "-m", "jigsaw_ref.train",
             "--model", a.model, "--way", a.way, "--epochs", "50", "--max-steps", str(a.steps), "--seed", str(a.seed),
             "--max-minutes", str(a.max_minutes), "--lr", "1e-3", "--lr-encdec", "1e-3", "--warmup-steps", "50",
             "--batch", "1", "--out", a.out]
    print("$", " ".join(train), flush=True)
    subprocess.run(train, env=env, check=True)
    try: from jigsaw_ref.evaluate import main as evaluate
    except ImportError as e:
        raise ImportError(f"jigsaw-demo: training finished ({Path(a.out) / 'final.ckpt'}) but the evaluation cannot be "
                          f"imported ({e}); reinstall jigsaw_ref (pip install -e .) and run jigsaw-eval on it") from e
    return evaluate([str(Path(a.out) / "final.ckpt"), "--out", str(Path(a.out) / "eval")])

# %%
#| hide
import shutil; shutil.rmtree(work, ignore_errors=True)

# %%
#| export
#| eval: false
if __name__ == "__main__":  # `python -m jigsaw_ref.train`, as the demo launches it
    sys.exit(main())
