"""SLURM for real: a single-node Slurm (Debian's slurm-wlm: munged, slurmctld, slurmd) runs the GPU-cluster
tutorial's batch script on 4 CPU tasks; the 4-way training runs on 4 MPI ranks started by `srun --mpi=pmi2`,
writes its checkpoints, resumes from them when submitted again, and resumes again when Slurm requeues it mid-run.

Slow (about 8 minutes on 2 busy cores); needs root (it installs packages and starts system daemons):
    python -m pytest tests/test_slurm.py -m slow -x
JIGSAW_SLURM_RECORD=benchmarks/results/slurm_run.log also writes the commands and what they printed there."""
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_mpi import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
SLURM = Path(ROOT) / "benchmarks" / "slurm"
BATCH = SLURM / "train_4way.sbatch"
RECORD = []  # (command, output) in the order they ran, for JIGSAW_SLURM_RECORD


def sh(cmd, timeout=120, check=True, label=None, **kw):
    "Run `cmd` (a list), note it (or `label`) and its output for the record, return the completed process."
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    RECORD.append((label or " ".join(map(str, cmd)), r.stdout + r.stderr))
    if check: assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def slurm():
    "A running single-node Slurm, from benchmarks/slurm/start_slurm.sh (skips where it cannot be installed)."
    if os.geteuid() != 0: pytest.skip("needs root: start_slurm.sh installs slurm-wlm and starts munged, slurmctld, slurmd")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it (not Debian?)")
    r = subprocess.run(["bash", str(SLURM / "start_slurm.sh")], capture_output=True, text=True, timeout=900)
    RECORD.append(("benchmarks/slurm/start_slurm.sh", r.stdout + r.stderr))
    if r.returncode != 0 and ("apt-get" in r.stderr or "not installed" in r.stderr):
        pytest.skip(f"slurm-wlm cannot be installed here (offline?): {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    sh(["sinfo"]); sh(["srun", "-n", "4", "-t", "1", "hostname"])
    return r.stdout


def submit_env(out, steps, ckpt_every, extra=""):
    return dict(os.environ, PYTHON=sys.executable, OUT=str(out), STEPS=str(steps), CKPT_EVERY=str(ckpt_every), EXTRA=extra)


def submit_line(out, steps, ckpt_every, log, extra=""):
    env = f" EXTRA='{extra}'" if extra else ""
    return f"PYTHON={sys.executable} OUT={out} STEPS={steps} CKPT_EVERY={ckpt_every}{env} sbatch --wait -o {log} benchmarks/slurm/train_4way.sbatch"


def metrics(out):
    "The run's history as {step: row} from its metrics.csv."
    with open(out / "metrics.csv") as f: return {int(r["step"]): r for r in csv.DictReader(f)}


def job_field(job, key):
    r = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, timeout=60)
    return next((w.split("=", 1)[1] for w in r.stdout.split() if w.startswith(key + "=")), None)


def committed(out, name):
    return (out / name / "manifest.json").exists() or (out / name / "zarr.json").exists()


def test_4way_training_under_sbatch_checkpoints_resumes_and_survives_a_requeue(slurm, tmp_path):
    out, log1, log2 = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    # 1. a fresh run of 8 steps: 4 ranks under srun, one 2 x 2 model group, checkpoints at 4 and 8
    r = sh(["sbatch", "--wait", "-o", log1, BATCH], timeout=900, check=False, env=submit_env(out, 8, 4),
           label=submit_line(out, 8, 4, log1))
    job1 = int(r.stdout.split()[-1]) if r.stdout.strip() else None
    text1 = log1.read_text() if log1.exists() else ""
    RECORD.append((f"cat {log1}", text1))
    assert r.returncode == 0, f"sbatch --wait: exit {r.returncode}\n{r.stdout}{r.stderr}\n{text1}"
    assert "no checkpoint" in text1 and "starting fresh" in text1
    assert "jigsaw-train: srun world=4 layout dp=1 x domain=2 x tensor=2" in text1 and "(1 group(s) of 4)" in text1
    assert all(committed(out, n) for n in ("step0000004.ckpt", "step0000008.ckpt", "final.ckpt")), sorted(os.listdir(out))
    first = metrics(out)
    assert sorted(first) == list(range(1, 9))

    # 2. the same folder submitted again for 24 steps (a longer run on purpose: --reschedule re-derives the schedule
    # at step 8); requeued by Slurm after step 16: the SIGTERM stops the run at a step boundary with a checkpoint
    p = subprocess.Popen(["sbatch", "--wait", "-o", str(log2), str(BATCH)], cwd=ROOT, env=submit_env(out, 24, 4, "--reschedule"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = int(p.stdout.readline().split()[-1])  # "Submitted batch job N"
    RECORD.append((submit_line(out, 24, 4, log2, "--reschedule") + "  &", f"Submitted batch job {job}\n"))
    t0 = time.time()
    while not committed(out, "step0000016.ckpt"):
        assert time.time() - t0 < 900 and p.poll() is None, f"no step 16 checkpoint\n{log2.read_text() if log2.exists() else ''}"
        time.sleep(1)
    before = metrics(out)  # what the interrupted run had done
    sh(["scontrol", "requeue", str(job)], label=f"scontrol requeue {job}   # after the step-16 checkpoint, {time.strftime('%H:%M:%S')}")
    try: rest = p.communicate(timeout=1200)[0]
    except subprocess.TimeoutExpired:
        p.kill(); sh(["scancel", str(job)], check=False)
        pytest.fail(f"job {job} did not finish within 20 minutes after the requeue\n{log2.read_text()}")
    while job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", None):
        assert time.time() - t0 < 2000, f"job {job} still {job_field(job, 'JobState')}"
        time.sleep(2)  # sbatch --wait may return at the requeue; the job itself ends later
    text2 = log2.read_text()
    RECORD.append((f"wait   # the sbatch --wait of job {job} returned at {time.strftime('%H:%M:%S')}", rest))
    for j in (job1, job):
        RECORD.append((f"scontrol show job {j}   # some fields", " ".join(f"{k}={job_field(j, k)}" for k in
                       ("JobState", "Restarts", "SubmitTime", "StartTime", "EndTime", "RunTime", "NumTasks")) + "\n"))
    RECORD.append((f"cat {log2}", text2))
    assert job_field(job, "JobState") == "COMPLETED" and job_field(job, "Restarts") == "1", text2
    assert "restart 0" in text2 and f"resumed from {out / 'step0000008.ckpt'} at step 8" in text2
    assert "stopped by SIGTERM" in text2 and "exit status 75" in text2
    assert "DUE TO JOB REQUEUE" in text2 and "restart 1" in text2
    resumed = int(text2.split("restart 1")[1].split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed >= 16, text2
    assert text2.count("jigsaw-train: srun world=4") == 2 and "training step exit status 0" in text2

    # the step count continues: one history 1..24, whose first steps were restored from the checkpoints, not redone
    final = metrics(out)
    assert sorted(final) == list(range(1, 25))
    assert all(final[s]["step_time"] == first[s]["step_time"] for s in range(1, 9))  # timings never repeat exactly
    assert all(final[s]["step_time"] == before[s]["step_time"] for s in range(9, min(resumed, max(before)) + 1))
    assert all(committed(out, f"step{s:07d}.ckpt") for s in range(4, 25, 4)) and committed(out, "final.ckpt")
    RECORD.append(("checks", f"4 ranks (world=4, 2 x 2), checkpoints {sorted(n for n in os.listdir(out) if n.endswith('.ckpt'))}, "
                   f"second submission resumed from step 8, requeued run resumed from step {resumed}, history steps 1..24\n"))


def teardown_module(module):
    path = os.environ.get("JIGSAW_SLURM_RECORD")
    if not path or not RECORD: return
    with open(Path(ROOT) / path, "w") as f:
        f.write(f"# tests/test_slurm.py, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, on {os.uname().nodename} ({os.cpu_count()} CPUs)\n")
        for cmd, text in RECORD: f.write(f"\n$ {cmd}\n{text.rstrip()}\n")
