"""Bytes one rank sends in one mixer block (medium preset), counted by the Groups, against pmatmul.block_bytes.
Run: mpiexec -n 2 python benchmarks/block_bytes.py  (2-way), mpiexec -n 4 ... (4-way)."""
import torch
from mpi4py import MPI
from jigsaw_ref.comm import Group
from jigsaw_ref.config import preset, split_sizes
from jigsaw_ref.grid import Grid
from jigsaw_ref.parallel import JigsawMixer, token_sizes
from jigsaw_ref.pmatmul import block_bytes
from jigsaw_ref.comm import make_groups
torch.set_num_threads(1)
w = MPI.COMM_WORLD
cfg = preset("medium")
way = {2: "2", 4: "4"}[w.Get_size()]
grid = Grid.named(way, w.Get_size()); g = make_groups(grid, "mpi", "p2p", w)
m = JigsawMixer(cfg, g["tensor"], g["domain"], dtype=torch.float32)
d, i, j = grid.coords(w.Get_rank())
x = torch.randn(1, token_sizes(cfg, grid.domain)[i], split_sizes(cfg.hidden, grid.tensor)[j])
for k in ("tensor", "domain"): g[k].sent = 0
with torch.no_grad(): m.block(x, 0)
fwd = g["tensor"].sent + g["domain"].sent
xr = x.clone().requires_grad_(True)
for k in ("tensor", "domain"): g[k].sent = 0
m.block(xr, 0).square().sum().backward()
fb = g["tensor"].sent + g["domain"].sent
ana = block_bytes(cfg.tokens, cfg.hidden, cfg.token_hidden, cfg.channel_hidden, grid.domain, grid.tensor, 4)
print(f"{way}-way rank {w.Get_rank()}: one mixer block, medium preset, float32: forward sent {fwd:,} B (analytic {ana:,} B), forward+backward {fb:,} B (analytic {2*ana:,} B)", flush=True)
