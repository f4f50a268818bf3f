# %%
#| default_exp settings

# %%
#| export
from __future__ import annotations
import dataclasses, json, math, os, signal
from dataclasses import dataclass
import torch
from fastcore.basics import patch
from pydantic import ConfigDict, TypeAdapter, ValidationError
from jigsaw_ref.config import ConfigError, MixerConfig, preset
from jigsaw_ref.grid import Grid
from jigsaw_ref.comm import Group

# %%
#| hide
import tempfile
from pathlib import Path
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc
torch.set_num_threads(1)
work = Path(tempfile.mkdtemp(prefix="jigsaw-settings-"))


# %% [markdown]
# # Settings of a run
#
# > `TrainConfig`: every setting of a training run, typed and checked (flags, config files and `--set` alike), and the checks that run before any collective.

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
    schedule: str = "overlap"  # the MLPs' exchanges: 'overlap' (overlapped with the matmuls), 'plain' or 'summa' (square groups)
    recompute: bool = False  # recompute each mixer block in the backward pass instead of keeping its activations
    comm_dtype: str = "same"  # activations on the wire: 'same' (the parameter dtype), 'float32' or 'bfloat16' (gradients stay exact)
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
    lat_weights: str = "cos"  # 'cos' (released code) or 'area' (WeatherBench2; the store's own weights or cell bounds when it has them)
    seed: int = 0  # seeds the initial weights, the sample order, the rollout draws and the dropout masks
    out: str = "runs/latest"  # run folder: metrics.csv, summary.json, checkpoints, run.lock (one run per folder)
    overwrite: bool = False  # a new run may delete the checkpoints and metrics another run left in `out`
    ckpt_every: int = 0  # steps between checkpoints (0: only at the end, and at a stop signal)
    keep_last: int = 0  # step checkpoints kept: the newest K (0: all); final.ckpt is always kept
    resume: str = ""  # a checkpoint (store folder or single file), or 'auto' (the newest one in `out` that verifies; none: start fresh)
    reschedule: bool = False  # on resume, accept changed schedule settings (steps, epochs, lr, warm-up, global batch, ...) and re-derive the schedule at the checkpoint's step
    stop_signals: str = "TERM,INT,USR1"  # signals that stop the run at the next step boundary with a checkpoint ('': none); a second one aborts at once
    requeue_exit_code: int = 0  # exit status after a signal stop (0, or the code your scheduler requeues on)
    step_timeout: float = 600.0  # seconds a rank may make no progress before the watchdog ends the job, naming whom it waited on (0: off)
    device: str = "cpu"  # 'cpu' or 'cuda' (this process's GPU from the launcher's local rank)
    precision: str = "fp32"  # 'fp32', 'tf32' (CUDA) or 'bf16' (CUDA autocast)
    dtype: str = "float32"  # parameter dtype ('float64' for exactness checks)
    val_batches: int = 8  # validation samples per epoch (0: all)
    data_check: str = "finite"  # value check of every sample read: 'finite' (NaN, inf, |x| > 1e30) or 'range' (also physical ranges)
    bad_samples: str = "stop"  # a sample that fails its check: 'stop' the run, or 'skip' its step (bounded by max_bad_samples)
    max_bad_samples: int = 10  # with bad_samples='skip': stop once more than this many samples were bad
    nonfinite: str = "stop"  # on a non-finite loss or gradient: 'stop' (keep the last good checkpoint) or 'skip' the step
    max_skip_fraction: float = 0.1  # with nonfinite='skip': stop once more than this fraction of the run's steps was skipped
    progress: bool = True  # progress bars (rank 0) for training and for the checkpoint writes of large models
    memory_check: bool = True  # before building anything, refuse a run whose planned peak per rank (jigsaw-plan) exceeds the memory the rank has
    metrics_every: float = 10.0  # seconds between rewrites of metrics.csv and summary.json (0: every step); always at validations, checkpoints and the end


# %% [markdown]
# ### Every value typed, from every source
#
# A setting arrives from a flag (`--max-steps 3`), a config file (`max_steps = 3` in TOML, or JSON) or, for the
# model, `--set hidden=128`; or from Python (`TrainConfig(max_steps=3)`). Whatever the route, a value is taken only
# if it already has the field's type: no coercion, so `overwrite = "false"` (a non-empty string, true to Python) or
# `max_steps = 2.5` or `--set hidden=true` is a one-line `ConfigError` naming the setting, the value, the type it
# needs and where it came from, never a silent conversion or a traceback. The type check is pydantic's strict mode
# (`TypeAdapter(type, config=ConfigDict(strict=True))`), a well-kept validator, rather than hand-written `isinstance`
# rules: it refuses `True` for an int and `"3"` for a float, and accepts an int where a float is asked (3 for 3.0).
# Ranges and choices (`lr > 0`, `mode` in exact/faithful) are checked after the types, below.

# %%
#| export
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple}
_ADAPTERS: dict = {}


def typed(name: str,  # the setting, for the message
          value,  # the value as given
          kind: str,  # its field's type: 'str', 'int', 'float', 'bool' or 'tuple'
          origin: str = "TrainConfig"):  # where it came from: 'flag --x', 'config file F', '--set', ...
    "`value` if it has the type `kind` (ints count as floats; a list as a tuple); else a `ConfigError` naming all four."
    t = _TYPES.get(kind, object)
    if t is tuple and isinstance(value, list): value = tuple(value)
    if t not in _ADAPTERS: _ADAPTERS[t] = TypeAdapter(t, config=ConfigDict(strict=True))
    try: return _ADAPTERS[t].validate_python(value)
    except ValidationError:
        hint = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string", "tuple": "a list"}[kind]
        raise ConfigError(f"{name} = {value!r} (from {origin}): expected {kind} ({hint}), got {type(value).__name__}") from None


def _kind(cls, name: str) -> str:
    "The type name of field `name` of dataclass `cls` ('int', 'float', ...)."
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.type if isinstance(f.type, str) else f.type.__name__


# %%
typed("lr", 3, "float"); typed("model_overrides", ["hidden=8"], "tuple")
test_fail(lambda: typed("overwrite", "false", "bool", "config file run.toml"), contains="overwrite = 'false' (from config file run.toml): expected bool (true or false), got str")
test_fail(lambda: typed("max_steps", 2.5, "int", "config file run.toml"), contains="expected int (a whole number), got float")
test_fail(lambda: typed("hidden", True, "int", "--set"), contains="hidden = True (from --set): expected int")


# %%
#| export
def _override(item: str) -> tuple[str, object]:
    "`(field, value)` of one `FIELD=VALUE` override of `base`, parsed as JSON where it can be, of the field's type exactly."
    if "=" not in item: raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set hidden=128")
    k, v = item.split("=", 1)
    fields = {f.name for f in dataclasses.fields(MixerConfig)}
    if k not in fields: raise ConfigError(f"--set {k}=...: MixerConfig has no field {k!r}; fields: {sorted(fields)}")
    kind = _kind(MixerConfig, k)
    if kind == "str": return k, v  # a string is taken as written
    try: val = json.loads(v)
    except json.JSONDecodeError: val = v
    if kind == "tuple" and isinstance(val, str): val = tuple(x.strip() for x in val.split(","))
    if kind == "tuple" and isinstance(val, dict): val = tuple(f"{a}={b}" for a, b in val.items())
    return k, typed(k, val, kind, f"--set {item}")


# %%
#| export
@patch
def model_config(self: TrainConfig) -> MixerConfig:
    "The preset with its overrides applied (later overrides of a field win)."
    base = preset(self.model)
    kw = dict(_override(item) for item in self.model_overrides)
    return base.replace(**kw) if kw else base


# %%
test_eq(TrainConfig(model="tiny", model_overrides=("hidden=16", "hidden=24")).model_config().hidden, 24)
test_fail(lambda: TrainConfig(model_overrides=("widht=3",)).model_config(), contains="no field 'widht'")
test_fail(lambda: TrainConfig(model="tiny", model_overrides=("hidden=true",)).model_config(), contains="hidden = True (from --set hidden=true): expected int")
test_eq(TrainConfig(model="tiny", model_overrides=("f_s=1",)).model_config().f_s, 1)


# %%
#| export
def check_types(tc: TrainConfig, origin: str = "TrainConfig"):
    "A `ConfigError` for the first field of `tc` whose value does not have the field's type (no coercion)."
    for f in dataclasses.fields(TrainConfig): typed(f.name, getattr(tc, f.name), _kind(TrainConfig, f.name), origin)


def settings_from(*sources: tuple[str, dict]) -> TrainConfig:
    "A `TrainConfig` from `(origin, {setting: value})` sources in order (later wins; `model_overrides` add up), every value typed."
    kw, over = {}, ()
    for origin, d in sources:
        for k, v in d.items():
            if k not in {f.name for f in dataclasses.fields(TrainConfig)}:
                raise ConfigError(f"{k} (from {origin}): no such setting; see `jigsaw-train --help`")
            v = typed(k, v, _kind(TrainConfig, k), origin)
            if k == "model_overrides": over += tuple(typed(k + " item", x, "str", origin) for x in v)
            else: kw[k] = v
    return TrainConfig(**kw, model_overrides=over)


# %%
test_eq(settings_from(("config file a.toml", {"max_steps": 3, "lr": 1, "model_overrides": ["hidden=8"]}),
                      ("flag", {"max_steps": 4, "model_overrides": ("blocks=1",)})),
        TrainConfig(max_steps=4, lr=1, model_overrides=("hidden=8", "blocks=1")))
test_fail(lambda: settings_from(("config file a.toml", {"lr": "3e-4"})), contains="lr = '3e-4' (from config file a.toml): expected float")
test_fail(lambda: check_types(TrainConfig(reschedule="no")), contains="reschedule = 'no' (from TrainConfig): expected bool")


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
    if tc.schedule == "summa" and p != q:
        raise ConfigError(f"schedule='summa' needs a square model group, not {p}x{q}: use --way 4 (2x2) or --schedule overlap")
    return grid


# %%
#| export
def parse_signals(spec: str) -> list[signal.Signals]:
    "The signals named in `spec` ('TERM,INT,USR1', 'SIGTERM', '' for none); a `ConfigError` for one that cannot be caught."
    out = []
    for name in (s.strip().upper() for s in spec.split(",") if s.strip()):
        sig = getattr(signal.Signals, name if name.startswith("SIG") else "SIG" + name, None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"stop_signals={spec!r}: {name!r} is not a signal a process can catch; use e.g. TERM,INT,USR1")
        out.append(sig)
    return out


# %%
#| export
def _check_values(tc: TrainConfig):
    "A `ConfigError` for the first field of `tc` whose value is not allowed."
    fin = math.isfinite
    parse_signals(tc.stop_signals)
    for f, ok in (("mode", tc.mode in ("exact", "faithful")), ("algo", tc.algo in ("p2p", "coll")),
                  ("backend", tc.backend in ("mpi", "torch")), ("rollout", tc.rollout in ("random", "cyclic")),
                  ("schedule", tc.schedule in ("overlap", "plain", "summa")), ("comm_dtype", tc.comm_dtype in ("same", "float32", "bfloat16")),
                  ("lat_weights", tc.lat_weights in ("cos", "area")), ("device", tc.device in ("cpu", "cuda")),
                  ("precision", tc.precision in ("fp32", "tf32", "bf16")), ("dtype", tc.dtype in ("float32", "float64")),
                  ("nonfinite", tc.nonfinite in ("stop", "skip")), ("batch", tc.batch >= 1), ("epochs", tc.epochs >= 1),
                  ("clip", fin(tc.clip) and tc.clip >= 0), ("max_steps", tc.max_steps >= 0),
                  ("lr", fin(tc.lr) and tc.lr > 0), ("lr_encdec", fin(tc.lr_encdec) and tc.lr_encdec > 0),
                  ("weight_decay", fin(tc.weight_decay) and tc.weight_decay >= 0),
                  ("warmup_steps", tc.warmup_steps >= -1), ("ckpt_every", tc.ckpt_every >= 0), ("keep_last", tc.keep_last >= 0),
                  ("val_batches", tc.val_batches >= 0), ("max_minutes", fin(tc.max_minutes) and tc.max_minutes >= 0),
                  ("requeue_exit_code", 0 <= tc.requeue_exit_code <= 255), ("step_timeout", fin(tc.step_timeout) and tc.step_timeout >= 0),
                  ("data_check", tc.data_check in ("finite", "range")), ("bad_samples", tc.bad_samples in ("stop", "skip")),
                  ("max_bad_samples", tc.max_bad_samples >= 0), ("max_skip_fraction", fin(tc.max_skip_fraction) and 0 <= tc.max_skip_fraction <= 1)):
        if not ok: raise ConfigError(f"{f}={getattr(tc, f)!r} is not valid; see `jigsaw-train --help`")


# %%
#| export
def check_settings(tc: TrainConfig, world: int) -> tuple[MixerConfig, Grid]:
    "The model config and grid of `tc` on `world` ranks, or a `ConfigError` naming the problem."
    check_types(tc)
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
test_fail(lambda: check_settings(TrainConfig(model="tiny", way="2x1", schedule="summa"), 2), contains="needs a square model group")
test_fail(lambda: check_settings(TrainConfig(model="tiny", stop_signals="TERM,KILL"), 1), contains="'KILL' is not a signal a process can catch")
test_eq(parse_signals("TERM, sigusr1"), [signal.SIGTERM, signal.SIGUSR1])


# %% [markdown]
# ### The launcher and the world must agree
#
# A launcher that starts $n$ processes which MPI does not connect gives $n$ worlds of one rank each. Each then
# trains alone, all of them into the same `--out`, and every one exits 0. Two launches do this: `torchrun`
# without `--backend torch` (torchrun sets `WORLD_SIZE`, MPI knows nothing of it), and `srun` without a PMI
# the MPI library speaks (`srun --mpi=none` with the PyPI MPICH wheel; see the GPU-cluster tutorial).
# `check_launch` compares the launcher's count with the MPI world on every rank, before any collective.

# %%
#| export
def check_launch(world: int, backend: str, env=None):
    "A `ConfigError` when the launcher started more processes than the MPI `world` holds (each would train alone)."
    env = os.environ if env is None else env
    n = int(env.get("WORLD_SIZE", "0") or 0)  # torchrun
    if backend == "mpi" and n > world:
        raise ConfigError(f"torchrun started {n} processes (WORLD_SIZE={n}) but MPI sees a world of {world}: each would "
                          f"train alone into the same --out; add --backend torch under torchrun, or launch with mpiexec/srun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of srun
        n = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 0)
        if n > world and not env.get("WORLD_SIZE"):
            raise ConfigError(f"srun started {n} tasks but MPI sees a world of {world}: MPI found no PMI to connect them; "
                              f"add --mpi=pmi2 (mpich wheel) or --mpi=pmix (an MPI built with PMIx) to srun")


# %%
test_fail(lambda: check_launch(1, "mpi", {"WORLD_SIZE": "4"}), contains="add --backend torch under torchrun")
test_fail(lambda: check_launch(1, "mpi", {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}),
          contains="add --mpi=pmi2 (mpich wheel) or --mpi=pmix")
check_launch(4, "mpi", {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"})  # mpiexec inside an allocation: fine
check_launch(4, "torch", {"WORLD_SIZE": "4"})

# %%
#| hide
import shutil; shutil.rmtree(work, ignore_errors=True)
