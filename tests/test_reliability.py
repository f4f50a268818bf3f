"""Reliability: a fault on any rank ends the whole job quickly with the rank and the error in stderr, no checkpoint
is ever lost or left half-written (a writer killed mid-save, a full disk), non-finite losses stop (or skip) cleanly,
and every bad input is refused with a message that names the problem, on every rank, without a hang.

Faults are injected with `JIGSAW_FAULT` (see `checkpoint.fault_point`); every launch runs under a subprocess timeout,
which is the hang detector. Steps are counted as the trainer counts them: `fault@R:S` fires in the step that starts
from the state of checkpoint `stepS` (which therefore exists), and `checkpoint@R:S` while rank R writes its share of
`stepS`.

The last section is what a cluster does to a run (issue 17): a stop signal on one rank (SIGTERM, SIGINT, SIGUSR1) and
the requeue that continues it bit for bit, a second signal, `--resume auto` (fresh start, fall-back past damaged
checkpoints, a time limit's final.ckpt), retention, a stalled rank (SIGSTOP) on both backends, two jobs on one folder,
a launcher that MPI does not connect, bad samples skipped or stopping, and the bounds on skipped steps."""
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from jigsaw_ref.comm import Group
from jigsaw_ref.config import ConfigError, preset
from jigsaw_ref.data import DataError, Era5Dataset
from jigsaw_ref.generator import default_dataset
from jigsaw_ref.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.train import Trainer, TrainConfig
from jigsaw_ref.settings import check_launch, check_settings
from jigsaw_ref.runfolder import RunFolderError, read_lock
from jigsaw_ref.cli import parse_args
from test_mpi import ROOT, mpiexec

ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # noqa: E731
TINY = ["--model", "tiny", "--progress", "false", "--val-batches", "1"]
FAULT_TO_EXIT_S = 30  # a fault must end the whole job within this many seconds
HANG_S = 150  # a launch that takes longer than this is a hang (start-up of 4 ranks on 2 shared cores included)


# ---------------------------------------------------------------------------------------------------- helpers

@dataclass
class Run:
    rc: int
    out: str
    err: str
    wall: float  # seconds from launch to exit
    t_exit: float  # time.time() at exit
    t_first_error: float | None  # time.time() when the first `[jigsaw_ref rank R]` line reached us
    pgid: int = 0  # the launch's process group

    @property
    def text(self): return self.out + self.err


def start(n, args, fault=None, env=None) -> tuple[subprocess.Popen, list]:
    "Start `python -m jigsaw_ref.cli ARGS` on `n` ranks (no mpiexec for 1) in its own process group; (process, command)."
    cmd = ([mpiexec(), "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", "jigsaw_ref.cli", *map(str, args)]
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("JIGSAW_FAULT", None)
    if fault: env["JIGSAW_FAULT"] = fault
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # own process group: a hang is killed whole
    return p, cmd


def launch(n, args, fault=None, timeout=HANG_S, env=None) -> Run:
    "Run `python -m jigsaw_ref.cli ARGS` on `n` ranks (no mpiexec for 1); fail the test if it hangs."
    t0 = time.monotonic()
    p, cmd = start(n, args, fault, env)
    got, first = {"out": [], "err": []}, []

    def pump(stream, key):
        for line in stream:
            if "[jigsaw_ref rank" in line and not first: first.append(time.time())
            got[key].append(line)
    th = [threading.Thread(target=pump, args=(p.stdout, "out"), daemon=True),
          threading.Thread(target=pump, args=(p.stderr, "err"), daemon=True)]
    for t in th: t.start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
        for t in th: t.join(5)
        pytest.fail(f"HANG: {' '.join(cmd[-12:])} (JIGSAW_FAULT={fault}) still running after {timeout} s\n"
                    f"{''.join(got['err'])[-3000:]}")
    t_exit, wall = time.time(), time.monotonic() - t0
    for t in th: t.join(10)
    return Run(rc, "".join(got["out"]), "".join(got["err"]), wall, t_exit, first[0] if first else None, p.pid)


def temp_files(out: Path):
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) if out.exists() else []


def checkpoints(out: Path) -> dict[str, dict]:
    "Every `*.ckpt` in `out`, loaded and verified (a partial or corrupted one raises)."
    return {p.name: load_checkpoint(p) for p in sorted(out.glob("*.ckpt"))}


def digest(path: Path) -> dict[str, bytes]:
    "Every file of a checkpoint (store folder or single file), by relative path."
    if path.is_file(): return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_ranks(err: str, kind: str, text: str) -> set[int]:
    """Ranks that printed `[jigsaw_ref rank R] KIND: TEXT...`. An error raised on every rank at once (settings, data,
    checkpoint: `train.agree`) is printed by each rank that gets there before the first `MPI_Abort` ends the job,
    so at least one, not necessarily all (see the report: a short grace period in the abort hook would make it all)."""
    return {int(r) for r in re.findall(rf"\[jigsaw_ref rank (\d+)\] {kind}: {re.escape(text)}", err)}


def step_names(steps):
    return [f"step{s:07d}.ckpt" for s in steps]


# ------------------------------------------------------------------------------------ a fault on one rank

FAULTS = [  # (ranks, way, JIGSAW_FAULT): one non-zero rank for compute/data faults; any writer for checkpoints
    (2, "2", "forward@1:2"), (2, "2", "backward@1:1"), (2, "2", "data@1:0"), (2, "2", "checkpoint@0:2"),
    (4, "4", "forward@3:1"), (4, "4", "backward@2:2"), pytest.param(4, "4", "data@1:1", marks=pytest.mark.slow),  # as 2-way's
    (4, "4", "checkpoint@2:2"),
]


@pytest.mark.parametrize("n,way,fault", FAULTS, ids=[f"{n}way-{f}" for n, _, f in (p.values if hasattr(p, "values") else p for p in FAULTS)])
def test_a_fault_on_one_rank_ends_the_job_quickly_and_loses_no_checkpoint(tmp_path, n, way, fault):
    what, at = fault.split("@")
    rank, step = map(int, at.split(":"))
    r = launch(n, [*TINY, "--way", way, "--max-steps", 4, "--ckpt-every", 1, "--out", tmp_path], fault=fault)
    assert r.rc != 0, r.text[-2000:]
    assert f"[jigsaw_ref rank {rank}] RuntimeError: injected fault at {what} on rank {rank}, step {step}" in r.err, r.text[-3000:]
    assert r.t_first_error is not None and r.t_exit - r.t_first_error < FAULT_TO_EXIT_S, \
        f"the job took {r.t_exit - r.t_first_error:.1f} s to end after the fault"
    # no checkpoint lost, none partial: exactly the steps completed before the fault, each verifies
    done = range(1, step) if what == "checkpoint" else range(1, step + 1)
    ck = checkpoints(tmp_path)
    assert sorted(ck) == step_names(done), sorted(ck)
    assert all(ck[name]["step"] == s for name, s in zip(step_names(done), done))
    assert temp_files(tmp_path) == []  # a failed store write removes its temporary folder


def _raise_in_checkpoint_write(monkeypatch, tmp_path):
    monkeypatch.setenv("JIGSAW_FAULT", "checkpoint@0:7")
    save_checkpoint(tmp_path / "step0000006.ckpt", {"step": 6, "x": torch.ones(3)})  # not the faulty step: written
    with pytest.raises(RuntimeError, match="injected fault at checkpoint"):
        save_checkpoint(tmp_path / "step0000007.ckpt", {"step": 7, "x": torch.ones(1000)})


def test_failed_checkpoint_write_keeps_the_previous_one(monkeypatch, tmp_path):
    _raise_in_checkpoint_write(monkeypatch, tmp_path)
    assert sorted(checkpoints(tmp_path)) == ["step0000006.ckpt"]


def test_failed_checkpoint_write_removes_its_temp_file(monkeypatch, tmp_path):
    _raise_in_checkpoint_write(monkeypatch, tmp_path)
    assert temp_files(tmp_path) == []


# ------------------------------------------------------------------------------ SIGKILL mid-write, resume

@pytest.mark.parametrize("n,killed", [(2, 0), pytest.param(2, 1, marks=pytest.mark.slow), (4, 3)],
                         ids=["2way-writer0", "2way-writer1", "4way-writer3"])  # writer 1: the same path as writer 0
def test_sigkill_during_a_checkpoint_write_keeps_the_last_good_one_and_resume_auto_uses_it(tmp_path, n, killed):
    r = launch(n, [*TINY, "--way", n, "--max-steps", 4, "--ckpt-every", 1, "--out", tmp_path], fault=f"kill-checkpoint@{killed}:2")
    assert r.rc != 0 and "Killed (signal 9)" in r.text, r.text[-3000:]
    tmp = temp_files(tmp_path)
    assert len(tmp) <= 1, tmp
    if tmp:  # the half-written store: the job ended soon after its last write, and it is no checkpoint
        assert r.t_exit - max(p.stat().st_mtime for p in (tmp_path / tmp[0]).rglob("*")) < FAULT_TO_EXIT_S
        assert not tmp[0].endswith(".ckpt") and not (tmp_path / tmp[0] / "manifest.json").exists()
        with pytest.raises(CheckpointError, match="not a committed checkpoint"):
            load_checkpoint(tmp_path / tmp[0])
    ck = checkpoints(tmp_path)
    assert sorted(ck) == step_names([1]) and ck["step0000001.ckpt"]["step"] == 1
    before = digest(tmp_path / "step0000001.ckpt")
    if (n, killed) == (4, 3): return  # resuming is the same code whatever killed the run: twice is enough
    # the same run, continued (the same bound: a changed one is refused, see tests/test_train.py)
    r = launch(n, [*TINY, "--way", n, "--max-steps", 4, "--ckpt-every", 1, "--out", tmp_path, "--resume", "auto"])
    assert r.rc == 0, r.text[-3000:]
    assert f"resumed from {tmp_path / 'step0000001.ckpt'} at step 1" in r.err, r.err[-3000:]
    ck = checkpoints(tmp_path)
    assert sorted(ck) == ["final.ckpt", *step_names([1, 2, 3, 4])] and temp_files(tmp_path) == []  # the stale folder is gone
    assert ck["final.ckpt"]["step"] == 4 and [h["step"] for h in ck["final.ckpt"]["history"]] == [1, 2, 3, 4]
    assert ck["final.ckpt"]["history"][0] == load_checkpoint(tmp_path / "step0000001.ckpt")["history"][0]
    assert digest(tmp_path / "step0000001.ckpt") == before  # resuming never rewrites the checkpoint it read


def test_a_full_disk_mid_write_ends_the_job_and_keeps_the_last_good_checkpoint(tmp_path):
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 4, "--ckpt-every", 1, "--out", tmp_path], fault="enospc-checkpoint@1:2")
    assert r.rc != 0
    assert error_ranks(r.err, "CheckpointError", f"{tmp_path / 'step0000002.ckpt'}: checkpoint not written"), r.err[-3000:]
    assert "No space left on device" in r.err or "rank 1 failed" in r.err
    assert sorted(checkpoints(tmp_path)) == step_names([1]) and temp_files(tmp_path) == []
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 4, "--out", tmp_path, "--resume", "auto"])
    assert r.rc == 0 and load_checkpoint(tmp_path / "final.ckpt")["step"] == 4, r.text[-3000:]


# ---------------------------------------------------------------------------------------- non-finite loss

DIVERGE = ["--lr", "1e9", "--lr-encdec", "1e9", "--clip", "0", "--warmup-steps", "0"]  # NaN/inf from the 2nd step on (1e6 overflows 1-way, not always 2-way)


def test_a_non_finite_loss_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path):
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 4, "--ckpt-every", 1, "--out", tmp_path, *DIVERGE])
    assert r.rc != 0
    found = re.findall(r"\[jigsaw_ref rank (\d)\] NonFiniteError: non-finite loss or gradient at step (\d+) .* on rank (\d)", r.err)
    assert found and all(a == b for a, _, b in found), r.err[-3000:]
    step = int(found[0][1])
    assert all(int(s) == step for _, s, _ in found) and "the last checkpoint is intact" in r.err
    ck = checkpoints(tmp_path)  # every checkpoint verifies; the newest is the state the failing step started from
    assert sorted(ck) == step_names(range(1, step + 1)), sorted(ck)
    assert all(torch.isfinite(t).all() for t in ck[step_names([step])[0]]["params"].values())
    assert temp_files(tmp_path) == []


def test_nonfinite_skip_continues_and_records_the_skipped_steps(tmp_path):
    "With every skip allowed (--max-skip-fraction 1) the run goes on; the default bound is tested below."
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 4, "--out", tmp_path, "--nonfinite", "skip", "--max-skip-fraction", 1, *DIVERGE])
    assert r.rc == 0, r.text[-3000:]
    lines = (tmp_path / "metrics.csv").read_text().split()
    col = lines[0].split(",").index("skipped")
    skipped = [int(l.split(",")[col]) for l in lines[1:]]
    assert len(skipped) == 4 and skipped[0] == 0 and sum(skipped) >= 1, skipped
    ck = load_checkpoint(tmp_path / "final.ckpt")
    assert [h["skipped"] for h in ck["history"]] == skipped
    assert all(torch.isfinite(t).all() for t in ck["params"].values())  # a skipped step never touches the weights


# ------------------------------------------------------------------ corrupted / truncated / other checkpoints

FIRST_FORMAT = ("config", "params", "adam", "scheduler", "step", "lrs", "history", "train", "mode", "layout")


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    t = Trainer(TrainConfig(model="tiny", max_steps=1, progress=False, val_batches=1, out=str(d)), groups=ONE())
    t.fit()
    return d / "final.ckpt"


@pytest.fixture(scope="module")
def good_ckpt(good_store):
    "The same checkpoint in the first format (one file holding the full model): old runs still resume from these."
    ck = load_checkpoint(good_store)
    path = good_store.parent / "first_format.ckpt"
    save_checkpoint(path, {**{k: ck[k] for k in FIRST_FORMAT}, "format": "jigsaw_ref/1"})
    return path


def _rewrite(payload) -> bytes:
    buf = io.BytesIO(); torch.save(payload, buf); data = buf.getvalue()
    return MAGIC + hashlib.sha256(data).hexdigest().encode() + data


def _flip(raw, i):
    raw = bytearray(raw); raw[i] ^= 0x40; return bytes(raw)


BAD_CKPTS = {  # name: (bytes of the file from the good one, expected message)
    "payload byte flipped": (lambda g: _flip(g, len(g) // 2), "checksum mismatch: the file is corrupted or truncated"),
    "last byte flipped": (lambda g: _flip(g, -1), "checksum mismatch"),
    "checksum byte flipped": (lambda g: _flip(g, 20), "checksum mismatch"),
    "magic byte flipped": (lambda g: _flip(g, 0), r"not a jigsaw_ref checkpoint \(bad header"),
    "truncated to half": (lambda g: g[: len(g) // 2], "checksum mismatch"),
    "truncated to 50 bytes": (lambda g: g[:50], "bad header"),
    "empty file": (lambda g: b"", "bad header"),
    "garbage": (lambda g: np.random.default_rng(0).bytes(4096), "bad header"),
    "plain torch.save file": (lambda g: g[72:], "bad header"),
    "other preset (small)": (lambda g: _rewrite({**_load(g), "config": asdict(preset("small"))}),
                             "written for another model"),
    "other shape (hidden=16)": (lambda g: _rewrite({**_load(g), "config": asdict(preset("tiny", hidden=16))}),
                                r"written for another model .*'hidden': \(16, 32\)"),
    "other format version": (lambda g: _rewrite({**_load(g), "format": "jigsaw_ref/0"}), "format 'jigsaw_ref/0' is not"),
}
GAPS = {  # checksum-valid files whose payload is not a checkpoint: today a raw UnpicklingError / AttributeError / KeyError
    "valid checksum, payload not a torch file": lambda g: MAGIC + hashlib.sha256(b"junk").hexdigest().encode() + b"junk",
    "valid checksum, payload a list": lambda g: _rewrite([1, 2]),
    "valid checksum, payload lacks keys": lambda g: _rewrite({"format": "jigsaw_ref/1"}),
}


def _load(raw): return torch.load(io.BytesIO(raw[72:]), weights_only=False)


def _resume_1way(path, out):
    Trainer(TrainConfig(model="tiny", max_steps=1, progress=False, out=str(out), resume=str(path)), groups=ONE())


@pytest.mark.parametrize("case", list(BAD_CKPTS))
def test_resume_refuses_a_bad_checkpoint_clearly(good_ckpt, tmp_path, case):
    make, msg = BAD_CKPTS[case]
    bad = tmp_path / "bad.ckpt"; bad.write_bytes(make(good_ckpt.read_bytes()))
    with pytest.raises(CheckpointError, match=msg) as e:
        _resume_1way(bad, tmp_path)
    assert str(bad) in str(e.value)  # the message names the file


@pytest.mark.parametrize("case", list(GAPS))
def test_resume_refuses_a_checksum_valid_non_checkpoint_clearly(good_ckpt, tmp_path, case):
    bad = tmp_path / "bad.ckpt"; bad.write_bytes(GAPS[case](good_ckpt.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        _resume_1way(bad, tmp_path)


def test_a_missing_or_directory_checkpoint_is_refused(tmp_path):
    for p, msg in ((tmp_path / "nope.ckpt", "no such checkpoint file"), (tmp_path, "not a committed checkpoint")):
        with pytest.raises(CheckpointError, match=msg): _resume_1way(p, tmp_path / "o")


def _store_chunk(folder: Path, arr="params/blocks.0.tok1.w/i0j0") -> Path:
    return sorted(p for p in (folder / arr / "c").rglob("*") if p.is_file())[0]


BAD_STORES = {  # name: (damage done to a copy of a good store, expected message)
    "chunk byte flipped": (lambda f: _store_chunk(f).write_bytes(_flip(_store_chunk(f).read_bytes(), 9)),
                           r"params of 'blocks\.0\.tok1\.w', block i0j0, chunk \(0, 0\): checksum mismatch"),
    "chunk truncated": (lambda f: _store_chunk(f).write_bytes(_store_chunk(f).read_bytes()[:-30]), "checksum mismatch"),
    "chunk deleted": (lambda f: _store_chunk(f).unlink(), r"chunk \(0, 0\): missing"),
    "manifest edited": (lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text().replace('"exact"', '"Exact"')),
                        r"manifest\.json: checksum mismatch"),
    "manifest deleted (an interrupted write)": (lambda f: (f / "manifest.json").unlink(), "not a committed checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_STORES))
def test_resume_refuses_a_damaged_store_naming_the_tensor_and_block(good_store, tmp_path, case):
    damage, msg = BAD_STORES[case]
    bad = tmp_path / "bad.ckpt"
    __import__("shutil").copytree(good_store, bad)
    damage(bad)
    with pytest.raises(CheckpointError, match=msg) as e:
        _resume_1way(bad, tmp_path / "o")
    assert str(bad) in str(e.value)


def test_a_damaged_store_fails_on_every_rank_without_a_hang(good_store, tmp_path):
    bad = tmp_path / "bad.ckpt"
    __import__("shutil").copytree(good_store, bad)
    BAD_STORES["chunk byte flipped"][0](bad)
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 1, "--out", tmp_path / "o", "--resume", bad], timeout=HANG_S)  # its own bound
    assert r.rc != 0
    assert "checksum mismatch" in r.err and str(bad) in r.err, r.err[-3000:]
    assert r.t_exit - r.t_first_error < FAULT_TO_EXIT_S


@pytest.mark.parametrize("case", ["payload byte flipped", "other preset (small)"])
def test_a_bad_checkpoint_fails_on_every_rank_without_a_hang(good_ckpt, tmp_path, case):
    make, msg = BAD_CKPTS[case]
    bad = tmp_path / "bad.ckpt"; bad.write_bytes(make(good_ckpt.read_bytes()))
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 1, "--out", tmp_path / "o", "--resume", bad], timeout=HANG_S)
    assert r.rc != 0  # another model is a ResumeError (a CheckpointError that is intact but not this run's)
    assert error_ranks(r.err, "(?:CheckpointError|ResumeError)", str(bad)) and re.search(msg, r.err), r.err[-3000:]
    assert r.t_exit - r.t_first_error < FAULT_TO_EXIT_S


# ---------------------------------------------------------------------------------------------- bad inputs

BAD_SETTINGS = [  # (TrainConfig fields, world size, expected message): settings are checked before any collective
    (dict(model_overrides=("patch=7",)), 1, "n_lon=32 is not divisible by patch=7"),
    (dict(model_overrides=("rollout=[2,1]",)), 1, "rollout=(2, 1): must be (k_min, k_max)"),
    (dict(model_overrides=("dropout=1.5",)), 1, "dropout=1.5: must be in [0, 1)"),
    (dict(model_overrides=("hidden=0",)), 1, "hidden=0: must be a positive integer"),
    (dict(model_overrides=("hidden=abc",)), 1, "hidden = 'abc' (from --set hidden=abc): expected int"),
    (dict(model_overrides=("widht=3",)), 1, "MixerConfig has no field 'widht'"),
    (dict(model_overrides=("hidden",)), 1, "expected FIELD=VALUE"),
    (dict(model_overrides=("variables=msl,msl",)), 1, "a channel is listed twice"),
    (dict(model_overrides=("res_inputs=foo",)), 1, "res_inputs='foo': choose 'dynamic' or 'all'"),
    (dict(model="huge"), 1, "unknown preset 'huge'"),
    (dict(way="3"), 3, "way='3': choose 1, 2, 4 or a 'PxQ'"),
    (dict(way="4"), 2, "world size 2 is not a multiple of the model group size 2x2=4"),
    (dict(way="4"), 6, "world size 6 is not a multiple of the model group size 2x2=4"),
    (dict(way="2x1"), 3, "world size 3 is not a multiple of the model group size 2x1=2"),
    (dict(way="16x1"), 16, "8 longitude patches cannot be split over 16 domain shards"),
    (dict(way="1x32"), 32, "22 input channels cannot be split 32 ways"),
    (dict(algo="ring"), 1, "algo='ring' is not valid"),
    (dict(nonfinite="ignore"), 1, "nonfinite='ignore' is not valid"),
    (dict(batch=0), 1, "batch=0 is not valid"),
    (dict(epochs=0), 1, "epochs=0 is not valid"),
    (dict(dtype="float16"), 1, "dtype='float16' is not valid"),
    (dict(precision="bf16"), 1, "precision='bf16' is for GPUs"),
    (dict(backend="nccl"), 1, "backend='nccl' is not valid"),
]
SETTINGS_GAPS = [  # once accepted silently or refused with a raw Python error; now each a ConfigError
    (dict(model_overrides=("f_s=abc",)), 1, "f_s"),  # ValueError: could not convert string to float
    (dict(model_overrides=("dt_hours=0",)), 1, "dt_hours"),  # accepted: stride 0 trains x -> x
    (dict(way="2x"), 2, "way='2x'"),  # ValueError: invalid literal for int()
    (dict(way="2x0"), 2, "way='2x0'"),  # ZeroDivisionError
    (dict(way="2x2x2"), 8, "way='2x2x2'"),  # ValueError: too many values to unpack
    (dict(way="-1"), 1, "way='-1'"),  # ValueError: not enough values to unpack
    (dict(max_steps=-1), 1, "max_steps"),  # accepted: trains nothing, then main() dies on hist[-1] (IndexError)
    (dict(clip=-1.0), 1, "clip"),  # accepted: clip_grads scales by a negative factor: gradient ASCENT
    (dict(lr=-1e-3), 1, "lr"),  # accepted here; torch.optim.Adam refuses it later with a raw ValueError
    (dict(ckpt_every=-1), 1, "ckpt_every"),  # accepted: checkpoints every step (step % -1 == 0)
]


@pytest.mark.parametrize("kw,world,msg", BAD_SETTINGS, ids=[str(c[2])[:40] for c in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_collective(kw, world, msg):
    with pytest.raises(ConfigError) as e:
        check_settings(TrainConfig(**{"model": "tiny", **kw}), world)
    assert msg in str(e.value)


@pytest.mark.parametrize("kw,world,msg", SETTINGS_GAPS, ids=[str(c[0])[5:40] for c in SETTINGS_GAPS])
def test_bad_settings_once_missed_are_refused_clearly(kw, world, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
        check_settings(TrainConfig(**{"model": "tiny", **kw}), world)


BAD_CLI = [  # (argv, expected text on stderr): argparse usage errors, in process
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--max-steps", "1.5"], "argument --max-steps: invalid int value: '1.5'"),
    (["--way"], "argument --way: expected one argument"),
    (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
]


@pytest.mark.parametrize("argv,msg", BAD_CLI, ids=[a[0] for a, _ in BAD_CLI])
def test_command_line_misuse_is_a_usage_error(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("text,suffix,msg", [
    ("lr = 1e-3\nlearning_rate = 2\n", ".toml", "unknown settings ['learning_rate']"),
    ("lr = = 1\n", ".toml", "cannot parse"),
    ('{"lr": 1e-3,}', ".json", "cannot parse"),
])
def test_a_bad_config_file_is_a_usage_error(tmp_path, capsys, text, suffix, msg):
    f = tmp_path / f"run{suffix}"; f.write_text(text)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f)])
    assert f"--config {f}: {msg}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory):
    "A small copy of the default tiny data (40 time steps) without 'temperature'."
    ds = xr.open_zarr(default_dataset(grid=(16, 32), verbose=False), consolidated=False).isel(time=slice(0, 40))
    ds = ds.drop_vars("temperature")
    ds.attrs = {}
    for v in ds.variables: ds[v].encoding = {}
    path = tmp_path_factory.mktemp("data") / "no_temperature.zarr"
    ds.to_zarr(path, mode="w", consolidated=False)
    return path


def test_a_store_missing_a_variable_is_refused_by_the_reader(broken_store):
    with pytest.raises(DataError, match=r"no_temperature\.zarr: channel 't850' needs variable 'temperature'.*remove 't850'"):
        Era5Dataset(broken_store, preset("tiny"))


@pytest.mark.parametrize("data,msg", [("missing", "no such file or directory"), ("broken", "needs variable 'temperature'")])
def test_bad_data_fails_on_every_rank_without_a_hang(tmp_path, broken_store, data, msg):
    path = tmp_path / "nope.zarr" if data == "missing" else broken_store
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 1, "--out", tmp_path / "o", "--data", path])
    assert r.rc != 0
    assert error_ranks(r.err, "DataError", f"{path}: ") and msg in r.err, r.err[-3000:]
    assert r.t_exit - r.t_first_error < FAULT_TO_EXIT_S


def test_bad_settings_end_to_end_on_4_ranks():
    "A settings error on 4 ranks: every rank says it, the job ends, nothing hangs."
    r = launch(4, [*TINY, "--way", "2x2", "--set", "patch=5"])
    assert r.rc != 0
    assert error_ranks(r.err, "ConfigError", "n_lon=32 is not divisible by patch=5"), r.err[-3000:]
    assert r.t_exit - r.t_first_error < FAULT_TO_EXIT_S


# ===================================================================================== a real cluster (issue 17)
# Preemption and requeue, a stalled rank, one run per folder, bad samples and the messages around them. The rows on
# resuming with changed settings are in tests/test_train.py, and the data rows (fingerprinted statistics, chunk
# checksums, value checks, time axes, a read-only data folder) in tests/test_data.py; nbs/11_reliability lists them all.

REQUEUE = 75  # what the batch script requeues on (EX_TEMPFAIL)
SIGNAL_RUN = [*TINY, "--way", 2, "--max-steps", 5, "--requeue-exit-code", REQUEUE]
SMALL = dict(model="tiny", progress=False, val_batches=1, lr=1e-3, lr_encdec=1e-3, warmup_steps=1)


@pytest.fixture
def no_fsync(monkeypatch):
    "In-process checkpoints without fsync (durability against a power cut is not what these tests look at)."
    import jigsaw_ref.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "FSYNC", False)


def same_run(a: dict, b: dict):
    "Two checkpoints hold the same run: weights, both Adam moments and every step's loss, bit for bit."
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in b["params"])
    assert all(torch.equal(a["adam"][k][n], b["adam"][k][n]) for k in ("exp_avg", "exp_avg_sq") for n in b["params"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def metrics_steps(out: Path) -> list[int]:
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows and rows[0].startswith("step,"), rows[:1]
    return [int(r.split(",")[0]) for r in rows[1:]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    "The 2-way 5-step run that an interrupted and requeued one must reproduce bit for bit."
    out = tmp_path_factory.mktemp("whole")
    r = launch(2, [*SIGNAL_RUN, "--out", out])
    assert r.rc == 0, r.text[-3000:]
    return load_checkpoint(out / "final.ckpt")


# ------------------------------------------------------------------------------------------ preemption, requeue

@pytest.mark.parametrize("sig", ["term", pytest.param("int", marks=pytest.mark.slow), pytest.param("usr1", marks=pytest.mark.slow)])
# one signal by default: the three share every line of the trainer's path (nbs/11's table runs all three)
def test_a_stop_signal_on_one_rank_stops_every_rank_at_a_step_boundary_and_the_requeue_continues_exactly(tmp_path, uninterrupted, sig):
    "Rank 1 gets the signal in step 3's forward pass: both ranks finish step 3, save it, write the metrics and exit with the requeue code."
    name = f"SIG{sig.upper()}"
    r = launch(2, [*SIGNAL_RUN, "--out", tmp_path], fault=f"{sig}-forward@1:2")
    assert r.rc == REQUEUE, r.text[-3000:]
    assert f"[jigsaw_ref rank 1] {name}: stopping at the next step boundary" in r.err and "Traceback" not in r.err, r.err[-3000:]
    assert f"jigsaw-train: stopped by {name} (rank 1) at step 3: checkpoint {tmp_path / 'step0000003.ckpt'}" in r.err
    ck = checkpoints(tmp_path)  # loaded and verified
    assert sorted(ck) == step_names([3]) and ck["step0000003.ckpt"]["step"] == 3 and temp_files(tmp_path) == []
    assert metrics_steps(tmp_path) == [1, 2, 3]
    stopped = json.loads((tmp_path / "summary.json").read_text())["stopped"]
    assert (stopped["signal"], stopped["rank"], stopped["step"]) == (name, 1, 3)
    assert not (tmp_path / "run.lock").exists()  # released: the requeued job finds the folder free
    # the requeue: the same command with --resume auto goes on to the end of the uninterrupted run, bit for bit
    r = launch(2, [*SIGNAL_RUN, "--out", tmp_path, "--resume", "auto"])
    assert r.rc == 0 and f"resumed from {tmp_path / 'step0000003.ckpt'} at step 3" in r.err, r.text[-3000:]
    same_run(load_checkpoint(tmp_path / "final.ckpt"), uninterrupted)
    assert metrics_steps(tmp_path) == [1, 2, 3, 4, 5]


def test_a_second_signal_aborts_at_once_and_commits_no_new_checkpoint(tmp_path):
    "The first SIGTERM (step 3's forward pass) asks for a stop; the second, while rank 1 writes step 3's checkpoint, ends the job."
    r = launch(2, [*SIGNAL_RUN, "--ckpt-every", 1, "--out", tmp_path], fault="term-forward@1:2,term-checkpoint@1:3")
    assert r.rc not in (0, REQUEUE), r.text[-3000:]
    assert "[jigsaw_ref rank 1] SIGTERM again: aborting now, without a checkpoint (the last one is intact)" in r.err, r.err[-3000:]
    assert r.t_exit - r.t_first_error < FAULT_TO_EXIT_S
    assert sorted(checkpoints(tmp_path)) == step_names([1, 2])  # step 3 never committed; 1 and 2 verify
    assert all(not (tmp_path / t / "manifest.json").exists() for t in temp_files(tmp_path))


def test_resume_auto_on_an_empty_out_starts_fresh_and_says_so(tmp_path, capsys):
    t = Trainer(TrainConfig(**SMALL, max_steps=1, out=str(tmp_path / "new"), resume="auto"), groups=ONE())
    assert t.step == 0 and t.resumed_from is None
    assert f"--resume auto: no checkpoint in {tmp_path / 'new'}: starting fresh" in capsys.readouterr().err


def test_resume_auto_takes_the_final_checkpoint_a_time_limit_stop_wrote(tmp_path, no_fsync):
    "--max-minutes ends a run early with final.ckpt only; the requeued run continues from it, exactly."
    whole = Trainer(TrainConfig(**SMALL, max_steps=3, out=str(tmp_path / "whole")), groups=ONE())
    whole.fit()
    a = Trainer(TrainConfig(**SMALL, max_steps=3, max_minutes=1e-9, out=str(tmp_path / "a")), groups=ONE())
    a.fit()
    assert a.step == 1 and sorted(checkpoints(tmp_path / "a")) == ["final.ckpt"]
    b = Trainer(TrainConfig(**SMALL, max_steps=3, out=str(tmp_path / "a"), resume="auto"), groups=ONE())
    assert (b.step, b.resumed_from) == (1, tmp_path / "a" / "final.ckpt")
    b.fit()
    same_run(load_checkpoint(tmp_path / "a" / "final.ckpt"), load_checkpoint(tmp_path / "whole" / "final.ckpt"))


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_verifies_naming_the_ones_skipped(tmp_path, no_fsync, capsys):
    kw = dict(SMALL, max_steps=3, ckpt_every=1, out=str(tmp_path))
    Trainer(TrainConfig(**kw), groups=ONE()).fit()
    want = load_checkpoint(tmp_path / "final.ckpt")
    BAD_STORES["manifest edited"][0](tmp_path / "final.ckpt")  # found unreadable when the folder is listed
    BAD_STORES["chunk byte flipped"][0](tmp_path / "step0000003.ckpt")  # a good manifest, found bad while loading
    capsys.readouterr()
    t = Trainer(TrainConfig(**kw, resume="auto"), groups=ONE())
    err = capsys.readouterr().err
    assert (t.step, t.resumed_from) == (2, tmp_path / "step0000002.ckpt"), err
    line = next(l for l in err.splitlines() if l.startswith("jigsaw-train: resumed from"))
    assert f"resumed from {tmp_path / 'step0000002.ckpt'} at step 2" in line and "skipped, newest first:" in line
    assert re.search(r"final\.ckpt \(.*manifest\.json: checksum mismatch", line), line
    assert re.search(r"step0000003\.ckpt \(.*blocks\.0\.tok1\.w', block i0j0, chunk \(0, 0\): checksum mismatch", line), line
    t.fit()  # the half-loaded step 3 left nothing behind: the run ends as the undamaged one did
    same_run(load_checkpoint(tmp_path / "final.ckpt"), want)


def test_keep_last_keeps_the_newest_step_checkpoints_and_the_final_one(tmp_path, no_fsync):
    Trainer(TrainConfig(**SMALL, max_steps=4, ckpt_every=1, keep_last=2, out=str(tmp_path)), groups=ONE()).fit()
    assert sorted(checkpoints(tmp_path)) == ["final.ckpt", *step_names([3, 4])]


def test_the_metrics_are_never_seen_empty_or_partial_while_a_run_writes_them(tmp_path):
    "A reader polling metrics.csv and summary.json while the run replaces them every step sees whole files only."
    t = Trainer(TrainConfig(**SMALL, max_steps=20, out=str(tmp_path), metrics_every=0), groups=ONE())
    th = threading.Thread(target=t.fit)
    th.start()
    reads, bad = 0, []
    while th.is_alive():
        try: text, summary = (tmp_path / "metrics.csv").read_text(), (tmp_path / "summary.json").read_text()
        except FileNotFoundError: continue
        reads += 1
        rows = text.splitlines()
        if not text.endswith("\n") or len(rows) < 2 or len({r.count(",") for r in rows}) != 1: bad.append(text)
        try: json.loads(summary)
        except ValueError: bad.append(summary)
    th.join()
    assert reads > 30 and bad == [], (reads, bad[:3])
    assert metrics_steps(tmp_path) == list(range(1, 21))


def test_a_full_disk_at_a_metrics_write_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JIGSAW_FAULT", "enospc-metrics@0:2")
    t = Trainer(TrainConfig(**SMALL, max_steps=3, out=str(tmp_path), metrics_every=0), groups=ONE())
    with pytest.raises(RunFolderError, match=re.escape(f"{tmp_path / 'metrics.csv'}: not written (No space left on device")
                       + r".*free disk space or choose another --out \(--keep-last K bounds the checkpoints kept\)"):
        t.fit()
    assert metrics_steps(tmp_path) == [1]  # the previous file, whole


# ------------------------------------------------------------------------------------------------- a stalled rank

@pytest.mark.parametrize("backend", ["mpi", "torch"])
def test_a_stalled_rank_ends_the_job_naming_the_rank_and_step_waited_on(tmp_path, backend):
    "SIGSTOP on rank 1 in step 3 (a stalled node): rank 0's watchdog names rank 1 and the step, and the job ends."
    r = launch(2, [*SIGNAL_RUN, "--backend", backend, "--step-timeout", 3, "--out", tmp_path], fault="stop-forward@1:2", timeout=120)
    assert r.rc == 124, r.text[-3000:]  # the watchdog's exit status (see the table in nbs/09_train)
    assert re.search(r"\[jigsaw_ref rank 0\] no progress for \d+ s \(timeout 3 s\) after step 3\b.*waiting for rank 1 \(tag \d+\)", r.err), r.err[-3000:]
    assert r.t_exit - r.t_first_error < FAULT_TO_EXIT_S and r.wall < 100
    for _ in range(50):  # the stopped rank was ended too, not left behind
        try: os.killpg(r.pgid, 0)
        except ProcessLookupError: break
        time.sleep(0.2)
    else: pytest.fail(f"processes of the job are left: {subprocess.run(['ps', '-g', str(r.pgid)], capture_output=True, text=True).stdout}")


# ------------------------------------------------------------------------------------------- one run per folder

def test_a_second_job_on_a_run_folder_is_refused_naming_the_job_that_holds_it(tmp_path):
    p, _ = start(1, [*TINY, "--max-steps", 3, "--out", tmp_path], fault="sleep3-data@0:1")  # a job that holds the folder a while
    try:
        t0, held = time.monotonic(), None
        while not (held or {}).get("run_id"):
            assert time.monotonic() - t0 < 60 and p.poll() is None, p.communicate()[1][-3000:] if p.poll() is not None else "no run.lock"
            held = read_lock(tmp_path)[0]; time.sleep(0.05)
        with pytest.raises(RunFolderError) as e:
            Trainer(TrainConfig(**SMALL, max_steps=3, out=str(tmp_path)), groups=ONE())
        out, err = p.communicate(timeout=HANG_S)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    msg = str(e.value)
    assert f"{tmp_path} is in use by run {held['run_id']} (host {held['host']}, pid {held['pid']}" in msg, msg
    assert "two jobs must not write one run folder" in msg and "choose another --out" in msg
    assert p.returncode == 0, err[-3000:]  # the first job was not disturbed
    assert load_checkpoint(tmp_path / "final.ckpt")["run_id"] == held["run_id"] and metrics_steps(tmp_path) == [1, 2, 3]


def test_a_new_run_into_a_folder_holding_another_runs_checkpoints_is_refused_unless_overwrite(tmp_path, no_fsync):
    kw = dict(SMALL, max_steps=1, out=str(tmp_path))
    a = Trainer(TrainConfig(**kw), groups=ONE())
    a.fit()
    with pytest.raises(RunFolderError, match=rf"holds what another run wrote \(final\.ckpt, summary\.json: run {a.run_id}\); to "
                                             r"continue that run use --resume auto, to keep it choose another --out, or pass --overwrite"):
        Trainer(TrainConfig(**kw), groups=ONE()).fit()
    assert load_checkpoint(tmp_path / "final.ckpt")["run_id"] == a.run_id  # untouched
    c = Trainer(TrainConfig(**kw, overwrite=True), groups=ONE())
    c.fit()
    assert c.run_id != a.run_id and load_checkpoint(tmp_path / "final.ckpt")["run_id"] == c.run_id and metrics_steps(tmp_path) == [1]


def test_a_launcher_that_mpi_does_not_connect_is_refused(tmp_path):
    "torchrun without --backend torch: 4 processes, each an MPI world of 1 (here one of them, as torchrun sets it up)."
    r = launch(1, [*TINY, "--max-steps", 1, "--out", tmp_path / "o"], env=dict(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0"))
    assert r.rc == 1 and not (tmp_path / "o").exists(), r.text[-3000:]
    assert ("[jigsaw_ref rank 0] ConfigError: torchrun started 4 processes (WORLD_SIZE=4) but MPI sees a world of 1: each would "
            "train alone into the same --out; add --backend torch under torchrun") in r.err, r.err[-3000:]
    srun = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}  # srun --mpi=none
    with pytest.raises(ConfigError, match=r"srun started 4 tasks but MPI sees a world of 1.*add --mpi=pmi2"):
        check_launch(1, "mpi", srun)
    check_launch(4, "mpi", srun)


# ------------------------------------------------------------------------------------------ steps that cannot count

def test_nonfinite_skip_stops_when_more_than_a_fraction_of_the_steps_is_skipped(tmp_path):
    r = launch(1, [*TINY, "--max-steps", 10, "--ckpt-every", 1, "--out", tmp_path, "--nonfinite", "skip", *DIVERGE])
    assert r.rc == 1, r.text[-3000:]
    m = re.search(r"\[jigsaw_ref rank 0\] NonFiniteError: non-finite loss .* (\d+) of the run's 10 steps skipped, more than "
                  r"--max-skip-fraction 0\.1; the last checkpoint is intact", r.err)
    assert m and int(m.group(1)) == 2, r.err[-3000:]
    assert all(torch.isfinite(t).all() for ck in checkpoints(tmp_path).values() for t in ck["params"].values())


@pytest.fixture(scope="module")
def bitrot(tmp_path_factory):
    "A copy of the generated default store, its statistics fresh, with one byte of a temperature chunk flipped in place (bit rot:"
    " same size, same modification time); and the first training step whose sample reads that chunk."
    import shutil
    from jigsaw_ref.data import stats_path
    from jigsaw_ref.train import epoch_order
    src = default_dataset(grid=(16, 32), verbose=False)
    q = tmp_path_factory.mktemp("bitrot") / "copy.zarr"
    shutil.copytree(src, q)
    shutil.copy2(stats_path(src), stats_path(q))
    order = epoch_order(len(Era5Dataset(q, preset("tiny"), "train", stats=False)), 0, 0)
    step = next(s for s, i in enumerate(order) if i % 4 == 0)  # a sample at the first time of its day's shard file
    f = q / "temperature" / "c" / str(int(order[step]) // 4) / "0" / "0" / "0"
    st, raw = f.stat(), bytearray(f.read_bytes())
    raw[40] ^= 0x10
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return q, step, int(order[step]), f


def _fit_ranks(comm, kw, way):
    from jigsaw_ref.comm import make_groups
    from jigsaw_ref.grid import Grid
    t = Trainer(TrainConfig(**kw, way=way), groups=make_groups(Grid.named(way, comm.Get_size()), comm=comm))
    t.fit()
    return [h["bad_sample"] for h in t.history], len(t.bad)


def test_a_bad_sample_is_skipped_on_every_rank_and_counted(bitrot, tmp_path, no_fsync):
    "2-way: only the rank holding the temperature channels reads the bad chunk; both skip that step; the count is kept."
    q, step, i, f = bitrot
    kw = dict(SMALL, data=str(q), max_steps=step + 2, bad_samples="skip", out=str(tmp_path))
    got = run_ranks(2, _fit_ranks, kw, "2")
    assert got == [([0] * step + [1, 0], 1)] * 2
    ck = load_checkpoint(tmp_path / "final.ckpt")
    assert [b["key"] for b in ck["bad_samples"]] == [[False, [i]]] and str(f) in ck["bad_samples"][0]["message"]
    assert json.loads((tmp_path / "summary.json").read_text())["bad_samples"] == 1
    assert ck["data"]["samples"] == step + 2  # the skipped sample counts as consumed: a requeued run never meets it again


@pytest.mark.parametrize("how,err,msg", [
    (dict(bad_samples="stop"), "BadSampleError", r"cannot read variable 'temperature' at time index {i} \(.*\): {f} is corrupt or truncated"),
    (dict(bad_samples="skip", max_bad_samples=0), "DataError", r"1 bad samples, more than --max-bad-samples 0; the last: .*{f}"),
])
def test_a_bad_sample_stops_the_run_when_asked_or_past_the_bound(bitrot, tmp_path, no_fsync, how, err, msg):
    q, step, i, f = bitrot
    t = Trainer(TrainConfig(**SMALL, data=str(q), max_steps=step + 2, ckpt_every=1, out=str(tmp_path), **how), groups=ONE())
    with pytest.raises(DataError, match=msg.format(i=i, f=re.escape(str(f)))) as e:
        t.fit()
    assert type(e.value).__name__ == err and "\n" not in str(e.value)
    assert sorted(checkpoints(tmp_path)) == step_names(range(1, step + 1))


def test_a_kill_between_the_two_renames_of_a_commit_keeps_the_newest_checkpoint_for_resume_auto(tmp_path, no_fsync):
    "Issue 22 item 4: no atomic folder exchange (forced); a kill between renaming final.ckpt away and the new one in."
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 2, "--out", tmp_path])
    assert r.rc == 0, r.text[-3000:]
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 4, "--out", tmp_path, "--resume", "auto", "--reschedule"],
               fault="kill-commit@0", env={"JIGSAW_NO_EXCHANGE": "1"})
    assert r.rc != 0
    names = sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name)
    assert "final.ckpt" not in names and any(".final.ckpt.old-" in n for n in names) and any(".final.ckpt.tmp-" in n for n in names), names
    r = launch(2, [*TINY, "--way", 2, "--max-steps", 5, "--out", tmp_path, "--resume", "auto", "--reschedule"],
               env={"JIGSAW_NO_EXCHANGE": "1"})
    assert r.rc == 0 and "starting fresh" not in r.text, r.text[-3000:]
    ck = load_checkpoint(tmp_path / "final.ckpt")
    assert ck["step"] == 5 and [h["step"] for h in ck["history"]] == [1, 2, 3, 4, 5], ck["history"]
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["final.ckpt"]
