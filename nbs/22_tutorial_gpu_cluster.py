# %% [markdown]
# # Running on a GPU cluster
#
# > Launching `jigsaw-train` with srun, mpirun or torchrun on NCCL, one rank per GPU; how data-parallel replicas of 4-way groups map onto nodes; TF32 and BF16; memory per GPU of the paper's models; and what one H200 measured.

# %%
import json, math
from pathlib import Path
from jigsaw_ref.config import preset
from jigsaw_ref.grid import Grid, group_table, groups
from jigsaw_ref.mixer import param_count
from jigsaw_ref.parallel import layout_param_count, shard_spec

ROOT = Path("..") if Path("../benchmarks").exists() else Path(".")

# %% [markdown]
# ## One rank per GPU, NCCL
#
# On GPUs, run with `--backend torch --device cuda`: the groups are `torch.distributed` process groups on
# NCCL, tensors never leave the GPU, and rank $r$ uses GPU `r % torch.cuda.device_count()` (so with
# `--gpus-per-task 1`, where each rank sees one GPU, every rank uses its own `cuda:0`). The
# launcher only has to start one process per GPU and say who is who:
#
# ```sh
# # Slurm, 2 nodes of 4 GPUs: two data-parallel replicas of a 4-way model
# export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# srun --mpi=pmi2 -N 2 --ntasks-per-node 4 --gpus-per-task 1 --cpus-per-task 8 \
#     jigsaw-train --backend torch --device cuda --precision tf32 --way 4 --model c3 --data $DATA
#
# # any MPI launcher (here Open MPI), same thing
# mpirun -n 8 --map-by ppr:4:node -x MASTER_ADDR \
#     jigsaw-train --backend torch --device cuda --precision tf32 --way 4 --model c3 --data $DATA
#
# # torchrun (no MPI at all): run it on each node
# torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 \
#     --no-python jigsaw-train --backend torch --device cuda --precision tf32 --way 4 --model c3 --data $DATA
# ```
#
# Under `torchrun` the ranks come from `RANK`/`WORLD_SIZE` and `torch.distributed` initialises from torchrun's
# rendezvous. Under `srun`/`mpirun` they come from MPI (mpi4py must be able to start under that launcher, e.g.
# built against the cluster's MPI, or `srun --mpi=pmi2` for the PyPI MPICH wheel: see
# [Slurm for real](#slurm-for-real-one-node-four-cpu-tasks) below); rank 0 picks a free port and
# broadcasts it, and every rank connects to `MASTER_ADDR` (default `127.0.0.1`, so **set it** on more than one
# node). `jigsaw_ref.comm.launcher()` reports which of the three started the process, and rank 0 prints it in
# its first line.
#
# With `--backend torch` the exchanges inside a model group are NCCL collectives (`all_gather`,
# `reduce_scatter`, `all_reduce`); the paper's point-to-point exchanges (`--algo p2p`) exist in the mpi4py
# backend.
#
# **CUDA-aware MPI instead of NCCL.** `--backend mpi` with `--device cuda` on several ranks is refused, because
# the mpi4py `Group` of `jigsaw_ref.comm` moves CPU buffers: it hands MPI `tensor.numpy()` views and allocates
# its receive buffers with `torch.empty` on the CPU. To run it on a CUDA-aware MPI one would pass the device
# tensors themselves (mpi4py accepts objects with `__cuda_array_interface__`/DLPack when the MPI library is
# CUDA-aware), allocate receive buffers on the input's device, synchronise the current CUDA stream before each
# send (MPI does not follow CUDA streams), and lift the check in `train.check_settings`. Nothing above the
# `Group` would change: the layers only call `all_gather`, `reduce_scatter` and `all_reduce`.

# %% [markdown]
# ## Groups on nodes
#
# Model groups are consecutive ranks, so with 4 ranks per node and `--way 4` **each node holds one whole
# model**: all tensor- and domain-parallel exchanges (every layer, every step) stay on the node's NVLink, and
# only the data-parallel gradient all-reduce (once per step, among the ranks that hold the same block) crosses
# the network. Two nodes, dp 2 x 4-way:

# %%
g = Grid.named(4, world=8)
print(group_table(g))
print("node of each rank:", [r // 4 for r in range(g.world)])

# %%
assert all(len({r // 4 for r in members}) == 1 for members in groups(g)["model"])  # every model group is one node


# %% [markdown]
# With `--way 2` a node holds two 2-way models; with `--way 1` four replicas. Keep the number of ranks per node
# a multiple of the model group size, or model groups will straddle nodes.

# %% [markdown]
# ## TF32 and BF16
#
# `--precision fp32` (default) runs full float32 GEMMs; `--precision tf32` lets cuBLAS use TF32 tensor cores
# for float32 matrix products (`torch.backends.cuda.matmul.allow_tf32`), as the paper trained;
# `--precision bf16` runs the forward pass under `torch.autocast(bfloat16)` with float32 master weights,
# gradients and Adam state, and computes the loss in float32. Neither is offered on CPU.

# %% [markdown]
# ## Memory per GPU
#
# Training state in float32 is 16 bytes per parameter: the weight, its gradient and Adam's two moments. Jigsaw
# cuts every weight matrix over the model group and replicates only LayerNorm weights and a few biases, so the
# state per GPU falls almost as $1/(PQ)$. The largest rank's share of the paper's presets
# (`parallel.shard_spec`; the `params` column is the one-process count from `parallel.layout_param_count`, and
# the 2- and 4-way totals are a little larger, by the LayerNorm weights and biases each domain partner keeps):

# %%
def per_rank(c, p, q):
    "Parameters on the largest rank of a p x q model group."
    return max(sum(math.prod(len(ix) for ix in idx) for idx, _, _ in shard_spec(c, p, q, i, j).values())
               for i in range(p) for j in range(q))

print(f"{'preset':<9}{'params':>15}" + "".join(f"{w:>22}" for w in ("1-way", "2-way", "4-way")))
for name in ("c1_1way", "c3", "c4_2way", "c4_4way"):
    c = preset(name)
    cells = [f"{per_rank(c, p, q) / 1e9:6.3f} B {16 * per_rank(c, p, q) / 2**30:6.1f} GiB" for p, q in ((1, 1), (1, 2), (2, 2))]
    print(f"{name:<9}{layout_param_count(c, 1, 1):>15,}" + "".join(f"{x:>22}" for x in cells))

# %%
test_c3 = preset("c3")
assert layout_param_count(test_c3, 1, 1) == param_count(test_c3) == 1_101_500_346
assert per_rank(test_c3, 2, 2) < 0.26 * param_count(test_c3)

# %% [markdown]
# Activations come on top. The H200 measurement below found a peak of about 28.4 GiB for one training step of
# `c3` on one GPU (batch 1), of which 16.4 GiB is the state above, so about 12 GiB is activations and
# workspace. The activations of a 4-way rank are blocks of a quarter of each $(T, H)$ matrix, so if they shrink
# like the state (an estimate, not a measurement) a 4-way `c3` rank needs about 4.1 + 3 GiB. The 2.57 B
# `c4_4way` model needs 38 GiB of state alone on one GPU, which is why the paper trained it 4-way on A100s of
# 40 GB.

# %% [markdown]
# ## One H200, measured
#
# `benchmarks/gpu_check.py` checks the model on CUDA against the float64 CPU reference (the `tiny` preset, two
# rollout steps, forward and gradients) and times one training step of a paper-size model on one GPU in FP32,
# TF32 and BF16 against the GEMM peak measured in the same run (8192^3 products). FLOPs follow the paper's
# convention (3 x forward GEMM FLOPs). The saved result:

# %%
r = json.loads((ROOT / "benchmarks/results/gpu_check_h200.json").read_text())
m = r["model"]
print(f"card: {r['device']}  (torch {r['torch']})")
print(f"model: preset {m['preset']}, {m['params'] / 1e9:.2f} B parameters, {m['train_step_tflop']:.1f} TFLOP per training step\n")
print(f"{'precision':<10}{'s/step':>8}{'TFLOP/s':>9}{'GEMM peak':>11}{'of peak':>9}{'peak mem':>10}")
for p in ("fp32", "tf32", "bf16"):
    s = r["steps"][p]
    print(f"{p:<10}{s['s_per_step']:>8.3f}{s['tflops']:>9.1f}{r['gemm_peak_tflops'][p]:>11.1f}"
          f"{s['fraction_of_measured_gemm_peak']:>9.0%}{s['peak_mem_gib']:>7.1f} GiB")
print("\nrelative error vs CPU float64 (tiny preset, k = 2):")
print(f"{'dtype':<10}{'output':>10}{'input grad':>12}{'weight grad':>13}")
for d, e in r["correctness_vs_cpu_float64"].items():
    print(f"{d:<10}{e['output_rel_err']:>10.1e}{e['input_grad_rel_err']:>12.1e}{e['tok1_weight_grad_rel_err']:>13.1e}")

# %%
assert r["device"] == "NVIDIA H200" and m["params"] == 1_101_500_346
assert r["correctness_vs_cpu_float64"]["float64"]["output_rel_err"] < 1e-12

# %% [markdown]
# How to read it:
#
# - **Correctness.** On the GPU in float64 the model agrees with the CPU reference to rounding (about 1e-15);
#   float32 to about 4e-7; TF32 to about 1e-3, the size of TF32's 10-bit mantissa.
# - **FP32** runs at about 92% of the card's measured FP32 GEMM rate: the step is almost all large GEMMs. The
#   paper reports 3.03 s per step and 81% of FP32 peak for the same model on one A100 (the paper's strong-scaling table, arXiv 2507.05753); these
#   are different cards, so only the fractions compare.
# - **TF32** is about 4x faster than FP32 but reaches under half of the TF32 GEMM rate, and **BF16** (autocast)
#   about 1.4x faster again at about a third of its rate: once the GEMMs are fast, the rest of the step
#   (LayerNorm, GELU, the optimizer, autocast's casts) is a larger share. The paper's 0.712 s per step in TF32
#   on an A100 is the figure to compare the TF32 row with, across cards.
# - Peak memory is about 28 GiB per GPU for this 1.10 B model at batch 1, well inside an H200 (and inside the
#   A100 40 GB the paper used).

# %% [markdown]
# ## Slurm for real: one node, four CPU tasks
#
# Everything above about `srun` can be tried without a cluster: Debian's `slurm-wlm` runs a real Slurm
# controller (`slurmctld`) and node daemon (`slurmd`) on one machine, authenticated by `munge`.
# `benchmarks/slurm/start_slurm.sh` installs them (`apt-get install slurm-wlm munge`), writes a
# `/etc/slurm/slurm.conf` for this one node, starts `munged`, `slurmctld` and `slurmd`, and checks `sinfo` and
# `srun hostname`; run again, it only reports what is already in place. From the repository root, as root (it
# starts system daemons), with the project's venv active:
#
# ```sh
# benchmarks/slurm/start_slurm.sh          # the first time it installs the packages too
# sinfo                                    # partition "debug", one node, idle
# srun -n 4 hostname
# ```
#
# The node advertises 4 CPUs whatever the machine has (`CPUs=4` with `SlurmdParameters=config_overrides`), so
# a 4-task job fits on a 2-core machine, oversubscribed. `SLURM_NODE_CPUS=8 benchmarks/slurm/start_slurm.sh`
# advertises 8. No cgroup plugins (`ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`), no accounting
# database, and `AuthInfo=cred_expire=30` so that a requeued job may start again sooner (here about a minute
# after the requeue instead of 2 min 45 s with the default 120 s). `benchmarks/slurm/stop_slurm.sh` stops the
# three daemons.
#
# The batch script is the tutorial's `srun` line scaled to 4 CPU tasks: one 4-way (2 x 2) `tiny` model,
# 24 steps, a checkpoint every 8, in a job folder:
#
# ```sh
# mkdir -p runs/slurm                       # where the job's log goes: sbatch does not create it
# sbatch benchmarks/slurm/train_4way.sbatch # "Submitted batch job 1"
# squeue                                    # R (running) in a few seconds
# tail -f runs/slurm/jigsaw-4way-1.log      # the job's output (1: the job id sbatch printed)
# ls runs/slurm/job1                        # step0000008.ckpt, step0000016.ckpt, ..., final.ckpt, metrics.csv
# ```
#
# On this shared 2-core machine an 8-step job took between 36 s (the recorded run below) and 2 min 20 s, and
# the default 24 steps 1 min 24 s, depending on the other work running; most of it is start-up (four Pythons
# importing torch and opening the data), then under a second to a few seconds per step.
# `STEPS=48 CKPT_EVERY=4 sbatch ...` changes the bound (sbatch passes the environment to the job), `OUT=...`
# the job folder. The script, without its comments:

# %%
sbatch_text = (ROOT / "benchmarks/slurm/train_4way.sbatch").read_text()
code = [l for l in sbatch_text.splitlines() if not l.startswith("# ") and l != "#"]  # the script, less its comments
print("\n".join(l for i, l in enumerate(code) if l or (i and code[i - 1])))

# %%
assert "#SBATCH --requeue" in sbatch_text and "#SBATCH --signal=B:USR1@120" in sbatch_text
assert "srun --mpi=pmi2" in sbatch_text and "--way 4" in sbatch_text and "--ckpt-every" in sbatch_text

# %% [markdown]
# ### How the MPICH wheel finds its ranks under srun
#
# The project's MPI is the PyPI `mpich` wheel (MPICH 5.0.2) under `mpi4py`; `srun` starts the 4 processes
# itself, so each one's `MPI_Init` must learn its rank and the others from Slurm through a PMI. Tried with
# Debian's Slurm 22.05.8 (`srun -n 4 python -c "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())"`):
#
# | srun option | result |
# |---|---|
# | `--mpi=pmi2` | **works**: 4 ranks of one world. MPICH's default PMI client (PMI-1; `MPIR_CVAR_PMI_VERSION=1` works the same) talks to Slurm's pmi2 plugin |
# | `--mpi=pmi2` with `MPIR_CVAR_PMI_VERSION=2` | fails in `MPI_Init` ("Internal MPI error") |
# | `--mpi=none` (the default here) | 4 separate worlds of 1 rank each, **silently**: `jigsaw-train --way 4` then fails on every task with `ConfigError: world size 1 is not a multiple of the model group size 2x2=4`, and `--way 1` would run 4 unrelated trainings into one folder |
# | `--mpi=pmix` | needs `libpmix-dev` for Slurm's plugin to load at all; then the wheel stops: "Runtime environment uses unsupported PMI version PMIx" (it is built without PMIx) |
#
# So: `srun --mpi=pmi2` (or `MpiDefault=pmi2` in slurm.conf). The other route also works: one batch script
# running the wheel's own `mpiexec -n $SLURM_NTASKS ...`, whose Hydra launcher starts its proxies with `srun`
# inside the allocation. A cluster's own MPI (Open MPI or MPICH built with PMIx) goes with `--mpi=pmix`.

# %% [markdown]
# ### Requeue and resume
#
# Every launch of the batch script, the first and every restart, runs the same command with `--resume auto`:
# the trainer continues from the newest checkpoint in the job folder that verifies (a step checkpoint, the one
# written at a signal, or `final.ckpt`; a damaged one is skipped and named), or, when there is none, starts
# fresh and says so. So a job that Slurm requeues (`scontrol requeue`, a node failure, preemption;
# `#SBATCH --requeue` allows it) runs the script again from the top and continues where it stopped, on the
# same schedule. Resuming with other schedule settings is refused, naming what changed: to continue a finished
# run to a larger `STEPS` on purpose, add `EXTRA=--reschedule` (the cosine is then re-derived for the new bound
# from the resumed step on, which is not the same as one run of the larger bound). `#SBATCH --open-mode=append`
# keeps all runs of a job in one log; `KEEP_LAST=3` keeps only the newest three step checkpoints.
#
# ```sh
# scontrol requeue 1                       # while job 1 trains: SIGTERM to its tasks (SIGKILL 30 s later)
# squeue                                   # PD (BeginTime) for about a minute, then R: "restart 1" in the log
# ```
#
# What the trainer does with a signal decides how much is lost. `jigsaw-train` catches SIGTERM, SIGINT and
# SIGUSR1 (`--stop-signals`) on every rank; the ranks agree at the next step boundary, write a checkpoint of that
# step and the metrics, and exit with `--requeue-exit-code` (75 in the batch script); a second signal aborts at
# once (the last committed checkpoint stays intact). Nothing is lost, even with `--ckpt-every 0`, as long as a
# step and a checkpoint write fit in Slurm's `KillWait` (30 s by default) or in the `--signal` lead below.
# `--step-timeout` (600 s in the script) ends the job when a rank makes no progress that long (a stalled node),
# naming the rank and step it waited on, instead of letting it hang until the time limit.
#
# Three things were needed that a reader would not guess:
#
# - **A requeued job's first MPI step hangs in `MPI_Init`** when the killed run's MPI step had the same step id
#   (`<jobid>.0`: a requeued job numbers its steps from 0 again). Requeued mid-step, the same `srun --mpi=pmi2`
#   step hung in `MPI_Init` after the restart in 3 of 3 tries (the trainer once, a 4-rank `mpi4py` barrier
#   twice), and ran at once when a throwaway `srun --ntasks=1 true` came first, making the MPI step
#   `<jobid>.1`. The batch script does that on every restart (`SLURM_RESTART_COUNT > 0`).
# - **The time-limit signal.** `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to the batch shell (`B:`) about
#   120 s before the time limit (Slurm may send it up to a minute early). The script traps it and passes it on to
#   the training step's tasks with `scancel --signal=USR1 <jobid>.<step>` (not to `srun`: `srun` receiving a
#   signal ends its tasks outright); they stop with a checkpoint and exit 75, and the script, seeing that exit
#   status, runs `scontrol requeue` on its own job. The signal lead must exceed a step plus a checkpoint write,
#   and the time limit must leave room for the start-up (up to 75 s here) plus some steps, or every restart is
#   stopped again before it trains (seen with a 3-minute limit).
# - **A preemption or `scontrol requeue` signals the tasks themselves** with SIGTERM, once per task, and Slurm
#   requeues the job on its own; the batch shell is ended too, so it does not requeue a second time.
#
# Both paths ran on the one-node Slurm above with `--ckpt-every 0`, so that the only step checkpoint is the one
# written at the signal (`benchmarks/results/slurm_signal.log`): the USR1 path stopped at step 21, the script
# requeued the job, and the restart resumed from `step0000021.ckpt` to the bound; `scontrol requeue` stopped a
# run at step 22 and its restart resumed from `step0000022.ckpt`. Each ended with one history, steps 1 to N.

# %%
signal_log = (ROOT / "benchmarks/results/slurm_signal.log").read_text()
keys = ("$ OUT", "$ scancel", "$ scontrol requeue", "== ", "jigsaw-train: stopped", "jigsaw-train: resumed", "srun: error", "   Requeue=")
print("\n".join(l[:160] for l in signal_log.splitlines() if l.startswith(keys)))

# %%
assert "--resume auto" in sbatch_text and "--requeue-exit-code" in sbatch_text and "--step-timeout" in sbatch_text
assert signal_log.count("stopped by SIG") == 2 and signal_log.count("Restarts=1") == 2
assert "resumed from runs/slurm/t17b/step0000021.ckpt at step 21" in signal_log and "resumed from runs/slurm/t17a/step0000022.ckpt" in signal_log

# %% [markdown]
# ### One recorded run
#
# `tests/test_slurm.py` (marked slow; root; `python -m pytest tests/test_slurm.py -m slow -x`, 3 to 7 minutes
# here) starts Slurm with the script above, submits the batch script with `sbatch --wait` for 8 steps (a
# checkpoint every 4), submits it again on the same folder for 24 steps, requeues that job with `scontrol
# requeue` right after its step-16 checkpoint, and checks: 4 ranks in one 2 x 2 group, the checkpoints, the
# second submission resuming from step 8, the requeued run from step 16, one history of steps 1 to 24 whose
# first steps were restored rather than recomputed (their measured step times are those of the earlier runs).
# `sbatch --wait` returns only when the requeued job has finished for good.
# With `JIGSAW_SLURM_RECORD=benchmarks/results/slurm_run.log` it writes the commands and their output. The
# saved record was made with the batch script before every launch passed `--resume auto` and before a changed
# bound on resume was refused; its second submission (8 steps continued to 24) now needs `EXTRA=--reschedule`.
# Its key lines:

# %%
record = (ROOT / "benchmarks/results/slurm_run.log").read_text()
keys = ("== ", "jigsaw-train:", "slurmstepd", "$ sbatch", "$ scontrol requeue", "job ", "4 ranks")
print(record.splitlines()[0])
print("\n".join(l[:160] for l in record.splitlines() if l.startswith(keys)))

# %%
assert record.count("jigsaw-train: srun world=4 layout dp=1 x domain=2 x tensor=2") == 3
assert "DUE TO JOB REQUEUE" in record and "restart 1" in record and "history steps 1..24" in record

# %% [markdown]
# ## What differs on a real cluster
#
# - **Nobody starts Slurm.** The administrators run `slurmctld` on a head node, `slurmd` on every compute node,
#   and `munged` everywhere with one shared key; `start_slurm.sh` is only for trying the job on one machine.
# - **Accounts and partitions.** Jobs are charged to an account and go to a partition with its own time limits:
#   `#SBATCH --account=<project>`, `#SBATCH --partition=<gpu partition>` (`sinfo -s` lists them,
#   `sacctmgr show assoc user=$USER` your accounts), often a `--qos`. `sacct -j <jobid>` shows finished jobs
#   where accounting exists (not on the node above).
# - **GPUs are generic resources (GRES).** `#SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-task=1
#   --cpus-per-task=8` gives each rank its own GPU (it sees it as `cuda:0`), and the flags become `--backend
#   torch --device cuda --precision tf32`; the node's cgroups confine each task to its GPU and cores. Set
#   `MASTER_ADDR` to the first node as in the `srun` line at the top of this page.
# - **Software comes from modules.** `module load` the site's CUDA, Python and MPI before activating the venv,
#   and build `mpi4py` against the site MPI (`MPICC=mpicc pip install --no-binary mpi4py mpi4py`) so that it
#   uses the fast network; then `--mpi=pmix` is usually the right srun option (`srun --mpi=list`).
# - **Shared file systems.** The job folder (`OUT`), the data and the venv must be on a file system every node
#   sees (home, project or scratch space): every rank writes its own blocks of a checkpoint and rank 0 commits
#   it. Scratch space is often purged; copy `final.ckpt` somewhere safe.
# - **Time limits and requeue.** Partitions cap a job's time; `--signal=B:USR1@120` and `--requeue` as in the
#   batch script let a long training run continue over several jobs. Some sites do not allow `--requeue`
#   or preempt jobs; then chain jobs instead: `sbatch --dependency=afterany:<jobid> benchmarks/slurm/train_4way.sbatch`
#   with the same `OUT`. A requeued job waits at least the cluster's credential lifetime (120 s by default).
