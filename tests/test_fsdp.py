"""The FSDP baseline of jigsaw-bench (`bench.fsdp_model`: torch's FSDP2 `fully_shard` on a CPU gloo mesh) against DDP.

Before any timing means anything, FSDP must train the same model: on 2 ranks, each with its own sample, one
float64 step of the WeatherMixer under FSDP and under DDP (`torch.nn.parallel.DistributedDataParallel`) from the
same seed gives the same gradients (FSDP's reduce-scattered shards, gathered) and, after one Adam step with
clipping, the same parameters. This is the check that catches a reduce-scatter that sums instead of averaging
(pytorch issue 162338, seen on gloo in some torch releases): every gradient would be n times DDP's. It also
checks the bench's per-rank accounting of FSDP's state: 1/n of the parameters on each rank.

As one process, this file launches itself under `mpiexec -n 2` (tests/test_mpi.py's launcher)."""
import pytest
import torch

from mpi_util import COMM, RANK, WORLD, agree
from test_mpi import run_mpi

under_mpi = pytest.mark.skipif(WORLD == 1, reason="runs under mpiexec (launched by test_fsdp_equals_ddp)")


@pytest.mark.skipif(WORLD > 1, reason="the launcher runs as one process")
def test_fsdp_equals_ddp():
    out = run_mpi(2, "tests/test_fsdp.py", timeout=240)
    assert " passed" in out and " failed" not in out, out[-2000:]


def _step(model, cfg, opt):
    "One step on this rank's own sample: loss, backward, clipping to 1.0 (a global norm), Adam."
    from jigsaw_ref.loss import lat_weights_cos, variable_weights, weighted_mse
    g = torch.Generator().manual_seed(100 + RANK)  # every rank its own sample
    x = torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    y = torch.randn(1, cfg.n_out, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    lw = lat_weights_cos(torch.linspace(-80, 80, cfg.n_lat, dtype=torch.float64))
    weighted_mse(model(x), y, lw, variable_weights(cfg).double()).backward()
    grads = {n.removeprefix("module."): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    params = {n.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    return grads, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm), params


@under_mpi
def test_one_step_gradients_and_parameters_equal_ddp():
    from torch.nn.parallel import DistributedDataParallel
    from jigsaw_ref.bench import _local, fsdp_model
    from jigsaw_ref.comm import init_torch_distributed
    from jigsaw_ref.config import preset
    from jigsaw_ref.mixer import WeatherMixer

    def check():
        init_torch_distributed(COMM, "gloo")
        cfg = preset("tiny", hidden=24, blocks=2)
        f = fsdp_model(cfg, WORLD, torch.float64, seed=5)
        d = DistributedDataParallel(WeatherMixer(cfg, torch.float64, seed=5))
        full = sum(p.numel() for p in d.parameters())
        mine = sum(_local(p).numel() for p in f.parameters())
        assert abs(mine - full / WORLD) <= len(list(d.parameters())), (mine, full)  # 1/n of every parameter (dim-0 shards)
        gf, nf, pf = _step(f, cfg, torch.optim.Adam(f.parameters(), lr=1e-3, weight_decay=3e-6))
        gd, nd, pd = _step(d, cfg, torch.optim.Adam(d.parameters(), lr=1e-3, weight_decay=3e-6))
        assert gf.keys() == gd.keys() and len(gd) > 10
        worst = max(float((gf[k] - gd[k]).abs().max() / gd[k].abs().max().clamp(min=1e-300)) for k in gd)
        assert worst < 1e-12, ("gradients differ from DDP's (summed instead of averaged?)", worst)
        assert abs(nf - nd) <= 1e-12 * nd, (nf, nd)  # the same global norm, clipped the same way
        worst = max(float((pf[k] - pd[k]).abs().max() / pd[k].abs().max().clamp(min=1e-300)) for k in pd)
        assert worst < 1e-12, ("parameters after one Adam step differ from DDP's", worst)
        init = dict(WeatherMixer(cfg, torch.float64, seed=5).named_parameters())
        assert init.keys() == pd.keys() and max(float((pd[k] - init[k]).abs().max()) for k in pd) > 1e-4  # the step moved them
    agree(check)
