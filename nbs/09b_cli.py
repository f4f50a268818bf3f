# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations
import argparse, ast, dataclasses, importlib.util, json, os, re, sys, time, tomllib
from pathlib import Path
import torch
from jigsaw_ref.config import ConfigError
from jigsaw_ref.comm import launcher
from jigsaw_ref.data import DataError
from jigsaw_ref.checkpoint import CheckpointError
from jigsaw_ref.settings import TrainConfig, _override, settings_from
from jigsaw_ref.runfolder import RunFolderError, Stopper
from jigsaw_ref.train import NonFiniteError, Trainer

# %%
#| hide
import tempfile
from fastcore.test import test_eq, test_fail, test_close
from nbdev.showdoc import show_doc
torch.set_num_threads(1)
work = Path(tempfile.mkdtemp(prefix="jigsaw-cli-"))


# %% [markdown]
# # The command line
#
# > `jigsaw-train` and `jigsaw-demo`: settings from flags and config files, the launcher, exit statuses.

# %%
#| export
def _bool(v: str) -> bool:
    "A flag's boolean: only `true` or `false` (any case), as in TOML and JSON."
    if v.lower() == "true": return True
    if v.lower() == "false": return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


# %%
#| export
def field_help(cls, module: str = "jigsaw_ref.settings") -> dict[str, str]:
    "The trailing comment of each field of dataclass `cls`, read from the source of `module` (its flag's help line)."
    # read from the module's file: a class has no source of its own in a notebook kernel, and fastcore's `docments`
    # loses the comments when the module runs as `python -m jigsaw_ref.cli`
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
        if f.type in ("bool", bool): ap.add_argument(flag, type=_bool, nargs="?", const=True, default=None, metavar="BOOL", help=h)
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
    file = _read_config(ap, a.config) if a.config else {}
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "model_overrides" and getattr(a, f.name) is not None}
    try:
        tc = settings_from((f"config file {a.config}", file), ("the command line", flags),
                           ("--set", {"model_overrides": tuple(a.model_overrides or ())}))
        for item in tc.model_overrides: _override(item)  # every --set typed like its model field (values: at start-up)
    except ConfigError as e: ap.error(str(e))
    return tc


# %%
test_eq(parse_args(["--model", "tiny", "--way", "4", "--set", "hidden=16", "--lr", "3e-4"]).lr, 3e-4)
(work / "run.toml").write_text('model = "tiny"\nmodel_overrides = ["hidden=64", "f_s=0.25"]\n')
test_eq(parse_args(["--config", str(work / "run.toml"), "--set", "hidden=48"]).model_overrides, ("hidden=64", "f_s=0.25", "hidden=48"))
test_eq(parse_args(["--config", str(work / "run.toml"), "--set", "hidden=48"]).model_config().hidden, 48)
test_eq((parse_args(["--overwrite", "--progress", "false"]).overwrite, parse_args(["--progress", "false"]).progress), (True, False))
assert all(a.help for a in arg_parser()._actions)


# %%
#| export
def _mpi_env():
    "Settings that must precede MPI initialisation: yield instead of spinning when ranks share cores."
    os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# %%
#| export
KNOWN_ERRORS = (ConfigError, DataError, CheckpointError, RunFolderError, NonFiniteError)  # their message says it all: no traceback


def install_abort_hook(world_comm=None):
    "On an uncaught exception: print it with the rank (one line for a known error), then abort every rank of the job."
    prev = sys.excepthook

    def hook(tp, val, tb):
        rank = world_comm.Get_rank() if world_comm is not None else 0
        sys.stderr.write(f"\n[jigsaw_ref rank {rank}] {tp.__name__}: {val}\n")
        if not issubclass(tp, KNOWN_ERRORS) or os.environ.get("JIGSAW_TRACEBACK"): prev(tp, val, tb)
        sys.stderr.flush(); sys.stdout.flush()
        if world_comm is not None and world_comm.Get_size() > 1:
            time.sleep(1.0)  # let other ranks failing the same way print theirs before the job is torn down
            world_comm.Abort(1)
        else:  # torchrun / srun without MPI: exit at once; the launcher ends the other ranks of the job
            os._exit(1)
    sys.excepthook = hook


# %% [markdown]
# The exit status of `jigsaw-train`, for schedulers and scripts:
#
# | status | meaning |
# |---|---|
# | 0 | the run reached its bound (`final.ckpt` written), or stopped at a signal with a checkpoint (default) |
# | `--requeue-exit-code N` | stopped at a signal of `--stop-signals`, checkpoint and metrics written: requeue and `--resume auto` |
# | 1 | an error, printed with its rank (one line for settings, data, checkpoint, run-folder and non-finite errors; `JIGSAW_TRACEBACK=1` adds the traceback) |
# | 2 | a usage error (a flag, a config file) |
# | 124 | the watchdog: a rank made no progress for `--step-timeout` s (the other ranks are ended by the launcher) |
# | 128 + n | a second signal n aborted the run at once (under `mpiexec`: the launcher's status for a killed rank) |

# %%
#| export
def main(argv=None):
    "Entry point of `jigsaw-train` (exit status: see the table above)."
    _mpi_env()
    tc = parse_args(argv)
    try: stopper = Stopper(tc.stop_signals)
    except ConfigError as e: arg_parser().error(str(e))
    stopper.install()  # at once: a signal during the set-up stops the run at its first step boundary
    torch.set_num_threads(int(os.environ.get("JIGSAW_THREADS", "1")))
    comm = None
    if tc.backend == "mpi" or launcher() == "mpiexec":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    install_abort_hook(comm)
    t = Trainer(tc, comm=comm, stopper=stopper)
    stopper.rank = t.rank
    if t.rank == 0:
        print(f"jigsaw-train: {launcher()} world={t.grid.world} layout dp={t.grid.dp} x domain={t.grid.domain} x "
              f"tensor={t.grid.tensor} mode={tc.mode} model={tc.model} ({t.grid.dp} group(s) of "
              f"{t.grid.group_size}) steps={t.total_steps} data={t.path} run={t.run_id}", flush=True)
    hist = t.fit()
    if t.stopped: return tc.requeue_exit_code
    if t.rank == 0:
        last = next((r for r in reversed(hist) if "val_loss" in r), hist[-1] if hist else {})
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}), flush=True)
        print(f"checkpoint: {t.out / 'final.ckpt'}", flush=True)
    return 0


# %% [markdown]
# ## The demo
#
# `jigsaw-demo` is the README's main job: 4-way Jigsaw training of the `demo` preset on the embedded default
# data on 4 MPI ranks for a fixed number of steps from a fixed seed, then the evaluation against persistence
# and climatology (a rerun replaces the previous demo run in `--out`). Bounded by steps (not minutes), it gives the same scorecard on any machine (bit-identical on
# CPU), only sooner or later. With `DEMO_STEPS` the scorecard beats persistence in most cells through 24 h (39 of
# the 57 cells of the 6, 12 and 24 h leads, measured); on this project's quiet 2-core machine (AMD EPYC) its training took
# 4.1 and 3.9 minutes in two runs (0.14-0.41 s per 4-way step), the whole demo 4.5 minutes with the default data
# already generated and 8 minutes from a fresh clone (`benchmarks/results/demo_runs.txt`).

# %%
#| export
DEMO_STEPS = 950  # 4-way demo steps: about 4 minutes of training measured on a quiet 2-core machine


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
    train = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(a.ranks), sys.executable, "-m", "jigsaw_ref.cli",
             "--model", a.model, "--way", a.way, "--epochs", "50", "--max-steps", str(a.steps), "--seed", str(a.seed),
             "--max-minutes", str(a.max_minutes), "--lr", "1e-3", "--lr-encdec", "1e-3", "--warmup-steps", "50",
             "--batch", "1", "--out", a.out, "--overwrite"]  # the demo is one fixed recipe: a rerun replaces the last
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
if __name__ == "__main__":  # `python -m jigsaw_ref.cli` (and `python -m jigsaw_ref.train`), as the demo launches it
    sys.exit(main())
