# %%
#| default_exp perfmodel

# %%
#| export
from __future__ import annotations
import math
from dataclasses import dataclass, replace
from jigsaw_ref.config import MixerConfig, preset
from jigsaw_ref.comm import expected_bytes
from jigsaw_ref.mixer import train_step_flops
from jigsaw_ref.pmatmul import block_bytes
from jigsaw_ref.parallel import shard_spec

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import matplotlib; matplotlib.use("Agg")
import matplotlib.pyplot as plt
import jigsaw_ref
from pathlib import Path

# %% [markdown]
# # Performance model
#
# > Step time and scaling efficiency of 1-, 2- and 4-way Jigsaw from GEMM rate, memory bandwidth, link bandwidths, I/O bandwidth and communication volumes counted from the algorithm; four parameters calibrated on four of the paper's cells, the other 26 predicted.

# %% [markdown]
# ## The machine
#
# Every hardware number, where it comes from, and what is assumed:
#
# | quantity | value | source |
# |---|---|---|
# | FP32 peak | 19.5 TFLOP/s | NVIDIA A100 datasheet (40 GB SXM4), dense |
# | TF32 peak | 156 TFLOP/s | same datasheet, dense Tensor Core (312 with sparsity, not used) |
# | HBM2 bandwidth | 1555 GB/s | same datasheet (A100 40 GB) |
# | NVLink between two GPUs | 100 GB/s per direction | NVLink3: 12 links x 25 GB/s per direction = 600 GB/s total per GPU; on a 4-GPU HGX A100 board every GPU pair is joined by 4 of the 12 links (assumption: HoreKa's nodes use that board) |
# | network per node | 4 x 200 Gb/s = 100 GB/s per direction | assumption: one InfiniBand HDR-200 adapter per GPU, as in HoreKa's accelerated nodes; non-blocking |
# | GPUs per node | 4 | HoreKa accelerated partition |
#
# Data are float32 everywhere (TF32 is a GEMM mode, tensors stay 4 bytes).

# %%
#| export
@dataclass(frozen=True)
class Machine:
    "Hardware numbers of one node type (defaults: HoreKa-like, 4 x A100 40 GB SXM4)."
    peak: tuple = (("fp32", 19.5e12), ("tf32", 156e12))  # dense GEMM FLOP/s per GPU and precision
    hbm: float = 1555e9  # device memory bandwidth, bytes/s
    nvlink_pair: float = 100e9  # bytes/s per direction between two GPUs of a node
    net_node: float = 100e9  # bytes/s per direction from one node into the network (4 x HDR-200)
    gpus_per_node: int = 4
    itemsize: int = 4  # bytes per tensor element (float32; TF32 changes the GEMM, not the storage)

    def peak_of(self, precision: str) -> float: return dict(self.peak)[precision]


A100_NODE = Machine()

# %%
test_eq(A100_NODE.peak_of("tf32") / A100_NODE.peak_of("fp32"), 8.0)

# %% [markdown]
# ## The free parameters
#
# Four numbers the datasheets do not give, each calibrated on one cell of the paper below:
#
# - $\eta_\text{fp32}$, $\eta_\text{tf32}$: the fraction of peak the GEMMs reach;
# - $\omega$: the fraction of the data-parallel gradient all-reduce hidden behind the backward pass (DDP
#   buckets overlap it; the model-parallel exchanges sit between dependent GEMMs and are taken as exposed);
# - $B_\text{io}$: the rate at which one node reads training samples (shared by the ranks of the node).

# %%
#| export
@dataclass(frozen=True)
class Calib:
    "The performance model's free parameters."
    eta: tuple = (("fp32", 0.8), ("tf32", 0.5))  # GEMM efficiency per precision (fraction of peak)
    overlap: float = 0.5  # fraction of the data-parallel all-reduce hidden behind compute
    io_node: float = 3e9  # bytes/s one node reads samples at (shared by its ranks)

    def eta_of(self, precision: str) -> float: return dict(self.eta)[precision]

# %% [markdown]
# ## Compute: GEMMs and memory-bound passes
#
# A rank of a $p \times q$ group does $1/pq$ of the training-step GEMM FLOPs (no GEMM is repeated, see
# `pmatmul`), at the calibrated rate:
#
# $$t_\text{gemm} = \frac{F_\text{step}}{p q\; \eta\, R_\text{peak}}, \qquad F_\text{step} = 3 F_\text{fwd}\ (\texttt{mixer.train\_step\_flops}).$$

# %%
#| export
def gemm_time(c: MixerConfig, p: int, q: int, precision: str, calib: Calib, hw: Machine = A100_NODE) -> float:
    "Seconds of GEMM per rank and training step (batch 1)."
    return train_step_flops(c) / (p * q) / (calib.eta_of(precision) * hw.peak_of(precision))

# %% [markdown]
# Everything else on the GPU (LayerNorm, bias, GELU, dropout, residual adds, the copies of gathers, the
# optimizer) streams tensors through memory. Counting passes (one read or one write of a tensor), per mixer
# block forward: the residual stream $X$ ($T_i \times H_j$) is touched about 18.5 times (two LayerNorms 2 each,
# two bias adds 2 each, two dropouts 2.25 each with their byte masks, two residual adds 3 each), each hidden
# tensor 6.25 times (bias, GELU, dropout). The hidden tensors are **replicated** inside a group: the token hidden
# $A[\mathcal S_j, :]$ is $S_j \times H$ on every domain partner, the channel hidden $A[:, \mathcal G_i]$ is
# $T \times G_i$ on every tensor partner; that redundancy is why memory-bound work does not shrink by $pq$.
# A gather writes and the GEMM later reads one more full copy (2 passes per gathered tensor). The backward
# streams twice the forward's bytes; the decoder and loss take about 20 passes over the rank's pixels; the
# optimizer 36 bytes per parameter (Adam reads parameter, gradient and two moments and writes three; the
# gradient is zeroed and read once more for the norm):
#
# $$t_\text{mem} = \frac{3\, b \sum_k n_k\, N_k + 36\, P_\text{rank}}{B_\text{HBM}}.$$

# %%
#| export
PASSES = dict(stream=18.5, hidden=6.25, gathered=2.0, pixels=20.0, bwd_factor=3.0, adam_bytes=36)


def rank_params(c: MixerConfig, p: int, q: int) -> int:
    "Parameters stored on the largest rank of a p x q group (`parallel.shard_spec`)."
    return max(sum(math.prod(len(ix) for ix in idx) for idx, _, _ in shard_spec(c, p, q, i, j).values())
               for i in range(p) for j in range(q))


def mem_bytes(c: MixerConfig, p: int, q: int, itemsize: int = 4) -> float:
    "Bytes one rank streams through device memory per training step outside the GEMMs."
    T, H, S, G, P = c.tokens, c.hidden, c.token_hidden, c.channel_hidden, c.patch
    Ti, Hj, Sj, Gi = T / p, H / q, S / q, G / p
    blk = PASSES["stream"] * Ti * Hj + PASSES["hidden"] * (Sj * H + T * Gi)
    blk += PASSES["gathered"] * ((q > 1) * 2 * Ti * H + (p > 1) * 2 * T * Hj)  # gathered inputs, partial outputs
    pix = PASSES["pixels"] * Ti * P * (c.n_out + c.n_in) / q
    return PASSES["bwd_factor"] * itemsize * (c.blocks * blk + pix) + PASSES["adam_bytes"] * rank_params(c, p, q)


def mem_time(c: MixerConfig, p: int, q: int, hw: Machine = A100_NODE) -> float:
    "Seconds of memory-bound work per rank and training step."
    return mem_bytes(c, p, q, hw.itemsize) / hw.hbm

# %%
_c3 = preset("c3")
print(f"C3, 1 GPU: memory-bound {mem_time(_c3, 1, 1) * 1e3:.0f} ms per step, "
      f"{mem_bytes(_c3, 1, 1) / 1e9:.0f} GB; parameters per rank 1/2/4-way: "
      f"{rank_params(_c3, 1, 1):,} / {rank_params(_c3, 1, 2):,} / {rank_params(_c3, 2, 2):,}")
assert mem_bytes(_c3, 1, 2) < mem_bytes(_c3, 1, 1) and mem_bytes(_c3, 2, 2) < mem_bytes(_c3, 1, 2)
assert mem_bytes(_c3, 1, 2) > mem_bytes(_c3, 1, 1) / 2  # replicated hidden tensors: less than linear

# %% [markdown]
# ## Model-parallel communication
#
# Counted from the algorithm, per rank and step, forward and backward (each collective's adjoint sends as
# much again): the mixer blocks (`pmatmul.block_bytes`, exact LayerNorms), the encoder (its weight all-gathered
# over the $p$ domain partners, its output reduce-scattered over the $q$ tensor partners), the decoder (weight
# gathered over $p$, the $T_i \times V_\text{out} P$ output reduce-scattered over $q$, two exact LayerNorms) and
# the linear residual (weight gathered over $p$, per-pixel output reduce-scattered over $q$), as `parallel`
# runs them. Every message stays inside the node and the steps are sequential, so they run at the pair link rate:
#
# $$V_\text{mp} = 2\Big(n_\text{blocks}\, V_\text{block} + V_\text{enc} + V_\text{dec}\Big), \qquad t_\text{mp} = V_\text{mp} / B_\text{NVLink}.$$

# %%
#| export
def mp_bytes(c: MixerConfig, p: int, q: int, itemsize: int = 4) -> int:
    "Bytes one rank sends to its model-parallel partners per training step (forward + backward)."
    e = lambda kind, n, numel: expected_bytes(kind, n, numel, itemsize)
    T, H, P, Vo = c.tokens, c.hidden, c.patch, c.n_out
    Ti, pix_i = T // p, c.n_lat * c.n_lon // p
    blocks = c.blocks * block_bytes(T, H, c.token_hidden, c.channel_hidden, p, q, itemsize)
    enc = e("all_gather", p, c.n_in * P * H) + e("reduce_scatter", q, Ti * H)
    dec = (e("all_gather", p, 2 * H * Vo * P) + e("reduce_scatter", q, Ti * Vo * P) + 2 * e("all_reduce", q, Ti)
           + e("all_gather", p, (Vo + c.n_res_in) * Vo) + e("reduce_scatter", q, pix_i * Vo) + 4 * e("all_reduce", q, pix_i))
    return 2 * (blocks + enc + dec)


def mp_time(c: MixerConfig, p: int, q: int, hw: Machine = A100_NODE) -> float:
    "Seconds per step one rank spends sending to its partners (exposed)."
    return mp_bytes(c, p, q, hw.itemsize) / hw.nvlink_pair

# %%
test_eq(mp_bytes(_c3, 1, 1), 0)
for p, q in ((1, 2), (2, 2)):
    print(f"C3 {p}x{q}: {mp_bytes(_c3, p, q) / 1e9:.2f} GB per rank and step, {mp_time(_c3, p, q) * 1e3:.0f} ms")

# %% [markdown]
# ## Data-parallel gradient all-reduce
#
# Ranks that hold the same block form a data-parallel group of $d = N / pq$ ranks; each all-reduces its
# gradient shard, $b\,P_\text{rank}$ bytes. Inside one node (ring over NVLink) a rank sends $2(d-1)/d$ of it. Across
# nodes the network is the bottleneck: a node holds $g/pq$ members of each of the $pq$ groups, each group's
# ring (NCCL lays rings node by node) crosses a node's boundary once, so a node sends
#
# $$V_\text{net} = p q \cdot \frac{2(d-1)}{d}\, b\, P_\text{rank} \approx \frac{2(d-1)}{d}\, b\, P_\text{model}$$
#
# into the network: about one model's gradient per node whatever the layout. It is hidden behind the backward
# for a fraction $\omega$: $t_\text{dp} = (1 - \omega)\, V / B$.

# %%
#| export
def dp_time(c: MixerConfig, p: int, q: int, n_gpus: int, hw: Machine = A100_NODE) -> float:
    "Seconds of the data-parallel gradient all-reduce per step (before overlap)."
    d = n_gpus // (p * q)
    if d <= 1: return 0.0
    shard = hw.itemsize * rank_params(c, p, q)
    if n_gpus <= hw.gpus_per_node: return expected_bytes("all_reduce", d, shard, 1) / hw.nvlink_pair
    return p * q * expected_bytes("all_reduce", d, shard, 1) / hw.net_node

# %%
test_eq(dp_time(_c3, 2, 2, 4), 0.0)
assert dp_time(_c3, 1, 1, 256) > dp_time(_c3, 1, 1, 8) > dp_time(_c3, 1, 1, 2) > 0

# %% [markdown]
# ## Reading the data
#
# A rank reads $1/pq$ of a $C_\text{in} \times 720 \times 1440$ float32 sample per step (its longitudes and
# variables); the ranks of a node share the node's read rate, and loading is not overlapped with compute
# (the paper's I/O-bound regime):
#
# $$t_\text{io} = \frac{r_\text{node}\; b\, C_\text{in} n_\text{lat} n_\text{lon} / pq}{B_\text{io}}, \qquad r_\text{node} = \min(N, g).$$

# %%
#| export
def sample_bytes(c: MixerConfig, itemsize: int = 4) -> int:
    "Bytes of one input sample (all input channels, whole grid)."
    return itemsize * c.n_in * c.n_lat * c.n_lon


def io_time(c: MixerConfig, p: int, q: int, n_gpus: int, calib: Calib, hw: Machine = A100_NODE) -> float:
    "Seconds per step a rank waits for its share of the sample, the node's ranks sharing `calib.io_node`."
    return min(n_gpus, hw.gpus_per_node) * sample_bytes(c, hw.itemsize) / (p * q) / calib.io_node

# %%
test_eq(sample_bytes(_c3), 4 * 72 * 720 * 1440)
test_close(io_time(_c3, 2, 2, 4, Calib()), io_time(_c3, 1, 1, 1, Calib()), eps=1e-12)  # one sample per node

# %% [markdown]
# ## Step time
#
# $$t_\text{step} = t_\text{gemm} + t_\text{mem} + t_\text{mp} + (1 - \omega)\, t_\text{dp} + t_\text{io}.$$

# %%
#| export
def step_time(c: MixerConfig, p: int, q: int, n_gpus: int, precision: str = "tf32", loading: bool = True,
              calib: Calib = Calib(), hw: Machine = A100_NODE) -> dict:
    "Predicted seconds per training step (batch 1 per model instance) and its parts."
    t = dict(gemm=gemm_time(c, p, q, precision, calib, hw), mem=mem_time(c, p, q, hw), mp=mp_time(c, p, q, hw),
             dp=(1 - calib.overlap) * dp_time(c, p, q, n_gpus, hw),
             io=io_time(c, p, q, n_gpus, calib, hw) if loading else 0.0)
    t["step"] = sum(t.values())
    return t

# %% [markdown]
# Strong scaling compares one model instance on 1 GPU with the same model on $pq$ GPUs; weak scaling (C4) is the
# per-GPU throughput at $N$ GPUs relative to **one model instance alone on one node** ($pq$ GPUs, no data
# parallelism, loading on): the released C4 logs run exactly that as their first case (1, 2 and 4 GPUs of one
# node, 100 steps per epoch), and the ratio of its epoch time to the $N$-GPU epoch time (also 100 steps per rank)
# reproduces the published efficiencies. With batch 1 per instance that ratio is
#
# $$E(N) = t_\text{step}(pq) / t_\text{step}(N), \qquad \text{FLOP/s}(N) = \frac{N}{pq}\frac{F_\text{step}}{t_\text{step}(N)}.$$

# %%
#| export
def speedup(c1: MixerConfig, c: MixerConfig, p: int, q: int, precision: str, calib: Calib = Calib(), hw: Machine = A100_NODE) -> float:
    "Strong-scaling speedup of `c` on a p x q group over `c1` on one GPU, loading off."
    t1 = step_time(c1, 1, 1, 1, precision, False, calib, hw)["step"]
    return t1 / step_time(c, p, q, p * q, precision, False, calib, hw)["step"]


def weak_efficiency(c: MixerConfig, p: int, q: int, n_gpus: int, precision: str = "tf32", calib: Calib = Calib(),
                    hw: Machine = A100_NODE) -> float:
    "Per-GPU throughput at `n_gpus` relative to one instance alone on one node (loading on)."
    base = step_time(c, p, q, p * q, precision, True, calib, hw)["step"]
    return base / step_time(c, p, q, n_gpus, precision, True, calib, hw)["step"]


def pflops(c: MixerConfig, p: int, q: int, n_gpus: int, precision: str = "tf32", calib: Calib = Calib(),
           hw: Machine = A100_NODE) -> tuple[float, float]:
    "Sustained PFLOP/s by the paper's convention and its fraction of the `n_gpus` peak."
    f = n_gpus // (p * q) * train_step_flops(c) / step_time(c, p, q, n_gpus, precision, True, calib, hw)["step"]
    return f / 1e15, f / (n_gpus * hw.peak_of(precision))

# %%
assert weak_efficiency(_c3, 2, 2, 256) < weak_efficiency(_c3, 2, 2, 8) < 1.0
test_close(weak_efficiency(_c3, 2, 2, 4), 1.0, eps=1e-12)

# %% [markdown]
# ## The paper's cells
#
# Strong scaling of the 1.10 B model (C3, loading off) and weak scaling of the C4 models (loading on, TF32). The
# parallel versions use the released 2- and 4-way architecture (72 padded outputs, per-pixel decoder bias).

# %%
#| export
_REL = dict(out_pad=3, res_inputs="all", dec_bias="pixel")
LAYOUTS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}  # way -> (p, q)
C4_MODELS = {1: preset("c1_1way"), 2: preset("c4_2way"), 4: preset("c4_4way")}
C4_GPUS = (8, 16, 32, 64, 128, 256)
PAPER = {  # SPEC.md section 4
    "c3": {("fp32", 1): 3.03, ("fp32", 2): 1.92, ("fp32", 4): 2.70, ("tf32", 1): 0.712, ("tf32", 2): 1.66, ("tf32", 4): 2.25},
    "c4": {1: (.66, .65, .64, .62, .61, .51), 2: (.90, .75, .74, .74, .74, .68), 4: (.94, .85, .79, .75, .74, .72)},
    "headline": {2: (11.16, .279), 4: (9.46, .237), 1: (7.7, .193)},
}
CALIBRATION_CELLS = ("C3 fp32 1 GPU s/step", "C3 tf32 1 GPU s/step", "C4 4-way 8 GPUs", "C4 1-way 8 GPUs")


def c3_model(way: int) -> MixerConfig:
    "The C3 strong-scaling model (H=4896, f_s=0.5) as the `way`-way code builds it."
    return preset("c3") if way == 1 else preset("c3", **_REL)

# %% [markdown]
# ## Calibration
#
# Each parameter is solved from one cell, in closed form given the others; the two scaling cells depend on
# each other through the baseline, so the pair is iterated to a fixed point (a few rounds):
#
# - $\eta_\text{fp32}$ from C3 FP32 on 1 GPU (3.03 s), $\eta_\text{tf32}$ from C3 TF32 on 1 GPU (0.712 s):
#   $\eta = F_\text{step} / \big(R_\text{peak}\, (t - t_\text{mem})\big)$;
# - $\omega$ from C4 4-way at 8 GPUs (0.94): a node reads one sample per step in the baseline and at scale, so
#   only the all-reduce separates the two;
# - $B_\text{io}$ from C4 1-way at 8 GPUs (0.66): four ranks per node read four samples instead of one.

# %%
#| export
def calibrate(hw: Machine = A100_NODE, rounds: int = 30) -> Calib:
    "Solve the four free parameters from the four calibration cells (`CALIBRATION_CELLS`)."
    c3, P3 = c3_model(1), PAPER["c3"]
    eta = tuple((pr, train_step_flops(c3) / hw.peak_of(pr) / (P3[(pr, 1)] - mem_time(c3, 1, 1, hw))) for pr in ("fp32", "tf32"))
    cal = Calib(eta=eta)
    for _ in range(rounds):
        c4, e4 = C4_MODELS[4], PAPER["c4"][4][0]  # 4-way, 8 GPUs: base / (base + (1 - w) t_dp) = e4
        base = step_time(c4, 2, 2, 4, "tf32", True, cal, hw)["step"]
        cal = replace(cal, overlap=1 - base * (1 / e4 - 1) / dp_time(c4, 2, 2, 8, hw))
        c1, e1 = C4_MODELS[1], PAPER["c4"][1][0]  # 1-way, 8 GPUs: (a + x) / (b + 4x) = e1, x = io time of 1 sample
        a = step_time(c1, 1, 1, 1, "tf32", False, cal, hw)["step"]
        b = step_time(c1, 1, 1, 8, "tf32", False, cal, hw)["step"]
        x = (a - e1 * b) / (e1 * hw.gpus_per_node - 1)
        cal = replace(cal, io_node=sample_bytes(c1, hw.itemsize) / x)
    return cal

# %%
CAL = calibrate()
print(f"eta_fp32 = {CAL.eta_of('fp32'):.3f}, eta_tf32 = {CAL.eta_of('tf32'):.3f}, "
      f"overlap = {CAL.overlap:.2f}, io per node = {CAL.io_node / 1e9:.2f} GB/s")
test_close(step_time(c3_model(1), 1, 1, 1, "fp32", False, CAL)["step"], 3.03, eps=1e-9)
test_close(weak_efficiency(C4_MODELS[4], 2, 2, 8, "tf32", CAL), 0.94, eps=1e-6)
test_close(weak_efficiency(C4_MODELS[1], 1, 1, 8, "tf32", CAL), 0.66, eps=1e-6)

# %% [markdown]
# ## Prediction against the paper
#
# Every row is computed from the model; rows marked `cal` are the four calibration cells (exact by
# construction), the rest are predictions.

# %%
#| export
def comparison(calib: Calib, hw: Machine = A100_NODE) -> list[tuple]:
    "Rows (cell, paper, predicted, relative error, 'cal' or 'pred') for every paper cell."
    rows, P = [], PAPER
    for pr in ("fp32", "tf32"):
        rows.append((f"C3 {pr} 1 GPU s/step", P["c3"][(pr, 1)], step_time(c3_model(1), 1, 1, 1, pr, False, calib, hw)["step"]))
        for way in (2, 4):
            rows.append((f"C3 {pr} {way}-way speedup", P["c3"][(pr, way)], speedup(c3_model(1), c3_model(way), *LAYOUTS[way], pr, calib, hw)))
    for way in (1, 2, 4):
        for n, e in zip(C4_GPUS, P["c4"][way]):
            rows.append((f"C4 {way}-way {n} GPUs", e, weak_efficiency(C4_MODELS[way], *LAYOUTS[way], n, "tf32", calib, hw)))
    for way, (pf, frac) in P["headline"].items():
        f, fr = pflops(C4_MODELS[way], *LAYOUTS[way], 256, "tf32", calib, hw)
        rows += [(f"256 GPUs {way}-way PFLOP/s", pf, f), (f"256 GPUs {way}-way % of peak", 100 * frac, 100 * fr)]
    return [(name, ref, pred, pred / ref - 1, "cal" if name in CALIBRATION_CELLS else "pred") for name, ref, pred in rows]


def format_table(rows: list[tuple]) -> str:
    "The comparison as an aligned text table."
    out = [f"{'cell':<28} {'paper':>8} {'model':>8} {'rel err':>8}  role"]
    out += [f"{n:<28} {r:>8.3f} {m:>8.3f} {e:>+8.1%}  {k}" for n, r, m, e, k in rows]
    return "\n".join(out)

# %%
ROWS = comparison(CAL)
print(format_table(ROWS))
test_eq(len(ROWS), 6 + 18 + 6)
test_eq(sum(k == "cal" for *_, k in ROWS), 4)

# %% [markdown]
# ## Where the time goes
#
# The parts of the step for each layout at 8 and 256 GPUs (TF32, loading on), and for the C3 strong-scaling runs:

# %%
def _parts(c, p, q, n, pr="tf32", loading=True):
    t = step_time(c, p, q, n, pr, loading, CAL)
    return "  ".join(f"{k} {v * 1e3:6.0f}" for k, v in t.items()) + " ms"

for way in (1, 2, 4):
    for n in (way, 8, 256):
        print(f"C4 {way}-way {n:>3} GPUs: {_parts(C4_MODELS[way], *LAYOUTS[way], n)}")
for way in (1, 2, 4):
    for pr in ("fp32", "tf32"):
        print(f"C3 {way}-way {pr}: {_parts(c3_model(way), *LAYOUTS[way], way, pr, False)}")

# %% [markdown]
# ## What the model misses, and why
#
# **C3 4-way.** The paper's two precisions pin down what the released 4-way code loses. If a layout's step is
# $t = r \cdot t_\text{gemm}^{(1)}/pq + x$ with $t_\text{gemm}^{(1)}$ the one-GPU GEMM time and $x$ everything
# that does not depend on the precision (memory passes, messages), the FP32 and TF32 cells give two equations
# for $r$ (GEMM slowdown) and $x$:

# %%
#| export
def gemm_slowdown(way: int, calib: Calib, hw: Machine = A100_NODE) -> tuple[float, float]:
    "(r, x) solved from the paper's FP32 and TF32 C3 cells: GEMM slowdown of the layout and its fixed overhead (s)."
    g = {pr: gemm_time(c3_model(1), 1, 1, pr, calib, hw) / way for pr in ("fp32", "tf32")}
    t = {pr: PAPER["c3"][(pr, 1)] / PAPER["c3"][(pr, way)] for pr in ("fp32", "tf32")}
    r = (t["fp32"] - t["tf32"]) / (g["fp32"] - g["tf32"])
    return r, t["fp32"] - r * g["fp32"]

# %%
for way in (2, 4):
    r, x = gemm_slowdown(way, CAL)
    cw, (p, q) = c3_model(way), LAYOUTS[way]
    print(f"{way}-way from the paper: GEMMs {r:.2f}x the 1-GPU time share, overhead {x * 1e3:.0f} ms;  "
          f"model: 1.00x, overhead {(mem_time(cw, p, q) + mp_time(cw, p, q)) * 1e3:.0f} ms (memory passes + messages)")

# %% [markdown]
# The 2-way cells are consistent with the model's assumptions: its GEMMs run as fast as on one GPU and the
# fixed overhead is close to what the memory passes and the messages predict. The 4-way cells are not: both
# precisions say the released 4-way code runs its GEMMs about 40% slower than one GPU does (about 72% of the
# 1-GPU rate), on top of an overhead the model does account for. That is an effect the model has no term for: the
# SUMMA products are split into partial products (twice as many, half-size GEMMs with extra accumulation), and
# the point-to-point transfers are overlapped with them, so NCCL's kernels take SMs and memory bandwidth from the
# GEMMs. Fitting it would need a fifth parameter used by exactly the cells it is fitted to, so it is left out and
# the 4-way strong-scaling speedups are over-predicted.
#
# **C4 beyond 8 GPUs.** Past the calibration cells the model's only growing term is the ring factor $2(d-1)/d$ of
# the all-reduce, which saturates at 2; so it predicts nearly flat efficiencies from 16 to 256 GPUs, while the
# paper's keep falling (4-way: 0.94, 0.85, 0.79 from 8 to 32 GPUs, where the ring factor only grows from 1 to 1.75;
# 1-way: 0.61 to 0.51 between 128 and 256). The exposed cost the paper implies grows several times faster than the
# bytes do. Missing: contention in the fat tree when every GPU of every node all-reduces at once (the model
# assumes each node gets its full 100 GB/s), synchronisation with stragglers (a synchronous step waits for the
# slowest of $N/pq$ instances, and shared-filesystem reads have a long tail that grows with the number of
# readers), the filesystem's aggregate bandwidth (1-way reads about 60 GB/s at 256 GPUs) and ring latency. None of
# these is an input of the model, so the large-scale drop is under-predicted (efficiencies over-predicted by up to
# about 25%) rather than fitted. The 2-way C4 cells carry one more error: the model puts the 2-way baseline
# (one H = 8192 instance on 2 GPUs) at about 0.9 s where the released log shows 0.75 s, i.e. the larger model's GEMMs
# run above the efficiency calibrated on the H = 4896 model; a per-shape GEMM efficiency would fix it, at the price of
# a measured GEMM table as input.

# %%
_errs = sorted(((abs(e), n) for n, _, _, e, k in ROWS if k == "pred"), reverse=True)
print("largest prediction errors:", ", ".join(f"{n} {e:.0%}" for e, n in _errs[:5]))

# %% [markdown]
# ## Scaling plots
#
# The paper's cells (markers) against the model (lines): strong scaling of the C3 model in FP32 and TF32, and
# weak scaling of the C4 models with loading on. The gaps discussed above are visible: the 4-way strong-scaling
# speedup, and the weak-scaling efficiencies beyond 16 GPUs, which the model keeps nearly flat.

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
for prec, col in (("fp32", "C0"), ("tf32", "C1")):
    ways = [1, 2, 4]
    a1.plot(ways, [1.0] + [speedup(c3_model(1), c3_model(w), *LAYOUTS[w], prec, CAL) for w in ways[1:]], "-", color=col, label=f"model {prec}")
    a1.plot(ways, [1.0] + [PAPER["c3"][(prec, w)] for w in ways[1:]], "o", color=col, label=f"paper {prec}")
a1.plot([1, 4], [1, 4], "k:", lw=1, label="ideal")
a1.set(xlabel="GPUs (1-, 2-, 4-way)", ylabel="speedup over 1 GPU", title="C3 strong scaling (1.10 B), A100", xticks=[1, 2, 4]); a1.legend(fontsize=8)
for w, col in ((1, "C0"), (2, "C1"), (4, "C2")):
    a2.semilogx(C4_GPUS, [weak_efficiency(C4_MODELS[w], *LAYOUTS[w], n, "tf32", CAL) for n in C4_GPUS], "-", color=col, base=2, label=f"model {w}-way")
    a2.semilogx(C4_GPUS, PAPER["c4"][w], "o", color=col, base=2, label=f"paper {w}-way")
a2.set(xlabel="GPUs", ylabel="weak-scaling efficiency", title="C4 weak scaling, loading on", ylim=(0.4, 1.0)); a2.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(Path(jigsaw_ref.__file__).parents[1] / "benchmarks" / "results" / "scaling_model.png", dpi=100)
plt.show()
