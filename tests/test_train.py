"""The trainer: parallel training equals 1-way training, resume equals an uninterrupted run (on any layout, with
any data parallelism), checkpoints move between layouts exactly, the demo is bounded by steps, and the command line
rejects bad input clearly and documents every flag."""
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from jigsaw_ref.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from jigsaw_ref.comm import Group, make_groups
from jigsaw_ref.grid import Grid
from jigsaw_ref.ranks import RankFailed, run_ranks
from jigsaw_ref.train import ResumeError, Trainer, TrainConfig, epoch_order
from jigsaw_ref.cli import DEMO_STEPS, arg_parser, demo, main, parse_args
from test_mpi import ROOT, mpiexec

ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # noqa: E731
BASE = dict(model="tiny", dtype="float64", lr=1e-3, lr_encdec=1e-3, warmup_steps=2, progress=False, val_batches=2,
            model_overrides=("rollout=[1,2]",))


def cli(n, args, timeout=600):
    cmd = ([mpiexec(), "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", "jigsaw_ref.cli", *args]
    # this Python's bin first, so the MPI wheel's mpiexec and the installed package are the ones used
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1",
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def flags(**kw):
    out = []
    for k, v in kw.items():
        if k == "model_overrides":
            for o in v: out += ["--set", o]
        else:
            out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.fixture(scope="module")
def one_way(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1")
    t = Trainer(TrainConfig(**BASE, max_steps=4, out=str(out)), groups=ONE())
    t.fit()
    return load_checkpoint(out / "final.ckpt")


def _close(a, b, tol=1e-10):
    for n in b:
        scale = max(float(b[n].abs().max()), 1e-6 * max(float(t.abs().max()) for t in b.values()))
        if n.endswith("tok2.b"):  # exactly-zero gradient: see tests/mpi/test_model_mpi.py
            scale = max(float(t.abs().max()) for t in b.values())
        assert float((a[n] - b[n]).abs().max()) <= tol * scale, n


@pytest.mark.parametrize("n,way", [(2, "2"), (4, "4")])
def test_parallel_training_equals_one_way(one_way, tmp_path, n, way):
    r = cli(n, flags(**BASE, max_steps=4, way=way, out=tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "final.ckpt")
    _close(ck["params"], one_way["params"])
    _close(ck["adam"]["exp_avg"], one_way["adam"]["exp_avg"])
    assert [h["k"] for h in ck["history"]] == [h["k"] for h in one_way["history"]]  # same rollout draws
    assert abs(ck["history"][-1]["loss"] - one_way["history"][-1]["loss"]) < 1e-10 * abs(one_way["history"][-1]["loss"])


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    cfg = dict(BASE, dtype="float32", max_steps=6, ckpt_every=3)
    a = Trainer(TrainConfig(**cfg, out=str(tmp_path / "a")), groups=ONE())
    a.fit()
    b = Trainer(TrainConfig(**cfg, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step0000003.ckpt")), groups=ONE())
    assert b.step == 3
    b.fit()
    A, B = load_checkpoint(tmp_path / "a" / "final.ckpt"), load_checkpoint(tmp_path / "b" / "final.ckpt")
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(A["adam"][key][n], B["adam"][key][n]) for n in A["params"])
    assert all(torch.equal(A["params"][n], B["params"][n]) for n in A["params"])
    assert [h["loss"] for h in A["history"]] == [h["loss"] for h in B["history"]]


def test_checkpoint_round_trip_4way_1way_2way(tmp_path):
    "4-way writes, 1-way loads and writes, 2-way loads and writes: weights and Adam moments unchanged, bit for bit."
    r = cli(4, flags(**BASE, max_steps=2, way="4", out=tmp_path / "w4"))
    assert r.returncode == 0, r.stderr[-3000:]
    c4 = load_checkpoint(tmp_path / "w4" / "final.ckpt")
    t1 = Trainer(TrainConfig(**BASE, max_steps=2, out=str(tmp_path / "w1"), resume=str(tmp_path / "w4" / "final.ckpt")), groups=ONE())
    p1 = t1.save("resaved.ckpt")
    c1 = load_checkpoint(p1)
    r = cli(2, flags(**BASE, max_steps=2, way="2", out=tmp_path / "w2", resume=p1))  # resumes at its last step: saves at once
    assert r.returncode == 0, r.stderr[-3000:]
    c2 = load_checkpoint(tmp_path / "w2" / "final.ckpt")
    for c in (c1, c2):
        assert c["step"] == c4["step"] == 2
        for n in c4["params"]:
            assert torch.equal(c["params"][n], c4["params"][n]), n
            assert torch.equal(c["adam"]["exp_avg"][n], c4["adam"]["exp_avg"][n]), n
            assert torch.equal(c["adam"]["exp_avg_sq"][n], c4["adam"]["exp_avg_sq"][n]), n
        assert c["scheduler"] == c4["scheduler"]


def test_resume_rejects_other_model(tmp_path, one_way):
    t = Trainer(TrainConfig(**BASE, max_steps=1, out=str(tmp_path)), groups=ONE())
    path = t.save("x.ckpt")
    other = dict(BASE, model_overrides=("hidden=16",))
    with pytest.raises(CheckpointError, match="written for another model.*hidden"):
        Trainer(TrainConfig(**other, max_steps=1, out=str(tmp_path), resume=str(path)), groups=ONE())


@pytest.mark.parametrize("args,msg", [
    (["--way", "3"], "way='3'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--set", "widht=3"], "no field 'widht'"),
    (["--mode", "fast"], "mode='fast' is not valid"),
    (["--lr", "abc"], "invalid float value"),
    (["--config", "/nonexistent.toml"], "no such file"),
    (["--resume", "/nonexistent.ckpt"], "no such checkpoint file"),
    (["--precision", "bf16"], "precision='bf16' is for GPUs"),
])
def test_cli_rejects_bad_input_clearly(args, msg):
    r = cli(1, ["--model", "tiny", "--progress", "false", "--max-steps", "1", *args], timeout=300)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr[-2000:]


def test_cli_world_size_mismatch_fails_on_every_rank_without_hanging():
    r = cli(2, ["--model", "tiny", "--way", "4", "--progress", "false"], timeout=120)
    assert r.returncode != 0
    assert "not a multiple of the model group size 2x2=4" in r.stderr


def test_torch_distributed_backend_trains_like_mpi(tmp_path):
    "--backend torch (gloo on CPU; NCCL on GPUs) gives the same training as the mpi4py backend, float64."
    args = flags(**BASE, max_steps=3, way="2")
    r1 = cli(2, args + ["--backend", "torch", "--out", str(tmp_path / "t")])
    r2 = cli(2, args + ["--backend", "mpi", "--out", str(tmp_path / "m")])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
    a, b = load_checkpoint(tmp_path / "t" / "final.ckpt"), load_checkpoint(tmp_path / "m" / "final.ckpt")
    _close(a["params"], b["params"])
    assert abs(a["history"][-1]["loss"] - b["history"][-1]["loss"]) < 1e-10 * abs(b["history"][-1]["loss"])


# ------------------------------------------------------------------------- resume on another layout (thread ranks)

def _fit(comm, kw, way):
    "Train `TrainConfig(**kw, way=way)` on this thread rank; (losses of every step in the history, last step)."
    torch.set_num_threads(1)
    t = Trainer(TrainConfig(**kw, way=way), groups=make_groups(Grid.named(way, comm.Get_size()), comm=comm))
    t.fit()
    return [h["loss"] for h in t.history], t.step


@pytest.fixture(scope="module")
def four_way_run(tmp_path_factory):
    "An uninterrupted 6-step 4-way float64 run with random rollout k in 1..2, checkpointed at step 3."
    out = tmp_path_factory.mktemp("w4")
    losses, step = run_ranks(4, _fit, dict(BASE, max_steps=6, ckpt_every=3, out=str(out)), "4")[0]
    assert step == 6
    return out, losses


@pytest.mark.parametrize("n,way", [(2, "2"), (1, "1"), (4, "1x4")])
def test_resume_on_another_layout_follows_the_uninterrupted_losses(four_way_run, tmp_path, n, way):
    out, want = four_way_run
    kw = dict(BASE, max_steps=6, out=str(tmp_path), resume=str(out / "step0000003.ckpt"))
    got, step = run_ranks(n, _fit, kw, way)[0]
    assert step == 6 and got[:3] == want[:3]  # the history came with the checkpoint
    assert all(abs(a - b) <= 1e-10 * abs(b) for a, b in zip(got[3:], want[3:])), (got, want)


def _position(comm, kw, way):
    t = Trainer(TrainConfig(**kw, way=way), groups=make_groups(Grid.named(way, comm.Get_size()), comm=comm))
    return t.step, t.samples, t.epoch_pos, t.next_indices().tolist()


def test_resume_with_another_data_parallelism_continues_from_the_samples_consumed(tmp_path):
    "Written by one 1x2 group with batch 2, resumed by two 1x2 groups with batch 1: the same global batches, the same losses."
    a = dict(BASE, max_steps=4, ckpt_every=2, batch=2, out=str(tmp_path / "a"))
    want, _ = run_ranks(2, _fit, a, "2")[0]
    b = dict(BASE, max_steps=4, batch=1, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step0000002.ckpt"))
    pos = run_ranks(4, _position, b, "2")
    order = epoch_order(len(Trainer(TrainConfig(**BASE, out=str(tmp_path / "c")), groups=ONE()).train_ds), 0, 0)
    assert [p[:3] for p in pos] == [(2, 4, 4)] * 4  # 2 steps of a global batch of 2: 4 samples consumed
    assert [p[3] for p in pos] == [[int(order[4])]] * 2 + [[int(order[5])]] * 2  # dp index d takes sample 4 + d
    got, step = run_ranks(4, _fit, b, "2")[0]
    assert step == 4 and all(abs(x - y) <= 1e-10 * abs(y) for x, y in zip(got[2:], want[2:])), (got, want)


def test_resume_on_another_layout_with_dropout_follows_the_uninterrupted_losses(tmp_path):
    kw = dict(BASE, model_overrides=("rollout=[1,2]", "dropout=0.1"), max_steps=4, ckpt_every=2)
    want, _ = run_ranks(4, _fit, dict(kw, out=str(tmp_path / "a")), "4")[0]
    got, _ = run_ranks(1, _fit, dict(kw, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step0000002.ckpt")), "1")[0]
    assert all(abs(x - y) <= 1e-10 * abs(y) for x, y in zip(got[2:], want[2:])), (got, want)


def test_a_first_format_checkpoint_still_resumes(tmp_path):
    "A single-file checkpoint of the first format (the full model) resumes and continues exactly like the store it came from."
    a = Trainer(TrainConfig(**BASE, max_steps=4, ckpt_every=2, out=str(tmp_path / "a")), groups=ONE())
    a.fit()
    ck = load_checkpoint(tmp_path / "a" / "step0000002.ckpt")
    old = tmp_path / "old.ckpt"
    save_checkpoint(old, {**{k: ck[k] for k in ("config", "params", "adam", "scheduler", "step", "lrs", "history", "train")},
                          "format": "jigsaw_ref/1", "layout": (1, 1, 1), "mode": "exact"})
    b = Trainer(TrainConfig(**BASE, max_steps=4, out=str(tmp_path / "b"), resume=str(old)), groups=ONE())
    assert (b.step, b.samples) == (2, 2)
    b.fit()
    assert [h["loss"] for h in b.history] == [h["loss"] for h in a.history]


def test_a_mode_mismatch_is_refused(tmp_path):
    t = Trainer(TrainConfig(**BASE, max_steps=1, out=str(tmp_path)), groups=ONE())
    path = t.save("x.ckpt")
    with pytest.raises(CheckpointError, match="written in mode 'exact', this run is --mode faithful"):
        Trainer(TrainConfig(**BASE, mode="faithful", max_steps=1, out=str(tmp_path), resume=str(path)), groups=ONE())


# --------------------------------------------------------------------------------------- the demo and the flags

@pytest.fixture
def fake_launch(monkeypatch):
    "Record the commands `demo` would run instead of running them."
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    return calls


def test_demo_fails_loudly_when_the_evaluation_cannot_be_imported(monkeypatch, tmp_path, fake_launch):
    monkeypatch.setitem(sys.modules, "jigsaw_ref.evaluate", None)  # `import jigsaw_ref.evaluate` raises ImportError
    with pytest.raises(ImportError, match="the evaluation cannot be imported"):
        demo(["--out", str(tmp_path)])
    assert len(fake_launch) == 1


def test_demo_is_bounded_by_steps_and_a_seed(monkeypatch, tmp_path, fake_launch):
    evaluated = []
    monkeypatch.setitem(sys.modules, "jigsaw_ref.evaluate", types.SimpleNamespace(main=lambda argv: evaluated.append(argv) or 0))
    assert demo(["--out", str(tmp_path)]) == 0
    cmd = fake_launch[0]
    arg = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert (arg("--max-steps"), arg("--seed"), float(arg("--max-minutes"))) == (str(DEMO_STEPS), "0", 0.0)
    demo(["--out", str(tmp_path), "--steps", "30", "--seed", "3"])
    assert (fake_launch[1][fake_launch[1].index("--max-steps") + 1], fake_launch[1][fake_launch[1].index("--seed") + 1]) == ("30", "3")
    assert evaluated[0][0] == str(tmp_path / "final.ckpt")


@pytest.mark.slow
def test_the_same_4way_run_twice_is_bit_identical_on_cpu(tmp_path):
    "What makes the demo's scorecard the same on every machine: a steps-bounded run from a seed repeats exactly."
    args = ["--model", "tiny", "--way", "4", "--max-steps", "3", "--progress", "false", "--val-batches", "1"]
    for name in ("a", "b"):
        r = cli(4, args + ["--out", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (load_checkpoint(tmp_path / n / "final.ckpt") for n in ("a", "b"))
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_set_adds_to_the_config_files_model_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('model = "tiny"\nmodel_overrides = ["hidden=64", "f_s=0.25"]\n')
    tc = parse_args(["--config", str(f), "--set", "f_c=0.5"])
    cfg = tc.model_config()
    assert tc.model_overrides == ("hidden=64", "f_s=0.25", "f_c=0.5") and (cfg.hidden, cfg.f_s, cfg.f_c) == (64, 0.25, 0.5)
    assert parse_args(["--config", str(f), "--set", "hidden=48"]).model_config().hidden == 48  # the flag wins


def test_every_flag_has_a_help_line():
    ap = arg_parser()
    flags = {a.option_strings[-1]: a.help for a in ap._actions if a.option_strings}
    assert all(flags.values()), [f for f, h in flags.items() if not h]
    assert "samples per model group per step" in flags["--batch"] and "(default: 1)" in flags["--batch"]
    assert "adds to the config file" in flags["--set"]
    r = cli(1, ["--help"], timeout=120)  # as the launchers run it: `python -m jigsaw_ref.train`
    assert r.returncode == 0 and "samples per model group per step" in r.stdout and "None (default" not in r.stdout


def test_the_progress_bar_total_is_the_real_bound(tmp_path):
    t = Trainer(TrainConfig(**BASE, max_steps=1000, max_minutes=1.0, out=str(tmp_path)), groups=ONE())
    bar = types.SimpleNamespace(total=t.total_steps, n=0, update=lambda k: None, set_postfix=lambda **kw: None)
    t.step = 10
    t._tick(bar, {"loss": 1.0, "k": 1, "step_time": 3.0}, elapsed=30.0, done=10)  # 10 steps in 30 s, 30 s left
    assert bar.total == 20
    t2 = Trainer(TrainConfig(**BASE, max_steps=7, out=str(tmp_path)), groups=ONE())
    assert t2.total_steps == 7


def test_a_faithful_run_resumed_on_its_own_layout_continues_bit_for_bit(tmp_path):
    "Faithful mode's per-rank copies (biases, local LayerNorms) differ between partners; the store keeps every copy."
    kw = dict(BASE, mode="faithful", max_steps=4, ckpt_every=2)
    want, _ = run_ranks(4, _fit, dict(kw, out=str(tmp_path / "a")), "2x2")[0]
    got, _ = run_ranks(4, _fit, dict(kw, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step0000002.ckpt")), "2x2")[0]
    assert got == want


def test_a_step_never_touches_the_global_random_generator(tmp_path):
    "Dropout masks come from (seed, step) and global indices: the trainer neither reseeds nor draws from torch's generator."
    t = Trainer(TrainConfig(**dict(BASE, model_overrides=("dropout=0.1",)), max_steps=2, out=str(tmp_path)), groups=ONE())
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    t.train_step(t.next_indices(), 1)
    assert torch.equal(before, torch.get_rng_state())


# ------------------------------------------------------------ resume is faithful to the run or refuses (issue 17)

@pytest.fixture
def no_fsync(monkeypatch):
    "In-process checkpoints without fsync (what these tests look at is the schedule, not durability)."
    import jigsaw_ref.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "FSYNC", False)


def _lrs(t): return [g["lr"] for g in t.opt.param_groups]


def _stepped(kw, out, n):
    "A fresh trainer of `kw` whose schedule is stepped `n` times: the learning rates a run of those settings has after n steps."
    t = Trainer(TrainConfig(**kw, out=str(out)), groups=ONE())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": only a replay
        for _ in range(n): t.sched.step()
    return t


def test_a_longer_run_on_resume_is_refused_or_rescheduled_so_the_lr_never_climbs_back(tmp_path, no_fsync):
    "A 4-step run's step-3 checkpoint, resumed for 8 steps: refused; with --reschedule the cosine of an 8-step run from step 3 on."
    kw = dict(BASE, max_steps=4, ckpt_every=3)
    Trainer(TrainConfig(**kw, out=str(tmp_path / "a")), groups=ONE()).fit()
    ck = str(tmp_path / "a" / "step0000003.ckpt")
    longer = dict(kw, max_steps=8, ckpt_every=0)
    with pytest.raises(ResumeError, match=r"\{'total_steps': \(4, 8\)\}.*a bound of 4 steps \(--max-steps, --epochs\).*--reschedule"):
        Trainer(TrainConfig(**longer, out=str(tmp_path / "b"), resume=ck), groups=ONE())
    b = Trainer(TrainConfig(**longer, out=str(tmp_path / "b"), resume=ck, reschedule=True), groups=ONE())
    assert b.step == 3
    b.fit()
    whole = Trainer(TrainConfig(**longer, out=str(tmp_path / "d")), groups=ONE())
    whole.fit()
    lrs = [h["lr"] for h in b.history]
    assert lrs[3:] == pytest.approx([h["lr"] for h in whole.history][3:], rel=1e-12, abs=1e-15)
    # from the resume on, the decay of the 8-step run to zero (a restored 4-step cosine would climb back up after step 4)
    assert all(x >= y for x, y in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0, abs=1e-15)
    final = load_checkpoint(tmp_path / "b" / "final.ckpt")
    assert final["schedule"]["total_steps"] == 8 and final["schedule_changes"] == [dict(step=3, changed={"total_steps": [4, 8]})]


def test_a_changed_lr_on_resume_is_refused_or_rescheduled_and_recorded(tmp_path, no_fsync):
    kw = dict(BASE, max_steps=4, ckpt_every=2)
    Trainer(TrainConfig(**kw, out=str(tmp_path / "a")), groups=ONE()).fit()
    ck = str(tmp_path / "a" / "step0000002.ckpt")
    with pytest.raises(ResumeError, match=r"\{'lr': \(0\.001, 0\.002\)\}.*resume with the checkpoint's \(--lr 0\.001\)"):
        Trainer(TrainConfig(**dict(kw, lr=2e-3), out=str(tmp_path / "b"), resume=ck), groups=ONE())
    b = Trainer(TrainConfig(**dict(kw, lr=2e-3), out=str(tmp_path / "b"), resume=ck, reschedule=True), groups=ONE())
    assert _lrs(b) == pytest.approx(_lrs(_stepped(dict(kw, lr=2e-3), tmp_path / "c", 2)), rel=1e-12)
    b.fit()
    final = load_checkpoint(tmp_path / "b" / "final.ckpt")  # what the run actually used, and when it changed
    assert (final["schedule"]["lr"], final["train"]["lr"]) == (2e-3, 2e-3)
    assert final["schedule_changes"] == [dict(step=2, changed={"lr": [1e-3, 2e-3]})]


def test_a_changed_data_parallelism_on_resume_keeps_the_samples_consumed(tmp_path, no_fsync):
    "dp 1 -> dp 2 with the same per-group batch doubles the global batch: refused as a change of the run; with --reschedule"
    " it continues from the samples consumed (2), not from step x new global batch (4)."
    Trainer(TrainConfig(**BASE, max_steps=4, ckpt_every=2, out=str(tmp_path / "a")), groups=ONE()).fit()
    kw = dict(BASE, max_steps=4, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "step0000002.ckpt"))
    with pytest.raises(RankFailed, match=r"ResumeError: .*\{'global_batch': \(1, 2\)\}.*a global batch of 1 \(--batch x data parallelism\)"):
        run_ranks(2, _position, kw, "1")
    pos = run_ranks(2, _position, dict(kw, reschedule=True), "1")
    order = epoch_order(len(Trainer(TrainConfig(**BASE, out=str(tmp_path / "c")), groups=ONE()).train_ds), 0, 0)
    assert pos == [(2, 2, 2, [int(order[2])]), (2, 2, 2, [int(order[3])])]


def _faithful_2way_checkpoint(comm, out):
    t = Trainer(TrainConfig(**BASE, mode="faithful", way="2", max_steps=1, out=str(out)), groups=make_groups(Grid.named("2", 2), comm=comm))
    t.fit()


def test_a_faithful_checkpoint_is_refused_by_an_exact_run(tmp_path, no_fsync):
    run_ranks(2, _faithful_2way_checkpoint, tmp_path / "f")
    with pytest.raises(ResumeError, match=r"written in mode 'faithful', this run is --mode exact; resume with --mode faithful"):
        Trainer(TrainConfig(**BASE, max_steps=1, out=str(tmp_path / "e"), resume=str(tmp_path / "f" / "final.ckpt")), groups=ONE())
