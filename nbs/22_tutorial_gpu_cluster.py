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
# srun -N 2 --ntasks-per-node 4 --gpus-per-task 1 --cpus-per-task 8 \
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
# built against the cluster's MPI, or `srun --mpi=pmi2` for an MPICH build); rank 0 picks a free port and
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
