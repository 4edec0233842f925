"""Our U-Net against diffusers' UNet2DModel at a matched size and resolution, in one run; and DDIM-50 vs DDPM-1000.

    python bench/ddpm_bench.py [--size 32] [--batch 32] [--iters 20] [--device cpu|cuda] [--no-sampling]

Both networks: 1 input channel, widths (64, 128, 128), 2 residual blocks per level, self-attention at 16 px and in
the middle, 4 attention heads, a class embedding (4 classes + null). One AdamW training step on the eps-MSE
(bf16 autocast on CUDA), timed after warm-up; each model runs in its own subprocess so that its peak memory is
its own (CUDA: max_memory_allocated; CPU: peak resident memory above the resident memory before the first step).
Each is timed in NCHW and in channels_last memory format; the ratio uses each model's faster format.
Then the time to sample a batch with DDIM-50 and with ancestral DDPM-1000 (our sampler, guidance w = 1).
diffusers is installed for this benchmark only (bench/requirements.txt).
"""
import argparse
import json
from pathlib import Path
import platform
import subprocess
import sys
import time

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make(which, size):
    if which == "ours":
        from diffusion.unet import UNet
        return UNet(in_ch=1, size=size, base=64, mults=(1, 2, 2), num_res=2, attn_res=(size // 2,), num_classes=4,
                    heads=4)
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(64, 128, 128), norm_num_groups=16, attention_head_dim=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=5)


def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def one(which, memory_format, size, batch, iters, device):
    """Time one model ('ours' or 'diffusers') in one memory format ('contiguous' or 'channels_last'): iters
    training steps on batches of `batch` size x size images; print a JSON line."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = make(which, size).to(dev)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(batch, 1, size, size, device=dev).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=dev)
    y = torch.randint(0, 4, (batch,), device=dev)
    eps = torch.randn_like(x)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(x, t, y) if which == "ours" else model(x, t, class_labels=y).sample
        loss = (out.float() - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base_rss = rss_kb("VmRSS:")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else (rss_kb("VmHWM:") - base_rss) / 1024
    print(json.dumps({"model": which, "format": memory_format, "params": sum(p.numel() for p in model.parameters()),
                      "img_s": batch * iters / dt, "peak_mem_mib": mem}))


def sampling(size, batch, device):
    """Seconds to sample a batch of size x size images with DDIM-50 and with DDPM-1000 (our U-Net, w = 1)."""
    from diffusion.ddpm import Schedule, ddim_sample, ddpm_sample
    dev = torch.device(device)
    model = make("ours", size).to(dev, memory_format=torch.channels_last).eval()
    s = Schedule("linear", 1000)
    y = torch.randint(0, 4, (batch,), device=dev)
    shape = (batch, 1, size, size)
    out = {}
    for name, fn in [("DDIM-50", lambda: ddim_sample(model, s, shape, y, 1.0, 50, 0.0, None, dev)),
                     ("DDPM-1000", lambda: ddpm_sample(model, s, shape, y, 1.0, None, dev))]:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out[name] = time.perf_counter() - t0
    return out


def main(args):
    if args.one:
        return one(args.one, args.format, args.size, args.batch, args.iters, args.device)
    rows = []
    for which in ("ours", "diffusers"):
        for fmt in ("contiguous", "channels_last"):
            r = subprocess.run([sys.executable, __file__, "--one", which, "--format", fmt, "--size", str(args.size),
                                "--batch", str(args.batch), "--iters", str(args.iters), "--device", args.device],
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{which} failed:\n{r.stderr[-2000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    print(f"device: {dev}; torch {torch.__version__}; {args.size}x{args.size}, batch {args.batch}, {args.iters} steps")
    print(f"{'model':10} {'format':14} {'params':>10} {'img/s':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['model']:10} {r['format']:14} {r['params']:>10,} {r['img_s']:>9.1f} {r['peak_mem_mib']:>9.0f}")
    best = {m: max((r for r in rows if r["model"] == m), key=lambda r: r["img_s"]) for m in ("ours", "diffusers")}
    o, d = best["ours"], best["diffusers"]
    per_param = (o["img_s"] * o["params"]) / (d["img_s"] * d["params"])
    print(f"ours / diffusers (each in its faster format): speed {o['img_s'] / d['img_s']:.2f}x, "
          f"per parameter {per_param:.2f}x, peak memory {o['peak_mem_mib'] / max(d['peak_mem_mib'], 1e-9):.2f}x")
    if args.sampling:
        t = sampling(args.size, args.sample_batch, args.device)
        print(f"sampling {args.sample_batch} images (w=1): DDIM-50 {t['DDIM-50']:.1f} s, DDPM-1000 "
              f"{t['DDPM-1000']:.1f} s ({t['DDPM-1000'] / t['DDIM-50']:.1f}x)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--iters", type=int, default=20, help="timed training steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--no-sampling", dest="sampling", action="store_false", help="skip the sampler timing")
    p.add_argument("--sample-batch", type=int, default=16, help="images per sampling run")
    p.add_argument("--one", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--format", default="contiguous", help=argparse.SUPPRESS)
    main(p.parse_args())
