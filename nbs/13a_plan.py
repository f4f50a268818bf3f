# %%
#| default_exp plan

# %%
#| export
from __future__ import annotations
import argparse, ctypes, json, math, os, resource, subprocess, sys, time, weakref
from dataclasses import dataclass, replace
from pathlib import Path
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from jigsaw_ref.config import ConfigError, MixerConfig, PRESETS, preset, split_sizes
from jigsaw_ref.mixer import param_count, param_shapes
from jigsaw_ref.parallel import bias_copies, residual_inputs, shard_spec, token_sizes
from jigsaw_ref import perfmodel

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
import matplotlib
if "ipykernel" not in sys.modules: matplotlib.use("Agg")  # a script run draws off-screen; the notebook shows the figure
import jigsaw_ref
from jigsaw_ref.comm import Group, make_groups
from jigsaw_ref.grid import Grid
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.parallel import JigsawMixer, block_of, loss_share, complete_grads
from jigsaw_ref.pmatmul import saved_bytes


# %% [markdown]
# # Plan a run
#
# > `jigsaw-plan`: what every rank will hold (parameters, gradients, Adam moments, saved activations, receive buffers, workspace, fixed overhead) and how fast it will step, for every layout that fits the devices and for DDP, FSDP and Megatron-1D; checked against measured peaks; and the check the trainer runs before it allocates anything.

# %% [markdown]
# Before asking for an allocation one wants to know: does the 2.57 B model fit 4-way on four 40 GB A100s? On how
# many GPUs does the 1.1 B model fit 1-way with recomputation? Which layout is fastest on my nodes? How far can the
# hidden size grow on 8 H200s? This page answers them from formulas, each **equal to what the code allocates**:
# every term below is checked, on small models with uneven splits, against the bytes the running model counts
# (the tensors it holds, the tensors autograd saves, the receive buffers its groups post, and the live bytes a
# tracker sees); and the sum is checked against the peak resident memory of real `mpiexec` ranks.
#
# The terms of one rank, in bytes:
#
# | term | what | from |
# |---|---|---|
# | parameters, gradients | this rank's blocks of every weight (`parallel.shard_spec`) | `rank_params` (exact) |
# | Adam | two moments per parameter | exact |
# | activations | what autograd saves in the forward for the backward, per schedule, with or without recomputation | `saved_elems` (exact) |
# | receive buffers | the peak of posted, not yet completed receives over the tensor and domain groups (`Group.recv_peak`) | `recv_elems` (exact) |
# | workspace | the transient tensors alive at the step's peak: gradients of activations, gathered blocks, the recomputed block, loss temporaries; or the optimizer's and clipping's temporaries when those are larger | `workspace` (modelled, checked against a live-bytes tracker) |
# | batch | this rank's input and target blocks | exact |
# | overhead | CPU: the Python + torch + MPI process, **measured**; GPU: CUDA context, cuBLAS and NCCL buffers, **stated** | |

# %% [markdown]
# ## Who holds what: parameters
#
# Rank $(i, j)$ of a $p \times q$ group holds, of every mixer block, a $T_i \times S_j$ and an $S_j \times T_i$ token
# weight and an $H_j \times G_i$ and $G_i \times H_j$ channel weight ($T_i$ the tokens of longitude band $i$, $H_j$, $S_j$
# the channel and token-hidden shards of $j$, $G_i$ the channel-hidden shard of $i$, all cut as `split_sizes` cuts),
# the replicated LayerNorm vectors $H_j$, and its bias shards; the encoder, decoder and residual weights are cut over
# both axes. `dims` gives every extent of a rank, `rank_params` counts its parameters without building any index
# list (so it runs at any size in microseconds); it equals what `parallel.shard_spec` lays out, parameter for
# parameter, for every rank, schedule and mode:

# %%
#| export
def dims(c: MixerConfig, p: int, q: int, i: int, j: int) -> dict:
    "Extents of rank (i, j)'s blocks on a p x q group (elements along each cut dimension)."
    T, H, S, G, ts = c.tokens, c.hidden, c.token_hidden, c.channel_hidden, token_sizes(c, p)
    return dict(T=T, H=H, S=S, G=G, Ti=ts[i], Tj=split_sizes(T, q)[j], Ts=ts[j] if j < p else 0,  # Ts: SUMMA's token block j
                Hj=split_sizes(H, q)[j], Hi=split_sizes(H, p)[i], Sj=split_sizes(S, q)[j], Si=split_sizes(S, p)[i],
                Gi=split_sizes(G, p)[i], Gj=split_sizes(G, q)[j], N=ts[i] * c.patch,  # N: pixels of longitude band i
                Cj=split_sizes(c.n_in, q)[j], Ci=split_sizes(c.n_in, p)[i], Vj=split_sizes(c.n_out, q)[j],
                Vi=split_sizes(c.n_out, p)[i], Rj=len(residual_inputs(c, q, j)))


# %%
#| export
def rank_params(c: MixerConfig, p: int, q: int, i: int = 0, j: int = 0, mode: str = "exact", schedule: str = "overlap") -> int:
    "Parameters rank (i, j) of a p x q group stores (what `parallel.shard_spec` gives it), counted from the extents."
    d, P, sub = dims(c, p, q, i, j), c.patch, lambda n, parts, k: split_sizes(n, parts)[k]
    Hj, Ti, Sj, Gi = d["Hj"], d["Ti"], d["Sj"], d["Gi"]
    if schedule == "summa":  # W1 and Wa cut the other way round, whole bias blocks
        blk = 4 * Hj + d["Si"] * d["Ts"] + d["Si"] + Ti * Sj + Ti + d["Hi"] * d["Gj"] + d["Gj"] + Gi * Hj + Hj
    elif bias_copies(mode, p):  # the released 4-way code's per-rank bias copies
        blk = 4 * Hj + 2 * Sj * Ti + Sj + Ti + 2 * Hj * Gi + Gi + Hj
    else:
        blk = 4 * Hj + 2 * Sj * Ti + sub(Sj, p, i) + sub(Ti, q, j) + 2 * Hj * Gi + sub(Gi, q, j) + sub(Hj, p, i)
    F = d["Vj"] + d["Rj"]  # the residual's features on this rank
    encdec = (d["Ci"] * P * Hj + 3 * Hj + 2 * Hj * d["Vi"] * P + d["Vj"] * (1 if c.dec_bias == "channel" else P)
              + 3 * d["Vj"] + 2 * F + F * d["Vi"])
    return c.blocks * blk + encdec


# %%
_c = preset("tiny", n_lon=48, hidden=20, out_pad=1)  # 12 patches, 19 inputs, 20 outputs: uneven everywhere
for _p, _q in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (2, 3), (1, 4), (3, 3)):
    for _mode in ("exact", "faithful"):
        for _s in ("overlap", "plain") + (("summa",) if _p == _q else ()):
            for _i in range(_p):
                for _j in range(_q):
                    test_eq(rank_params(_c, _p, _q, _i, _j, _mode, _s),
                            sum(math.prod(len(ix) for ix in idx) for idx, _, _ in shard_spec(_c, _p, _q, _i, _j, _mode, _s).values()))
test_eq(sum(rank_params(preset("c4_4way"), 2, 2, i, j, "faithful") for i in range(2) for j in range(2)), 2_569_397_904)  # the released count


# %% [markdown]
# ## Saved activations
#
# What autograd keeps from the forward for the backward, per mixer block and sample, on rank $(i, j)$; every
# LayerNorm keeps its input and two statistics per row, every GEMM its activation operand, every GELU its input:
#
# | schedule | LayerNorms | token MLP | channel MLP |
# |---|---|---|---|
# | `plain` | $2(T_i H_j + 2T_i)$ | $T_i H$ (gathered input) $+ 2 S_j H$ (hidden, whole over the domain) | $T H_j$ (gathered) $+ 2 T G_i$ |
# | `overlap` | $2(T_i H_j + 2T_i)$ | $T_i H_j + 2 S_j H'_i$ | $T_i H_j + 2 T'_j G_i$ |
# | `summa` | $2(T_i H_j + 2T_i)$ | $T_i H_j + 2 S_i H_j$ | $T_i H_j + 2 T_i G_j$ |
#
# ($H'_i$, $T'_j$: the hidden block's channels cut over the domain axis and tokens cut over the tensor axis, which
# the overlapped stages keep; the overlapped exchanges save only the rank's own input block and gather it again in
# the backward.) The released code's per-rank bias copies (faithful mode, $p > 1$, plain schedule) add a mask of
# $T + H$ per block. With **recomputation** a block keeps only its input, $T_i H_j$, and re-runs its forward in the
# backward. Blocks run $k$ times per step (latent rollout). Outside the blocks: the encoder keeps its patches
# $T_i C_\text{in} P$ (and, overlapped with $p, q > 1$, the gathered weight $C_\text{in} P H_j$); the decoder its
# LayerNorm input, the $T_i \times 2H_j$ concatenation (and the gathered weight when $p > 1$); the residual its
# prediction block, two $N_i \times F_j$ features and their statistics; the loss the weighted error.

# %%
#| export
def block_saved(c: MixerConfig, p: int, q: int, i: int, j: int, schedule: str = "overlap", mode: str = "exact",
                batch: int = 1) -> int:
    "Elements one mixer block saves for the backward on rank (i, j) (one rollout step, `batch` samples)."
    d = dims(c, p, q, i, j)
    ln = 2 * (d["Ti"] * d["Hj"] + 2 * d["Ti"])  # two LayerNorms: input, mean and 1/std per token
    if schedule == "plain":
        mlp = d["Ti"] * d["H"] + 2 * d["Sj"] * d["H"] + d["T"] * d["Hj"] + 2 * d["T"] * d["Gi"]
        return batch * (ln + mlp) + (d["T"] + d["H"] if bias_copies(mode, p) else 0)  # the released bias masks
    if schedule == "summa": return batch * (ln + 2 * d["Ti"] * d["Hj"] + 2 * d["Si"] * d["Hj"] + 2 * d["Ti"] * d["Gj"])
    return batch * (ln + 2 * d["Ti"] * d["Hj"] + 2 * d["Sj"] * d["Hi"] + 2 * d["Tj"] * d["Gi"])


# %%
#| export
def encdec_saved(c: MixerConfig, p: int, q: int, i: int, j: int, schedule: str = "overlap", batch: int = 1) -> dict:
    "Elements the encoder, decoder, residual and loss save on rank (i, j), by part."
    d, P, F = dims(c, p, q, i, j), c.patch, dims(c, p, q, i, j)["Vj"] + dims(c, p, q, i, j)["Rj"]
    enc = batch * d["Ti"] * c.n_in * P + (c.n_in * P * d["Hj"] if q > 1 and p > 1 and schedule != "plain" else 0)
    dec = batch * (3 * d["Ti"] * d["Hj"] + 2 * d["Ti"]) + (2 * d["Hj"] * c.n_out * P if p > 1 else 0)
    res = batch * (d["N"] * d["Vj"] + 2 * d["N"] * F + 4 * d["N"]) + (F * c.n_out if p > 1 else 0)
    loss = batch * d["N"] * d["Vj"] + d["Vj"] * c.n_lat
    return dict(encoder=enc, decoder=dec, residual=res, loss=loss)


# %%
#| export
def dropout_saved(c: MixerConfig, p: int, q: int, i: int = 0, j: int = 0, schedule: str = "overlap", recompute: bool = False,
                  batch: int = 1, k: int = 1) -> float:
    "Expected bytes `mixer.dropout` keeps for the backward on rank (i, j): int64 positions of the dropped elements, p of them."
    if c.dropout == 0 or recompute: return 0.0
    d = dims(c, p, q, i, j)
    hid = {"plain": d["Sj"] * d["H"] + d["T"] * d["Gi"], "summa": d["Si"] * d["Hj"] + d["Ti"] * d["Gj"]}.get(
        schedule, d["Sj"] * d["Hi"] + d["Tj"] * d["Gi"])  # the two GELU outputs, as each schedule holds them
    return 8 * c.dropout * c.blocks * k * batch * (hid + 2 * d["Ti"] * d["Hj"])  # and the two MLP outputs


# %%
#| export
def saved_elems(c: MixerConfig, p: int, q: int, i: int = 0, j: int = 0, schedule: str = "overlap", mode: str = "exact",
                recompute: bool = False, batch: int = 1, k: int = 1) -> int:
    "Elements autograd keeps for the backward on rank (i, j) at the end of the forward (parameters not counted)."
    blk = batch * dims(c, p, q, i, j)["Ti"] * dims(c, p, q, i, j)["Hj"] if recompute else block_saved(c, p, q, i, j, schedule, mode, batch)
    return c.blocks * k * blk + sum(encdec_saved(c, p, q, i, j, schedule, batch).values())


# %% [markdown]
# Dropout keeps, per site, what `mixer.dropout` needs to rebuild its mask in the backward: the positions of the
# dropped elements as int64, a fraction $p$ of the elements on average (`dropout_saved`, an expected value: the count
# is random).
#
# The formula against `pmatmul.saved_bytes` (the count `jigsaw-bench` reports), less the parameters autograd also
# keeps a reference to, on thread ranks: every layout, schedule, mode, recomputation, batch 2 and rollout $k = 2$,
# on the uneven configuration above. Equal to the byte without dropout; with dropout ($p = 0.1$) the difference is
# the dropout term's random part, a few standard deviations of the drop count at most:

# %%
def _count_saved(comm, cfg, p, q, schedule, mode, recompute, B, k):
    g = make_groups(Grid(1, p, q), comm=comm)
    m = JigsawMixer(cfg, g["tensor"], g["domain"], mode, torch.float32, schedule=schedule, recompute=recompute).train()
    own = {t.untyped_storage().data_ptr() for t in m.parameters()}
    x = torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon)
    y = block_of(cfg, torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j)
    with saved_bytes() as sb:
        loss_share(m(block_of(cfg, x, p, q, m.i, m.j), k=k, key=5), y, torch.ones(cfg.n_lat), torch.ones(y.shape[1]), 1)
    return m.i, m.j, sb.bytes - sum(t.untyped_storage().nbytes() for t in m.parameters() if t.untyped_storage().data_ptr() in sb.seen)

for _p, _q in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 2)):
    for _s, _mode, _rec, _B, _k in (("overlap", "exact", False, 1, 1), ("plain", "exact", False, 2, 1), ("overlap", "faithful", False, 1, 2),
                                    ("plain", "faithful", False, 1, 1), ("overlap", "exact", True, 2, 2), ("summa", "exact", False, 2, 1)):
        if _s == "summa" and _p != _q: continue
        for _i, _j, _b in run_ranks(_p * _q, _count_saved, _c, _p, _q, _s, _mode, _rec, _B, _k):
            test_eq(_b, 4 * saved_elems(_c, _p, _q, _i, _j, _s, _mode, _rec, _B, _k))
_cd = _c.replace(dropout=0.1)
for _p, _q, _s in ((1, 1, "overlap"), (2, 2, "overlap"), (2, 2, "plain"), (2, 2, "summa")):
    for _i, _j, _b in run_ranks(_p * _q, _count_saved, _cd, _p, _q, _s, "exact", False, 2, 2):
        _drop = dropout_saved(_cd, _p, _q, _i, _j, _s, False, 2, 2)
        assert abs(_b - 4 * saved_elems(_cd, _p, _q, _i, _j, _s, "exact", False, 2, 2) - _drop) < 6 * 8 * math.sqrt(_drop / 8 * 0.9), (_p, _q, _s)


# %% [markdown]
# ## Receive buffers
#
# Every exchange posts its receives into fresh buffers before it computes (that is what lets it overlap), so a rank
# holds, for a while, the blocks its partners send. `Group.recv_peak` records the largest total of posted, not yet
# completed receives of a group; `jigsaw-bench` reports the sum over the tensor and domain groups. The formula takes,
# per group, the largest of the exchanges of a training step, forward and backward: the encoder's input channels
# and weight shards, each MLP stage's gathered inputs and the partial products it receives (in the backward also
# the gathered upstream gradient, and the input-gradient blocks its partners return, posted while the input is
# being gathered again), the decoder's and residual's partial outputs, and SUMMA's operand blocks and partials.

# %%
#| export
def _allreduce_recv(n: int, numel: int) -> int:
    "Elements an all-reduce of `numel` over `n` ranks receives at once (`comm.Group.all_reduce`, point-to-point)."
    if n <= 2: return numel * (n == 2)
    sz = split_sizes(numel, n)
    return max(sz[0] * (n - 1), numel - min(sz))


# %%
#| export
def _summa_recv(c: MixerConfig, p: int, q: int, i: int, j: int, batch: int) -> tuple[int, int]:
    "Peak receive elements of the four SUMMA products of a block (row = tensor group, column = domain group)."
    d, n = dims(c, p, q, i, j), p
    t_s, s_s, h_s, g_s = token_sizes(c, p), split_sizes(c.token_hidden, q), split_sizes(c.hidden, q), split_sizes(c.channel_hidden, p)
    prods = [((d["Si"], t_s[j]), (batch, d["Ti"], d["Hj"]), t_s), ((d["Ti"], s_s[j]), (batch, d["Si"], d["Hj"]), s_s),
             ((batch, d["Ti"], h_s[j]), (d["Hi"], d["Gj"]), h_s), ((batch, d["Ti"], g_s[j]), (d["Gi"], d["Hj"]), g_s)]
    row, col = [0], [0]
    for a, b, ks in prods:  # C = A @ B: A blocks along the row, B blocks down the column, then the partials of dA, dB
        K, na, nb = sum(ks), math.prod(a), math.prod(b)
        ra, cb = na // a[-1] * (K - ks[j]), nb // b[-2] * (K - ks[i])
        row += [ra, ra + (n - 1) * na]
        col += [cb, max(cb, (n - 1) * nb) if (i == j and n == 2) else cb + (n - 1) * nb]
    return max(row), max(col)


# %%
#| export
def recv_elems(c: MixerConfig, p: int, q: int, i: int = 0, j: int = 0, schedule: str = "overlap", mode: str = "exact",
               batch: int = 1) -> tuple[int, int]:
    "Peak elements of posted receives of rank (i, j)'s tensor and domain groups in a training step (`Group.recv_peak`)."
    d, B, P = dims(c, p, q, i, j), batch, c.patch
    T, H, Ti, Hj, Hi, Sj, Gi, Tj = d["T"], d["H"], d["Ti"], d["Hj"], d["Hi"], d["Sj"], d["Gi"], d["Tj"]
    Vo, Vj, Vi, F = c.n_out, d["Vj"], d["Vi"], d["Vj"] + d["Rj"]
    tens, dom = [0], [0]
    if q > 1:  # encoder input channels, decoder and residual partial outputs (forward) and their gradients (backward)
        tens += [B * Ti * P * (c.n_in - d["Cj"]), (q - 1) * B * Ti * Vj * P, B * Ti * P * (Vo - Vj),
                 (q - 1) * B * d["N"] * Vj, B * d["N"] * (Vo - Vj)] + ([2 * B * Ti * (q - 1)] if mode == "exact" else [])
    if p > 1:  # the encoder, decoder and residual weight shards, gathered, and their gradients, reduce-scattered
        dom += [P * Hj * (c.n_in - d["Ci"]), (p - 1) * d["Ci"] * P * Hj, 2 * Hj * P * (Vo - Vi), (p - 1) * 2 * Hj * Vi * P,
                F * (Vo - Vi), (p - 1) * F * Vi]
    if schedule == "plain":
        tens += [B * Ti * (H - Hj), (q - 1) * B * Ti * Hj, _allreduce_recv(q, B * T * Gi)]
        dom += [_allreduce_recv(p, B * Sj * H), B * (T - Ti) * Hj, (p - 1) * B * Ti * Hj]
    elif schedule == "overlap":
        tens += [B * Ti * (H - Hj) + (q - 1) * B * Ti * Hj, B * (T - Tj) * Gi + (q - 1) * B * Tj * Gi]
        dom += [B * Sj * (H - Hi) + (p - 1) * B * Sj * Hi, B * (T - Ti) * Hj + (p - 1) * B * Ti * Hj]
    else:
        t, dm = _summa_recv(c, p, q, i, j, B); tens.append(t); dom.append(dm)
    return max(tens), max(dom)


# %% [markdown]
# Against `Group.recv_peak` after a forward and backward on thread ranks:

# %%
def _count_recv(comm, cfg, p, q, schedule, B):
    g = make_groups(Grid(1, p, q), comm=comm)
    m = JigsawMixer(cfg, g["tensor"], g["domain"], "exact", torch.float32, schedule=schedule).train()
    x = block_of(cfg, torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j)
    m(x).square().sum().backward()
    return m.i, m.j, g["tensor"].recv_peak + g["domain"].recv_peak

for _p, _q, _s in ((1, 2, "overlap"), (2, 1, "plain"), (2, 2, "overlap"), (2, 2, "plain"), (2, 2, "summa"), (3, 2, "overlap"), (1, 4, "plain")):
    for _i, _j, _r in run_ranks(_p * _q, _count_recv, _c, _p, _q, _s, 2):
        test_eq(_r, 4 * sum(recv_elems(_c, _p, _q, _i, _j, _s, "exact", 2)))


# %% [markdown]
# ## Workspace: the transient tensors at the peak
#
# Saved activations and receive buffers are not all a step holds. At the step's peak there are also the gradients
# flowing backward and the temporaries of the stage being differentiated. Where the peak falls depends on the
# shapes, so `act_peak` takes the largest of four moments (elements, this rank):
#
# 1. the loss's backward: everything saved, the prediction block (alive through the backward: the trainer holds
#    it) and two temporaries of its size (the square's derivative);
# 2. the residual's backward: the gradient of its second LayerNorm's input, $N_i \times F_j$, while the
#    LayerNorm's saved input is still there and the matmul's is gone;
# 3. the decoder's backward, after the residual and loss have released what they saved: the $T_i \times 2H_j$
#    gradient of the concatenation, twice, and the decoder's output gradient;
# 4. a mixer block's backward, after the decoder released its part: the stage whose temporaries are largest
#    (overlapped stages: the gathered upstream gradient, the gradient block and one input block per gather partner,
#    two weight blocks; plain: the gathered operand and the hidden block; SUMMA: the output gradient and the
#    operand partials), the residual-stream gradient, and with recomputation the block's re-computed activations.
#
# Then, after the activations are gone: with data parallelism, `parallel.sync_grads` sums the gradients over the
# replicas as one flat tensor (the concatenation, the received sum and the result: three copies of the rank's
# gradients); the clipping norm (float64 copy and square of the largest gradient block, 16 bytes per element);
# Adam's temporaries (on a CPU, `torch.optim.Adam` runs per tensor: the decayed gradient, the square root and its
# quotient, three copies of the largest block; on a GPU it runs *foreach* over the processor's parameter group: one
# copy of that group). And the build: `JigsawMixer` computes every initial
# block in float64 from integer hashes, 40 bytes per element of the largest block, before any gradient exists.
#
# These moments are a model, not a count: the next section measures the live bytes and shows how close it is.

# %%
#| export
def _stage_extras(c: MixerConfig, p: int, q: int, i: int, j: int, schedule: str, B: int) -> int:
    "Elements of temporaries alive in the backward of the costliest MLP stage of a block, beyond what is saved."
    d = dims(c, p, q, i, j)
    T, H, Ti, Hj, Hi, Sj, Gi, Tj = d["T"], d["H"], d["Ti"], d["Hj"], d["Hi"], d["Sj"], d["Gi"], d["Tj"]
    u = B * Ti * Hj  # the residual-stream gradient
    if p * q == 1 or schedule == "plain":
        return max(B * Ti * H + B * Sj * H + Sj * Ti, B * T * Hj + B * T * Gi + Hj * Gi) + u
    if schedule == "summa":
        Si, Gj = d["Si"], d["Gj"]
        st = [(B * Si * Hj, Si * Ti, u), (u, Ti * Sj, B * Si * Hj), (B * Ti * Gj, u, Hi * Gj), (u, B * Ti * Gj, Gi * Hj)]
        return max(o + p * a + p * b for o, a, b in st) + u  # output gradient and the partials of both operands
    stages = [(q, p, u, B * Sj * Hi, B * Sj * H, Sj * Ti), (p, q, B * Sj * Hi, u, B * Ti * H, Ti * Sj),  # (gather size,
              (p, q, u, B * Tj * Gi, B * T * Gi, Hj * Gi), (q, p, B * Tj * Gi, u, B * T * Hj, Gi * Hj)]  # scatter size, in, out, gathered out, weight)
    ex = []
    for ng, ns, x, out, gfull, w in stages:
        if ns == 1: ex.append(out + ng * x + 2 * w)
        elif ng == 1: ex.append(out + x + 2 * w)
        else: ex.append(gfull + out + ng * x + 2 * w)
    return max(ex) + u


# %%
#| export
def act_peak(c: MixerConfig, p: int, q: int, i: int = 0, j: int = 0, schedule: str = "overlap", mode: str = "exact",
             recompute: bool = False, batch: int = 1, k: int = 1) -> tuple[int, str]:
    "Elements of activations and temporaries at the peak of the forward and backward on rank (i, j) (receive buffers apart), and where."
    d, B = dims(c, p, q, i, j), batch
    sv, parts = saved_elems(c, p, q, i, j, schedule, mode, recompute, B, k), encdec_saved(c, p, q, i, j, schedule, B)
    F = d["Vj"] + d["Rj"]
    blk = _stage_extras(c, p, q, i, j, schedule, B) + (block_saved(c, p, q, i, j, schedule, mode, B) if recompute else 0)
    pred = B * d["N"] * d["Vj"]  # the prediction block, alive through the backward
    moments = {"loss backward": sv + 3 * pred, "residual backward": sv + B * d["N"] * F + pred,
               "decoder backward": sv - parts["residual"] - parts["loss"] + 4 * B * d["Ti"] * d["Hj"] + B * d["Ti"] * d["Vj"] * c.patch + pred,
               "block backward": sv - parts["residual"] - parts["loss"] - parts["decoder"] + blk + pred}
    where = max(moments, key=moments.get)
    return moments[where], where


# %% [markdown]
# ## Live bytes, measured
#
# To check the model of the peak without the allocator in the way, `LiveBytes` counts the bytes of every tensor
# storage an operation creates while it is alive (a `TorchDispatchMode` that sees every aten call, and a finalizer on
# each new storage): its `peak` is the largest total of live tensor bytes created inside it, what
# `torch.cuda.max_memory_allocated` measures on a GPU. Views and in-place results share their input's storage and
# are not counted again.

# %%
#| export
class LiveBytes(TorchDispatchMode):
    "Peak and current bytes of the tensor storages created inside the context and still alive (per thread)."
    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._live = {}

    def _add(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live: return
        n = st.nbytes(); self.now += n; self.peak = max(self.peak, self.now)
        def gone(key=key, n=n): self._live.pop(key, None); self.now -= n
        self._live[key] = weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in ins: self._add(t)
        return out


# %%
with LiveBytes() as _lb:
    _a = torch.ones(1000); _b = _a + 1; _v = _b[:10]; _b.mul_(2)  # a view and an in-place result are not new storages
    del _a
test_eq((_lb.now, _lb.peak), (4000, 8000))
del _b, _v


# %% [markdown]
# The model of the peak against the live bytes of the second training step (forward, backward, clipping, Adam:
# gradients and moments exist) on thread ranks, beside the exact terms. The error is in units of the rank's
# activation block $B\,T_i H_j$ and relative to what the rank adds during the run (state and step):

# %%
def _live_step(comm, cfg, p, q, schedule, recompute, B):
    g = make_groups(Grid(1, p, q), comm=comm)
    m = JigsawMixer(cfg, g["tensor"], g["domain"], "exact", torch.float32, schedule=schedule, recompute=recompute).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4, weight_decay=3e-6)
    x = block_of(cfg, torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j).contiguous()
    y = block_of(cfg, torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j).contiguous()
    for _ in range(2):
        for gg in g.values(): gg.recv_peak = gg.inflight = 0
        with LiveBytes() as lb:  # the second step: grads and moments exist already
            opt.zero_grad(set_to_none=False)
            loss_share(m(x), y, torch.ones(cfg.n_lat), torch.ones(y.shape[1]), 1).backward()
            complete_grads(m, g, 1.0); opt.step()
    return m.i, m.j, lb.peak

_cw = preset("small", n_lat=16, n_lon=96, hidden=300, f_s=0.25, f_c=2.0)
_rows = []
for _p, _q, _s, _rec, _B in ((1, 1, "overlap", False, 1), (1, 1, "overlap", True, 1), (1, 2, "plain", False, 2), (1, 2, "overlap", False, 1),
                             (2, 2, "overlap", False, 2), (2, 2, "summa", True, 1), (2, 2, "plain", True, 1), (1, 4, "overlap", False, 1)):
    _i, _j, _live = run_ranks(_p * _q, _live_step, _cw, _p, _q, _s, _rec, _B)[0]
    _a, _where = act_peak(_cw, _p, _q, _i, _j, _s, "exact", _rec, _B)
    _pred = 4 * (_a + sum(recv_elems(_cw, _p, _q, _i, _j, _s, "exact", _B)))
    _u, _state = 4 * _B * dims(_cw, _p, _q, _i, _j)["Ti"] * dims(_cw, _p, _q, _i, _j)["Hj"], 16 * rank_params(_cw, _p, _q, _i, _j, schedule=_s)
    _rows.append((f"{_p}x{_q} {_s}{' recompute' if _rec else ''} B={_B}", _live, _pred, _where, (_pred - _live) / _u, (_pred - _live) / (_live + _state)))
print(f"{'case':<28}{'live MiB':>9}{'model MiB':>10}  {'peak at':<18}{'err (blocks)':>13}{'err/(step+state)':>17}")
for _r in _rows: print(f"{_r[0]:<28}{_r[1] / 2**20:>9.2f}{_r[2] / 2**20:>10.2f}  {_r[3]:<18}{_r[4]:>13.2f}{_r[5]:>17.1%}")
assert all(abs(r[4]) < 7 and abs(r[5]) < 0.1 for r in _rows)


# %% [markdown]
# On these activation-heavy shapes (tiny weights, $G = 2H$) the model is within a few activation blocks of the
# live bytes; a sweep over 3 shapes, 7 layouts, every schedule, recomputation and batch (done while writing this
# page) stayed within $-4.7$ to $+5.9$ blocks, under 9% of what the rank adds. The exact terms (saved activations,
# receive buffers, state) carry most of every real rank's memory.

# %% [markdown]
# ## Precision
#
# TF32 changes the GEMM, not the storage. Under **bf16 autocast** the parameters, gradients and moments stay
# float32; the GEMMs that run as plain torch products (1-way, and the `plain` schedule) save bf16 copies of their
# activation operand (half the bytes of the float32 tensor) and bf16 copies of their weights; the overlapped and
# SUMMA exchanges are autograd functions that save their float32 inputs and cast inside, so their saved bytes do
# not change, and autocast's cache holds bf16 copies of the weights through the forward. This is a model of what
# autocast does, checked on the GPU for 1-way only (`benchmarks/results/gpu_check_h200.json`, below).

# %%
#| export
def _gemm_operands(c: MixerConfig, p: int, q: int, i: int, j: int, recompute: bool, B: int, k: int) -> tuple[int, int]:
    "(activation elements saved as GEMM operands, GEMM weight elements) of rank (i, j) on the plain/1-way path."
    d, F = dims(c, p, q, i, j), dims(c, p, q, i, j)["Vj"] + dims(c, p, q, i, j)["Rj"]
    blk = 0 if recompute else c.blocks * k * B * (d["Ti"] * d["H"] + d["Sj"] * d["H"] + d["T"] * d["Hj"] + d["T"] * d["Gi"])
    acts = blk + B * (d["Ti"] * c.n_in * c.patch + 2 * d["Ti"] * d["Hj"] + d["N"] * F)
    w = c.blocks * 2 * (d["Sj"] * d["Ti"] + d["Hj"] * d["Gi"]) + d["Ci"] * c.patch * d["Hj"] + 2 * d["Hj"] * d["Vi"] * c.patch + F * d["Vi"]
    return acts, w


# %% [markdown]
# ## A rank's memory
#
# `rank_memory` puts the terms together for rank $(i, j)$ and takes the largest of the three phases of a run:
# the build (parameters and the initialisation's temporaries), a training step after the first (state, batch,
# saved activations, receive buffers, workspace) and the optimizer step (state and its temporaries). The
# workspace term is what makes the phase's peak: the step's transients, or the optimizer's when those are larger.

# %%
#| export
TERMS = ("params", "grads", "adam", "activations", "recv", "workspace", "batch", "overhead")  # the parts of a rank's peak


@dataclass(frozen=True)
class Setup:
    "Everything besides the model and the layout that fixes a rank's memory and step."
    batch: int = 1  # samples per model group and step
    k: int = 1  # latent rollout steps (the largest of the run)
    recompute: bool = False  # recompute each mixer block in the backward
    schedule: str = "overlap"  # 'overlap', 'plain' or 'summa' (square groups)
    mode: str = "exact"  # 'exact' or 'faithful'
    precision: str = "fp32"  # 'fp32', 'tf32' or 'bf16' (autocast)
    itemsize: int = 4  # bytes per parameter element (float32; float64 runs use 8)
    device: str = "cpu"  # 'cpu' or 'cuda': which optimizer kernels run, and which fixed overhead applies
    dp: int = 1  # data-parallel replicas (more than one: the gradients are flattened and all-reduced after the backward)


# %%
#| export
def rank_memory(c: MixerConfig, p: int, q: int, i: int = 0, j: int = 0, s: Setup = Setup(), overhead: float = 0.0) -> dict:
    "Bytes of every term of rank (i, j)'s peak on a p x q group (`TERMS`), its `peak`, and the `phase` that makes it."
    b, B, d = s.itemsize, s.batch, dims(c, p, q, i, j)
    P = rank_params(c, p, q, i, j, s.mode, s.schedule)
    sv = saved_elems(c, p, q, i, j, s.schedule, s.mode, s.recompute, B, s.k)
    act, where = act_peak(c, p, q, i, j, s.schedule, s.mode, s.recompute, B, s.k)
    saved, transient = b * sv + dropout_saved(c, p, q, i, j, s.schedule, s.recompute, B, s.k), b * (act - sv)
    if s.precision == "bf16":
        ops, w = _gemm_operands(c, p, q, i, j, s.recompute, B, s.k)
        if p * q == 1 or s.schedule == "plain": saved += 2 * w - (b - 2) * ops  # bf16 operand and weight copies saved
        else: transient = max(transient, 2 * w + b * 3 * B * d["N"] * d["Vj"])  # autocast's weight cache in the forward
    recv = b * sum(recv_elems(c, p, q, i, j, s.schedule, s.mode, B))
    batch = b * B * (d["Cj"] + d["Vj"]) * d["N"]
    biggest = max(math.prod(sh) for sh in _rank_shapes(c, p, q, i, j, s.mode, s.schedule))
    group = P if s.device == "cuda" else 3 * biggest  # Adam's temporaries: foreach over a group, or per tensor
    opt = max(b * group, 16 * biggest, 3 * b * P * (s.dp > 1))  # ... the clipping norm's float64 copy and square; the dp sum's flat copies
    build = 40 * biggest - 3 * b * P  # initial values in float64 before any gradient or moment exists (relative to the state)
    step = saved + recv + transient + batch
    phase = max((step, f"step: {where}"), (opt + batch, "optimizer"), (build, "build"), key=lambda t: t[0])
    t = dict(params=b * P, grads=b * P, adam=2 * b * P, activations=saved, recv=recv, batch=batch, overhead=overhead)
    t["workspace"] = phase[0] - saved - recv - batch
    t = {k: float(t[k]) for k in TERMS}
    state = overhead + 4 * b * P
    return t | dict(peak=sum(t.values()), phase=phase[1], rank=(i, j),
                    phases=dict(build=overhead + b * P + 40 * biggest, step=state + step, optimizer=state + opt + batch))


# %%
#| export
def _rank_shapes(c: MixerConfig, p: int, q: int, i: int, j: int, mode: str, schedule: str) -> list[tuple]:
    "The shapes of rank (i, j)'s two largest kinds of weight block (token and channel), for the per-tensor temporaries."
    d = dims(c, p, q, i, j)
    if schedule == "summa": return [(d["Si"], d["Ts"]), (d["Ti"], d["Sj"]), (d["Hi"], d["Gj"]), (d["Gi"], d["Hj"]),
                                    (d["Ci"] * c.patch, d["Hj"]), (2 * d["Hj"], d["Vi"] * c.patch)]
    return [(d["Sj"], d["Ti"]), (d["Hj"], d["Gi"]), (d["Ci"] * c.patch, d["Hj"]), (2 * d["Hj"], d["Vi"] * c.patch)]


# %% [markdown]
# A layout's memory is that of its fullest rank (with uneven splits the first ranks hold the larger blocks):

# %%
#| export
def layout_memory(c: MixerConfig, p: int, q: int, s: Setup = Setup(), overhead: float = 0.0) -> dict:
    "`rank_memory` of the rank of a p x q group with the largest peak."
    ranks = [(i, j) for i in range(p) for j in range(q)] if p * q <= 16 else [(0, 0), (p - 1, q - 1), (0, q - 1), (p - 1, 0)]
    return max((rank_memory(c, p, q, i, j, s, overhead) for i, j in ranks), key=lambda r: r["peak"])


# %%
_m1 = layout_memory(preset("c3"), 1, 1, Setup(device="cuda"))
print({k: round(v / 2**30, 2) for k, v in _m1.items() if k in TERMS}, f"peak {_m1['peak'] / 2**30:.2f} GiB at the {_m1['phase']}")
test_eq(_m1["params"], 4 * param_count(preset("c3")))


# %% [markdown]
# ## The baselines on the same devices
#
# - **DDP**: a whole model per rank (the 1-way terms) and DDP's gradient buckets, one more copy of the gradients
#   (`gradient_as_bucket_view=False`, torch's default), counted as its exchange buffers;
# - **FSDP** (fully sharded, one unit per mixer block and one for the rest): parameters, gradients and moments
#   divided by $n$; while a unit runs, its parameters gathered, the next unit's prefetched and one unit's full
#   gradient before its reduce-scatter (three copies of the largest unit, as exchange buffers); the activations
#   of a whole sample, as 1-way;
# - **Megatron-1D** over $n$ ranks: the mixer MLPs' weights split $n$ ways, encoder and decoder replicated; the
#   residual stream replicated, so each block saves $4 T H$ plus the split hidden tensors $2(S H + T G)/n$; one
#   $T \times H$ all-reduce buffer.

# %%
#| export
def baseline_memory(kind: str, c: MixerConfig, n: int, s: Setup = Setup(), overhead: float = 0.0) -> dict:
    "Per-rank terms of `kind` ('ddp', 'fsdp', 'megatron') on `n` ranks, as `rank_memory` gives them."
    one = rank_memory(c, 1, 1, 0, 0, replace(s, schedule="overlap"), overhead)
    b, B, P1 = s.itemsize, s.batch, rank_params(c, 1, 1)
    t = {k: one[k] for k in TERMS}
    if kind == "ddp":
        t["recv"] = b * P1 * (n > 1)
    elif kind == "fsdp":
        T, H, S, G = c.tokens, c.hidden, c.token_hidden, c.channel_hidden
        unit = max(2 * (S * T + H * G) + 4 * H + S + T + G + H, P1 - c.blocks * (2 * (S * T + H * G) + 4 * H + S + T + G + H))
        t |= dict(params=b * P1 / n, grads=b * P1 / n, adam=2 * b * P1 / n, recv=3 * b * unit * (n > 1))
    elif kind == "megatron":
        T, H, S, G, BK = c.tokens, c.hidden, c.token_hidden, c.channel_hidden, c.blocks * s.k
        split = c.blocks * 2 * (S * T + H * G)
        Pm = split // n + (P1 - split)
        blk1, blkn = block_saved(c, 1, 1, 0, 0, "overlap", s.mode, B), B * (4 * T * H + 4 * T + 2 * (S * H + T * G) // n)
        keep = (B * T * H) if s.recompute else blkn
        t |= dict(params=b * Pm, grads=b * Pm, adam=2 * b * Pm, recv=b * B * T * H * (n > 1),
                  activations=one["activations"] - b * BK * ((B * T * H) if s.recompute else blk1) + b * BK * keep)
        ws = B * max(T * H + S * H // n, 2 * T * H + T * G // n) + (blkn if s.recompute else 0)
        t["workspace"] = max(one["workspace"] * 0 + b * ws, 16 * max(S * T, H * G) // n)
    else: raise ConfigError(f"baseline {kind!r}: choose ddp, fsdp or megatron")
    t = {k: float(v) for k, v in t.items()}
    return t | dict(peak=sum(t.values()), phase=one["phase"] if kind != "megatron" else "step", rank=(0, 0))


# %% [markdown]
# ## The fixed overhead
#
# On a CPU every rank is a process that has imported Python, torch, mpi4py and jigsaw_ref, and whose optimizer has
# imported `torch._dynamo` (torch's Adam does so when it is built, about 70 MB), and that has run a step: the code
# pages of the GEMM, autograd and optimizer kernels it touched are resident too (about 20 MB), and so are MPI's
# buffers once a message went through. `measure_overhead` starts such a process (under `mpiexec` with as many ranks
# as the run), runs one step of a 64 x 64 linear layer and one 1 MiB all-reduce, and reads its peak resident set;
# nothing of it is assumed. On a GPU the fixed cost is the CUDA context, cuBLAS's workspace
# and NCCL's buffers; it is **stated**, not measured here: 0.75 GiB per GPU.

# %%
#| export
GPU_OVERHEAD = 0.75 * 2**30  # bytes per GPU: CUDA context (lazy module loading), cuBLAS workspace, NCCL channel buffers; stated


def status_kib(*keys: str) -> dict:
    "Fields of /proc/self/status in bytes (VmRSS, VmHWM, VmSize, ...)."
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in keys: out[k] = int(line.split()[1]) * 1024
    return out


def _baseline_step():
    "What a trainer process has before its model: its imports, one step of a small linear model, one message."
    from mpi4py import MPI
    import numpy as np
    torch.set_num_threads(1)
    lin = torch.nn.Linear(64, 64)  # loads the GEMM, autograd and optimizer code a step runs (kB of tensors)
    opt = torch.optim.Adam(lin.parameters(), weight_decay=3e-6)
    torch.nn.functional.layer_norm(torch.einsum("bth,hg->btg", torch.randn(2, 8, 64), lin.weight), (64,)).square().sum().backward()
    opt.step()
    buf = np.ones(2**18, dtype=np.float32)  # 1 MiB through MPI: its shared-memory and eager buffers
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)
    return status_kib("VmHWM")["VmHWM"]


def _baseline_worker() -> int:
    "One rank of the overhead measurement: `_baseline_step`, then every rank's VmHWM (printed by rank 0)."
    tame_allocator()
    from mpi4py import MPI
    v = MPI.COMM_WORLD.gather(_baseline_step(), root=0)
    if MPI.COMM_WORLD.Get_rank() == 0: print(json.dumps(v))
    return 0


# %%
#| export
def _rank_command(ranks: int, *args) -> list[str]:
    "An mpiexec command line whose ranks import what a `jigsaw-train` rank imports, then run `jigsaw-plan ARGS`."
    exe = Path(sys.executable).with_name("mpiexec")
    boot = "import sys, jigsaw_ref.train; from jigsaw_ref.plan import main; sys.exit(main(sys.argv[1:]))"  # train: the trainer's imports
    return [str(exe if exe.exists() else "mpiexec"), "-n", str(ranks), sys.executable, "-c", boot, *args]


# %%
#| export
def measure_overhead(ranks: int = 1) -> float:
    "Measured bytes of one rank's fixed overhead: the largest peak resident set of `ranks` idle trainer processes."
    cmd = _rank_command(ranks, "--baseline-worker")
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if r.returncode: raise RuntimeError(f"measuring the overhead failed: {r.stderr[-2000:]}")
    return float(max(json.loads(r.stdout.strip().splitlines()[-1])))


# %% [markdown]
# **The allocator.** glibc's `malloc` raises its mmap threshold each time a large block is freed (up to 32 MiB),
# after which blocks of that size come from the heap and are kept after they are freed; a CPU rank's resident set
# then grows above its live tensors by however the heap fragments. `tame_allocator` fixes the threshold
# (`mallopt(M_MMAP_THRESHOLD, 128 KiB)`), so every tensor larger than that is mapped and given back when freed,
# as blocks beyond 32 MiB always are: the resident set then follows the live bytes, which is what the plan
# predicts. (Tensors of the paper's 720 x 1440 models are beyond 32 MiB anyway.) The measurements below are taken
# both ways.

# %%
#| export
def tame_allocator(threshold: int = 128 * 1024) -> bool:
    "Fix glibc's mmap threshold so freed tensors return to the system (False where there is no glibc)."
    try: libc = ctypes.CDLL("libc.so.6")
    except OSError: return False
    return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD


# %% [markdown]
# ## Devices
#
# `--devices` takes `N x MEMORY` (`4x40GB`: four GPUs of 40 GiB, A100-class compute), a named node (`a100-40`,
# `a100-80`: 4 GPUs; `h100`, `h200`: 8 GPUs; `N x NAME` for another count) or `cpu` (this machine: its cores as
# ranks sharing `MemAvailable`; `N x cpu` for N ranks).

# %%
#| export
@dataclass(frozen=True)
class Devices:
    "What a run gets: `n` devices of `memory` bytes each, a `machine` for the step time, GPU or CPU."
    n: int
    memory: float  # bytes per device (CPU: MemAvailable divided among the ranks)
    machine: perfmodel.Machine
    kind: str = "cuda"  # 'cuda' or 'cpu'
    name: str = ""

    def __str__(self): return f"{self.n} x {self.name} ({self.memory / 2**30:.1f} GiB each)"


# %%
#| export
NODES = {"a100-40": 4, "a100-80": 4, "h100": 8, "h200": 8}  # GPUs per named node


def mem_available() -> float:
    "This machine's MemAvailable in bytes."
    with open("/proc/meminfo") as f:
        return float(next(int(l.split()[1]) for l in f if l.startswith("MemAvailable")) * 1024)


def parse_devices(spec: str, cpu_rate: float | None = None) -> Devices:
    "`4x40GB`, `a100-40`, `8xh200`, `cpu`, `2xcpu` -> `Devices` (`cpu_rate`: measured GEMM FLOP/s of one core)."
    s = spec.strip().lower().replace(" ", "")
    n, _, what = s.rpartition("x") if "x" in s and s.split("x")[0].isdigit() else ("", "", s)
    if what in perfmodel.MACHINES:
        m = perfmodel.MACHINES[what]
        return Devices(int(n or NODES[what]), m.memory, m, "cuda", m.name)
    if what == "cpu":
        k = int(n or len(os.sched_getaffinity(0)))
        rate = cpu_rate or 50e9
        m = perfmodel.Machine(peak=(("fp32", rate),), hbm=math.inf, nvlink_pair=5e9, net_node=5e9, gpus_per_node=k, sms=0,
                              msg_lat=5e-6, memory=mem_available() / k, name="CPU rank")
        return Devices(k, m.memory, m, "cpu", f"CPU rank of this machine")
    if what.endswith(("gb", "gib")) and what.rstrip("gib").replace(".", "").isdigit():
        gib = float(what.rstrip("gib"))
        m = replace(perfmodel.A100_NODE, memory=gib * 2**30, name=f"{gib:g} GiB GPU (A100-class compute)")
        return Devices(int(n or 1), m.memory, m, "cuda", m.name)
    raise ConfigError(f"--devices {spec!r}: write N x MEMORY (4x40GB), a node ({', '.join(perfmodel.MACHINES)}, e.g. 8xh200) or cpu")


# %%
test_eq(parse_devices("4x40GB").n, 4)
test_eq(parse_devices("4x40GB").memory, 40 * 2**30)
test_eq((parse_devices("h200").n, parse_devices("2xh200").n), (8, 2))
test_fail(lambda: parse_devices("4xTPU"), contains="write N x MEMORY")

# %% [markdown]
# ## Step time
#
# From the performance model (`perfmodel.step_time`, calibrated on the paper's A100 cells; bf16 at the TF32 GEMM
# efficiency, an assumption), loading off: `overlap` is the activations schedule with its designed overlap,
# `plain` the same exchanges exposed, `summa` the paper's balanced 2x2 products. Recomputation runs the blocks'
# forward GEMMs and exchanges again: a third more of their GEMM time and exchanges. On the CPU the model is
# `predict_local`'s: a measured GEMM rate, 5 GB/s and 5 µs between ranks (stated).

# %%
#| export
_CAL = None


def calib() -> perfmodel.Calib:
    "The performance model's calibration (solved once), with bf16 at the TF32 efficiency."
    global _CAL
    if _CAL is None:
        c = perfmodel.calibrate()
        _CAL = replace(c, eta=c.eta + (("bf16", c.eta_of("tf32")),))
    return _CAL


# %%
#| export
def step_seconds(c: MixerConfig, layout: str, p: int, q: int, dev: Devices, s: Setup) -> float:
    "Predicted seconds per training step of `layout` ('jigsaw', 'ddp', 'fsdp', 'megatron') on `dev.n` devices."
    prec = "fp32" if dev.kind == "cpu" else s.precision
    cal = perfmodel.Calib(eta=(("fp32", 1.0),)) if dev.kind == "cpu" else calib()
    hw = dev.machine
    if layout == "ddp": return perfmodel.step_time(c, 1, 1, dev.n, prec, False, cal, hw, "activations", batch=s.batch)["step"]
    if layout == "fsdp": return perfmodel.fsdp_time(c, dev.n, prec, cal, hw, s.batch)["step"]
    if layout == "megatron": return perfmodel.megatron_time(c, q, dev.n, prec, cal, hw, s.batch)["step"]
    sched = "summa" if s.schedule == "summa" and p * q == 4 else "activations"
    t = perfmodel.step_time(c, p, q, dev.n, prec, False, cal, hw, sched, 0.0 if s.schedule == "plain" else 1.0, s.batch)
    if s.recompute: t["step"] += (t["gemm"] + t["mp"]) / 3
    if dev.kind == "cpu": t["step"] += t["gemm"] * (max(1.0, dev.n / len(os.sched_getaffinity(0))) - 1)  # ranks share the cores
    return t["step"]


# %% [markdown]
# ## The plan
#
# `plan` lists every model-parallel layout $p \times q$ that divides the device count and can be cut (the longitude
# patches and the channel dimensions must be at least as many as the shards; SUMMA needs a square group, other
# groups fall back to `overlap`), with data parallelism filling the rest, and the three baselines; for each the
# per-rank terms, whether it fits, the predicted step and samples per second. The recommendation is the layout
# that fits with the most samples per second (of those within 1% of the most, the one with the smallest peak).

# %%
#| export
def layouts(c: MixerConfig, n: int) -> list[tuple[int, int]]:
    "Every (p, q) with p*q dividing `n` that `c` can be cut into."
    out = []
    for m in (d for d in range(1, n + 1) if n % d == 0):
        for p in (d for d in range(1, m + 1) if m % d == 0):
            q = m // p
            if c.n_lon_patches >= p and min(c.n_in, c.n_out, c.hidden, c.token_hidden, c.channel_hidden) >= max(p, q): out.append((p, q))
    return out


# %%
#| export
def plan(c: MixerConfig, dev: Devices, s: Setup = Setup(), overhead: float | None = None) -> dict:
    "Rows (one per layout and baseline) with per-rank terms, peak, fit, step time and samples/s; the recommendation."
    over = (GPU_OVERHEAD if dev.kind == "cuda" else 0.0) if overhead is None else overhead
    rows = []
    for p, q in layouts(c, dev.n):
        st = replace(s if (s.schedule != "summa" or p == q) else replace(s, schedule="overlap"), dp=dev.n // (p * q))
        m = layout_memory(c, p, q, st, over)
        rows.append(dict(layout=f"Jigsaw {p}x{q}", kind="jigsaw", p=p, q=q, dp=dev.n // (p * q), schedule=st.schedule, **m,
                         saved_by_schedule={sc + (" recompute" if rc else ""): st.itemsize * max(
                             saved_elems(c, p, q, i, j, sc, st.mode, rc, st.batch, st.k) for i in range(min(p, 4)) for j in range(min(q, 4)))
                             for sc in ("plain", "overlap") + (("summa",) if p == q else ()) for rc in (False, True)}))
    rows.append(dict(layout="DDP", kind="ddp", p=1, q=1, dp=dev.n, schedule="-", **baseline_memory("ddp", c, dev.n, s, over)))
    if dev.n > 1:
        rows.append(dict(layout="FSDP", kind="fsdp", p=1, q=1, dp=dev.n, schedule="-", **baseline_memory("fsdp", c, dev.n, s, over)))
        for m in (d for d in range(2, dev.n + 1) if dev.n % d == 0 and d <= c.hidden):
            rows.append(dict(layout=f"Megatron-1D {m}", kind="megatron", p=1, q=m, dp=dev.n // m, schedule="-",
                             **baseline_memory("megatron", c, m, s, over)))
    for r in rows:
        r["fits"] = r["peak"] <= dev.memory
        r["step_s"] = step_seconds(c, r["kind"], r["p"], r["q"], dev, s)
        r["samples_s"] = r["dp"] * s.batch / r["step_s"] if r["kind"] != "fsdp" else dev.n * s.batch / r["step_s"]
    ok = [r for r in rows if r["fits"]]
    top = max((r["samples_s"] for r in ok), default=0.0)
    best = min((r for r in ok if r["samples_s"] >= 0.99 * top), key=lambda r: r["peak"]) if ok else None  # ties: less memory
    return dict(model=c, devices=dev, setup=s, overhead=over, rows=rows, best=best, reason=_reason(best, ok, rows, dev))


# %%
#| export
def _reason(best, ok, rows, dev) -> str:
    "Why `best` is recommended, in one sentence."
    if best is None:
        r = min(rows, key=lambda r: r["peak"])
        return (f"nothing fits {dev}: the smallest peak, {r['layout']}, needs {r['peak'] / 2**30:.1f} GiB per rank; "
                f"try recomputation, a smaller batch, or more devices")
    others = sorted((r for r in ok if r is not best), key=lambda r: -r["samples_s"])
    if not others: nxt = "; the only layout that fits"
    elif others[0]["samples_s"] > best["samples_s"]:
        nxt = (f"; {others[0]['layout']} predicts {others[0]['samples_s']:.3g}, within 1%, with "
               f"{(others[0]['peak'] - best['peak']) / 2**30:.2f} GiB more per rank")
    else: nxt = f"; next {others[0]['layout']} at {others[0]['samples_s']:.3g}"
    return (f"{best['layout']} (dp {best['dp']}) fits with {best['peak'] / 2**30:.1f} of {dev.memory / 2**30:.1f} GiB per rank "
            f"and has the most predicted samples/s among the {len(ok)} layouts that fit (within 1%, the least memory): "
            f"{best['samples_s']:.3g}{nxt}")


# %%
#| export
def format_plan(pl: dict) -> str:
    "The plan as a text table: per-rank GiB by term, peak, fit, step time, samples/s; the recommendation."
    c, dev, s = pl["model"], pl["devices"], pl["setup"]
    g = lambda v: f"{v / 2**30:.2f}"
    head = (f"model {param_count(c):,} parameters (1-way), grid {c.n_lat}x{c.n_lon}, H={c.hidden}, f_s={c.f_s}, f_c={c.f_c}; "
            f"devices {dev}; batch {s.batch}, k={s.k}, {s.precision}, schedule {s.schedule}, "
            f"{'recompute' if s.recompute else 'no recompute'}, {s.mode}; overhead {g(pl['overhead'])} GiB per rank "
            f"({'measured' if dev.kind == 'cpu' else 'stated'})")
    cols = ("params", "grads", "adam", "activations", "recv", "workspace", "batch", "overhead")
    lines = [head, f"{'layout':<16}{'dp':>4} " + "".join(f"{k[:6]:>8}" for k in cols) + f"{'peak GiB':>9} {'fits':<5}{'s/step':>9}{'samples/s':>10}  peak at"]
    for r in pl["rows"]:
        lines.append(f"{r['layout']:<16}{r['dp']:>4} " + "".join(f"{g(r[k]):>8}" for k in cols)
                     + f"{g(r['peak']):>9} {'yes' if r['fits'] else 'NO':<5}{r['step_s']:>9.3f}{r['samples_s']:>10.3f}  {r['phase']}")
    lines.append("recommended: " + pl["reason"])
    return "\n".join(lines)


# %% [markdown]
# ## The paper's C4 4-way model on four A100 40 GB
#
# The paper trained the 2.57 B model (H = 10352, $f_s = 1$) 4-way on the four A100s (40 GB) of a HoreKa node, TF32,
# batch 1, no recomputation. The plan says it fits 4-way and not 1-way (nor with DDP), as the paper found:

# %%
_pl = plan(preset("c4_4way"), parse_devices("4x40GB"), Setup(precision="tf32", mode="faithful", schedule="summa"))
print(format_plan(_pl))
_by = {r["layout"]: r for r in _pl["rows"]}
assert _by["Jigsaw 2x2"]["fits"] and not _by["Jigsaw 1x1"]["fits"] and not _by["DDP"]["fits"]


# %% [markdown]
# ## How large a model fits
#
# `max_hidden` finds, by bisection, the largest hidden size $H$ (the C4 4-way model's other settings: 720 x 1440,
# $P = 60$, $f_s = f_c = 1$, 3 blocks, TF32, batch 1, no recomputation) whose fullest rank fits a device; the table
# lists it for 1, 2, 4 and 8 GPUs of 40, 80 and 141 GB (A100 40GB, A100 80GB, H200), for each layout and baseline
# (`-`: the layout needs more GPUs, or nothing fits).

# %%
#| export
def max_hidden(base: MixerConfig, fits, lo: int = 8, hi: int = 1 << 17) -> int:
    "The largest hidden size H in [lo, hi] with `fits(base.replace(hidden=H))` (0 if none; memory grows with H)."
    if not fits(base.replace(hidden=lo)): return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(base.replace(hidden=mid)) else (lo, mid - 1)
    return lo


# %%
#| export
def hidden_table(base: MixerConfig, s: Setup, gpus=(1, 2, 4, 8), nodes=("a100-40", "a100-80", "h200")) -> dict:
    "{(layout, node, n): largest H} for the Jigsaw layouts (1x1, 1x2, 2x2, 2x4) and the baselines."
    out = {}
    for node in nodes:
        m = perfmodel.MACHINES[node]
        for n in gpus:
            jig = lambda c, p, q: layout_memory(c, p, q, replace(s, dp=n // (p * q)), GPU_OVERHEAD) if n >= p * q else None
            for name, f in (("Jigsaw 1x1 (data parallel)", lambda c: jig(c, 1, 1)), ("Jigsaw 1x2", lambda c: jig(c, 1, 2)),
                            ("Jigsaw 2x2", lambda c: jig(c, 2, 2)), ("Jigsaw 2x4", lambda c: jig(c, 2, 4)),
                            ("DDP", lambda c: baseline_memory("ddp", c, n, s, GPU_OVERHEAD)),
                            ("FSDP", lambda c: baseline_memory("fsdp", c, n, s, GPU_OVERHEAD) if n >= 2 else None),
                            ("Megatron-1D", lambda c: baseline_memory("megatron", c, n, s, GPU_OVERHEAD) if n >= 2 else None)):
                if f(base) is None: out[(name, node, n)] = None; continue
                out[(name, node, n)] = max_hidden(base, lambda c: f(c)["peak"] <= m.memory)
    return out


# %%
_ht = hidden_table(preset("c4_4way"), Setup(precision="tf32", device="cuda"))
_names = list(dict.fromkeys(k[0] for k in _ht))
print(f"{'largest H':<34}" + "".join(f"{node:>8}x{n}" for node in ("a100-40", "a100-80", "h200") for n in (1, 2, 4, 8)))
for _n in _names:
    print(f"{_n:<34}" + "".join(f"{(_ht[(_n, node, n)] or '-'):>10}" for node in ("a100-40", "a100-80", "h200") for n in (1, 2, 4, 8)))
assert _ht[("Jigsaw 2x2", "a100-40", 4)] >= 10352 > _ht[("Jigsaw 1x1 (data parallel)", "a100-40", 4)]

# %% [markdown]
# ## The picture
#
# Stacked per-rank memory of each layout for the paper's presets on their own devices (C1 1-way and C3 on one
# A100 40GB rank each, C4 2-way on two, C4 4-way on four; every layout and baseline of that device count), with the
# capacity of common GPUs:

# %%
#| export
COLORS = dict(params="#4c72b0", grads="#6f8fc7", adam="#9fb5dd", activations="#dd8452", recv="#c44e52", workspace="#e7b07a",
              batch="#8c8c8c", overhead="#555555")


def plot_memory(plans: dict, path=None):
    "Stacked per-rank bars (GiB by term) of each plan's rows, one panel per plan, with GPU capacity lines; the figure."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3.2 * len(plans), 4.4))
    axes = fig.subplots(1, len(plans), sharey=True)
    for ax, (title, pl) in zip(axes if len(plans) > 1 else [axes], plans.items()):
        rows = pl["rows"]
        for x, r in enumerate(rows):
            bottom = 0.0
            for k in TERMS:
                v = r[k] / 2**30
                ax.bar(x, v, bottom=bottom, color=COLORS[k], width=0.75, label=k if x == 0 else None)
                bottom += v
        for node, ls in (("a100-40", ":"), ("a100-80", "--"), ("h200", "-.")):
            m = perfmodel.MACHINES[node]
            ax.axhline(m.memory / 2**30, color="k", ls=ls, lw=0.9, label=m.name if ax is (axes[0] if len(plans) > 1 else axes) else None)
        ax.set_xticks(range(len(rows)), [r["layout"].replace("Jigsaw ", "").replace("Megatron-1D ", "Meg ") for r in rows],
                      rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9); ax.grid(axis="y", alpha=0.3)
    (axes[0] if len(plans) > 1 else axes).set_ylabel("GiB per rank")
    fig.legend(*(axes[0] if len(plans) > 1 else axes).get_legend_handles_labels(), fontsize=7, loc="upper center", ncol=6)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    if path: fig.savefig(path, dpi=110)
    return fig


# %%
_plans = {f"{name} on {n} x A100 40GB": plan(preset(name), parse_devices(f"{n}x40GB"), Setup(precision="tf32"))
          for name, n in (("c1_1way", 1), ("c3", 1), ("c4_2way", 2), ("c4_4way", 4))}
plot_memory(_plans)


# %% [markdown]
# ## Checked against measurement
#
# `measure` runs real training steps (3 steps: the same forward with a dropout key, loss share, backward, gradient
# completion with clipping and Adam as `jigsaw-train`, on random data of the preset's shapes) on `mpiexec` ranks, one
# torch thread each, and reads every rank's peak resident set (`VmHWM` of `/proc/self/status`). The planned peak
# is the plan's terms plus the fixed overhead that each rank measured before it built anything (the step of
# `measure_overhead`: the trainer's imports, one step of a small linear layer, one message).
# `--fresh` runs each case in its own launch; otherwise the cases of one world size share a launch and the peak is
# reset between them (`/proc/self/clear_refs`), which leaves the small blocks of earlier cases in the heap.

# %%
#| export
def _measure_worker(spec: dict) -> int:
    "Ranks of one measurement launch: each case of `spec['cases']` in turn, printing each rank's VmHWM (rank 0, JSON)."
    if spec.get("tame", True): tame_allocator()
    from mpi4py import MPI
    from jigsaw_ref.comm import make_groups
    from jigsaw_ref.grid import Grid
    from jigsaw_ref.parallel import JigsawMixer, block_of, complete_grads, loss_share
    from jigsaw_ref.mixer import dropout_key
    comm = MPI.COMM_WORLD
    overhead = _baseline_step()  # this process's fixed overhead, measured before any model exists
    out = []
    for case in spec["cases"]:
        import gc; gc.collect()
        comm.Barrier()
        with open("/proc/self/clear_refs", "w") as f: f.write("5")  # VmHWM := VmRSS
        base = status_kib("VmRSS")["VmRSS"]
        cfg = preset(case["model"], **case.get("overrides", {}))
        p, q = case["p"], case["q"]
        g = make_groups(Grid(comm.Get_size() // (p * q), p, q), "mpi", "p2p", comm)
        m = JigsawMixer(cfg, g["tensor"], g["domain"], case.get("mode", "exact"), torch.float32,
                        schedule=case.get("schedule", "overlap"), recompute=case.get("recompute", False)).train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-4, weight_decay=3e-6)
        B = case.get("batch", 1)
        x = block_of(cfg, torch.randn(B, cfg.n_in, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j).contiguous()
        y = block_of(cfg, torch.randn(B, cfg.n_out, cfg.n_lat, cfg.n_lon), p, q, m.i, m.j).contiguous()
        lw, vw = torch.ones(cfg.n_lat), torch.ones(y.shape[1])
        for step in range(case.get("steps", 3)):
            opt.zero_grad(set_to_none=False)
            loss_share(m(x, k=case.get("k", 1), key=dropout_key(0, step)), y, lw, vw, y.numel()).backward()
            complete_grads(m, g, 1.0); opt.step()
        peak = status_kib("VmHWM")["VmHWM"]
        out.append(comm.gather(dict(peak=peak, base=base, overhead=overhead), root=0))
        del m, opt, x, y, g
    if comm.Get_rank() == 0: print(json.dumps(out))
    return 0


# %%
#| export
def measure(cases: list[dict], ranks: int, tame: bool = True, timeout: float = 1800) -> list[list[dict]]:
    "Per case, every rank's measured `peak` (VmHWM) and `base` (VmRSS before the case), bytes, from one mpiexec launch."
    cmd = _rank_command(ranks, "--worker", json.dumps(dict(cases=cases, tame=tame)))
    env = dict(os.environ, MPIR_CVAR_ENABLE_HEAVY_YIELD="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode: raise RuntimeError(f"measurement failed: {' '.join(cmd[:4])} ...\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# %%
#| export
CHECK_WAYS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}


def check_cases(model: str, ways=(1, 2, 4)) -> list[tuple[int, dict]]:
    "The measured cases of a preset: (ranks, case) for 1-, 2- and 4-way, with and without recomputation, plain and overlap."
    out = []
    for w in ways:
        p, q = CHECK_WAYS[w]
        for rec in (False, True):
            for sched in (("overlap",) if w == 1 else ("plain", "overlap")):
                out.append((w, dict(model=model, p=p, q=q, schedule=sched, recompute=rec)))
    return out


# %%
#| export
def check(models=("tiny", "small"), ways=(1, 2, 4), fresh: bool = False, tame: bool = True) -> list[dict]:
    "Measured vs planned peak per rank (the largest rank) for every case of `check_cases`: rows with both and their ratio."
    rows = []
    for w in ways:
        cases = [c for m in models for r, c in check_cases(m, (w,))]
        runs = [measure([c], w, tame)[0] for c in cases] if fresh else measure(cases, w, tame)
        for case, ranks in zip(cases, runs):
            cfg, over = preset(case["model"]), max(r["overhead"] for r in ranks)
            s = Setup(schedule=case["schedule"], recompute=case["recompute"])
            pl = layout_memory(cfg, case["p"], case["q"], s, over)
            got = max(r["peak"] for r in ranks)
            rows.append(dict(case, way=w, measured=got, planned=pl["peak"], overhead=over, ratio=pl["peak"] / got,
                             base=max(r["base"] for r in ranks), phase=pl["phase"], terms={k: pl[k] for k in TERMS}))
    return rows


# %%
#| export
def replan(rows: list[dict]) -> list[dict]:
    "The rows of `check` (e.g. read back from its JSON) with `planned` and `ratio` computed again by this module's formulas."
    out = []
    for r in rows:
        pl = layout_memory(preset(r["model"]), r["p"], r["q"], Setup(schedule=r["schedule"], recompute=r["recompute"]), r["overhead"])
        out.append(r | dict(planned=pl["peak"], ratio=pl["peak"] / r["measured"], phase=pl["phase"], terms={k: pl[k] for k in TERMS}))
    return out


# %%
#| export
def check_table(rows: list[dict]) -> str:
    "The measured-vs-planned table of `check`."
    lines = [f"{'model':<8}{'way':>4} {'schedule':<9}{'recompute':<10}{'overhead':>9}{'planned':>9}{'measured':>9}{'planned/measured':>17}  peak at"]
    for r in rows:
        lines.append(f"{r['model']:<8}{r['way']:>4} {r['schedule']:<9}{'yes' if r['recompute'] else 'no':<10}{r['overhead'] / 2**20:>9.0f}"
                     f"{r['planned'] / 2**20:>9.0f}{r['measured'] / 2**20:>9.0f}{r['ratio']:>17.3f}  {r['phase']}")
    return "\n".join(lines) + "\n(MiB per rank; the largest rank of each case)"


# %% [markdown]
# Measured on this project's 2-core machine (`jigsaw-plan --check tiny,small,medium --fresh`, once with the tamed
# allocator and once with glibc's default; the machine was shared with other work, which changes times, not
# memory). The files are the command's output, read here:

# %%
_res = Path(jigsaw_ref.__file__).parents[1] / "benchmarks" / "results"
_checked = {}
for _f in ("plan_check", "plan_check_default_malloc"):
    if not (_res / f"{_f}.json").exists(): continue
    _checked[_f] = replan(json.loads((_res / f"{_f}.json").read_text()))  # the records, planned by this page's formulas
    print(f"== {_f}: " + (_res / f"{_f}.txt").read_text().splitlines()[0] + "\n" + check_table(_checked[_f]) + "\n")
_r = [r["ratio"] for r in _checked["plan_check"]]
print(f"tamed allocator: planned / measured from {min(_r):.3f} to {max(_r):.3f} over {len(_r)} cases")
assert all(abs(x - 1) < 0.10 for x in _r)
if "plan_check_default_malloc" in _checked:
    _d = [r["ratio"] for r in _checked["plan_check_default_malloc"]]
    print(f"glibc's default: planned / measured from {min(_d):.3f} to {max(_d):.3f}")

# %% [markdown]
# With the allocator tamed, every case is within 4% of the measured peak (the plan slightly under for most, by the
# kB-sized blocks of the step's bookkeeping, and 2% over for 1-way `medium`, where the decoder moment overcounts). With
# glibc's default the same runs peak 10-33% higher than their live tensors (`tiny` excepted: nothing to retain), the
# more so the more tensors fall between 128 KiB and 32 MiB (`medium`: a $T_i 	imes H_j$ block is 6-25 MB): that is
# the heap keeping freed blocks, not a term the model lacks. A trainer that plans its memory should tame the
# allocator (`tame_allocator()`, one `mallopt` call at start-up), or budget that much more.

# %% [markdown]
# ## On the GPU
#
# `benchmarks/gpu_check.py` measured the C3 model (1.10 B) training 1-way on an H200 with
# `torch.cuda.max_memory_allocated` (live tensor bytes: no CUDA context, no allocator cache). The plan's peak without
# the stated overhead, against it:

# %%
_g = json.loads((_res / "gpu_check_h200.json").read_text())
for _prec in ("tf32", "bf16", "fp32"):
    _pm = layout_memory(preset(_g["model"]["preset"]), 1, 1, Setup(precision=_prec, device="cuda"))
    _meas = _g["steps"][_prec]["peak_mem_gib"] * 2**30
    print(f"C3 1-way {_prec}: planned {_pm['peak'] / 2**30:.2f} GiB, measured {_meas / 2**30:.2f} GiB: {_pm['peak'] / _meas:.3f}")
    assert abs(_pm["peak"] / _meas - 1) < 0.1

# %% [markdown]
# `gpu_check` repeats that comparison for more cases on whatever GPU it runs on (`jigsaw-plan --gpu-check`, 1-way,
# one GPU): per case the largest `max_memory_allocated` of three training steps (forward, loss share, backward,
# gradient completion with clipping, foreach Adam) against the plan's peak without the fixed overhead.

# %%
#| export
GPU_CASES = [dict(model="c3"), dict(model="c3", recompute=True), dict(model="c3", precision="bf16"), dict(model="c3", batch=2),
             dict(model="h1024"), dict(model="c1_1way", recompute=True, batch=2), dict(model="c4_2way", recompute=True)]


def gpu_check(cases=GPU_CASES, steps: int = 3) -> list[dict]:
    "Measured (`torch.cuda.max_memory_allocated`, by phase) vs planned peak of 1-way training steps on this process's GPU."
    from jigsaw_ref.comm import Group
    from jigsaw_ref.parallel import JigsawMixer, complete_grads, loss_share
    out = []
    for case in cases:
        cfg, s = preset(case["model"]), Setup(batch=case.get("batch", 1), recompute=case.get("recompute", False),
                                              precision=case.get("precision", "tf32"), device="cuda")
        torch.backends.cuda.matmul.allow_tf32 = s.precision == "tf32"
        pl = layout_memory(cfg, 1, 1, s)
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        m = JigsawMixer(cfg, Group(), Group(), dtype=torch.float32, device="cuda", init=False, recompute=s.recompute).train()
        with torch.no_grad():
            for t in m.parameters(): t.normal_(0, 0.01)
        build = torch.cuda.max_memory_allocated()
        opt = torch.optim.Adam(m.parameters(), lr=1e-4, weight_decay=3e-6)
        x = torch.randn(s.batch, cfg.n_in, cfg.n_lat, cfg.n_lon, device="cuda")
        y = torch.randn(s.batch, cfg.n_out, cfg.n_lat, cfg.n_lon, device="cuda")
        lw, vw, g = torch.ones(cfg.n_lat, device="cuda"), torch.ones(cfg.n_out, device="cuda"), {"dp": Group(), "model": Group()}
        phases = {}
        for step in range(steps):
            opt.zero_grad(set_to_none=False)
            for name, fn in (("forward", None), ("backward", None), ("optimizer", None)):
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                if name == "forward":
                    with torch.autocast("cuda", torch.bfloat16, enabled=s.precision == "bf16"): pred = m(x, k=1)
                    loss = loss_share(pred.float(), y, lw, vw, y.numel())
                elif name == "backward": loss.backward()
                else: complete_grads(m, g, 1.0); opt.step()
                torch.cuda.synchronize()
                phases[name] = max(phases.get(name, 0), torch.cuda.max_memory_allocated()) if step else 0
            del pred, loss
        meas = max(phases.values())
        out.append(dict(case, planned=pl["peak"], measured=meas, ratio=pl["peak"] / meas, build=build, phases=phases,
                        planned_phase=pl["phase"], planned_phases=pl["phases"], device=torch.cuda.get_device_name()))
        print(f"{case}: planned {pl['peak'] / 2**30:.2f} GiB ({pl['phase']}), measured {meas / 2**30:.2f} GiB "
              f"({ {k: round(v / 2**30, 2) for k, v in phases.items()} }): {pl['peak'] / meas:.3f}", flush=True)
        del m, opt, x, y
    return out


# %% [markdown]
# ## Before the trainer builds anything
#
# `preflight` is what `jigsaw-train` runs on every rank, before the first collective and before it allocates the
# model: it plans this rank's peak and compares it with what the rank has. On a CPU that is `MemAvailable` shared by
# the node's ranks (counted from the launcher's environment: `MPI_LOCALNRANKS`, `OMPI_COMM_WORLD_LOCAL_SIZE`,
# `LOCAL_WORLD_SIZE`, `SLURM_NTASKS_PER_NODE`, ...) and, if the process has an address-space limit (`ulimit -v`,
# `RLIMIT_AS`), what is left of it; on a GPU, its free memory. The rank's own resident set is its overhead (it has
# imported everything by then). A run that cannot fit is refused with one line: the shortfall, the terms, and the
# smallest change that fits (recomputation, another layout of the same ranks, a smaller batch, or more ranks).

# %%
#| export
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE",
                    "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")


def ranks_on_node(world: int) -> int:
    "How many ranks share this node, from the launcher's environment (`world` if it does not say)."
    for k in _LOCAL_SIZE_VARS:
        v = os.environ.get(k, "").split("(")[0].split(",")[0]
        if v.isdigit() and int(v) > 0: return int(v)
    return world


# %%
#| export
def available(device: str = "cpu", ranks_here: int = 1, gpu=None) -> tuple[float, str]:
    "(bytes this rank may still allocate, where the figure comes from)."
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info(gpu)
        return float(free), "free device memory"
    have, why = mem_available() / ranks_here, f"MemAvailable / {ranks_here} rank{'s' if ranks_here > 1 else ''} on this node"
    lim = resource.getrlimit(resource.RLIMIT_AS)[0]
    if lim != resource.RLIM_INFINITY:
        left = lim - status_kib("VmSize")["VmSize"]
        if left < have: have, why = float(left), f"address-space limit {lim / 2**30:.1f} GiB less {status_kib('VmSize')['VmSize'] / 2**30:.1f} in use"
    return have, why


# %%
#| export
def _fits_with(c: MixerConfig, p: int, q: int, s: Setup, have: float) -> bool:
    return layout_memory(c, p, q, s)["peak"] <= have


def smallest_change(c: MixerConfig, grid, s: Setup, have: float) -> str:
    "The first change that makes the dynamic peak fit in `have` bytes: recomputation, a layout, a smaller batch, more ranks."
    p, q, world = grid.domain, grid.tensor, grid.world
    if not s.recompute and _fits_with(c, p, q, replace(s, recompute=True), have): return "add --recompute"
    for rc in (False, True):
        for pp, qq in sorted(layouts(c, world), key=lambda t: (t[0] * t[1], abs(t[0] - t[1]))):
            st = replace(s, recompute=rc, schedule=s.schedule if (s.schedule != "summa" or pp == qq) else "overlap", dp=world // (pp * qq))
            if (pp, qq) != (p, q) and _fits_with(c, pp, qq, st, have):
                return f"use --way {pp}x{qq} on the same {world} ranks{' with --recompute' if rc else ''}"
    for b in range(s.batch - 1, 0, -1):
        if _fits_with(c, p, q, replace(s, batch=b, recompute=True), have): return f"use --batch {b} with --recompute"
    for n in (2, 4, 8, 16, 32, 64):
        for pp, qq in sorted(layouts(c, n), key=lambda t: t[0] * t[1]):
            if pp * qq > p * q and _fits_with(c, pp, qq, replace(s, batch=1, recompute=True), have):
                return f"launch at least {pp * qq} ranks per model (--way {pp}x{qq} --recompute --batch 1, each with this much memory)"
    h = max_hidden(c, lambda cc: _fits_with(cc, p, q, replace(s, recompute=True), have), lo=1, hi=c.hidden)
    return f"nothing up to 64 ranks per model fits; on this layout hidden <= {h} fits (with --recompute)" if h else \
        "nothing up to 64 ranks per model fits, and no hidden size does on this layout"


# %%
#| export
def preflight(c: MixerConfig, grid, *, batch: int = 1, k: int = 1, recompute: bool = False, schedule: str = "overlap",
              mode: str = "exact", dtype: str = "float32", precision: str = "fp32", device: str = "cpu", rank: int = 0,
              ranks_here: int | None = None, have: float | None = None, gpu=None) -> dict:
    "Raise `ConfigError` (one line) if this rank's planned peak exceeds what it has; else return the plan of the rank."
    t0 = time.perf_counter()
    _, i, j = grid.coords(rank)
    s = Setup(batch, k, recompute, schedule, mode, precision, 8 if dtype == "float64" else 4, device, grid.dp)
    if have is None:
        if device == "cpu" and "torch._dynamo" not in sys.modules: import torch._dynamo  # noqa: F401 (the optimizer will import it)
        have, why = available(device, ranks_here or ranks_on_node(grid.world), gpu)
    else: why = "the given memory"
    r = rank_memory(c, grid.domain, grid.tensor, i, j, s)  # no overhead: `have` is what is left beside this process
    if r["peak"] > have:
        terms = ", ".join(f"{k} {r[k] / 2**30:.2f}" for k in TERMS if r[k] and k != "overhead")
        raise ConfigError(f"memory: rank {rank} would need {r['peak'] / 2**30:.2f} GiB beyond what it holds now, at its peak "
                          f"({r['phase']}; {terms} GiB), but {have / 2**30:.2f} GiB are available ({why}): "
                          f"{smallest_change(c, grid, s, have)}; or set memory_check=false to skip this check")
    return r | dict(have=have, seconds=time.perf_counter() - t0)


# %% [markdown]
# The case of the issue that asked for this: the `tiny` preset with `hidden=60000` (three channel-MLP weights of
# 3.6 billion elements each) on one rank with 6 GiB is refused by the plan, in well under a second, before anything
# is allocated:

# %%
from jigsaw_ref.grid import Grid
_t = time.perf_counter()
test_fail(lambda: preflight(preset("tiny", hidden=60000), Grid(1, 1, 1), have=6 * 2**30), contains="memory: rank 0 would need")
try: preflight(preset("tiny", hidden=60000), Grid(1, 1, 1), have=6 * 2**30)
except ConfigError as e: print(e)
print(f"({time.perf_counter() - _t:.2f} s)")
assert preflight(preset("tiny"), Grid(1, 1, 1), have=6 * 2**30)["peak"] < 2**30
test_fail(lambda: preflight(preset("small"), Grid(1, 1, 1), have=200 * 2**20), contains="add --recompute")
test_fail(lambda: preflight(preset("small"), Grid(2, 1, 1), have=150 * 2**20), contains="use --way 1x2 on the same 2 ranks")


# %% [markdown]
# ## `jigsaw-plan`

# %%
#| export
def _overrides(base: MixerConfig, items: list[str]) -> dict:
    "`--set FIELD=VALUE` items as config overrides (numbers as JSON, tuples comma-separated)."
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not hasattr(base, k): raise ConfigError(f"--set {item!r}: expected FIELD=VALUE with a MixerConfig field")
        try: val = json.loads(v)
        except json.JSONDecodeError: val = v
        cur = getattr(base, k)
        out[k] = tuple(val) if isinstance(cur, tuple) and isinstance(val, list) else float(val) if isinstance(cur, float) else val
    return out


# %%
#| export
def _cpu_rate() -> float:
    "Measured fp32 GEMM FLOP/s of one thread (best of 5 products of 1024^3)."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    torch.set_num_threads(old)
    return 2 * 1024**3 / best


# %%
#| export
def _jsonable(pl: dict) -> dict:
    c, d = pl["model"], pl["devices"]
    return dict(model=dict(vars(c)), params=param_count(c), devices=dict(n=d.n, memory=d.memory, name=d.name, kind=d.kind),
                setup=dict(vars(pl["setup"])), overhead=pl["overhead"], rows=pl["rows"],
                recommended=pl["best"]["layout"] if pl["best"] else None, reason=pl["reason"])


# %%
#| export
def main(argv=None) -> int:
    "Entry point of `jigsaw-plan`."
    ap = argparse.ArgumentParser("jigsaw-plan", description="Per-rank memory and step time of every layout on the given devices.")
    ap.add_argument("--model", default="c4_4way", help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE", help="override a preset field (repeatable)")
    ap.add_argument("--devices", default="4x40GB", help="N x MEMORY (4x40GB), a node (a100-40, a100-80, h100, h200, or 8xh200), or cpu")
    ap.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"), help="default: tf32 on GPUs, fp32 on the CPU")
    ap.add_argument("--batch", type=int, default=1, help="samples per model group and step")
    ap.add_argument("--rollout", type=int, default=1, help="latent rollout steps k (the largest the run draws)")
    ap.add_argument("--recompute", action="store_true", help="recompute each mixer block in the backward")
    ap.add_argument("--schedule", default="overlap", choices=("overlap", "plain", "summa"))
    ap.add_argument("--mode", default="exact", choices=("exact", "faithful"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--max-hidden", action="store_true", help="print the largest hidden size per layout on 1-8 GPUs of 40, 80, 141 GB")
    ap.add_argument("--check", default=None, metavar="MODELS", help="measure presets (e.g. tiny,small,medium) on 1, 2, 4 mpiexec ranks against the plan")
    ap.add_argument("--fresh", action="store_true", help="with --check: one launch per case")
    ap.add_argument("--default-malloc", action="store_true", help="with --check: leave glibc's dynamic mmap threshold alone")
    ap.add_argument("--out", default=None, help="with --check: write the table (and a .json beside it) here")
    ap.add_argument("--replan", default=None, metavar="JSON", help="print the table of a --check JSON with the plan computed again")
    ap.add_argument("--gpu-check", default=None, metavar="JSON", help="measure 1-way steps on this GPU against the plan; write JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker: return _measure_worker(json.loads(a.worker))
    if a.baseline_worker: return _baseline_worker()
    try:
        if a.gpu_check:
            Path(a.gpu_check).write_text(json.dumps(gpu_check(), indent=1)); return 0
        if a.replan:
            head = Path(a.replan).with_suffix(".txt").read_text().splitlines()[0] if Path(a.replan).with_suffix(".txt").exists() else ""
            print(head + "\n" + check_table(replan(json.loads(Path(a.replan).read_text()))))
            return 0
        if a.check:
            rows = check(tuple(a.check.split(",")), fresh=a.fresh, tame=not a.default_malloc)
            text = (f"CPU: {_cpu_model()}; allocator: {'glibc default' if a.default_malloc else 'mmap threshold fixed at 128 KiB'}; "
                    f"{'one launch per case' if a.fresh else 'cases of a world size share a launch'}\n" + check_table(rows))
            print(text)
            if a.out:
                Path(a.out).write_text(text + "\n"); Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
            return 0
        base = preset(a.model)
        c = base.replace(**_overrides(base, a.sets)) if a.sets else base
        dev = parse_devices(a.devices, _cpu_rate() if "cpu" in a.devices.lower() else None)
        prec = a.precision or ("fp32" if dev.kind == "cpu" else "tf32")
        if dev.kind == "cpu" and prec != "fp32": raise ConfigError(f"--precision {prec} is for GPUs; the CPU runs fp32")
        s = Setup(a.batch, a.rollout, a.recompute, a.schedule, a.mode, prec, 8 if a.dtype == "float64" else 4, dev.kind)
        if a.max_hidden:
            ht = hidden_table(c, replace(s, device="cuda"))
            names = list(dict.fromkeys(k[0] for k in ht))
            print(f"largest hidden size (other settings of {a.model}); columns: node x GPUs")
            print(f"{'layout':<34}" + "".join(f"{node:>8}x{n}" for node in ("a100-40", "a100-80", "h200") for n in (1, 2, 4, 8)))
            for nm in names:
                print(f"{nm:<34}" + "".join(f"{(ht[(nm, node, n)] or '-'):>10}" for node in ("a100-40", "a100-80", "h200") for n in (1, 2, 4, 8)))
            return 0
        pl = plan(c, dev, s, measure_overhead(dev.n) if dev.kind == "cpu" else None)
        print(json.dumps(_jsonable(pl), indent=1, default=str) if a.json else format_plan(pl))
        return 0
    except ConfigError as e:
        ap.error(str(e))


# %%
#| export
def _cpu_model() -> str:
    "The CPU model name and core count of this machine (lscpu's 'Model name')."
    try: name = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration): name = "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


# %%
#| export
#| eval: false
if __name__ == "__main__":
    sys.exit(main())

# %% [markdown]
# The command for the paper's C4 4-way model on four 40 GB GPUs (the A100 node the paper trained it on):

# %%
main(["--model", "c4_4way", "--devices", "4x40GB"])
