# %% [markdown]
# # Large batches: a miniature of the paper's experiment
#
# > The same model, data and epochs on 4 ranks with global batch 4, 2 and 1 (1-way x dp 4, 2-way x dp 2, 4-way x dp 1): validation RMSE and optimizer steps, measured on CPU, with the paper's numbers beside them and the caveats that limit both.

# %%
import json, sys
from pathlib import Path
import matplotlib.pyplot as plt

ROOT = Path("..") if Path("../benchmarks").exists() else Path(".")
sys.path.insert(0, str(ROOT / "benchmarks"))
from large_batch import table  # benchmarks/large_batch.py

# %% [markdown]
# ## The paper's observation
#
# For its C1 configuration the paper trains the same 1.06 B WeatherMixer on 8 GPUs three ways: 1-way (8
# data-parallel replicas, global batch 8), 2-way (4 replicas, batch 4) and 4-way (2 replicas, batch 2), each
# with one sample per model instance, for the same number of epochs. The model parallel runs reach lower 6 h
# RMSE (the paper's large-batch experiment, arXiv 2507.05753, C1):

# %%
paper = {"z500": (45.15, 40.73, 40.79), "t850": (0.712, 0.689, 0.684), "t2m": (0.662, 0.641, 0.643)}
print(f"{'':6}{'batch 8':>9}{'batch 4':>16}{'batch 2':>16}")
for v, (a, b, c) in paper.items():
    print(f"{v:6}{a:>9}{b:>9} ({100 * (b / a - 1):+.1f}%){c:>9} ({100 * (c / a - 1):+.1f}%)")

# %% [markdown]
# Two things change together there: the global batch, and, because every run covers the same epochs, the
# number of optimizer steps (twice and four times as many). The released code's 2- and 4-way models also differ
# slightly from the 1-way one (LayerNorm over a channel half, per-rank biases, padded outputs; see `parallel`),
# so the architecture changes too.

# %% [markdown]
# ## The miniature
#
# `benchmarks/large_batch.py` repeats the design at the scale of a laptop. On **4 MPI ranks** it trains the
# `tiny` preset (16 x 32 grid, 65 thousand parameters) on the generated default-style data (120 days of
# training, 6-hourly: 479 samples; 30 days of validation: 119 samples) with
#
# | run | layout | data parallel | global batch | steps per epoch |
# |---|---|---|---|---|
# | `way1_dp4` | 1-way | 4 | 4 | 119 |
# | `way2_dp2` | 2-way | 2 | 2 | 239 |
# | `way4_dp1` | 4-way (2x2) | 1 | 1 | 479 |
#
# all with `--batch 1 --epochs 2 --mode exact --seed 0`, Adam at `--lr 1e-3 --lr-encdec 1e-3` (the same for
# every batch size), one warm-up epoch then cosine decay to zero (the released recipe), no dropout.
# In `exact` mode the three layouts compute the same function from the same initial weights, so here the
# architecture does **not** change: only the batch and the step count do.
#
# After training, each run's `final.ckpt` is scored again in one process by the same code on the whole
# validation split: latitude-weighted (cos) RMSE of the 6 h forecast in physical units. Two controls run on
# **one** rank with global batch 1: at seed 0 it must reproduce the 4-way run (the same arithmetic), at seed 1
# it shows how far the batch-1 result moves with the initialisation alone. Persistence (the input as the 6 h
# forecast) is scored on the same samples for scale.
#
# ```sh
# python benchmarks/large_batch.py --runs /tmp/large_batch   # trains, scores, writes benchmarks/results/large_batch.json
# python benchmarks/large_batch.py --show                     # prints the table of the saved results
# ```

# %% [markdown]
# ## Results
#
# From the run saved in `benchmarks/results/large_batch.json` (percentages: change against the batch-4 run):

# %%
res = json.loads((ROOT / "benchmarks/results/large_batch.json").read_text())
print(f"model {res['model']}, {res['epochs']} epochs, lr {res['lr']}/{res['lr_encdec']}, {res['mode']} mode, "
      f"{res['machine']['cpus']} CPUs, torch {res['machine']['torch']}\n")
print(table(res))

# %%
runs = {r["name"]: r for r in res["runs"]}
b4, b2, b1 = runs["way1_dp4"], runs["way2_dp2"], runs["way4_dp1"]
assert (b4["optimizer_steps"], b2["optimizer_steps"], b1["optimizer_steps"]) == (238, 478, 958)
assert all(b1["rmse"][v] < b2["rmse"][v] < b4["rmse"][v] for v in b4["rmse"])  # smaller batch, lower error
c0 = runs["control_1rank_s0"]
assert all(abs(c0["rmse"][v] / b1["rmse"][v] - 1) < 1e-5 for v in b1["rmse"])  # 4-way == one process

# %% [markdown]
# The training loss against epochs (each point: the mean over a tenth of an epoch). The smaller global batch
# is ahead at every point of the same data:

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, label in (("way1_dp4", "batch 4 (1-way x4)"), ("way2_dp2", "batch 2 (2-way x2)"),
                    ("way4_dp1", "batch 1 (4-way)"), ("control_1rank_s1", "batch 1, seed 1 (1 rank)")):
    c = runs[name]["train_loss_per_tenth_epoch"]
    ax.plot([(i + 0.5) / 10 for i in range(len(c))], c, marker=".", label=label, ls="--" if "control" in name else "-")
ax.set_yscale("log"); ax.set_xlabel("epoch"); ax.set_ylabel("training loss"); ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## What the run shows
#
# The numbers behind the statements below, computed from the file:

# %%
vs = list(b4["rmse"])
pct = lambda a, b: 100 * (a / b - 1)
s1 = runs["control_1rank_s1"]
print("batch 1 vs 4:", {v: round(pct(b1["rmse"][v], b4["rmse"][v]), 1) for v in vs})
print("batch 2 vs 4:", {v: round(pct(b2["rmse"][v], b4["rmse"][v]), 1) for v in vs})
print("batch 1, seed 1 vs seed 0:", {v: round(pct(s1["rmse"][v], b1["rmse"][v]), 1) for v in vs})
beyond = [v for v in vs if max(b1["rmse"][v], s1["rmse"][v]) < b4["rmse"][v] - abs(s1["rmse"][v] - b1["rmse"][v])]
print("batch-1 vs batch-4 gap larger than the seed spread:", beyond)
per = res["persistence_rmse"]
print("better than persistence:", {n: [v for v in vs if r["rmse"][v] < per[v]] for n, r in runs.items()})

# %%
assert {"z500", "t850", "t2m", "u250"} <= set(beyond) and "q850" not in beyond

# %% [markdown]
# - **Same direction as the paper, much larger.** With the same epochs, global batch 1 ends with 22-55% lower
#   6 h RMSE than global batch 4 on every variable reported, and batch 2 lies in between (12-29% lower), where
#   the paper saw 3-10% between batch 8 and batches 4 and 2.
# - **The layout is not the cause.** The one-rank control with batch 1 reproduces the 4-way run to about 1e-7
#   (float32 rounding), so in exact mode the gain belongs to the batch size and the step count, not to Jigsaw.
# - **Seeds matter at this size.** With another seed the batch-1 run moves by 5-39% depending on the variable
#   (`control_1rank_s1`). The batch-1 vs batch-4 gap is clearly larger than that spread for z500, t850, t2m and
#   u250; barely for msl (the two batch-1 seeds differ by 14%, and batch 4 is 13% above the worse of them); not
#   for q850.

# %% [markdown]
# ## Caveats
#
# - **Steps and batch are confounded**, as in the paper: batch 1 took four times the optimizer steps of batch 4
#   for the same data. This run cannot say whether a large batch hurts *per step*; that needs batch 4 trained for
#   the same number of steps (four times the epochs) or learning rates tuned per batch size, neither run here.
# - **Far from converged.** After two epochs every model is still worse than persistence at 6 h for z500,
#   t850, u250 and q850; only msl and t2m beat it, at batch 2 and 1. Early in training, progress per step dominates,
#   which inflates the effect compared with the paper's long ERA5 runs. The percentages are not comparable with
#   the paper's.
# - **One seed per arm** for the three main runs; the single seed-1 control only bounds the noise of the batch-1
#   arm.
# - **Toy scale, synthetic data:** a 65-thousand-parameter model on a 16 x 32 grid of the generated
#   quasi-geostrophic atmosphere, not 1.06 B parameters on 0.25 degree ERA5.
# - **Wall times are not performance:** the 4 ranks share 2 CPU cores, and other jobs shared the machine
#   during this run (the wall times are printed below; from step times measured with the machine otherwise
#   idle, the three main runs alone would take about 7-8 minutes, an estimate).
# - **Scoring:** the trainer's own `summary.json` RMSE differs from the re-scored value for the data-parallel
#   runs by a factor $\sqrt{119/120}$: its validation divides by `len(my samples) * dp`, which is 120 where the 119
#   validation samples do not split evenly over 2 or 4 replicas. The table uses the re-scored values; both are in
#   the results file.

# %%
print({n: r["wall_s"] for n, r in runs.items()}, "s; total", res["total_wall_s"], "s")
for n in ("way1_dp4", "way2_dp2"):
    r = runs[n]
    print(n, "trainer / re-scored z500:", round(r["rmse_reported_by_trainer"]["z500"] / r["rmse"]["z500"], 5),
          "| sqrt(119/120) =", round((119 / 120) ** 0.5, 5))
