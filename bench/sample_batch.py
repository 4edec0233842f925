"""Which sampling batch suits a CPU: milliseconds per image and DDIM step of a guided U-Net call, by batch size.

    python bench/sample_batch.py [--sizes 32,64,128,256] [--width 16] [--reps 8]

The U-Net is the quick fairgen preset's (32 px, 16-32-32 channels, one res block per level, attention at 8 px,
channels_last as diffusion/sample_ddpm.py runs it), untrained: speed does not depend on the weights. Each batch of
B images costs one forward pass on 2B inputs (classifier-free guidance batches the conditional and the null call).
The sizes are measured in turn, twice, and the faster of the two kept, so that a burst of other work on the machine
does not decide the ranking. sample_ddpm.default_batch takes its CPU default from this. Measured: README, Benchmarks.
"""
import argparse
from pathlib import Path
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffusion.unet import UNet  # noqa: E402


def ms_per_image_step(model, batch, reps, size):
    x = torch.randn(2 * batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (2 * batch,))
    y = torch.randint(0, 5, (2 * batch,))
    with torch.no_grad():
        model(x, t, y)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x, t, y)
    return (time.perf_counter() - t0) / reps / batch * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,64,128,256", help="comma-separated batch sizes (images, before guidance)")
    p.add_argument("--width", type=int, default=16, help="U-Net base width (the quick preset's: 16)")
    p.add_argument("--size", type=int, default=32, help="image size in pixels")
    p.add_argument("--reps", type=int, default=8, help="timed forward passes per batch size and round")
    a = p.parse_args()
    torch.manual_seed(0)
    model = UNet(in_ch=1, size=a.size, base=a.width, mults=(1, 2, 2), num_res=1, attn_res=(8,), num_classes=4)
    model = model.to(memory_format=torch.channels_last).eval()
    sizes = [int(s) for s in a.sizes.split(",")]
    best = {b: min(ms_per_image_step(model, b, a.reps, a.size) for _ in range(2)) for b in sizes}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, width {a.width}, {a.size} px")
    for b, ms in best.items():
        print(f"  batch {b:4d}: {ms:.2f} ms per image-step ({ms / min(best.values()):.2f}x the fastest)")


if __name__ == "__main__":
    main()
