"""Each partitioned layer on every p x q layout of the world, against the one-process layer in float64:
forward, input gradient and weight gradients, even and uneven sizes.

Groups come from `mpi_util.make_group`: the backend (MPI `Group` or torch.distributed `TorchGroup`) and the
algorithm (p2p or coll) are chosen by JIGSAW_TEST_BACKEND / JIGSAW_TEST_ALGO (see tests/test_mpi.py)."""
import pytest
import torch
import torch.nn.functional as F

from jigsaw_ref.pmatmul import block_bytes, layer_norm
from mpi_util import agree, block, comms_for, layouts, lid, make_group, mlp_variants, rel_err

TOL = 1e-11


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cut(t, spec):
    "Block of t: spec is a list of (dim, parts, index)."
    return block(t, spec).clone().requires_grad_(True)


SIZES = {"even": dict(B=2, T=8, H=4, S=4, G=4), "uneven": dict(B=2, T=10, H=5, S=3, G=7)}
TOKEN, CHANNEL = mlp_variants("token"), mlp_variants("channel")  # every exported schedule (plain, overlap)


@pytest.mark.parametrize("variant", list(TOKEN))
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_token_mlp(layout, sizes, variant):
    def check():
        c = comms_for(layout)
        d, i, j = c.coords
        dp, p, q = layout
        B, T, H, S = (SIZES[sizes][k] for k in "BTHS")
        if T < p or H < q or S < q: return
        X, W1, b1, W2, b2 = _rand(B, T, H, seed=1), _rand(S, T, seed=2), _rand(S, seed=3), _rand(T, S, seed=4), _rand(T, seed=5)
        G = _rand(B, T, H, seed=6)  # upstream gradient of the output
        full = [t.clone().requires_grad_(True) for t in (X, W1, b1, W2, b2)]
        Y = torch.einsum("ts,bsh->bth", full[3], F.gelu(torch.einsum("st,bth->bsh", full[1], full[0]) + full[2][:, None])) + full[4][:, None]
        (Y * G).sum().backward()
        x = _cut(X, [(1, p, i), (2, q, j)])
        # biases are sharded over the group that sums the partial product they join
        w1, b1l = _cut(W1, [(0, q, j), (1, p, i)]), _cut(b1, [(0, q, j), (0, p, i)])
        w2, b2l = _cut(W2, [(0, p, i), (1, q, j)]), _cut(b2, [(0, p, i), (0, q, j)])
        tg, dg = make_group(c.tensor), make_group(c.domain)
        y = TOKEN[variant](x, w1, b1l, w2, b2l, tg, dg, T, H, S)
        assert rel_err(y, block(Y, [(1, p, i), (2, q, j)])) < TOL
        (y * block(G, [(1, p, i), (2, q, j)])).sum().backward()
        assert rel_err(x.grad, block(full[0].grad, [(1, p, i), (2, q, j)])) < TOL
        assert rel_err(w1.grad, block(full[1].grad, [(0, q, j), (1, p, i)])) < TOL
        assert rel_err(w2.grad, block(full[3].grad, [(0, p, i), (1, q, j)])) < TOL
        # sharded biases get complete gradients, no synchronisation
        assert rel_err(b1l.grad, block(full[2].grad, [(0, q, j), (0, p, i)])) < TOL
        assert rel_err(b2l.grad, block(full[4].grad, [(0, p, i), (0, q, j)])) < TOL
    agree(check)


@pytest.mark.parametrize("variant", list(CHANNEL))
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_channel_mlp(layout, sizes, variant):
    def check():
        c = comms_for(layout)
        d, i, j = c.coords
        dp, p, q = layout
        B, T, H, G_ = (SIZES[sizes][k] for k in "BTHG")
        X, Wa, ba, Wb, bb = _rand(B, T, H, seed=1), _rand(H, G_, seed=2), _rand(G_, seed=3), _rand(G_, H, seed=4), _rand(H, seed=5)
        Gr = _rand(B, T, H, seed=6)
        full = [t.clone().requires_grad_(True) for t in (X, Wa, ba, Wb, bb)]
        Y = F.gelu(full[0] @ full[1] + full[2]) @ full[3] + full[4]
        (Y * Gr).sum().backward()
        x = _cut(X, [(1, p, i), (2, q, j)])
        wa, bal = _cut(Wa, [(0, q, j), (1, p, i)]), _cut(ba, [(0, p, i), (0, q, j)])
        wb, bbl = _cut(Wb, [(0, p, i), (1, q, j)]), _cut(bb, [(0, q, j), (0, p, i)])
        tg, dg = make_group(c.tensor), make_group(c.domain)
        y = CHANNEL[variant](x, wa, bal, wb, bbl, tg, dg, T, H, G_)
        assert rel_err(y, block(Y, [(1, p, i), (2, q, j)])) < TOL
        (y * block(Gr, [(1, p, i), (2, q, j)])).sum().backward()
        assert rel_err(x.grad, block(full[0].grad, [(1, p, i), (2, q, j)])) < TOL
        assert rel_err(wa.grad, block(full[1].grad, [(0, q, j), (1, p, i)])) < TOL
        assert rel_err(wb.grad, block(full[3].grad, [(0, p, i), (1, q, j)])) < TOL
        assert rel_err(bal.grad, block(full[2].grad, [(0, p, i), (0, q, j)])) < TOL
        assert rel_err(bbl.grad, block(full[4].grad, [(0, q, j), (0, p, i)])) < TOL
    agree(check)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "faithful"])
@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_layer_norm(layout, exact):
    def check():
        c = comms_for(layout)
        d, i, j = c.coords
        dp, p, q = layout
        H = 7  # uneven over every q
        X, w, b, G = _rand(2, 6, H, seed=1), _rand(H, seed=2), _rand(H, seed=3), _rand(2, 6, H, seed=4)
        full = [t.clone().requires_grad_(True) for t in (X, w, b)]
        Y = F.layer_norm(full[0], (H,), full[1], full[2])
        (Y * G).sum().backward()
        x, wl, bl = _cut(X, [(2, q, j)]), _cut(w, [(0, q, j)]), _cut(b, [(0, q, j)])
        tg = make_group(c.tensor)
        y = layer_norm(x, wl, bl, tg, H, exact=exact)
        err = rel_err(y, block(Y, [(2, q, j)]))
        if exact or q == 1:
            assert err < TOL
            (y * block(G, [(2, q, j)])).sum().backward()
            assert rel_err(x.grad, block(full[0].grad, [(2, q, j)])) < TOL
            assert rel_err(wl.grad, block(full[1].grad, [(0, q, j)])) < TOL
        else:  # the released code's local statistics are a different function when channels are split
            assert err > 1e-3
    agree(check)


@pytest.mark.parametrize("layout", layouts(), ids=lid)
def test_block_bytes_measured_equal_analytic(layout):
    "Bytes one rank sends in one mixer block forward, counted by the Groups, equal the analytic count."
    def check():
        c = comms_for(layout)
        d, i, j = c.coords
        dp, p, q = layout
        T, H, S, G_ = 8, 8, 4, 8
        tg, dg = make_group(c.tensor), make_group(c.domain)
        f = lambda t, spec: block(t, spec).float()
        x = f(_rand(1, T, H, seed=1), [(1, p, i), (2, q, j)])
        w1, b1 = f(_rand(S, T, seed=2), [(0, q, j), (1, p, i)]), f(_rand(S, seed=3), [(0, q, j), (0, p, i)])
        w2, b2 = f(_rand(T, S, seed=4), [(0, p, i), (1, q, j)]), f(_rand(T, seed=5), [(0, p, i), (0, q, j)])
        wa, ba = f(_rand(H, G_, seed=6), [(0, q, j), (1, p, i)]), f(_rand(G_, seed=7), [(0, p, i), (0, q, j)])
        wb, bb = f(_rand(G_, H, seed=8), [(0, p, i), (1, q, j)]), f(_rand(H, seed=9), [(0, q, j), (0, p, i)])
        one = torch.ones(H // q)
        with torch.no_grad():
            u = layer_norm(x, one, 0 * one, tg, H)
            x = x + TOKEN["token_mlp"](u, w1, b1, w2, b2, tg, dg, T, H, S)
            u = layer_norm(x, one, 0 * one, tg, H)
            x = x + CHANNEL["channel_mlp"](u, wa, ba, wb, bb, tg, dg, T, H, G_)
        assert tg.sent + dg.sent == block_bytes(T, H, S, G_, p, q, itemsize=4), (tg.sent + dg.sent, block_bytes(T, H, S, G_, p, q))
    agree(check)
