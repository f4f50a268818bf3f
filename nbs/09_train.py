# %%
#| default_exp train

# %%
#| export
from __future__ import annotations
import argparse, dataclasses, hashlib, io, json, math, os, sys, time, tomllib
from dataclasses import dataclass, field, asdict
from pathlib import Path
import numpy as np
import torch
from jigsaw_ref.config import ConfigError, MixerConfig, preset, shard_range, split_sizes
from jigsaw_ref.grid import Grid
from jigsaw_ref.comm import Group, TorchGroup, launcher, make_groups
from jigsaw_ref.loss import lat_weights_cos, lat_weights_area, variable_weights
from jigsaw_ref.parallel import JigsawMixer, clip_grads, gather_state, loss_share, scatter_state, sync_grads

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc

# %% [markdown]
# # The distributed trainer
#
# > `jigsaw-train`: any layout (1-, 2-, 4-way, p x q) times data parallelism, randomized or cyclic latent rollout, Adam with warm-up and cosine decay, clipping, atomic checkpoints in one full-model format that any layout resumes from.

# %% [markdown]
# ## Settings
#
# One frozen dataclass holds a run. Every field is also a command-line flag (`--lr-encdec`, ...), and a TOML or
# JSON file can hold any of them (`--config run.toml`); flags override the file. `model` names a preset and
# `model_overrides` changes its fields (`--set hidden=128 --set f_s=0.5`).

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
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    max_minutes: float = 0.0  # stop after this many minutes of training (0: no limit)
    lr: float = 1e-4  # processor learning rate
    lr_encdec: float = 2e-5  # encoder / decoder / residual learning rate
    weight_decay: float = 3e-6
    warmup_steps: int = -1  # linear warm-up steps; -1: one epoch, as in the released recipe
    clip: float = 1.0  # gradient-norm clipping (0: off)
    rollout: str = "random"  # 'random' (k drawn per step, same on every rank) or 'cyclic'
    lat_weights: str = "cos"  # 'cos' (released code) or 'area' (WeatherBench2)
    seed: int = 0
    out: str = "runs/latest"  # run folder: metrics.csv, summary.json, checkpoints
    ckpt_every: int = 0  # steps between checkpoints (0: only at the end)
    resume: str = ""  # a checkpoint file, or 'auto' (the newest in `out`)
    device: str = "cpu"  # 'cpu' or 'cuda'
    precision: str = "fp32"  # 'fp32', 'tf32' (CUDA) or 'bf16' (CUDA autocast)
    dtype: str = "float32"  # parameter dtype ('float64' for exactness checks)
    val_batches: int = 8  # validation samples per epoch (0: all)
    nonfinite: str = "stop"  # on a non-finite loss or gradient: 'stop' (keep the last good checkpoint) or 'skip' the step
    progress: bool = True

    def model_config(self) -> MixerConfig:
        "The preset with its overrides applied."
        base, fields, kw = preset(self.model), {f.name for f in dataclasses.fields(MixerConfig)}, {}
        for item in self.model_overrides:
            if "=" not in item: raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set hidden=128")
            k, v = item.split("=", 1)
            if k not in fields: raise ConfigError(f"--set {k}=...: MixerConfig has no field {k!r}; fields: {sorted(fields)}")
            try: val = json.loads(v)
            except json.JSONDecodeError: val = v
            cur = getattr(base, k)
            try:
                if isinstance(cur, tuple): val = tuple(val) if isinstance(val, list) else tuple(x.strip() for x in str(val).split(","))
                elif isinstance(cur, float): val = float(val)
            except (TypeError, ValueError):
                raise ConfigError(f"--set {k}={v}: {k} needs a {type(cur).__name__}, e.g. --set {k}={cur!r}") from None
            kw[k] = val
        return base.replace(**kw) if kw else base

# %%
test_eq(TrainConfig(model="tiny", model_overrides=("hidden=16",)).model_config().hidden, 16)
test_fail(lambda: TrainConfig(model_overrides=("widht=3",)).model_config(), contains="no field 'widht'")

# %%
#| export
MAGIC = b"JIGSAWCK"


def fault_point(where: str, rank: int, step: int):
    """Fault injection for the reliability tests: `JIGSAW_FAULT="forward@1:2"` raises on rank 1 at step 2 in the
    forward pass; `kill-checkpoint@0` sends SIGKILL to rank 0 halfway through writing a checkpoint. Points:
    `data`, `forward`, `backward`, `checkpoint`; the step is optional. Unset (the default), it does nothing."""
    spec = os.environ.get("JIGSAW_FAULT")
    if not spec: return
    for item in spec.split(","):
        what, _, at = item.partition("@")
        r, _, st = at.partition(":")
        kill = what.startswith("kill-")
        if (what[5:] if kill else what) == where and int(r) == rank and (not st or int(st) == step):
            if kill:
                import signal
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at {where} on rank {rank}, step {step} (JIGSAW_FAULT={spec})")


class CheckpointError(ValueError):
    "A checkpoint that cannot be used; the message names the file and the problem."


def save_checkpoint(path, payload: dict):
    "Write `payload` to `path` atomically (temp file, fsync, rename) with a SHA-256 checksum."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(data).hexdigest().encode() + data[: len(data) // 2])
            f.flush()
            fault_point("checkpoint", 0, payload.get("step", -1) if isinstance(payload, dict) else -1)
            f.write(data[len(data) // 2:])
            f.flush(); os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, I/O error, an injected fault: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY); os.fsync(fd); os.close(fd)
    except OSError: pass


def load_checkpoint(path) -> dict:
    "Read and verify a checkpoint written by `save_checkpoint`."
    path = Path(path)
    if not path.is_file(): raise CheckpointError(f"{path}: no such checkpoint file")
    raw = path.read_bytes()
    if len(raw) < 72 or raw[:8] != MAGIC:
        raise CheckpointError(f"{path}: not a jigsaw_ref checkpoint (bad header; truncated or another format)")
    want, data = raw[8:72].decode(errors="replace"), raw[72:]
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted or truncated; "
                              f"resume from an earlier checkpoint")
    try:  # weights_only: plain containers and tensors only, so a crafted file cannot run code
        ck = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a jigsaw_ref checkpoint (payload cannot be read: {type(e).__name__})") from None
    return ck

# %%
import tempfile
with tempfile.TemporaryDirectory() as d:
    save_checkpoint(f"{d}/a.ckpt", {"x": torch.arange(3)})
    test_eq(load_checkpoint(f"{d}/a.ckpt")["x"], torch.arange(3))
    raw = bytearray(Path(f"{d}/a.ckpt").read_bytes()); raw[-1] ^= 1; Path(f"{d}/b.ckpt").write_bytes(raw)
    test_fail(lambda: load_checkpoint(f"{d}/b.ckpt"), contains="checksum mismatch")
    Path(f"{d}/c.ckpt").write_bytes(raw[:40])
    test_fail(lambda: load_checkpoint(f"{d}/c.ckpt"), contains="bad header")

# %% [markdown]
# ## Randomness that survives resharding
#
# Every random choice is a pure function of `(seed, epoch, step)`: the sample order of an epoch, the
# rollout length $k$ of a step (identical on every rank of a model group, as it must be: all ranks of a
# group run the processor the same number of times) and the dropout seed. A resumed run therefore draws
# exactly what the uninterrupted one would have drawn, in any layout.

# %%
#| export
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    "The sample order of `epoch`: a permutation of `range(n)` shared by every rank."
    return np.random.default_rng([seed, epoch, 0x5A]).permutation(n)


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
def check_settings(tc: TrainConfig, world: int) -> tuple[MixerConfig, Grid]:
    "The model config and grid of `tc` on `world` ranks, or a `ConfigError` naming the problem."
    cfg = tc.model_config()
    grid = Grid.named(tc.way, world)
    p, q = grid.domain, grid.tensor
    if cfg.n_lon_patches < p:
        raise ConfigError(f"way={tc.way}: {cfg.n_lon_patches} longitude patches cannot be split over {p} domain "
                          f"shards; use a layout with at most {cfg.n_lon_patches} domain shards")
    for n, what in ((cfg.n_in, "input channels"), (cfg.n_out, "output channels"), (cfg.hidden, "hidden"),
                    (cfg.token_hidden, "token-MLP hidden"), (cfg.channel_hidden, "channel-MLP hidden")):
        if n < max(p, q): raise ConfigError(f"way={tc.way}: {n} {what} cannot be split {max(p, q)} ways")
    for f, ok in (("mode", tc.mode in ("exact", "faithful")), ("algo", tc.algo in ("p2p", "coll")),
                  ("backend", tc.backend in ("mpi", "torch")), ("rollout", tc.rollout in ("random", "cyclic")),
                  ("lat_weights", tc.lat_weights in ("cos", "area")), ("device", tc.device in ("cpu", "cuda")),
                  ("precision", tc.precision in ("fp32", "tf32", "bf16")), ("dtype", tc.dtype in ("float32", "float64")),
                  ("nonfinite", tc.nonfinite in ("stop", "skip")), ("batch", tc.batch >= 1), ("epochs", tc.epochs >= 1),
                  ("clip", math.isfinite(tc.clip) and tc.clip >= 0), ("max_steps", tc.max_steps >= 0),
                  ("lr", math.isfinite(tc.lr) and tc.lr > 0), ("lr_encdec", math.isfinite(tc.lr_encdec) and tc.lr_encdec > 0),
                  ("weight_decay", math.isfinite(tc.weight_decay) and tc.weight_decay >= 0),
                  ("warmup_steps", tc.warmup_steps >= -1), ("ckpt_every", tc.ckpt_every >= 0),
                  ("val_batches", tc.val_batches >= 0), ("max_minutes", math.isfinite(tc.max_minutes) and tc.max_minutes >= 0)):
        if not ok: raise ConfigError(f"{f}={getattr(tc, f)!r} is not valid; see `jigsaw-train --help`")
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no GPU: use --device cpu or install a CUDA build of torch")
    if tc.device == "cuda" and tc.backend == "mpi" and world > 1:
        raise ConfigError("device='cuda' with several ranks needs --backend torch (NCCL); mpi4py here moves CPU buffers")
    if tc.precision != "fp32" and tc.device != "cuda":
        raise ConfigError(f"precision={tc.precision!r} is for GPUs; on CPU use fp32 (bf16 matmul is ~100x slower here)")
    return cfg, grid


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
# ## The training loop
#
# `Trainer` puts the pieces together on one rank. Each step: every model group takes its `batch` samples of the
# global batch (the global order is shared), each rank reads only its block of each sample, runs the forward
# pass with the step's $k$, back-propagates its loss share, completes its gradients (replicas, then data
# parallelism), clips by the global norm and steps its Adam.

# %%
#| export
class NonFiniteError(FloatingPointError):
    "A loss or gradient that is NaN or infinite."


class Trainer:
    "One rank's share of a training run."
    def __init__(self, tc: TrainConfig, groups: dict | None = None, comm=None):
        self.tc = tc
        if groups is None:
            if tc.backend == "mpi":
                from mpi4py import MPI
                comm = comm or MPI.COMM_WORLD
                world = comm.Get_size()
            else:
                world = int(os.environ.get("WORLD_SIZE", "0"))  # set by torchrun
                if not world:  # launched by mpiexec/srun: the size comes from MPI
                    from mpi4py import MPI
                    world = MPI.COMM_WORLD.Get_size()
            self.cfg, self.grid = check_settings(tc, world)
            groups = make_groups(self.grid, tc.backend, tc.algo, comm)
        else:
            self.cfg, self.grid = check_settings(tc, groups["world"].size)
        self.g = groups
        self.rank = groups["world"].rank
        self.d, self.i, self.j = self.grid.coords(self.rank)
        self.device = torch.device("cuda", self.rank % max(1, torch.cuda.device_count())) if tc.device == "cuda" else torch.device("cpu")
        if tc.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
        self.out = Path(tc.out)
        self.path = agree(self.g["world"], self._data_path)
        self.train_ds, self.val_ds = agree(self.g["world"], self._datasets)
        cfg, q = self.cfg, self.grid.tensor
        lat = torch.as_tensor(self.train_ds.lat)
        self.lat_w = (lat_weights_cos if tc.lat_weights == "cos" else lat_weights_area)(lat)
        self.var_w = variable_weights(cfg)[slice(*shard_range(cfg.n_out, q, self.j))]
        self.dtype = getattr(torch, tc.dtype)
        self.model = JigsawMixer(cfg, self.g["tensor"], self.g["domain"], tc.mode, self.dtype, self.device, tc.seed)
        self.global_batch = tc.batch * self.grid.dp
        self.steps_per_epoch = len(self.train_ds) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{len(self.train_ds)} training samples cannot fill one global batch of {self.global_batch}")
        total = self.steps_per_epoch * tc.epochs
        self.total_steps = min(total, tc.max_steps) if tc.max_steps else total
        self.opt, self.sched = make_optimizer(self.model, tc, self.total_steps, self.steps_per_epoch)
        self.step, self.history = 0, []
        if tc.resume:
            self.load(self._resume_path())

    # -- data ---------------------------------------------------------------------------------------------
    def _data_path(self):
        if self.tc.data != "default": return self.tc.data
        path = None
        if self.rank == 0:  # one rank generates and computes statistics, the others wait for its verdict
            from jigsaw_ref.generator import default_dataset
            from jigsaw_ref.data import compute_stats, load_stats
            path = str(default_dataset(grid=(self.cfg.n_lat, self.cfg.n_lon), verbose=True))
            if load_stats(path) is None: compute_stats(path, self.cfg)
        return self.g["world"].allgather_obj(path)[0]

    def _datasets(self):
        from jigsaw_ref.data import Era5Dataset
        kw = dict(lon_parts=self.grid.domain, lon_index=self.i, ch_parts=self.grid.tensor, ch_index=self.j)
        return (Era5Dataset(self.path, self.cfg, "train", **kw), Era5Dataset(self.path, self.cfg, "val", max_lead=1, **kw))

    def batch(self, ds, idx, k):
        "Stack this rank's blocks of samples `idx` at lead `k`: (B, C_j, lat, lon_i), (B, V_j, lat, lon_i)."
        fault_point("data", self.rank, self.step)
        xs, ys = zip(*(ds.get(int(i), k) for i in idx))
        return (torch.stack(xs).to(self.device, self.dtype), torch.stack(ys).to(self.device, self.dtype))

    def global_count(self, B):
        "Elements of the global-batch prediction: the denominator of every rank's loss share."
        return B * self.grid.dp * self.cfg.n_out * self.cfg.n_lat * self.cfg.n_lon

    # -- one step -----------------------------------------------------------------------------------------
    def train_step(self, idx, k: int) -> dict:
        "Forward, backward, gradient completion, clipping and an optimizer step on this rank's samples `idx`."
        tc, m = self.tc, self.model
        m.train()
        torch.manual_seed(hash((tc.seed, self.step, self.rank)) % 2**31)  # dropout: a function of (seed, step, rank)
        x, y = self.batch(self.train_ds, idx, k)
        self.opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", torch.bfloat16, enabled=tc.precision == "bf16"):
            pred = m(x, k=k)
        fault_point("forward", self.rank, self.step)
        share = loss_share(pred.float() if tc.precision == "bf16" else pred, y, self.lat_w, self.var_w, self.global_count(len(idx)))
        share.backward()
        fault_point("backward", self.rank, self.step)
        sync_grads(m, self.g["dp"])
        loss = float(self.g["world"].all_reduce(share.detach().double().reshape(1).cpu())[0])
        norm = clip_grads(m, self.g["model"], tc.clip) if tc.clip else float("nan")
        finite = math.isfinite(loss) and (not tc.clip or math.isfinite(norm))
        if not tc.clip: finite = finite and all(torch.isfinite(t.grad).all() for t in m.parameters())
        # every rank must take the same branch: agree on finiteness
        finite = bool(self.g["world"].all_reduce(torch.tensor([0.0 if finite else 1.0], dtype=torch.float64))[0] == 0)
        if not finite:
            msg = f"non-finite loss or gradient at step {self.step} (loss {loss}, grad norm {norm}) on rank {self.rank}"
            if tc.nonfinite == "stop": raise NonFiniteError(msg + "; the last checkpoint is intact. Lower --lr or use --nonfinite skip")
            self.opt.zero_grad(); self.step += 1
            return dict(step=self.step, k=k, loss=loss, grad_norm=norm, skipped=1)
        self.opt.step(); self.sched.step(); self.step += 1
        return dict(step=self.step, k=k, loss=loss, grad_norm=norm, skipped=0)

    # -- validation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        "Loss and latitude-weighted RMSE per variable (physical units) at lead `dt` on the validation split."
        m, cfg, ds = self.model, self.cfg, self.val_ds
        m.eval()
        n = len(ds) if not self.tc.val_batches else min(len(ds), self.tc.val_batches * self.grid.dp)
        mine = list(range(self.d, n, self.grid.dp))
        c0, c1 = shard_range(cfg.n_out, self.grid.tensor, self.j)
        se = torch.zeros(cfg.n_out, dtype=torch.float64); loss = torch.zeros(1, dtype=torch.float64)
        lw = self.lat_w.to(torch.float64)[:, None]
        for i in mine:  # the n samples are dealt round-robin over the model groups: counts use n itself
            x, y = self.batch(ds, [i], 1)
            pred = m(x, k=1)
            loss += loss_share(pred, y, self.lat_w, self.var_w, n * cfg.n_out * cfg.n_lat * cfg.n_lon).double().cpu()
            err = (ds.denormalize(pred[0].cpu()) - ds.denormalize(y[0].cpu())).double()  # (V_j, lat, lon_i)
            se[c0:c1] += (err.square() * lw).sum((1, 2))
        tot = self.g["world"].all_reduce(torch.cat([loss, se]))
        count = n * cfg.n_lat * cfg.n_lon
        rmse = (tot[1:] / count).sqrt()
        return {"val_loss": float(tot[0]), **{f"rmse_{c}": float(r) for c, r in zip(cfg.variables, rmse)}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_payload(self) -> dict:
        "The full-model checkpoint (collective over the model group; identical on every rank)."
        m, g = self.model, self.g["model"]
        st = m.state()
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = gather_state(m, g, {n: self.opt.state[t][key] if t in self.opt.state else torch.zeros_like(t)
                                              for n, t in st.items()})
        adam_step = max((float(s["step"]) for s in self.opt.state.values()), default=0.0)
        return {"format": "jigsaw_ref/1", "config": asdict(self.cfg), "params": gather_state(m, g),
                "adam": {**moments, "step": adam_step}, "scheduler": self.sched.state_dict(), "step": self.step,
                "train": asdict(self.tc), "layout": dataclasses.astuple(self.grid), "mode": m.mode,
                "lrs": [g["lr"] for g in self.opt.param_groups], "rng": {"torch": torch.get_rng_state()},
                "history": self.history}

    def save(self, name: str | None = None) -> Path:
        "Write a checkpoint of the current state to `out/` (rank 0 writes; all ranks take part)."
        payload = self.state_payload()
        path = self.out / (name or f"step{self.step:07d}.ckpt")
        if self.rank == 0: save_checkpoint(path, payload)
        self.g["world"].barrier()
        return path

    def _resume_path(self):
        if self.tc.resume != "auto": return Path(self.tc.resume)
        found = sorted(self.out.glob("step*.ckpt"))
        if not found: raise CheckpointError(f"--resume auto: no step*.ckpt in {self.out}")
        return found[-1]

    def load(self, path):
        "Resume from a full-model checkpoint written by any layout (weights and Adam moments resharded)."
        ck = agree(self.g["world"], load_checkpoint, path)
        missing = {"format", "config", "params", "adam", "scheduler", "step", "lrs"} - set(ck if isinstance(ck, dict) else ())
        if missing:
            raise CheckpointError(f"{path}: not a jigsaw_ref training checkpoint (missing {sorted(missing)})")
        if ck.get("format") != "jigsaw_ref/1":
            raise CheckpointError(f"{path}: format {ck.get('format')!r} is not 'jigsaw_ref/1'")
        theirs = MixerConfig(**ck["config"])
        if theirs != self.cfg:
            diff = {f: (getattr(theirs, f), getattr(self.cfg, f)) for f in asdict(self.cfg) if getattr(theirs, f) != getattr(self.cfg, f)}
            raise CheckpointError(f"{path}: written for another model ({{field: (checkpoint, this run)}} {diff}); "
                                  f"use the same --model and --set options")
        m = self.model
        scatter_state(m, ck["params"])
        for n, t in m.state().items():
            from jigsaw_ref.parallel import take
            self.opt.state[t] = {"step": torch.tensor(ck["adam"]["step"]),
                                 "exp_avg": take(ck["adam"]["exp_avg"][n], m.spec[n][0]).to(t),
                                 "exp_avg_sq": take(ck["adam"]["exp_avg_sq"][n], m.spec[n][0]).to(t)}
        self.sched.load_state_dict(ck["scheduler"])
        for g, lr in zip(self.opt.param_groups, ck["lrs"]): g["lr"] = lr
        self.step, self.history = ck["step"], list(ck.get("history", []))

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        "Train until `epochs`, `max_steps` or `max_minutes`; validate each epoch; checkpoint; return the history."
        tc, cfg, world = self.tc, self.cfg, self.g["world"]
        if self.rank == 0: self.out.mkdir(parents=True, exist_ok=True)
        bar = None
        if self.rank == 0 and tc.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        t_start, flops = time.perf_counter(), None
        from jigsaw_ref.mixer import train_step_flops
        while self.step < self.total_steps:
            epoch, s = divmod(self.step, self.steps_per_epoch)
            order = epoch_order(len(self.train_ds), tc.seed, epoch)
            g0 = s * self.global_batch + self.d * tc.batch
            idx = order[g0: g0 + tc.batch]
            k = rollout_k(*cfg.rollout, tc.rollout, tc.seed, self.step)
            t0 = time.perf_counter()
            rec = self.train_step(idx, k)
            dt = time.perf_counter() - t0
            rec |= dict(epoch=epoch, lr=self.sched.get_last_lr()[0], step_time=dt, samples_per_s=self.global_batch / dt,
                        gflops=train_step_flops(cfg, self.global_batch, k) / dt / 1e9)
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            elapsed = (time.perf_counter() - t_start) / 60
            stop = bool(world.all_reduce(torch.tensor([float(tc.max_minutes and elapsed > tc.max_minutes)]))[0] > 0)
            if end_of_epoch or stop: rec |= self.validate()
            self.history.append(rec)
            if bar is not None:
                bar.update(1); bar.set_postfix(loss=f"{rec['loss']:.4f}", k=k, s_per_step=f"{dt:.2f}", samples_s=f"{rec['samples_per_s']:.1f}")
            if self.rank == 0: self._write_metrics()
            if tc.ckpt_every and self.step % tc.ckpt_every == 0: self.save()
            if stop: break
        if bar is not None: bar.close()
        self.save("final.ckpt")
        return self.history

    def _write_metrics(self):
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in self.history]
        (self.out / "metrics.csv").write_text("\n".join(lines) + "\n")
        last_val = next((r for r in reversed(self.history) if "val_loss" in r), {})
        summary = {"steps": self.step, "layout": dict(zip(("dp", "domain", "tensor"), dataclasses.astuple(self.grid))),
                   "mode": self.tc.mode, "final": self.history[-1], "last_validation": last_val, "train": asdict(self.tc)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

# %% [markdown]
# The methods a user of the Python API calls:

# %%
show_doc(Trainer.fit)

# %%
show_doc(Trainer.train_step)

# %%
show_doc(Trainer.validate)

# %%
show_doc(Trainer.save)

# %%
show_doc(Trainer.load)

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


def parse_args(argv=None) -> TrainConfig:
    "A `TrainConfig` from a config file (`--config`, TOML or JSON) and command-line flags (flags win)."
    ap = argparse.ArgumentParser("jigsaw-train", description="Train WeatherMixer with Jigsaw parallelism (launch with mpiexec/srun/torchrun).")
    ap.add_argument("--config", help="TOML or JSON file with any of the settings below")
    ap.add_argument("--set", dest="model_overrides", action="append", metavar="FIELD=VALUE",
                    help="override a model config field, e.g. --set hidden=128 (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides": continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool): ap.add_argument(flag, type=_bool, default=None, metavar="BOOL")
        else: ap.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None)
    a = ap.parse_args(argv)
    kw = {}
    if a.config:
        p = Path(a.config)
        if not p.is_file(): ap.error(f"--config {p}: no such file")
        try: kw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e: ap.error(f"--config {p}: cannot parse: {e}")
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(kw) - names
        if unknown: ap.error(f"--config {p}: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        if "model_overrides" in kw: kw["model_overrides"] = tuple(kw["model_overrides"])
    for f in dataclasses.fields(TrainConfig):
        v = getattr(a, f.name)
        if v is not None: kw[f.name] = tuple(v) if f.name == "model_overrides" else v
    try: return TrainConfig(**kw)
    except TypeError as e: ap.error(str(e))

# %%
test_eq(parse_args(["--model", "tiny", "--way", "4", "--set", "hidden=16", "--lr", "3e-4"]).lr, 3e-4)

# %%
#| export
def _mpi_env():
    "Settings that must precede MPI initialisation: yield instead of spinning when ranks share cores."
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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
# `jigsaw-demo` is the README's main job: 4-way Jigsaw training of the `small` preset on the embedded default
# data for a few minutes on 4 MPI ranks, then the evaluation against persistence and climatology.

# %%
#| export
def demo(argv=None):
    "Entry point of `jigsaw-demo`: `mpiexec -n 4 jigsaw-train --way 4` on the default data, then `jigsaw-eval`."
    import subprocess
    ap = argparse.ArgumentParser("jigsaw-demo", description=demo.__doc__)
    ap.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--way", default="4")
    ap.add_argument("--model", default="demo")
    a = ap.parse_args(argv)
    mpiexec = Path(sys.executable).with_name("mpiexec")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    train = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(a.ranks), sys.executable, "-m", "jigsaw_ref.train",
             "--model", a.model, "--way", a.way, "--epochs", "50", "--max-minutes", str(a.minutes), "--lr", "1e-3",
             "--lr-encdec", "1e-3", "--warmup-steps", "50", "--batch", "1", "--out", a.out]
    print("$", " ".join(train), flush=True)
    subprocess.run(train, env=env, check=True)
    try:
        from jigsaw_ref.evaluate import main as evaluate
    except ImportError:
        return 0
    return evaluate([str(Path(a.out) / "final.ckpt"), "--out", str(Path(a.out) / "eval")])

# %%
#| export
#| eval: false
if __name__ == "__main__":  # `python -m jigsaw_ref.train`, as the demo launches it
    sys.exit(main())
