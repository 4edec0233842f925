"""Conditional DCGAN (Radford et al. 2016; conditioned as Mirza & Osindero 2014) for images of one modality, class
= attribute x label (common/modalities.py; NIH: sex x {No Finding, finding}), trained from scratch in plain PyTorch:
the GAN row of `make compare`.

G: (z 128 ++ 32-d class embedding) -> Linear -> 8w x 4 x 4, then [ConvT k4 s2 p1, BN, ReLU] halving the channels
to w at size / 2, ConvT k4 s2 p1 -> C, tanh. D: the image with the class as one-hot planes -> Conv k4 s2 p1 (w,
LeakyReLU 0.2, no BN), then [Conv k4 s2 p1, BN, LeakyReLU 0.2] doubling the channels down to 4 x 4, Linear -> 1
logit. w = --width (64 px: 4 up / down blocks). Non-saturating BCE loss, Adam (betas 0.5, 0.999), DCGAN's
N(0, 0.02) init, one D and one G step per batch; batches drawn uniformly over the training images (the classes
in the data's proportions). Checkpoints every --save-every steps (--resume continues with the same random
streams); samples.png (fixed noise, a row per class) and loss_curve.png at the end. --amp: both networks' forward
passes under bf16 autocast, their logits and the losses in fp32.

    python -m gan.train_dcgan --out-dir runs/dcgan/nih64                       # embedded NIH1000, training split
    python -m gan.train_dcgan --sets runs/results/chestxray/fold0/compare_sets.csv --train-set pool ...
    python -m gan.train_dcgan --data toy:200 --size 32 --steps 20 --out-dir /tmp/dcgan   # seconds
    python -m gan.train_dcgan --data-root /data/nih --size 64 --width 64 --steps 20000 --out-dir runs/dcgan/full  # GPU
"""
import argparse
from pathlib import Path
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import ArgumentParser, positive_float, positive_int, run
from common.errors import DataError
from common.modalities import add_set_args, training_images
from common.report import save_grid
from common.runs import (add_common_args, check_finite, device_from, load_checkpoint, load_weights,
                         prepare_out_dir, resume_differences, save_checkpoint, seed_everything, use_amp,
                         write_config, write_json)
from fairness.figures import lines

Z_DIM = 128
# bf16 under --amp auto on CPUs with bf16 instructions: bench/bf16_agreement.py --loop dcgan agreed (30 seeds,
# results/bench/bf16_dcgan), 1.56x per run
BF16_CHECKED = True


def levels(size):
    """Up- / down-sampling blocks between 4 px and size (a power of two, 16 to 128)."""
    n = int(np.log2(size)) - 2
    if size < 16 or size > 128 or 4 * 2 ** n != size:
        raise DataError(f"--size {size}: the DCGAN works at 16, 32, 64 or 128 px")
    return n


class Generator(nn.Module):
    def __init__(self, n_classes, channels=1, size=64, width=32):
        super().__init__()
        n = levels(size)
        chans = [width * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 64 px, w 32: 256, 128, 64, 32
        self.emb = nn.Embedding(n_classes, 32)
        self.fc = nn.Sequential(nn.Linear(Z_DIM + 32, chans[0] * 16), nn.BatchNorm1d(chans[0] * 16), nn.ReLU())
        ups = [nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
               for a, b in zip(chans[:-1], chans[1:])]
        self.net = nn.Sequential(*ups, nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1), nn.Tanh())
        self.c0 = chans[0]

    def forward(self, z, y):
        return self.net(self.fc(torch.cat([z, self.emb(y)], 1)).view(len(z), self.c0, 4, 4))


class Discriminator(nn.Module):
    def __init__(self, n_classes, channels=1, size=64, width=32):
        super().__init__()
        n = levels(size)
        chans = [width * 2 ** i for i in range(n)]  # e.g. 32, 64, 128, 256
        self.k = n_classes
        downs = [nn.Sequential(nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2))
                 for a, b in zip(chans[:-1], chans[1:])]
        self.net = nn.Sequential(nn.Conv2d(channels + n_classes, chans[0], 4, 2, 1), nn.LeakyReLU(0.2), *downs)
        self.out = nn.Linear(chans[-1] * 16, 1)

    def forward(self, x, y):
        planes = F.one_hot(y, self.k).float()[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.out(self.net(torch.cat([x, planes], 1)).flatten(1)).squeeze(1)


def dcgan_init(m):
    """DCGAN's initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02) and biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build(model_args):
    G, D = Generator(**model_args), Discriminator(**model_args)
    G.apply(dcgan_init)
    D.apply(dcgan_init)
    return G, D


@torch.no_grad()
def generate(G, classes, seed=0, device="cpu", batch_size=256):
    """Images (N, C, S, S) in [-1, 1] for the class indices `classes` (one image per entry), G in eval mode."""
    G.eval()
    g = torch.Generator().manual_seed(seed)
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    z = torch.randn(len(classes), Z_DIM, generator=g)
    return torch.cat([G(z[i:i + batch_size].to(device), classes[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(classes), batch_size)])


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_args(p)
    p.add_argument("--size", type=positive_int, default=64, help="image side (16, 32, 64 or 128)")
    p.add_argument("--width", type=positive_int, default=32, help="base channel width w of G and D")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps (one D and one G update each)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate of G and D")
    p.add_argument("--save-every", type=positive_int, default=500, help="checkpoint interval (steps)")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the training steps (the losses and sampling in fp32). auto: bf16 on a CPU "
                        "with bf16 instructions once bench/bf16_agreement.py --loop dcgan has agreed (BF16_CHECKED), "
                        "fp32 elsewhere; bf16: always (refused on a device without bf16); off: fp32")
    add_common_args(p, "runs/dcgan/nih64")
    args = p.parse_args(argv)
    if not args.sets and args.train_set != "train":
        p.error("--train-set names a set of a --sets file; pass one")
    if args.force and args.resume:
        p.error("--force replaces the run in --out-dir and --resume continues it: pass one of them")
    return args


def main(args):
    device = device_from(args.device)
    levels(args.size)  # a bad --size stops before anything is read or written
    bf16 = use_amp(args.amp, device, cpu_checked=BF16_CHECKED, gpu_checked=False)  # so does a refused --amp bf16
    mod, x, cls = training_images(args.data, args.size, args.data_root, "train", args.split_seed, args.sets,
                                  args.train_set)
    if len(x) < 2:
        raise DataError(f"--data {args.data}: {len(x)} training image; a GAN needs a training set")
    names = mod.class_names
    model_args = {"n_classes": len(names), "channels": mod.channels, "size": args.size, "width": args.width}
    data_args = {**{k: getattr(args, k) for k in ("data", "data_root", "split_seed", "sets", "train_set",
                                                   "batch_size", "lr", "seed")},
                 "bf16": bf16}  # a run resumes in its own arithmetic
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    ck = load_checkpoint(ckpt_path, flag="--resume") if args.resume and ckpt_path.is_file() else None
    diffs = resume_differences(ck, model_args=model_args, data_args=data_args) if ck is not None else []
    if diffs:
        raise DataError(f"--resume: {ckpt_path} does not continue this run ({'; '.join(diffs)}); pass its flags, "
                        f"or --force to start afresh")
    out = prepare_out_dir(args.out_dir, args.force, args.resume)
    seed_everything(args.seed)
    G, D = build(model_args)
    G, D = G.to(device), D.to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(args.seed * 1000)  # batches and noise
    step, history, before = 0, [], 0.0
    if ck is not None:
        load_weights(G, ck["G"], ckpt_path)
        load_weights(D, ck["D"], ckpt_path)
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        gen.set_state(ck["gen"])
        step, history, before = ck["step"], ck["history"], ck.get("seconds", 0.0)
        print(f"resumed {ckpt_path} at step {step}")
    counts = np.bincount(cls, minlength=len(names))
    write_config(out, vars(args), data=mod.data, weights="none (from scratch)", classes=names,
                 class_counts=counts.tolist(), model=model_args, notes=mod.notes)
    x_all, y_all = torch.from_numpy(x), torch.from_numpy(cls).long()
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=data_args["bf16"])
    t0 = time.time()
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="dcgan")
    for step in bar:
        G.train()
        D.train()
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen)
        real, y = (x_all[idx].float() / 127.5 - 1).to(device), y_all[idx].to(device)  # uint8 -> [-1, 1]
        z = torch.randn(len(idx), Z_DIM, generator=gen).to(device)
        with cast:
            fake = G(z, y)
            # D: log D(x|y) + log(1 - D(G(z|y)|y)); G: the non-saturating log D(G(z|y)|y)
            d_real, d_fake = D(real, y).float(), D(fake.detach(), y).float()
        loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with cast:
            d_gen = D(fake, y).float()
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        check_finite(loss_d + loss_g, step, args.out_dir)
        history.append([step + 1, loss_d.item(), loss_g.item(), torch.sigmoid(d_real).mean().item(),
                        torch.sigmoid(d_fake).mean().item()])
        if step % 20 == 0:
            bar.set_postfix(d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}")
        done = step + 1
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint({"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(),
                             "opt_d": opt_d.state_dict(), "gen": gen.get_state(), "step": done, "history": history,
                             "model_args": model_args, "data_args": data_args, "class_names": names,
                             "data": mod.data, "seconds": before + time.time() - t0}, ckpt_path)
    seconds = before + time.time() - t0  # training time over every session of the run
    rows = len(names)
    grid = generate(G, np.repeat(np.arange(rows), 8), seed=0, device=device)
    save_grid(grid, out / "samples.png", nrow=rows, row_labels=names,
              title=f"conditional DCGAN samples, step {args.steps}, {mod.data} (fixed noise)")
    h = np.array(history)
    smooth = lambda v: dict(zip(h[:, 0].astype(int).tolist(), np.convolve(v, np.ones(20) / 20, "same").tolist()))
    lines({"D loss": smooth(h[:, 1]), "G loss": smooth(h[:, 2]), "D(real)": smooth(h[:, 3]),
           "D(G(z))": smooth(h[:, 4])}, out / "loss_curve.png", f"DCGAN losses ({mod.data}; mean of 20 steps)",
          "step", "value")
    write_json(out / "metrics.json", {"steps": args.steps, "n_train": len(x), "classes": names,
                                      "class_counts": counts.tolist(),
                                      "final_d_loss_mean_last_100": float(h[-100:, 1].mean()),
                                      "final_g_loss_mean_last_100": float(h[-100:, 2].mean()),
                                      "seconds": seconds, "data": mod.data, "bf16_autocast": data_args["bf16"]})
    print(f"DCGAN: {args.steps} steps on {len(x)} images ({seconds:.0f} s); D loss {h[-100:, 1].mean():.3f}, "
          f"G loss {h[-100:, 2].mean():.3f} (last 100 steps)")


if __name__ == "__main__":
    run(main, parse_args)
