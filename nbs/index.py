# %% [markdown]
# # jigsaw_ref
#
# > A literate reference implementation of WeatherMixer and Jigsaw: training multi-billion-parameter AI weather models with domain + tensor model parallelism.

# %% [markdown]
# `jigsaw_ref` re-derives, implements and tests the method of *Jigsaw: Training Multi-Billion-Parameter AI
# Weather Models with Optimized Model Parallelism* (arXiv 2507.05753): **WeatherMixer**, an MLP-Mixer that
# forecasts the global atmosphere, and **Jigsaw**, which cuts every activation and every weight of it over a
# $p \times q$ grid of ranks (longitude bands $\times$ channel blocks) so that nothing large is replicated and
# each rank reads only its share of every sample from disk.
#
# Every parallel piece is checked in float64 against the one-process model (forward, input and weight
# gradients, and the parameters after optimizer steps) on the paper's 1-, 2- and 4-way layouts and on
# general $p\times q$ layouts with uneven sizes.

# %% [markdown]
# ## Quick start
#
# On a fresh Linux machine with Python 3.10+ (no GPU, no system MPI needed), from a checkout of this
# repository. **Train and evaluate** (4-way Jigsaw on 4 MPI ranks, the `demo` preset on the `small` grid, the embedded default
# data, which is generated on first use):
#
# ```sh
# python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && jigsaw-demo
# ```
#
# Measured on this project's 2-core machine (AMD EPYC, nothing else running; `benchmarks/results/demo_runs.txt`):
# from a fresh clone the demo takes about 8 minutes (1.2 simulating the default data on first use, then its
# statistics and climatology, 4 training 950 steps, the rest evaluation and start-up), 4.5 minutes once the data
# exists. It is bounded by steps from a fixed seed, so two runs print byte-identical scorecards; the model beat
# persistence in 39 of the 57 cells of the 6, 12 and 24 h leads, 56 of the scorecard's 114 cells over all leads
# (`benchmarks/results/demo_scorecard.txt`, measured before the dropout masks and WeatherBench2's lead convention
# changed on 2026-12-05: not yet re-measured). The run's checkpoints, metrics and scorecard land in `runs/demo`
# (`runs/demo/eval`); the generated data, its statistics and climatology are cached in `~/.cache/jigsaw_ref`,
# shared by every clone on the machine.
#
# **Run the tests** (notebooks, then pytest, which includes 2-, 4- and 8-rank `mpiexec` runs, the ipyparallel
# MPI notebook and the docs site; the site's browser check needs Debian's `chromium`, which `.ci/run` installs):
#
# ```sh
# python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" && nbdev_test && pytest
# ```
#
# `pip install torch==2.13.0` comes first so that pip takes the CPU wheel; a looser pin can resolve to a
# multi-GB CUDA build. On a GPU machine install the CUDA build of torch you want first instead.

# %% [markdown]
# ## What is where
#
# | notebook | module | what |
# |---|---|---|
# | `00_config` | `config` | frozen configs, channel lists, presets, shard arithmetic |
# | `01_mixer` | `mixer` | the mixer math and the one-process WeatherMixer; parameter and FLOP counts |
# | `02_loss` | `loss` | latitude/variable weighted MSE, WeatherBench2 cell-area weights |
# | `03_grid` | `grid` | the dp x domain x tensor grid and its communicators |
# | `04_comm` | `comm` | point-to-point exchanges and collectives over mpi4py, thread ranks or torch.distributed (NCCL, gloo), as autograd functions; byte counts; staging of device tensors; launchers, devices, the groups of a run; a watchdog |
# | `04a_ranks` | `ranks` | in-process thread ranks: the same `Group` code as MPI, so notebooks run 2 and 4 ranks |
# | `04b_probe` | `probe` | what a run does, recorded: every message of a group (sender, receiver, shape, bytes, tag) as a table and a figure; the bytes autograd saves |
# | `05_partitioned_matmul` | `pmatmul` | token and channel mixing and LayerNorm on a p x q grid, derived and run: the 2-way sums, the general form, the 2x2 exchanges traced, the backward, one ring primitive under the overlapped, faithful and SUMMA schedules |
# | `06_parallel` | `parallel` | the whole model on any layout, exact and faithful modes; completing gradients; precision |
# | `06a_api` | `jigsaw_ref` | the public names a training loop of your own needs |
# | `07_generator` | `generator` | the embedded default data: a forced two-layer atmosphere on the sphere |
# | `08_data` | `data` | WeatherBench2-layout ERA5 reader, each rank reading only its block |
# | `08a_settings` | `settings` | every setting of a run, typed and checked (flags, config files, `--set`) before any collective |
# | `08b_runfolder` | `runfolder` | one run per folder, stop signals, the run's lineage |
# | `09_train` | `train` | the distributed trainer: one step, then the loop |
# | `09a_checkpoint` | `checkpoint` | sharded, layout-independent checkpoints (zarr), atomic and checksummed; `jigsaw-ckpt` |
# | `09b_cli` | `cli` | `jigsaw-train` and `jigsaw-demo`: the command line, the launcher, exit statuses |
# | `10_evaluate` | `evaluate` | `jigsaw-eval`: WeatherBench2-style RMSE, ACC and bias; persistence and climatology |
# | `10a_forecast` | `forecast` | `jigsaw-forecast`: a checkpoint's forecasts in the WeatherBench2 layout (xarray, zarr written by ranks) |
# | `11_reliability` | | what happens on failures, and every bad input with its message |
# | `12_bench` | `bench` | `jigsaw-bench`: Jigsaw against DDP and Megatron-style tensor parallelism, roofline |
# | `13_perf_model` | `perfmodel` | a performance model of the paper's strong and weak scaling tables |
# | `13a_plan` | `plan` | `jigsaw-plan`: per-rank memory and step time of every layout, DDP, FSDP and Megatron-1D on given devices, checked against measured peaks; the trainer's memory check |
# | `14_mpi_notebook` | | 2-way and 4-way on four ipyparallel MPI engines, checked against one process |
# | `20`-`24` | | tutorials: a laptop, your own ERA5, a GPU cluster (and SLURM), the large-batch experiment, your own training loop |
#
# The layering, which `tests/test_layering.py` checks by reading every module's imports: the one-process model
# (`config`, `mixer`, `loss`) imports no communication code; the communication layer (`grid`, `comm`, `ranks`,
# `probe`) knows grids and tensors, never models or data; `data` knows layouts, never models; the parallel model
# composes the two; `plan` (memory and time of a run) uses the model, its layout and `perfmodel`, never the trainer
# or the data, so that `train` can call it before it builds anything; `settings` and `runfolder` sit below the
# trainer and know no model; `train`, `evaluate`, `forecast` and `bench` compose everything (`forecast` reuses
# `evaluate`'s model loading and rollout), and only the command line (`cli`) imports `train`; there is no import
# cycle.

# %% [markdown]
# ## The presets
#
# The paper's models are reproduced to the parameter (`mixer.param_count`, checked against the counts
# the released code prints); CPU presets are ours:

# %%
from jigsaw_ref.config import PRESETS
from jigsaw_ref.mixer import param_count, train_step_flops
for name, c in PRESETS.items():
    print(f"{name:8s} grid {c.n_lat}x{c.n_lon}  H={c.hidden:<6d} tokens={c.tokens:<6d} "
          f"params={param_count(c):>14,d}  train step={train_step_flops(c)/1e9:>10,.1f} GFLOP")

# %% [markdown]
# ## Measured on a GPU
#
# `benchmarks/gpu_check.py` ran on the GPU machine lent to this project (results in
# `benchmarks/results/gpu_check_h200.json`): the paper's 1.10 B strong-scaling model (C3) training on one GPU,
# forward + backward + clipping + Adam, against GEMM peaks measured in the same run, and the model's CUDA
# results against the float64 CPU reference. The paper's A100 numbers for the same model are 3.03 s/step (FP32)
# and 0.712 s/step (TF32).

# %%
import json
from pathlib import Path
import jigsaw_ref
r = json.loads((Path(jigsaw_ref.__file__).parents[1] / "benchmarks/results/gpu_check_h200.json").read_text())
print(f"{r['device']}, torch {r['torch']}, model {r['model']['preset']} ({r['model']['params']:,} parameters, "
      f"{r['model']['train_step_tflop']:.1f} TFLOP per step)")
for prec, s in r["steps"].items():
    print(f"  {prec:5s} {s['s_per_step']:.3f} s/step  {s['tflops']:6.1f} TFLOP/s  "
          f"{100 * s['fraction_of_measured_gemm_peak']:.0f}% of the {r['gemm_peak_tflops'][prec]:.0f} TFLOP/s GEMM peak measured")
for prec, e in r["correctness_vs_cpu_float64"].items():
    print(f"  CUDA {prec:7s} vs CPU float64: output {e['output_rel_err']:.1e}, input gradient {e['input_grad_rel_err']:.1e}")

# %% [markdown]
# The trainer itself on the same GPU (`benchmarks/gpu_train.py`: `Trainer` on one CUDA device, the `demo` preset on the
# default data for one minute each in TF32 and BF16, then `jigsaw-eval` on the GPU):

# %%
g = json.loads((Path(jigsaw_ref.__file__).parents[1] / "benchmarks/results/gpu_train_h200.json").read_text())
for prec, run in g["runs"].items():
    print(f"  {g['device']} {prec}: {run['steps']} steps, median {run['median_step_s'] * 1e3:.0f} ms/step, "
          f"validation loss {run['val_loss']:.3f}, z500 6 h RMSE {run['rmse_z500_6h']:.0f} m2/s2")
