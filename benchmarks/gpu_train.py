"""GPU check of the trainer itself: `Trainer` on one CUDA device (groups of one) in TF32 and BF16 on the default
data, then `jigsaw-eval` of the TF32 checkpoint on the GPU. Run on a CUDA machine:
`python benchmarks/gpu_train.py --minutes 1 --out DIR`."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from jigsaw_ref.comm import Group
from jigsaw_ref.train import Trainer, TrainConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo"); ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_train"))
    a = ap.parse_args()
    out, res = Path(a.out), {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for prec in ("tf32", "bf16"):
        one = {k: Group() for k in ("world", "model", "tensor", "domain", "dp")}
        tc = TrainConfig(model=a.model, device="cuda", precision=prec, epochs=50, max_minutes=a.minutes, lr=1e-3,
                         lr_encdec=1e-3, warmup_steps=50, out=str(out / prec), progress=False)
        t0 = time.time()
        hist = Trainer(tc, groups=one).fit()
        last = next(r for r in reversed(hist) if "val_loss" in r)
        res["runs"][prec] = {"steps": len(hist), "wall_s": time.time() - t0, "median_step_s": sorted(h["step_time"] for h in hist)[len(hist) // 2],
                             "final_loss": hist[-1]["loss"], "val_loss": last["val_loss"], "rmse_z500_6h": last["rmse_z500"]}
        print(prec, res["runs"][prec], flush=True)
    from jigsaw_ref.evaluate import main as evaluate
    evaluate([str(out / "tf32" / "final.ckpt"), "--out", str(out / "eval"), "--device", "cuda"])
    (out / "gpu_train.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
