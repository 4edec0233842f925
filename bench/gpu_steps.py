"""One training step of each full-scale network on a GPU: images/s, TFLOP/s and peak memory, fp32 and bf16 autocast,
so that the full-scale GPU-hours in docs/fullscale.md come from a measurement instead of an assumed rate.

    python bench/gpu_steps.py --out results/bench/gpu_steps.json   # a CUDA machine; ~2 min
    python bench/fullscale.py --report results/bench/fullscale_*.json --gpu results/bench/gpu_steps.json

The networks as the full-scale studies train them (channels_last), each step on one batch of random images that stays
on the GPU, with plain Adam: a compute rate, without data loading, augmentation, EMA or clipping:
densenet121, `classify/train_chexnet.py` at 224 px (15 labels, batch 64, `--amp auto`: bf16); cvae, the chest X-ray
CVAE at 64 px (batch 64, `--amp auto`: fp32, its bf16 training is unchecked); unet64, fairgen's full-preset DDPM
U-Net (64 px, 64-128-128-128, 2 blocks per level, attention at 16, batch 64, bf16 on a GPU). FLOPs are counted by
torch's FLOP counter on one step; a rate is the fastest of --rounds rounds of --steps steps, timed between
synchronisations. The bf16 matrix-multiply rate (8192^3) measured in the same run is the ceiling each rate is set
against. TF32 stays at torch's defaults (convolutions may use it, matrix products do not), as in the studies.
"""
import argparse
import json
from pathlib import Path
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from classify.nets import build  # noqa: E402
from bench.machine_limit import training_step  # noqa: E402
from common.runs import git_commit  # noqa: E402
from diffusion.ddpm import Schedule, q_sample  # noqa: E402
from diffusion.unet import UNet  # noqa: E402
from vae.train_cvae import CVAE, cvae_loss  # noqa: E402

NETS = ("densenet121", "cvae", "unet64")
AS_TRAINED = {"densenet121": "bf16", "cvae": "fp32", "unet64": "bf16"}  # what `--amp auto` picks on a GPU


def matmul_tflops(dev, n=8192, reps=10):
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def step_of(name, dev, batch, bf16):
    """(one training step, images per step) of a full-scale network on dev."""
    torch.manual_seed(0)
    cl = torch.channels_last
    if name == "densenet121":
        net, x = build("densenet121", 1, 15, 224), torch.rand(batch, 1, 224, 224) * 2 - 1
        y = torch.rand(batch, 15, device=dev).round()
        loss_fn = lambda m, xb: F.binary_cross_entropy_with_logits(m(xb).float(), y)
    elif name == "cvae":
        net, x = CVAE(), torch.rand(batch, 1, 64, 64) * 2 - 1
        y = (torch.rand(batch, 15, device=dev) > 0.8).float()

        def loss_fn(m, xb):
            x_hat, mu, logvar = m(xb, y)
            return cvae_loss(x_hat.float(), xb, mu.float(), logvar.float())[0]
    else:
        net, x = UNet(1, 64, 64, (1, 2, 2, 2), 2, (16,), num_classes=4), torch.rand(batch, 1, 64, 64) * 2 - 1
        sched, y = Schedule(), torch.randint(0, 4, (batch,), device=dev)

        def loss_fn(m, xb):
            t = torch.randint(0, sched.T, (len(xb),), device=dev)
            eps = torch.randn_like(xb)
            return F.mse_loss(m(q_sample(sched, xb, t, eps), t, y).float(), eps)
    net = net.to(dev, memory_format=cl)
    xb = x.to(dev).contiguous(memory_format=cl)
    return training_step(loss_fn, net, xb, torch.optim.Adam(net.parameters(), lr=1e-4), "cuda", bf16), batch


def measure(name, dev, batch, bf16, steps, rounds):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step, n = step_of(name, dev, batch, bf16)
    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    flops, arith = counter.get_total_flops(), "bf16" if bf16 else "fp32"
    return {"net": name, "arith": arith, "batch": n, "gflop_per_image": flops / n / 1e9,
            "images_per_s": steps * n / best, "tflops": flops * steps / best / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "as_trained": AS_TRAINED[name] == arith}


def recorded_out(path):
    """--out as the record keeps it: relative to the repository, or <out>/<name> outside it (no machine's folder)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return f"<out>/{Path(path).name}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="images per step (the full presets' batch)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (the fastest is kept)")
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated, of {', '.join(NETS)}")
    p.add_argument("--out", default=None, help="write the rows here (JSON)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_steps.py: no CUDA device here (torch.cuda.is_available() is False); run it on a "
                         "machine with a GPU")
    dev = torch.device("cuda")
    peak = matmul_tflops(dev)
    gpu = torch.cuda.get_device_name(0)
    print(f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}: bf16 matmul 8192^3 {peak:.0f} TFLOP/s")
    print("| network | arithmetic | batch | GFLOP per image-step | images/s | TFLOP/s | of bf16 matmul | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in [n for n in args.nets.split(",") if n]:
        if name not in NETS:
            raise SystemExit(f"--nets: unknown network {name!r} (use {', '.join(NETS)})")
        for bf16 in (False, True):
            r = measure(name, dev, args.batch, bf16, args.steps, args.rounds)
            rows.append(r)
            print(f"| {name} | {r['arith']}{' (as trained)' if r['as_trained'] else ''} | {r['batch']} | "
                  f"{r['gflop_per_image']:.2f} | {r['images_per_s']:.0f} | {r['tflops']:.1f} | "
                  f"{r['tflops'] / peak:.1%} | {r['peak_gib']:.1f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "bf16_matmul_tflops": peak, "commit": git_commit(), "rows": rows,
            "command": f"python bench/gpu_steps.py --out {recorded_out(args.out)}"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
