# %%
#| default_exp probe

# %%
#| export
from __future__ import annotations
from typing import NamedTuple
import torch
from jigsaw_ref.comm import Group
from jigsaw_ref.grid import Grid, groups

# %%
#| hide
from fastcore.test import test_eq, test_fail
from jigsaw_ref.comm import all_gather, expected_bytes, make_groups, reduce_scatter
from jigsaw_ref.ranks import run_ranks


# %% [markdown]
# # Probes
#
# > What a run does, recorded instead of described: every message its groups send (sender, receiver, shape, bytes, tag) as a table and a figure, and the bytes autograd keeps for the backward.

# %% [markdown]
# The partitioned layers (`pmatmul`) explain their exchanges in equations; a probe shows what the code
# actually sent while it ran. A `Trace` watches the groups of one rank: every point-to-point exchange of
# `comm.Group` (and of `comm.TorchGroup`) is posted through the group's `start`, the point-to-point collectives
# included, so wrapping that one method of the group object records every message, with nothing changed in
# `comm`. A group with `algo="coll"` hands its collectives to the library, whose messages a trace does not see.

# %% [markdown]
# ## Messages

# %%
#| export
class Message(NamedTuple):
    "One point-to-point message, as its sender posted it."
    label: str  # what the run was doing when it was posted (`Trace.label`)
    post: int  # the sender's exchange number: its n-th `start` on a watched group (the same exchange on every rank)
    sender: int  # ranks in the numbering `Trace.watch` was given (the world's, for `traced`)
    receiver: int
    group: str  # the name of the group it went through
    tag: int
    shape: tuple
    nbytes: int


# %%
#| export
class Trace:
    "The messages that the watched groups of one rank send, in the order they were posted."
    def __init__(self, rank: int, label: str = ""):
        self.rank, self.label, self.messages, self.posts = rank, label, [], 0

    def watch(self, group: Group, name: str, members: list[int]) -> Group:
        "Record every message `group` sends from now on; `members[k]`: the rank (in this trace's numbering) of member k."
        start = group.start
        def recording(sends=(), recvs=(), tag: int = 0):
            self.posts += 1
            self.messages += [Message(self.label, self.posts, self.rank, members[d], name, tag, tuple(t.shape),
                                      t.numel() * t.element_size()) for t, d in sends]
            return start(sends=sends, recvs=recvs, tag=tag)
        group.start = recording  # an attribute of this group object only: the class and other groups are untouched
        return group


# %% [markdown]
# Every member of an SPMD program posts its exchanges in the same order, so the $n$-th post of every rank is
# the same exchange, and `post` groups the messages of all ranks by exchange. `traced` watches the model-group
# groups that `comm.make_groups` returned, with the members' world ranks (for a grid with `dp = 1`, rank
# $r = iq + j$ of the model group):

# %%
#| export
def traced(gs: dict[str, Group], grid: Grid, rank: int, kinds=("tensor", "domain")) -> Trace:
    "A `Trace` of world rank `rank` watching its groups `kinds` of `gs` (from `make_groups(grid)`)."
    t, members = Trace(rank), groups(grid)
    for k in kinds: t.watch(gs[k], k, next(m for m in members[k] if rank in m))
    return t


# %% [markdown]
# Three thread ranks, an all-gather of blocks of 3 + 2 + 2 rows (each rank sends its block to the two others)
# and a reduce-scatter of the same tensor (each sends every partner that partner's block): the trace has one
# message per pair and exchange, and its bytes are the bytes the group counted.

# %%
def _demo(comm):
    g = make_groups(Grid(1, 1, 3), comm=comm)
    t = traced(g, Grid(1, 1, 3), comm.Get_rank())
    x = torch.ones(2, 7, 4)
    t.label = "gather"; all_gather(x[:, :[3, 2, 2][comm.Get_rank()]], g["tensor"], 1, [3, 2, 2])
    t.label = "scatter"; reduce_scatter(x, g["tensor"], 1, [3, 2, 2])
    return t.messages, g["tensor"].sent

_res = run_ranks(3, _demo)
_msgs = [m for ms, _ in _res for m in ms]
test_eq(len(_msgs), 2 * 3 * 2)  # 2 exchanges x 3 senders x 2 receivers
test_eq([sum(m.nbytes for m in ms) for ms, _ in _res], [sent for _, sent in _res])
test_eq({(m.sender, m.receiver, m.shape) for m in _msgs if m.label == "scatter" and m.sender == 0}, {(0, 1, (2, 2, 4)), (0, 2, (2, 2, 4))})
test_eq(sum(m.nbytes for m in _msgs if m.label == "gather" and m.sender == 1), expected_bytes("all_gather", 3, 2 * 6 * 4, 4))


# %% [markdown]
# ## The table and the figure
#
# `exchanges` groups the messages of all ranks by exchange; `message_table` prints one line per exchange: what
# the run was doing, the tag and its name (`names`, tag -> words), the group, every message as
# sender→receiver, their shape, and the bytes of all of them; then the bytes each rank sent.

# %%
#| export
def exchanges(messages) -> list[list[Message]]:
    "The messages of all ranks grouped by exchange (`Message.post`), in the order they were posted."
    out = {}
    for m in sorted(messages, key=lambda m: (m.post, m.sender, m.receiver)): out.setdefault(m.post, []).append(m)
    return list(out.values())


# %%
#| export
def message_table(messages, names: dict | None = None, width: int = 36) -> str:
    "One line per exchange: label, tag and its name (`names`), group, messages sender→receiver, shape and bytes."
    names, ex = names or {}, exchanges(messages)
    pairs = [" ".join(f"{x.sender}→{x.receiver}" for x in ms) for ms in ex]
    mw = max([16] + [len(s) for s in pairs]) + 1
    rows = [f"{'when':<11}{'tag':>4}  {'exchange':<{width}}{'group':<8}{'messages':<{mw}}{'shape':<13}{'bytes':>9}"]
    for ms, pair in zip(ex, pairs):
        m = ms[0]
        shape = str(m.shape).replace(" ", "") if len({x.shape for x in ms}) == 1 else "(several)"
        rows.append(f"{m.label:<11}{m.tag:>4}  {names.get(m.tag, '')[:width - 1]:<{width}}{m.group:<8}{pair:<{mw}}"
                    f"{shape:<13}{sum(x.nbytes for x in ms):>9,}")
    sent = {}
    for m in messages: sent[m.sender] = sent.get(m.sender, 0) + m.nbytes
    return "\n".join(rows + ["bytes sent: " + ", ".join(f"rank {r} {b:,}" for r, b in sorted(sent.items()))])


# %%
print(message_table(_msgs, {11: "all-gather", 12: "reduce-scatter"}, width=16))


# %% [markdown]
# `plot_messages` draws the same: one panel per exchange, the ranks of a $p \times q$ model group as blocks (row
# $i$, column $j$, rank $r = iq + j$), an arrow per message in its sender's colour.

# %%
#| export
def plot_messages(messages, p: int, q: int, names: dict | None = None, title: str = "", cols: int = 4, size: float = 2.3):
    "A figure of every exchange in `messages` on a p x q model group: an arrow per message, coloured by its sender."
    import matplotlib.pyplot as plt
    ex, names = exchanges(messages), names or {}
    cols = min(cols, len(ex)); rows = -(-len(ex) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size * max(1, q / 2), rows * size * 1.1 * max(1, p / 2)), squeeze=False)
    colours, centre = plt.cm.tab10.colors, lambda r: (r % q + 0.46, p - 0.54 - r // q)
    for ax, ms in zip(axes.flat, ex):
        for r in range(p * q):
            ax.add_patch(plt.Rectangle((r % q, p - 1 - r // q), 0.92, 0.92, color=colours[r % 10], alpha=0.45))
            ax.text(*centre(r), f"rank {r}\n({r // q},{r % q})", ha="center", va="center", fontsize=7)
        for m in ms:  # curved, so that the two directions between a pair stay apart
            ax.annotate("", xy=centre(m.receiver), xytext=centre(m.sender), arrowprops=dict(
                arrowstyle="-|>", lw=1.3, color=colours[m.sender % 10], shrinkA=15, shrinkB=15, connectionstyle="arc3,rad=0.25"))
        m = ms[0]
        ax.set_title(f"{m.label}: {names.get(m.tag, f'tag {m.tag}')}\nover {m.group}, {sum(x.nbytes for x in ms):,} B", fontsize=7)
        ax.set_xlim(-0.1, q); ax.set_ylim(-0.1, p); ax.set_aspect("equal"); ax.axis("off")
    for ax in axes.flat[len(ex):]: ax.axis("off")
    if title: fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# %%
#| fig-alt: The two exchanges of the demo on three ranks in a row: six arrows each.
plot_messages(_msgs, 1, 3, {11: "all-gather", 12: "reduce-scatter"}, cols=2);


# %% [markdown]
# ## Saved activations
#
# The other thing a run does that the equations leave implicit is what autograd keeps for the backward.
# `saved_bytes` counts the distinct storages saved inside its block (a storage saved twice counts once):

# %%
#| export
class saved_bytes:
    "Context manager: `.bytes` of the distinct storages autograd saves for the backward inside it."
    def __enter__(self):
        self.seen, self.bytes = set(), 0
        def pack(t):
            try: key = t.untyped_storage().data_ptr()
            except RuntimeError: key = id(t)
            if key not in self.seen: self.seen.add(key); self.bytes += t.untyped_storage().nbytes()
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__(); return self

    def __exit__(self, *a): self._ctx.__exit__(*a)


# %%
_w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
with saved_bytes() as _sb: (torch.randn(4, 8, dtype=torch.float64) @ _w).tanh()
test_eq(_sb.bytes, 4 * 8 * 8 + 4 * 8 * 8)  # the product's input (its weight gradient needs it) and tanh's output
