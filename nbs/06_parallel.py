# %%
#| default_exp parallel

# %%
#| export
from __future__ import annotations
import functools, math
import torch
import torch.nn as nn
import torch.nn.functional as F
from jigsaw_ref.config import MixerConfig, shard_range, split_sizes
from jigsaw_ref.mixer import dropout, init_block, param_shapes, patchify, site_key, unpatchify
from jigsaw_ref.comm import Group, all_gather
from jigsaw_ref.pmatmul import (FEATURES, PATCHES, Layout, channel_mlp, channel_mlp_faithful, channel_mlp_overlap,
                                channel_mlp_summa, gather_contract, layer_norm, matmul_reduce_scatter_out, token_mlp,
                                token_mlp_faithful, token_mlp_overlap, token_mlp_summa)
from torch.utils.checkpoint import checkpoint
from fastcore.basics import patch

# %%
#| hide
from fastcore.test import test_eq, test_close, test_fail
from jigsaw_ref.config import preset
from jigsaw_ref.mixer import WeatherMixer, param_count
from nbdev.showdoc import show_doc
from jigsaw_ref.ranks import run_ranks
from jigsaw_ref.comm import make_groups
from jigsaw_ref.grid import Grid
from jigsaw_ref.probe import saved_bytes


# %% [markdown]
# # The parallel WeatherMixer
#
# > The whole model on a $p \times q$ grid (1-, 2-, 4-way and beyond), in an exact mode equal to the one-process model and a faithful mode with the released code's behaviour.

# %% [markdown]
# ## Who holds what
#
# `shard_spec` says, for rank $(i,j)$ of a $p\times q$ model group, which slice of every full parameter it
# keeps (one index list per dimension) and whether that slice is also kept by other ranks:
#
# - the big matrices (token and channel MLP weights) are cut into $p \times q$ blocks, one per rank;
# - the encoder, decoder and residual weights are cut over the channel axis $q$ (the encoder by its output
#   features, the decoder and residual by the features they contract), and over the domain axis $p$ along
#   another dimension; they are all-gathered over the $p$ domain partners when used (in the backward, their
#   gradient is reduce-scattered back), so no rank stores more than $1/pq$ of them. The encoder first gathers
#   the rank's *raw input pixels* of all channels from its tensor partners ($C_\text{in}$ values per pixel, far
#   fewer than the $H$ features a partial-sum encoder would have to exchange) and then needs no communication
#   in the backward at all, since no gradient flows into the data;
# - the MLP biases are sharded over the group that sums the partial product they are added to (see
#   `pmatmul.add_bias_shard`);
# - the remaining vectors (LayerNorm weights, encoder, decoder and residual biases) act on a channel block for
#   every token of the rank's domain block, so they are kept whole for that channel block and **replicated**
#   over the $p$ domain partners. They are at most $\max(H, P V)$ long, a fraction of a percent of the
#   parameters; in exact mode their gradient shares are summed over the replica group after the backward.

# %%
#| export
def _r(n, parts, k):
    a, b = shard_range(n, parts, k)
    return list(range(a, b))


# %%
#| export
def token_sizes(c: MixerConfig, p: int) -> list[int]:
    "Tokens per domain block: longitude patches are split over `p`, each with all latitude rows."
    return [s * c.n_lat for s in split_sizes(c.n_lon_patches, p)]


# %%
#| export
def residual_inputs(c: MixerConfig, q: int, j: int) -> list[int]:
    "Indices (into the input channels) of the residual's input channels that tensor rank `j` holds."
    return [k for k in _r(c.n_in, q, j) if k < c.n_res_in]


# %%
#| export
def _sub(ix: list, parts: int, k: int) -> list:
    "Shard `k` of `parts` of an index list (a bias shard within a block)."
    a, b = shard_range(len(ix), parts, k)
    return ix[a:b]


# %%
#| export
def shard_spec(c: MixerConfig, p: int, q: int, i: int, j: int, mode: str = "exact", schedule: str = "overlap") -> dict:
    "name -> (index lists per dim, replica axis or None, gather dim over the domain axis or None)."
    H, S, G, Vo, V, T = c.hidden, c.token_hidden, c.channel_hidden, c.n_out, c.n_vars, c.tokens
    t0 = sum(token_sizes(c, p)[:i]); Ti = list(range(t0, t0 + token_sizes(c, p)[i]))
    Hj, Sj, Gi, Vj = _r(H, q, j), _r(S, q, j), _r(G, p, i), _r(Vo, q, j)
    P = list(range(c.patch))
    spec = {"enc.w": ([_r(c.n_in, p, i), P, Hj], None, 0), "enc.b": ([Hj], "domain", None)}
    for b in range(c.blocks):
        n = f"blocks.{b}."
        spec |= {n + "ln1.w": ([Hj], "domain", None), n + "ln1.b": ([Hj], "domain", None),
                 n + "tok1.w": ([Sj, Ti], None, None), n + "tok1.b": ([_sub(Sj, p, i)], None, None),
                 n + "tok2.w": ([Ti, Sj], None, None), n + "tok2.b": ([_sub(Ti, q, j)], None, None),
                 n + "ln2.w": ([Hj], "domain", None), n + "ln2.b": ([Hj], "domain", None),
                 n + "ch1.w": ([Hj, Gi], None, None), n + "ch1.b": ([_sub(Gi, q, j)], None, None),
                 n + "ch2.w": ([Gi, Hj], None, None), n + "ch2.b": ([_sub(Hj, p, i)], None, None)}
    if schedule == "summa":  # W1 and Wa cut the other way round; biases whole blocks, kept by a row or a column
        Si, Tj, Hi, Gj = _r(S, p, i), list(range(sum(token_sizes(c, p)[:j]), sum(token_sizes(c, p)[:j + 1]))), _r(H, p, i), _r(G, q, j)
        for b in range(c.blocks):
            n = f"blocks.{b}."
            spec |= {n + "tok1.w": ([Si, Tj], None, None), n + "tok1.b": ([Si], "tensor", None),
                     n + "tok2.b": ([Ti], "tensor", None), n + "ch1.w": ([Hi, Gj], None, None),
                     n + "ch1.b": ([Gj], "domain", None), n + "ch2.b": ([Hj], "domain", None)}
    elif bias_copies(mode, p):  # the released 4-way code: a bias per rank for its whole output block, untied
        for b in range(c.blocks):
            n = f"blocks.{b}."
            spec |= {n + "tok1.b": ([Sj], "domain", None), n + "tok2.b": ([Ti], "tensor", None),
                     n + "ch1.b": ([Gi], "tensor", None), n + "ch2.b": ([Hj], "domain", None)}
    rows = Vj + [Vo + k for k in residual_inputs(c, q, j)]  # residual features: LN(y) block, then my inputs
    dec_b = [Vj] if c.dec_bias == "channel" else [Vj, P]
    spec |= {"dec.ln.w": ([Hj], "domain", None), "dec.ln.b": ([Hj], "domain", None),
             "dec.w": ([Hj + [H + h for h in Hj], _r(Vo, p, i), P], None, 1), "dec.b": (dec_b, "domain", None),
             "res.ln1.w": ([Vj], "domain", None), "res.ln1.b": ([Vj], "domain", None),
             "res.ln2.w": ([rows], "domain", None), "res.ln2.b": ([rows], "domain", None),
             "res.w": ([rows, _r(Vo, p, i)], None, 1), "res.b": ([Vj], "domain", None)}
    return spec


# %%
#| export
def bias_copies(mode: str, p: int) -> bool:
    "Whether the MLP biases are per-rank copies of each output block (faithful mode with domain shards)."
    return mode == "faithful" and p > 1


# %%
#| export
def take(t, idx):
    "The block of `t` at index lists `idx` (one per dim)."
    for d, ix in enumerate(idx): t = t.index_select(d, torch.tensor(ix, dtype=torch.long))
    return t


# %% [markdown]
# `shard_table` prints it: for every rank of a layout, the index ranges of each parameter it holds (one range
# per dimension, `a:b`; a `+` joins the pieces of a list that is not contiguous), beside `grid.group_table`,
# which says who its partners are.

# %%
#| export
def _ranges(ix: list) -> str:
    "An index list as contiguous ranges, `a:b+c:d`."
    out, k = [], 0
    while k < len(ix):
        e = k
        while e + 1 < len(ix) and ix[e + 1] == ix[e] + 1: e += 1
        out.append(f"{ix[k]}:{ix[e] + 1}"); k = e + 1
    return "+".join(out) or "-"


# %%
#| export
def shard_table(c: MixerConfig, p: int, q: int, mode: str = "exact", names=None, schedule: str = "overlap") -> str:
    "A printable table of which block of every parameter (`names`, default those of block 0 and the rest) each rank holds."
    shapes = param_shapes(c)
    names = names or [n for n in shapes if not n.startswith("blocks.") or n.startswith("blocks.0.")]
    rows = [f"{'parameter':<18}{'full shape':<16}" + "".join(f"{f'rank {i*q+j} ({i},{j})':<26}" for i in range(p) for j in range(q))]
    for n in names:
        cells = []
        for i in range(p):
            for j in range(q):
                idx, rep, _ = shard_spec(c, p, q, i, j, mode, schedule)[n]
                cells.append(f"{'[' + ', '.join(_ranges(ix) for ix in idx) + ']' + ('*' if rep else ''):<26}")
        rows.append(f"{n:<18}{str(tuple(shapes[n])):<16}" + "".join(cells))
    return "\n".join(rows) + "\n(* replicated over the " + "domain or tensor partners, summed in exact mode)"


# %% [markdown]
# The paper's 4-way layout of the `tiny` preset (16 x 32 grid, 128 tokens, $H = 32$):

# %%
print(shard_table(preset("tiny"), 2, 2))

# %% [markdown]
# The SUMMA schedule (`pmatmul.summa`) cuts $W_1$ and $W_a$ the other way round and keeps the MLP biases whole for
# their blocks, replicated over a row (`tok1.b`, `tok2.b`) or a column (`ch1.b`, `ch2.b`):

# %%
print(shard_table(preset("tiny"), 2, 2, schedule="summa", names=[f"blocks.0.{n}" for n in ("tok1.w", "tok1.b", "tok2.w", "tok2.b", "ch1.w", "ch1.b", "ch2.w", "ch2.b")]))

# %%
test_eq(_ranges([0, 1, 2, 5, 6]), "0:3+5:7")
assert "blocks.0.tok1.w" in shard_table(preset("tiny"), 2, 2) and "[0:32, 0:64]" in shard_table(preset("tiny"), 2, 2)

# %% [markdown]
# Every element of every parameter is held by some rank, and each large weight exactly once:

# %%
_c = preset("tiny", n_lon=48, hidden=20)  # 12 longitude patches, uneven 19-channel splits
for p, q in ((1, 2), (2, 2), (3, 2), (2, 3)):
    for name, shape in param_shapes(_c).items():
        cover = torch.zeros(shape)
        for i in range(p):
            for j in range(q):
                idx, rep, gdim = shard_spec(_c, p, q, i, j)[name]
                cover[torch.meshgrid(*[torch.tensor(ix, dtype=torch.long) for ix in idx], indexing="ij")] += 1
        assert cover.min() >= 1, (name, p, q)
        if shard_spec(_c, p, q, 0, 0)[name][1] is None: assert cover.max() == 1, (name, p, q)


# %% [markdown]
# Storage over all ranks of a layout, without allocating anything: what each rank holds, summed. For the
# paper's 2-way layout nothing is replicated, so this equals the one-process count; with the released 2-way
# architecture switches (72 padded outputs, residual over all inputs, per-pixel decoder bias) it equals the
# counts the released 2-way code prints, to the parameter:

# %%
#| export
def layout_param_count(c: MixerConfig, p: int, q: int, mode: str = "exact", schedule: str = "overlap") -> int:
    "Parameters stored over all ranks of a p x q model group (replicas counted on every rank that holds one)."
    return sum(math.prod(len(ix) for ix in idx) for i in range(p) for j in range(q)
               for idx, _, _ in shard_spec(c, p, q, i, j, mode, schedule).values())


# %%
_rel = dict(out_pad=3, res_inputs="all", dec_bias="pixel")
for (H, fs, fc), n in {(4896, 0.5, 1): 1_103_268_024, (8192, 0.5, 1): 1_404_881_688, (368, 0.03125, 1): 61_645_404,
                       (1024, 0.125, 0.25): 238_885_416}.items():
    test_eq(layout_param_count(MixerConfig(hidden=H, f_s=fs, f_c=fc, **_rel), 1, 2), n)

# %% [markdown]
# The released **4-way** code keeps more copies: every rank holds a bias for the whole output block of each MLP
# linear it computes, untied from the partners that compute the same block. Faithful mode reproduces that
# placement whenever there are domain shards ($p > 1$; with $p = 1$ the released 2-way exchange keeps its biases
# sharded, as ours does). With it, the counts the released 4-way code prints are reproduced to the parameter:

# %%
_released_4way = {(4896, 0.5, 1): 1_103_453_424, (2832, 0.5, 1): 980_913_744, (2192, 0.25, 1): 505_376_784,
                  (1600, 0.125, 1): 260_248_656, (1024, 0.125, 0.25): 238_967_760, (512, 0.125, 1): 232_315_344,
                  (368, 0.03125, 1): 61_711_416, (256, 0.125, 0.125): 227_461_776, (6064, 1, 1): 2_091_294_480,
                  (10352, 1, 1): 2_569_397_904}
for (H, fs, fc), n in _released_4way.items():
    test_eq(layout_param_count(MixerConfig(hidden=H, f_s=fs, f_c=fc, **_rel), 2, 2, "faithful"), n)
for (H, fs, fc), n in {(4896, 0.5, 1): 1_103_268_024, (8192, 0.5, 1): 1_404_881_688}.items():  # and 2-way, faithful too
    test_eq(layout_param_count(MixerConfig(hidden=H, f_s=fs, f_c=fc, **_rel), 1, 2, "faithful"), n)

# %% [markdown]
# ## The model on one rank
#
# `JigsawMixer` holds this rank's blocks as parameters and runs the forward pass of `WeatherMixer` with each
# product replaced by its partitioned version. Its input is the rank's block of the input pixels
# (channels `shard_range(C_in, q, j)`, longitudes of domain block $i$) and its output the block of the
# prediction (channels `shard_range(V_out, q, j)`, same longitudes), exactly what the data reader hands each
# rank. In `exact` mode it computes the one-process function; in `faithful` mode it reproduces the released
# code: LayerNorm statistics over the local block, per-rank biases (no gradient sum over replicas) and per-rank
# gradient clipping.

# %%
#| export
SCHEDULES = {"plain": (token_mlp, channel_mlp), "overlap": (token_mlp_overlap, channel_mlp_overlap),
             "summa": (token_mlp_summa, channel_mlp_summa)}


class JigsawMixer(nn.Module):
    "This rank's share of a WeatherMixer on a p x q model group."
    def __init__(self, cfg: MixerConfig, tensor: Group, domain: Group,
                 mode: str = "exact",  # 'exact' (the one-process function) or 'faithful' (the released code)
                 dtype=torch.float32, device=None, seed: int | None = 0,
                 init: bool = True,  # slice the one-process initial weights (False: leave them uninitialised)
                 schedule: str = "overlap",  # the MLPs' exchanges: 'overlap' (overlapped, 1/n activations), 'plain' or 'summa'
                 recompute: bool = False):  # recompute each mixer block in the backward instead of saving its activations
        super().__init__()
        _check_layout(cfg, tensor, domain, mode, schedule)
        self.cfg, self.tensor, self.domain, self.mode, self.schedule, self.recompute = cfg, tensor, domain, mode, schedule, recompute
        self.p, self.q, self.i, self.j = domain.size, tensor.size, domain.rank, tensor.rank
        self.spec = shard_spec(cfg, self.p, self.q, self.i, self.j, mode, schedule)
        self.spec_mode, self.bias_after = mode, bias_copies(mode, self.p)
        self._names = list(self.spec)
        self.params = nn.ParameterDict({
            n.replace(".", "/"): nn.Parameter(torch.empty([len(ix) for ix in self.spec[n][0]], dtype=dtype, device=device))
            for n in self._names})
        self.layout = Layout(tensor, domain, token_sizes(cfg, self.p), split_sizes(cfg.hidden, self.q),  # what the MLPs take
                             split_sizes(cfg.token_hidden, self.q), split_sizes(cfg.channel_hidden, self.p))
        self.out_slice = slice(*shard_range(cfg.n_out, self.q, self.j))  # my output channels: e.g. `var_w[model.out_slice]`
        self.mlps = _mlps(schedule, self.bias_after)
        if init:
            with torch.no_grad():  # my blocks of the one-process initial weights, computed for my blocks only
                for name in self._names: self.state()[name].copy_(init_block(cfg, name, self.spec[name][0], seed))


# %% [markdown]
# The MLPs a schedule runs; with the released code's per-rank bias copies (faithful mode, $p > 1$) the same
# schedule with the copies placed as the released code places them (`pmatmul`, faithful mode as a diff):

# %%
#| export
def _mlps(schedule: str, copies: bool):
    "(token MLP, channel MLP) functions of `schedule`, with per-rank bias `copies` or sharded biases."
    if not copies: return SCHEDULES[schedule]
    if schedule == "plain": return token_mlp_faithful, channel_mlp_faithful
    tok, ch = SCHEDULES[schedule]
    return functools.partial(tok, faithful=True), functools.partial(ch, faithful=True)


# %% [markdown]
# The layout is checked before anything is allocated, with a message that names the fix:

# %%
#| export
def _check_layout(cfg, tensor, domain, mode, schedule):
    "Raise `ValueError` if `cfg` cannot be cut over `domain` x `tensor` ranks."
    if mode not in ("exact", "faithful"):
        raise ValueError(f"mode={mode!r}: choose 'exact' (equals the 1-way model) or 'faithful' (released code)")
    if schedule not in SCHEDULES: raise ValueError(f"schedule={schedule!r}: choose one of {sorted(SCHEDULES)}")
    if schedule == "summa" and domain.size != tensor.size:
        raise ValueError(f"schedule='summa' needs a square model group, not {domain.size}x{tensor.size}: use way 4 (2x2), "
                         f"another n x n layout, or schedule 'overlap'")
    if cfg.n_lon_patches < domain.size:
        raise ValueError(f"{cfg.n_lon_patches} longitude patches cannot be split over {domain.size} domain ranks: "
                         f"use fewer domain shards or a smaller patch")
    for n, what in ((cfg.n_in, "input channels"), (cfg.n_out, "output channels"), (cfg.hidden, "hidden"),
                    (cfg.token_hidden, "token hidden")):
        if n < tensor.size: raise ValueError(f"{n} {what} cannot be split over {tensor.size} tensor ranks")


# %%
test_fail(lambda: JigsawMixer(preset("tiny"), Group(), Group(), mode="fast"), contains="choose 'exact'")
test_fail(lambda: JigsawMixer(preset("tiny"), Group(), Group(), schedule="ring"), contains="schedule='ring'")


# %% [markdown]
# Its parameters by full name, and the helpers that the layers use: a weight gathered over the domain
# partners (the encoder, decoder and residual weights are small and cut along the domain axis too), and a
# LayerNorm over this rank's features.

# %%
#| export
@patch
def state(self: JigsawMixer) -> dict[str, torch.Tensor]:
    "This rank's blocks by full parameter name."
    return {n: self.params[n.replace(".", "/")] for n in self._names}


# %%
#| export
@patch
def _gathered(self: JigsawMixer, name):
    "A weight all-gathered over the domain partners along its gather dim (gradient: reduce-scattered back)."
    full_n = param_shapes(self.cfg)[name][self.spec[name][2]]
    return all_gather(self.state()[name], self.domain, self.spec[name][2], split_sizes(full_n, self.p))


# %%
#| export
@patch
def _ln(self: JigsawMixer, x, name, n_features):
    p, sizes = self.state(), None
    if name == "res.ln2":  # each rank's residual features: its prediction block and its residual inputs
        sizes = [len(_r(self.cfg.n_out, self.q, k)) + len(residual_inputs(self.cfg, self.q, k)) for k in range(self.q)]
    return layer_norm(x, p[name + ".w"], p[name + ".b"], self.tensor, n_features, self.mode == "exact", sizes=sizes)


# %% [markdown]
# **Encoder.** The raw input is small (a few dozen channels), so the tensor partners gather its channels and
# each rank embeds its tokens into its channel block $\mathcal H_j$. Outside the `plain` schedule the gather is
# overlapped with the embedding (`gather_contract`): each rank embeds its own channels while the partners' arrive.

# %%
#| export
@patch
def encode(self: JigsawMixer, x):
    "Input block (B, C_j, n_lat, n_lon_i) -> token block (B, T_i, H_j)."
    x = patchify(x, self.cfg.patch)  # (B, T_i, C_j, P)
    z = gather_contract(PATCHES, self._gathered("enc.w"), x, self.tensor, split_sizes(self.cfg.n_in, self.q), xd=2, wd=0,
                        overlap=self.schedule != "plain")  # all C_in channels contracted
    return z + self.state()["enc.b"]


# %% [markdown]
# **Mixer block.** The two MLPs of `pmatmul` (the schedule's, or the faithful ones), each behind its LayerNorm.
# Dropout masks come from `mixer.dropout` at this rank's offsets, so they are the one-process model's bits
# whatever the layout. With `recompute`, the block's activations are not kept: `torch.utils.checkpoint` runs
# the block again in the backward (its exchanges too, in the same order on every rank, and its dropout
# masks, which depend only on the key, come out the same).

# %%
#| export
@patch
def _block(self: JigsawMixer, x, b: int, key: int, sample0: int, rollout: int):
    p, c, n = self.state(), self.cfg, f"blocks.{b}."
    tok, ch = self.mlps
    def drop(t, which, starts, full):
        return dropout(t, c.dropout, self.training, site_key(key, rollout, b, which, c.blocks), (sample0,) + tuple(starts), (0,) + tuple(full))
    w = lambda mlp: [p[n + mlp + k] for k in ("1.w", "1.b", "2.w", "2.b")]  # (w1, b1, w2, b2) of `mlp`
    x = x + tok(self._ln(x, n + "ln1", c.hidden), *w("tok"), self.layout, drop)
    return x + ch(self._ln(x, n + "ln2", c.hidden), *w("ch"), self.layout, drop)


# %%
#| export
@patch
def block(self: JigsawMixer, x, b: int, key: int = 0, sample0: int = 0, rollout: int = 0):
    "Mixer block `b` on the token block (B, T_i, H_j); `key`, `sample0`, `rollout` place its dropout masks."
    if self.recompute and torch.is_grad_enabled():
        return checkpoint(self._block, x, b, key, sample0, rollout, use_reentrant=False)
    return self._block(x, b, key, sample0, rollout)


# %% [markdown]
# **Decoder and residual.** Each rank decodes its tokens into every output channel (a partial sum over its
# channel block of the features), and the tensor partners reduce-scatter the result along the output channels;
# the per-pixel residual likewise. Outside the `plain` schedule both reduce-scatters are overlapped with their
# GEMMs (`matmul_reduce_scatter_out`): each partner's output channels are computed and sent first, mine last.

# %%
#| export
@patch
def decode(self: JigsawMixer, x, z, inp):
    "Processor and encoder blocks (B, T_i, H_j), input block -> prediction block (B, V_j, n_lat, n_lon_i)."
    p, c = self.state(), self.cfg
    u = torch.cat([self._ln(x, "dec.ln", c.hidden), z], dim=-1)  # (B, T_i, 2 H_j)
    ov, vs = self.schedule != "plain", split_sizes(c.n_out, self.q)
    y = matmul_reduce_scatter_out(FEATURES, self._gathered("dec.w"), u, self.tensor, vs, wd=1, od=2, overlap=ov)  # (B, T_i, V_j, P)
    y = y + (p["dec.b"][:, None] if c.dec_bias == "channel" else p["dec.b"])
    y = unpatchify(y, c.n_lat).permute(0, 2, 3, 1)  # (B, lat, lon_i, V_j)
    dyn = inp[:, : len(residual_inputs(c, self.q, self.j))].permute(0, 2, 3, 1)
    r = torch.cat([self._ln(y, "res.ln1", c.n_out), dyn], -1)
    r = self._ln(r, "res.ln2", c.n_out + c.n_res_in)  # (B, lat, lon_i, F_j): the partial sum's features
    r = matmul_reduce_scatter_out(FEATURES, self._gathered("res.w"), r, self.tensor, vs, wd=1, od=3, overlap=ov) + p["res.b"]
    return r.permute(0, 3, 1, 2)


# %% [markdown]
# **The forward pass**: encode, run the processor `k` times with tied weights, decode. `key` and `sample0`
# fix the dropout masks (`mixer.dropout_key(seed, step)`, and the position of this rank's first sample in the
# global batch).

# %%
#| export
@patch
def forward(self: JigsawMixer, x, k: int = 1, key: int = 0, sample0: int = 0):
    "Input block -> prediction block `k` steps ahead."
    z = h = self.encode(x)
    for r in range(k):
        for b in range(self.cfg.blocks): h = self.block(h, b, key, sample0, r)
    return self.decode(h, z, x)


# %% [markdown]
# **Replicated parameters.** LayerNorm weights and the small encoder/decoder biases are replicated over the
# domain or the tensor partners; in exact mode each replica receives only its share of the gradient, and
# `sync_replicated_grads` sums the shares (one message per replica group).

# %%
#| export
@patch
def replica_groups(self: JigsawMixer) -> dict[str, list[str]]:
    "Names of the parameters replicated over the `domain` and over the `tensor` partners."
    out = {"domain": [], "tensor": []}
    for n, (_, rep, _) in self.spec.items():
        if rep: out[rep].append(n)
    return out


# %%
#| export
@patch
def sync_replicated_grads(self: JigsawMixer):
    "Exact mode: sum the gradient shares of replicated parameters over their replica group (one message each)."
    if self.mode != "exact": return
    st = self.state()
    for axis, names in self.replica_groups().items():
        g = getattr(self, axis)
        ps = [st[n] for n in names if st[n].grad is not None]
        if g.size == 1 or not ps: continue
        flat = g.all_reduce(torch.cat([t.grad.reshape(-1) for t in ps]))
        for t, v in zip(ps, flat.split([t.numel() for t in ps])): t.grad.copy_(v.view_as(t.grad))


# %%
show_doc(JigsawMixer.forward)

# %%
show_doc(JigsawMixer.sync_replicated_grads)

# %% [markdown]
# In one process (groups of one) it is the one-process model, parameter for parameter:

# %%
_cfg = preset("tiny")
_pm = JigsawMixer(_cfg, Group(), Group(), dtype=torch.float64)
_sm = WeatherMixer(_cfg, dtype=torch.float64)
_x = torch.randn(2, _cfg.n_in, _cfg.n_lat, _cfg.n_lon, dtype=torch.float64)
test_close(_pm(_x, k=2), _sm(_x, k=2), eps=1e-12)
test_eq(sum(t.numel() for t in _pm.parameters()), param_count(_cfg))


# %% [markdown]
# ## Moving whole models in and out of a layout
#
# `scatter_state` cuts a full (one-process) state dict into this rank's blocks; `gather_state` assembles the
# full state dict on every rank of the model group from the blocks (an all-gather of the blocks, each
# placed by its spec). Checkpoints are stored in the full format, so any layout loads any checkpoint.

# %%
#| export
@torch.no_grad()
def scatter_state(model: JigsawMixer, full: dict):
    "Copy this rank's blocks of the full state dict `full` into `model`."
    for n, t in model.state().items():
        t.copy_(take(full[n].to(t.dtype), model.spec[n][0]))


# %%
#| export
@torch.no_grad()
def gather_state(model: JigsawMixer, model_group: Group, tensors: dict | None = None) -> dict:
    "The full state dict (or of `tensors`, name -> this rank's block) assembled on every rank of `model_group`."
    cfg, mine = model.cfg, (tensors or {n: t.detach() for n, t in model.state().items()})
    if model_group.size == 1:
        return {n: t.detach().cpu().clone() for n, t in mine.items()}
    blocks = model_group.allgather_obj({n: t.detach().cpu() for n, t in mine.items()})
    specs = model_group.allgather_obj((model.i, model.j))
    full = {}
    for n, shape in param_shapes(cfg).items():
        out = torch.zeros(shape, dtype=mine[n].dtype)
        for (i, j), b in zip(specs, blocks):
            idx = shard_spec(cfg, model.p, model.q, i, j, model.spec_mode, model.schedule)[n][0]
            out[torch.meshgrid(*[torch.tensor(ix, dtype=torch.long) for ix in idx], indexing="ij")] = b[n]
        full[n] = out
    return full


# %% [markdown]
# ## The whole model on thread ranks
#
# `block_of` cuts a full input or prediction `(B, C, n_lat, n_lon)` into rank $(i, j)$'s block: its channels
# and its band of longitudes, what the data reader hands each rank.

# %%
#| export
def block_of(cfg: MixerConfig, t, p: int, q: int, i: int, j: int):
    "Rank (i, j)'s block of a full input (C = C_in) or prediction/target (C = V_out) tensor (B, C, n_lat, n_lon)."
    a, e = shard_range(cfg.n_lon_patches, p, i)
    c0, c1 = shard_range(t.shape[1], q, j)
    return t[:, c0:c1, :, a * cfg.patch: e * cfg.patch]


# %% [markdown]
# The model on 1x2, 2x2 and 3x2 grids of thread ranks, on a configuration with uneven splits everywhere,
# dropout on and latent rollout $k = 2$, against the one-process model in float64: the output blocks, the
# input gradients, and every parameter's complete gradient (after the replicated shares are summed), for every
# schedule (SUMMA on the square grid). The same key gives the same dropout masks on every layout.

# %%
_cfg = preset("tiny", n_lon=48, hidden=20, dropout=0.1, out_pad=1)  # 12 patches, 19 input and 20 output channels
_gen = torch.Generator().manual_seed(1)
_x = torch.randn(2, _cfg.n_in, _cfg.n_lat, _cfg.n_lon, generator=_gen, dtype=torch.float64)
_dy = torch.randn(2, _cfg.n_out, _cfg.n_lat, _cfg.n_lon, generator=_gen, dtype=torch.float64)
_ref = WeatherMixer(_cfg, dtype=torch.float64).train()
_xr = _x.clone().requires_grad_(True)
_yr = _ref(_xr, k=2, key=99); (_yr * _dy).sum().backward()


def _model_on(comm, p, q, schedule):
    g = make_groups(Grid(1, p, q), comm=comm)
    m = JigsawMixer(_cfg, g["tensor"], g["domain"], dtype=torch.float64, schedule=schedule).train()
    i, j = m.i, m.j
    x = block_of(_cfg, _x, p, q, i, j).clone().requires_grad_(True)
    y = m(x, k=2, key=99)
    (y * block_of(_cfg, _dy, p, q, i, j)).sum().backward()
    m.sync_replicated_grads()
    grads = gather_state(m, g["model"], {n: t.grad for n, t in m.state().items()})
    return i, j, y.detach(), x.grad, grads

for _p, _q, _sched in [(p, q, s) for p, q in ((1, 2), (2, 2), (3, 2)) for s in ("plain", "overlap")] + [(2, 2, "summa")]:
    for _i, _j, _y, _gx, _grads in run_ranks(_p * _q, _model_on, _p, _q, _sched):
        test_close(_y, block_of(_cfg, _yr.detach(), _p, _q, _i, _j), eps=1e-11)
        test_close(_gx, block_of(_cfg, _xr.grad, _p, _q, _i, _j), eps=1e-11)
        for _n, _t in _ref.state().items(): test_close(_grads[_n], _t.grad, eps=1e-10 * max(1, float(_t.grad.abs().max())))


# %% [markdown]
# **Recomputation.** With `recompute=True` a block keeps only its input; its activations are recomputed in the
# backward (exchanges and dropout masks included). The gradients are the same to rounding, and the saved
# bytes drop to the block inputs:

# %%
def _saved(comm, recompute):
    g = make_groups(Grid(1, 1, 2), comm=comm)
    m = JigsawMixer(_cfg, g["tensor"], g["domain"], dtype=torch.float64, recompute=recompute).train()
    x = block_of(_cfg, _x, 1, 2, 0, m.j)
    with saved_bytes() as sb: y = m(x, k=2, key=99)
    (y * block_of(_cfg, _dy, 1, 2, 0, m.j)).sum().backward()
    return sb.bytes, m.state()["blocks.1.tok1.w"].grad

(_b0, _g0), _ = run_ranks(2, _saved, False)
(_b1, _g1), _ = run_ranks(2, _saved, True)
test_close(_g1, _g0, eps=1e-12)
print(f"saved for the backward on rank 0: {_b0:,} B without recomputation, {_b1:,} B with")
assert _b1 < _b0 / 2


# %% [markdown]
# ## Loss shares, gradient sums, clipping
#
# The global loss is the **sum of every rank's share**: a rank evaluates the weighted MSE on its block of the
# prediction (its channels, its longitudes, its samples) divided by the *global* element count. Each rank
# back-propagates its share; then
#
# 1. replicated parameters sum their gradient shares over their replica group (`sync_replicated_grads`);
# 2. data parallelism sums the gradients over the ranks that hold the same block (`dp` group): since the
#    count in every share is global, the sum *is* the gradient of the global-batch loss, so `dp` x `p x q` with
#    global batch $B$ equals 1-way with batch $B$;
# 3. the gradient norm for clipping is the norm of the full gradient: squares summed over the model group,
#    each replicated element counted once (exact), or the released code's per-rank norm (faithful).

# %%
#| export
def loss_share(pred, target, lat_w, var_w, global_count: int):
    "This rank's share of the released-code weighted MSE: sum over its block / the global element count."
    w = var_w.to(pred)[:, None, None] * lat_w.to(pred)[None, :, None]
    return ((pred - target) * w).square().sum() / global_count


# %%
#| export
def sync_grads(model: JigsawMixer, dp: Group):
    "Complete the gradients: replica shares summed (exact mode), then summed over data-parallel replicas."
    model.sync_replicated_grads()
    ps = [t for t in model.parameters() if t.grad is not None]
    if dp.size > 1 and ps:
        flat = dp.all_reduce(torch.cat([t.grad.reshape(-1) for t in ps]))
        for t, v in zip(ps, flat.split([t.numel() for t in ps])): t.grad.copy_(v.view_as(t.grad))


# %%
#| export
def grad_norm(model: JigsawMixer, model_group: Group) -> torch.Tensor:
    "2-norm of the full gradient (exact: over the model group, replicas once) or of this rank's (faithful)."
    st, sq = model.state(), 0.0
    for n, (_, rep, _) in model.spec.items():
        g = st[n].grad
        if g is None: continue
        if model.mode == "exact" and rep is not None and getattr(model, rep).rank != 0: continue
        sq = sq + g.double().square().sum()
    sq = torch.as_tensor(sq, dtype=torch.float64).reshape(1)
    if model.mode == "exact": sq = model_group.all_reduce(sq)
    return sq.sqrt()[0]


# %%
#| export
def clip_grads(model: JigsawMixer, model_group: Group, max_norm: float) -> float:
    "Scale the gradients so their norm (see `grad_norm`) is at most `max_norm`, as `clip_grad_norm_` does; returns the norm."
    norm = grad_norm(model, model_group)
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for t in model.parameters():
        if t.grad is not None: t.grad.mul_(scale.to(t.grad.dtype))
    return float(norm)


# %% [markdown]
# In one process, clipping equals torch's own `clip_grad_norm_`:

# %%
_cfg = preset("tiny")
_a, _b = JigsawMixer(_cfg, Group(), Group(), dtype=torch.float64), WeatherMixer(_cfg, dtype=torch.float64)
_x = torch.randn(1, _cfg.n_in, _cfg.n_lat, _cfg.n_lon, dtype=torch.float64)
for m in (_a, _b): (m(_x) ** 2).sum().backward()
_n1 = clip_grads(_a, Group(), 0.5)
_n2 = torch.nn.utils.clip_grad_norm_(_b.parameters(), 0.5)
test_close(_n1, float(_n2), eps=1e-9)
test_close(_a.state()["res.w"].grad, _b.state()["res.w"].grad, eps=1e-12)


# %% [markdown]
# **Faithful training** also reproduces what the released 4-way training script does to the LayerNorm gradients
# (`scripts/equivalent_fourway.py`, `utils.reduce_ddp_layernorms`): after the per-rank clipping, every LayerNorm
# weight and bias gradient is **averaged** (a mean, not a sum) over the ranks that hold the same channel half, the
# domain partners. (The released script also skips the average at the first step of every epoch, an artefact of
# its asynchronous handle; that is not reproduced.)

# %%
#| export
def average_layernorm_grads(model: JigsawMixer):
    "Faithful mode: mean of every LayerNorm parameter's gradient over the domain partners (the released 4-way script)."
    g = model.domain
    ps = [t for n, t in model.state().items() if ".ln" in n or n.startswith(("dec.ln", "res.ln")) if t.grad is not None]
    if g.size == 1 or not ps: return
    flat = g.all_reduce(torch.cat([t.grad.reshape(-1) for t in ps])) / g.size
    for t, v in zip(ps, flat.split([t.numel() for t in ps])): t.grad.copy_(v.view_as(t.grad))


# %% [markdown]
# ## Everything between the backward and the step
#
# `complete_grads` does, in the right order for the mode, what every training loop must do after `backward()`:
# exact mode sums the replicated shares and the data-parallel replicas and clips by the norm of the full
# gradient; faithful mode sums over the replicas, clips each rank by its own norm, then averages the LayerNorm
# gradients. `loss_count` is the denominator of a rank's loss share: the global-batch element count in exact mode;
# in faithful mode the released code's mean over the rank's own block (so its objective is $pq$ times the global
# mean, as the released scripts optimise), times the data-parallel degree (DDP's mean over replicas).

# %%
#| export
def complete_grads(model: JigsawMixer, groups: dict, clip: float = 0.0) -> float:
    "Complete this rank's gradients for the optimizer step (replicas, data parallelism, clipping, faithful LayerNorms); the norm or nan."
    sync_grads(model, groups["dp"])
    norm = clip_grads(model, groups["model"], clip) if clip else float("nan")
    if model.mode == "faithful": average_layernorm_grads(model)
    model._complete = True
    return norm


# %%
#| export
def loss_count(model: JigsawMixer, batch: int, dp: int) -> int:
    "The denominator of this rank's `loss_share` for `batch` samples per model group and `dp` replicas."
    c = model.cfg
    if model.mode == "exact": return batch * dp * c.n_out * c.n_lat * c.n_lon
    v_j, lon_i = len(model.spec["res.b"][0][0]), model.layout.t_sizes[model.i] // c.n_lat * c.patch  # my block's channels, longitudes
    return batch * dp * v_j * c.n_lat * lon_i


# %% [markdown]
# Forgetting to complete the gradients is silent in some layouts and wrong in others (a replicated LayerNorm
# weight would be stepped with one rank's share of its gradient). `guard(optimizer)` makes it loud: every
# backward marks the model's gradients incomplete, `complete_grads` marks them complete, and the optimizer
# refuses to step in between.

# %%
#| export
@patch
def guard(self: JigsawMixer, optimizer):
    "Make `optimizer.step()` raise unless `complete_grads(self, ...)` ran after the last backward; returns the optimizer."
    def incomplete(_):
        self._complete = False
    for t in self.parameters(): t.register_post_accumulate_grad_hook(incomplete)
    def check(opt, args, kwargs):
        if not getattr(self, "_complete", True):
            raise RuntimeError("optimizer.step() before the gradients were completed: call "
                               "jigsaw_ref.parallel.complete_grads(model, groups, clip) after backward()")
    optimizer.register_step_pre_hook(check)
    return optimizer


# %%
_m = JigsawMixer(preset("tiny"), Group(), Group(), dtype=torch.float64)
_opt = _m.guard(torch.optim.Adam(_m.parameters()))
_m(torch.randn(1, 22, 16, 32, dtype=torch.float64)).square().sum().backward()
test_fail(_opt.step, contains="call jigsaw_ref.parallel.complete_grads")
complete_grads(_m, {"dp": Group(), "model": Group()}, clip=1.0); _opt.step()
test_eq(loss_count(_m, 2, 3), 2 * 3 * 19 * 16 * 32)
def _faithful_count(comm):
    g = make_groups(Grid(1, 2, 2), comm=comm)
    return loss_count(JigsawMixer(preset("tiny"), g["tensor"], g["domain"], mode="faithful"), 1, 1)

_mf = run_ranks(4, _faithful_count)
test_eq(_mf, [10 * 16 * 16, 9 * 16 * 16, 10 * 16 * 16, 9 * 16 * 16])  # faithful: my block, 10 or 9 channels x 16 x 16 pixels


# %% [markdown]
# ## Precision: TF32, bf16 autocast, bf16 messages, determinism
#
# - **TF32** (NVIDIA Ampere and later) is a switch of cuBLAS, `torch.backends.cuda.matmul.allow_tf32 = True`:
#   the parallel model's GEMMs are ordinary torch products, so it applies to them unchanged.
# - **bf16 autocast**: run the forward inside `torch.autocast(device, torch.bfloat16)`. The exchange functions of
#   `pmatmul` are custom autograd functions, whose backward torch runs without autocast; they record the autocast
#   state in the forward and re-enter it in the backward, and send every gradient block in the dtype of the
#   tensor it belongs to, so partners always agree on message sizes. The exact LayerNorm computes its
#   statistics in float32 at least, as autocast's own `layer_norm` does.
# - **bf16 messages**: `make_groups(..., wire=torch.bfloat16)` casts the activation exchanges of the tensor and
#   domain groups to bfloat16 on the wire (half the bytes); gradients summed over data parallelism stay in
#   their own dtype.
# - **Determinism**: every point-to-point sum in `comm` and `pmatmul` is taken in a fixed order (rank order, or
#   the order of the exchange rounds), independent of which message arrived first, so CPU runs are bitwise
#   reproducible for a given layout. On GPUs add `torch.use_deterministic_algorithms(True)` and
#   `CUBLAS_WORKSPACE_CONFIG=:4096:8`; with NCCL collectives (`algo="coll"`) also fix the algorithm
#   (`NCCL_ALGO=Ring`, `NCCL_PROTO=Simple`), since NCCL's own reduction order depends on them; the default `p2p`
#   exchanges need no such setting (NCCL only moves bytes, the sums are ours).
#
# The tolerance bands, measured here on the CPU (the GPU check script measures them on a GPU): the parallel
# model under bf16 autocast, with and without bf16 messages, against the float64 one-process model, beside the
# one-process model under the same autocast.

# %%
def _precision(comm, p, q, schedule, amp, wire):
    g = make_groups(Grid(1, p, q), comm=comm, wire=torch.bfloat16 if wire else None)
    m = JigsawMixer(_pcfg, g["tensor"], g["domain"], schedule=schedule)
    xb = block_of(_pcfg, _px, p, q, m.i, m.j).clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp): y = m(xb)
    y.float().square().sum().backward(); m.sync_replicated_grads()
    return m.i, m.j, y.float().detach(), gather_state(m, g["model"], {n: t.grad for n, t in m.state().items()})


_pcfg = preset("tiny", n_lon=48, hidden=32)
_px = torch.randn(2, _pcfg.n_in, _pcfg.n_lat, _pcfg.n_lon, generator=torch.Generator().manual_seed(3))
_r64 = WeatherMixer(_pcfg, dtype=torch.float64)
_y64 = _r64(_px.double()); _y64.square().sum().backward()
_rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())
_bands = {}
for _name, (_p, _q, _s, _amp, _wire) in {"1-way fp32": (1, 1, "overlap", False, False), "1-way bf16": (1, 1, "overlap", True, False),
        "2x2 fp32": (2, 2, "overlap", False, False), "2x2 bf16": (2, 2, "overlap", True, False),
        "2x2 bf16 + bf16 messages": (2, 2, "overlap", True, True), "2x2 summa bf16": (2, 2, "summa", True, False)}.items():
    _res = run_ranks(_p * _q, _precision, _p, _q, _s, _amp, _wire)
    _out = max(_rel(y, block_of(_pcfg, _y64.detach(), _p, _q, i, j)) for i, j, y, _ in _res)
    _grad = max(_rel(_res[0][3][n], t.grad) for n, t in _r64.state().items() if n.endswith("tok1.w"))
    _bands[_name] = (_out, _grad)
    print(f"{_name:<26} output {_out:.1e}   tok1.w gradients {_grad:.1e}  (relative to the float64 model)")
assert max(_bands["2x2 fp32"]) < 1e-5 and max(_bands["2x2 bf16"]) < 3 * max(_bands["1-way bf16"]) < 0.1
assert max(_bands["2x2 bf16 + bf16 messages"]) < 0.1
