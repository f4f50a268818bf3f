"""GPU check: correctness of the model on CUDA against the float64 CPU reference, and one-GPU throughput
(MFU) of a paper-size WeatherMixer training step in FP32, TF32 and BF16, against GEMM peaks measured in the
same run. Run on a CUDA machine: `python benchmarks/gpu_check.py [--preset c3] [--out DIR]`."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from jigsaw_ref.comm import Group
from jigsaw_ref.config import preset
from jigsaw_ref.loss import lat_weights_cos, variable_weights
from jigsaw_ref.mixer import WeatherMixer, param_count, train_step_flops
from jigsaw_ref.parallel import JigsawMixer, clip_grads, loss_share


def timed(fn, reps, warm=2):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps): fn()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def gemm_peak(dtype, tf32, n=8192, reps=10):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    x, y = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / timed(lambda: x @ y, reps) / 1e12


def correctness():
    cfg = preset("tiny")
    x = torch.randn(2, cfg.n_in, cfg.n_lat, cfg.n_lon, dtype=torch.float64)
    ref = WeatherMixer(cfg, dtype=torch.float64)
    out = {}
    for name, dtype, tf32 in (("float64", torch.float64, False), ("float32", torch.float32, False), ("tf32", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = JigsawMixer(cfg, Group(), Group(), dtype=dtype, device="cuda")
        xr = x.clone().requires_grad_(True)
        xg = x.to("cuda", dtype).requires_grad_(True)
        yr, yg = ref(xr, k=2), m(xg, k=2)
        (yr.square().sum()).backward(); (yg.square().sum()).backward()
        err = float((yg.double().cpu() - yr).abs().max() / yr.abs().max())
        gerr = float((xg.grad.double().cpu() - xr.grad).abs().max() / xr.grad.abs().max())
        w = ref.state()["blocks.0.tok1.w"].grad
        werr = float((m.state()["blocks.0.tok1.w"].grad.double().cpu() - w).abs().max() / w.abs().max())
        out[name] = {"output_rel_err": err, "input_grad_rel_err": gerr, "tok1_weight_grad_rel_err": werr}
        ref.zero_grad()
    return out


def step_time(m, opt, cfg, precision, reps):
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    x = torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon, device="cuda")
    y = torch.randn(1, cfg.n_out, cfg.n_lat, cfg.n_lon, device="cuda")
    lw = lat_weights_cos(torch.linspace(-89.875, 89.875, cfg.n_lat)).cuda()
    vw = variable_weights(cfg).cuda()
    one = Group()

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            pred = m(x)
        loss_share(pred.float(), y, lw, vw, y.numel()).backward()
        clip_grads(m, one, 1.0)
        opt.step()
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, reps)
    return t, torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="c3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t0 = time.time()
    res["correctness_vs_cpu_float64"] = correctness()
    res["gemm_peak_tflops"] = {"fp32": gemm_peak(torch.float32, False), "tf32": gemm_peak(torch.float32, True),
                              "bf16": gemm_peak(torch.bfloat16, False)}
    cfg = preset(a.preset)
    flops = train_step_flops(cfg)
    res["model"] = {"preset": a.preset, "params": param_count(cfg), "train_step_tflop": flops / 1e12}
    res["steps"] = {}
    t1 = time.time()
    m = JigsawMixer(cfg, Group(), Group(), dtype=torch.float32, device="cuda", seed=0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4, weight_decay=3e-6)
    res["init_s"] = time.time() - t1
    for prec in ("tf32", "bf16", "fp32"):
        t, mem = step_time(m, opt, cfg, prec, a.reps if prec != "fp32" else 2)
        peak = res["gemm_peak_tflops"][prec]
        res["steps"][prec] = {"s_per_step": t, "tflops": flops / t / 1e12, "fraction_of_measured_gemm_peak": flops / t / 1e12 / peak,
                              "peak_mem_gib": mem}
        print(prec, res["steps"][prec], flush=True)
    res["wall_s"] = time.time() - t0
    print(json.dumps(res, indent=1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
