"""Every communication primitive against its one-process meaning, float64, forward and backward.

Runs as one process (groups of one) and under `mpiexec -n 2/4/8` (see tests/test_mpi.py)."""
import pytest
import torch

from jigsaw_ref.comm import Group, all_gather, all_reduce, expected_bytes, reduce_scatter
from jigsaw_ref.config import split_sizes
from mpi_util import COMM, RANK, WORLD, agree

ALGOS = ["p2p", "coll"]


def _full(n, seed=0, cols=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cols, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("extra", [0, 1], ids=["even", "uneven"])
def test_all_gather_forward_backward_bytes(algo, extra):
    def check():
        g = Group(COMM, algo)
        n = 2 * WORLD + extra
        sizes = split_sizes(n, WORLD)
        X = _full(n)
        mine = X.split(sizes)[RANK].clone().requires_grad_(True)
        y = all_gather(mine, g, 0, sizes)
        assert torch.equal(y, X)
        # each rank's loss share uses the replicated y with its own upstream gradient G_r
        G = [_full(n, seed=100 + r) for r in range(WORLD)]
        (y * G[RANK]).sum().backward()
        want = sum(G).split(sizes)[RANK]
        assert torch.allclose(mine.grad, want, rtol=1e-13, atol=1e-13)
        if extra == 0:  # forward all-gather + backward reduce-scatter
            assert g.sent == 2 * expected_bytes("all_gather", WORLD, X.numel(), 8), g.sent
    agree(check)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("extra", [0, 1], ids=["even", "uneven"])
def test_reduce_scatter_forward_backward(algo, extra):
    def check():
        g = Group(COMM, algo)
        n = 2 * WORLD + extra
        sizes = split_sizes(n, WORLD)
        parts = [_full(n, seed=10 + r) for r in range(WORLD)]  # rank r holds the summand parts[r]
        mine = parts[RANK].clone().requires_grad_(True)
        y = reduce_scatter(mine, g, 0, sizes)
        assert torch.allclose(y, sum(parts).split(sizes)[RANK], rtol=1e-13, atol=1e-13)
        G = _full(n, seed=200).split(sizes)[RANK]  # upstream gradient of my block
        (y * G).sum().backward()
        assert torch.equal(mine.grad, _full(n, seed=200))  # every summand's gradient is the whole upstream
        if extra == 0:
            assert g.sent == 2 * expected_bytes("reduce_scatter", WORLD, n * 3, 8), g.sent
    agree(check)


@pytest.mark.parametrize("algo", ALGOS)
def test_all_reduce_forward_backward(algo):
    def check():
        g = Group(COMM, algo)
        parts = [_full(5, seed=20 + r) for r in range(WORLD)]
        mine = parts[RANK].clone().requires_grad_(True)
        y = all_reduce(mine, g)
        assert torch.allclose(y, sum(parts), rtol=1e-13, atol=1e-13)
        G = [_full(5, seed=300 + r) for r in range(WORLD)]
        (y * G[RANK]).sum().backward()
        assert torch.allclose(mine.grad, sum(G), rtol=1e-13, atol=1e-13)
    agree(check)


def test_gradcheck_all_gather_in_a_chain():
    "torch.autograd.gradcheck through gather -> nonlinearity -> reduce-scatter, every rank differentiating its share."
    def check():
        g = Group(COMM, "p2p")
        n = 2 * WORLD
        mine = _full(n, seed=1).split(split_sizes(n, WORLD))[RANK].clone().requires_grad_(True)
        w = _full(3, seed=2, cols=3)

        def f(x):
            return reduce_scatter(torch.tanh(all_gather(x, g, 0) @ w), g, 0)
        # gradcheck perturbs my input only; other ranks take part in the same collectives each time
        return torch.autograd.gradcheck(f, (mine,), eps=1e-6, atol=1e-7, nondet_tol=0.0)
    assert agree(check)


def test_torch_distributed_gloo_matches_mpi():
    "The same collectives over torch.distributed (gloo on CPU), set up from the MPI communicator."
    import os

    import torch.distributed as dist

    from jigsaw_ref.comm import TorchGroup
    if WORLD == 1:
        pytest.skip("torch.distributed needs more than one rank to be interesting")

    def check():
        if not dist.is_initialized():
            import socket
            port = None
            if RANK == 0:
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
                s.close()
            port = COMM.bcast(port)
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=WORLD,
                                    timeout=__import__("datetime").timedelta(seconds=60))
        tg, mg = TorchGroup(None), Group(COMM, "coll")
        n = 2 * WORLD + 1
        sizes = split_sizes(n, WORLD)
        X = _full(n)
        assert torch.equal(tg.all_gather(X.split(sizes)[RANK], 0, sizes), mg.all_gather(X.split(sizes)[RANK], 0, sizes))
        part = _full(n, seed=40 + RANK)
        assert torch.allclose(tg.reduce_scatter(part, 0, sizes), mg.reduce_scatter(part, 0, sizes), rtol=1e-13)
        assert torch.allclose(tg.all_reduce(part), mg.all_reduce(part), rtol=1e-13)
    agree(check)
