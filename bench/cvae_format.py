"""Which memory format suits the chest X-ray CVAE on a CPU: milliseconds per image of a training step (forward,
loss, backward, Adam) with contiguous (NCHW) weights and with channels_last weights, as vae/train_cvae.py runs it.

    python bench/cvae_format.py [--batch 64] [--steps 5] [--rounds 3]

The CVAE is docs/METHODS.md's (64 px, 15-label condition, latent 128), untrained: speed does not depend on the
weights. The two formats are measured in turn, --rounds times, and each format's fastest round kept, so that a
burst of other work on the machine does not decide the ranking. Measured: docs/bench.md.
"""
import argparse
from pathlib import Path
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vae.train_cvae import CVAE, cvae_loss  # noqa: E402


def ms_per_image(channels_last, batch, steps):
    torch.manual_seed(0)
    model = CVAE()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x = torch.rand(batch, 1, 64, 64) * 2 - 1
    y = (torch.rand(batch, 15) > 0.8).float()

    def step():
        x_hat, mu, logvar = model(x, y)
        loss = cvae_loss(x_hat, x, mu, logvar)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps / batch * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="batch size (train_cvae.py's: 64)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per format and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over both formats; the fastest round is kept")
    a = p.parse_args()
    best = {"contiguous": float("inf"), "channels_last": float("inf")}
    for _ in range(a.rounds):
        for name in best:
            best[name] = min(best[name], ms_per_image(name == "channels_last", a.batch, a.steps))
    print(f"CVAE training step, batch {a.batch}, {torch.get_num_threads()} threads, ms per image (best of "
          f"{a.rounds}): contiguous {best['contiguous']:.2f}, channels_last {best['channels_last']:.2f} "
          f"({best['contiguous'] / best['channels_last']:.2f}x)")


if __name__ == "__main__":
    main()
