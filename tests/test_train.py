"""The trainer: parallel training equals 1-way training, resume equals an uninterrupted run, checkpoints
move between layouts exactly, and the command line rejects bad input clearly."""
import os
import subprocess
import sys

import pytest
import torch

from jigsaw_ref.comm import Group
from jigsaw_ref.train import CheckpointError, Trainer, TrainConfig, load_checkpoint, main
from test_mpi import ROOT, mpiexec

ONE = lambda: {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}  # noqa: E731
BASE = dict(model="tiny", dtype="float64", lr=1e-3, lr_encdec=1e-3, warmup_steps=2, progress=False, val_batches=2,
            model_overrides=("rollout=[1,2]",))


def cli(n, args, timeout=600):
    cmd = ([mpiexec(), "-n", str(n)] if n > 1 else []) + [sys.executable, "-m", "jigsaw_ref.train", *args]
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
