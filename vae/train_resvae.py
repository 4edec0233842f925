"""Residual VAE with a VGG19 perceptual loss (Lopez-Perez, Hauberg & Feragen, "Are generative models fair? A study
of racial bias in dermatological image generation"; built on LukeDitria/CNN-VAE). docs/METHODS.md.

Pre-activation residual blocks, BatchNorm + ELU, 3x3 convs. ResDown(ci, co): ELU(BN(x)) -> Conv(ci -> co//2 + co,
stride 2); the first co channels are the skip, the rest -> ELU(BN) -> Conv(co//2 -> co); out = sum + skip. ResUp
mirrors it after a nearest x2 upsampling. The encoder ends in 1x1 convs to the mean and log-variance of a
spatial latent (paper: 64 x 8 x 8; here latent_channels x size/2^levels).
Loss (Eq. 2) = MSE(x_hat, x) + KL (mean over latent elements) + perceptual term: the mean squared difference of
VGG19 feature maps of x and x_hat after each of its 16 conv layers (pre-ReLU), averaged over the 16; grey images
would be repeated to 3 channels. Adam 1e-4, batch 64, 15 epochs.
VGG19 weights: torchvision's ImageNet weights (downloaded once on your machine), a local file (--vgg-weights), or
--no-pretrained (random VGG19 features: the perceptual term is then a random-feature loss; every output says so).
Metrics per image: reconstruction MSE of decode(mu(x)) on the [0, 1] scale, and the mean of sigma(x) over the
latent elements.

    python -m vae.train_resvae --train-set B --out-dir runs/skintone/resvae-B        # phantom unless --data-root
    python -m vae.train_resvae --data-root /data/fitzpatrick17k --train-set A --size 64 --epochs 15
"""
import argparse
import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import ArgumentParser, key_values, nonneg_float, positive_float, positive_int, run
from common.errors import DataError
from common.runs import (add_common_args, check_finite, device_from, load_state_dict_file, prepare_out_dir,
                         save_checkpoint, seed_everything, use_amp, write_config, write_json)
from common.splits import read_sets
from vae.skin import SETS, draw_train_set, load_skin

BF16_CHECKED = True  # bf16 under --amp auto: bench/bf16_agreement.py --loop resvae agreed (results/bench/bf16_resvae)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResDown(nn.Module):
    def __init__(self, ci, co):
        super().__init__()
        self.co = co
        self.norm1, self.conv1 = nn.BatchNorm2d(ci, eps=1e-4), nn.Conv2d(ci, co // 2 + co, 3, 2, 1)
        self.norm2, self.conv2 = nn.BatchNorm2d(co // 2, eps=1e-4), nn.Conv2d(co // 2, co, 3, 1, 1)

    def forward(self, x):
        h = self.conv1(F.elu(self.norm1(x)))
        skip, h = h[:, :self.co], h[:, self.co:]
        return self.conv2(F.elu(self.norm2(h))) + skip


class ResUp(nn.Module):
    def __init__(self, ci, co):
        super().__init__()
        self.co = co
        self.norm1, self.conv1 = nn.BatchNorm2d(ci, eps=1e-4), nn.Conv2d(ci, ci // 2 + co, 3, 1, 1)
        self.norm2, self.conv2 = nn.BatchNorm2d(ci // 2, eps=1e-4), nn.Conv2d(ci // 2, co, 3, 1, 1)

    def forward(self, x):
        h = self.conv1(F.interpolate(F.elu(self.norm1(x)), scale_factor=2, mode="nearest"))
        skip, h = h[:, :self.co], h[:, self.co:]
        return self.conv2(F.elu(self.norm2(h))) + skip


class ResVAE(nn.Module):
    def __init__(self, channels=3, width=32, levels=3, latent_channels=64):
        super().__init__()
        chans = [width * 2 ** i for i in range(levels + 1)]  # e.g. 32, 64, 128, 256
        self.inp = nn.Conv2d(channels, chans[0], 3, 1, 1)
        self.down = nn.Sequential(*[ResDown(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.norm = nn.BatchNorm2d(chans[-1], eps=1e-4)
        self.mu, self.logvar = nn.Conv2d(chans[-1], latent_channels, 1), nn.Conv2d(chans[-1], latent_channels, 1)
        self.dec_in = nn.Conv2d(latent_channels, chans[-1], 1)
        self.up = nn.Sequential(*[ResUp(a, b) for a, b in zip(chans[::-1][:-1], chans[::-1][1:])])
        self.out_norm, self.out = nn.BatchNorm2d(chans[0], eps=1e-4), nn.Conv2d(chans[0], channels, 3, 1, 1)

    def encode(self, x):
        h = F.elu(self.norm(self.down(self.inp(x))))
        return self.mu(h), self.logvar(h)  # (B, latent_channels, S/2^levels, S/2^levels)

    def decode(self, z):
        return torch.tanh(self.out(F.elu(self.out_norm(self.up(self.dec_in(z))))))

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar


class VGGPerceptual(nn.Module):
    """Feature maps of VGG19 after each of its 16 convs (pre-ReLU), for images in [-1, 1]."""

    def __init__(self, pretrained=True, weights_file=None):
        super().__init__()
        import torchvision.models as tvm
        vgg = tvm.vgg19(weights=None)
        self.source = "random (no ImageNet weights)"
        if weights_file:
            load_state_dict_file(weights_file, vgg, "--vgg-weights")  # weights_only; keys checked
            self.source = f"imagenet ({weights_file})"
        elif pretrained:
            try:
                vgg.load_state_dict(tvm.VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
            except Exception as e:
                raise DataError(f"cannot fetch VGG19 ImageNet weights ({type(e).__name__}). Offline? Use "
                                f"--no-pretrained or --vgg-weights PATH") from e
            self.source = "imagenet (torchvision VGG19_Weights.IMAGENET1K_V1)"
        for m in vgg.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False  # keep the pre-ReLU maps we record intact
        last_conv = max(i for i, m in enumerate(vgg.features) if isinstance(m, nn.Conv2d))
        self.features = vgg.features[:last_conv + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, feats = (x - self.mean) / self.std, []
        for m in self.features:
            h = m(h)
            if isinstance(m, nn.Conv2d):
                feats.append(h)  # pre-ReLU
        return feats  # 16 maps


def vae_loss(x_hat, x, mu, logvar, vgg, perceptual_weight=1.0):
    mse = F.mse_loss(x_hat, x)
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean()  # mean over latent elements (docs/METHODS.md)
    perc = torch.zeros((), device=x.device)
    if perceptual_weight:
        with torch.no_grad():
            f_x = vgg(x)
        perc = torch.stack([F.mse_loss(a, b) for a, b in zip(vgg(x_hat), f_x)]).mean()  # Eq. 2: mean over 16 layers
    return mse + kl + perceptual_weight * perc, mse, kl, perc


def fit(x, vgg, device, *, width, latent_channels, latent_res, epochs, batch_size, lr, perceptual_weight, seed,
        out_dir=None, progress=True, amp=False):
    """x: (N, 3, S, S) in [-1, 1]; the model and its training: add_args' flags of the same names; out_dir: named in
    the message of a non-finite loss; amp: the ResVAE's and the VGG's forward passes under bf16 autocast, the loss
    terms in fp32 (autocast runs mse_loss in fp32; the KL's inputs are cast here). Returns (model, history)."""
    torch.manual_seed(seed)
    levels = int(np.log2(x.shape[-1] // latent_res))
    model = ResVAE(x.shape[1], width, levels, latent_channels).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen, history = torch.Generator().manual_seed(seed), []
    for epoch in tqdm(range(epochs), desc="resvae", disable=not progress, leave=False):
        model.train()
        parts = []
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb = x[idx].to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                x_hat, mu, logvar = model(xb)
                loss, mse, kl, perc = vae_loss(x_hat.float(), xb, mu.float(), logvar.float(), vgg, perceptual_weight)
            check_finite(loss, epoch, out_dir)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parts.append([loss.item(), mse.item(), kl.item(), perc.item()])
        history.append(dict(zip(["loss", "mse", "kl", "perceptual"], np.mean(parts, 0).tolist())))
    return model.eval(), history


@torch.no_grad()
def measure(model, x, device, batch_size=256):
    """Per image: reconstruction MSE of decode(mu) on the [0, 1] scale, mean latent std; and the reconstructions."""
    mses, stds, recs = [], [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        mu, logvar = model.encode(xb)
        rec = model.decode(mu)
        mses.append(((rec - xb) / 2).pow(2).flatten(1).mean(1).cpu())
        stds.append((0.5 * logvar).exp().flatten(1).mean(1).cpu())
        recs.append(rec.cpu())
    return torch.cat(mses).numpy(), torch.cat(stds).numpy(), torch.cat(recs)


def add_args(p):
    p.add_argument("--size", type=positive_int, default=32, help="image side (paper 64+; quick 32)")
    p.add_argument("--width", type=positive_int, default=32, help="channels of the first level (doubling per level)")
    p.add_argument("--latent-channels", type=positive_int, default=64, help="latent channels (paper 64)")
    p.add_argument("--latent-res", type=positive_int, default=8, help="latent spatial size (paper 8)")
    p.add_argument("--epochs", type=positive_int, default=15, help="epochs (paper 15)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (paper 64)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (paper 1e-4)")
    p.add_argument("--perceptual-weight", type=nonneg_float, default=1.0, help="weight of the VGG19 term (paper 1)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="VGG19 ImageNet weights (--no-pretrained: random VGG19 features, recorded in every output)")
    p.add_argument("--vgg-weights", default=None, help="local VGG19 state-dict file (instead of downloading)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the training steps (the loss terms in fp32). auto: bf16 on a CPU with "
                        "bf16 instructions, since bench/bf16_agreement.py --loop resvae found that it trains the "
                        "ResVAE as fp32 does there (results/bench/bf16_resvae, quick settings; 1.57x on a 2-core "
                        "CPU), else fp32 (GPUs too: not checked there); bf16: always (refused on a device without "
                        "bf16); off: fp32")
    return p


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="Fitzpatrick17k (csv + images); default: the skin phantom")
    p.add_argument("--train-set", default="B",
                   help="A 100%% light, B 50/50, C 100%% dark (drawn here); with --sets, a set of that file")
    p.add_argument("--n-train", type=positive_int, default=1668,
                   help="training images, drawn with replacement (not used with --sets: the set is the draw)")
    p.add_argument("--sets", default=None,
                   help="a split file (set,image rows; common.splits.write_sets): train on its --train-set and "
                        "measure its --test-sets")
    p.add_argument("--test-sets", default="", help="comma-separated sets of --sets whose images get their MSE and "
                                                   "latent std in preds.csv (e.g. light,dark)")
    p.add_argument("--vgg-seed", type=int, default=0,
                   help="seed of the VGG19's random weights under --no-pretrained (one fixed random perceptual net "
                        "for every training set)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a column written into preds.csv, e.g. --tag repeat=0")
    add_args(p)
    add_common_args(p, "runs/skintone/resvae")
    args = p.parse_args(argv)
    if not args.sets and args.train_set not in SETS:
        p.error(f"--train-set {args.train_set}: choose A, B or C (or name a set of a --sets file)")
    return args


def main(args):
    device = device_from(args.device)
    # a refused bf16 first; auto: bf16 on CPUs, where the check ran, fp32 on GPUs until one is checked there
    amp = use_amp(args.amp, device, cpu_checked=BF16_CHECKED, gpu_checked=False)
    keys = key_values(args.tag, reserved=("image", "test_group", "skin_type", "diagnosis", "mse", "latent_std",
                                          "seed"))  # bad input first, before the run folder is touched
    out = prepare_out_dir(args.out_dir, args.force)
    seed_everything(args.seed)
    t, x, data = load_skin(args.data_root, args.size)
    tests = [s for s in args.test_sets.split(",") if s]
    if args.sets:
        names = [str(i).replace("\\", "/").rsplit("/", 1)[-1] for i in t["image"]]
        sets = read_sets(args.sets, names, [args.train_set, *tests])
        idx = sets[args.train_set]
    else:
        if tests:
            raise DataError("--test-sets needs --sets (the file that names the test images)")
        idx = draw_train_set(t, np.arange(len(t)), args.train_set, args.n_train, np.random.default_rng(args.seed))
    torch.manual_seed(args.vgg_seed)  # the random VGG19 (--no-pretrained) is the same for every run
    vgg = VGGPerceptual(args.pretrained, args.vgg_weights).to(device)
    write_config(out, vars(args), data=data, weights=f"VGG19: {vgg.source}")
    t0 = time.time()
    model, history = fit(x[idx], vgg, device, width=args.width, latent_channels=args.latent_channels,
                         latent_res=args.latent_res, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         perceptual_weight=args.perceptual_weight, seed=args.seed, out_dir=args.out_dir, amp=amp)
    save_checkpoint({"model": model.state_dict(), "args": vars(args)}, out / "ckpt.pt")
    rows, recons = [], {}
    for g in tests:  # per test image: reconstruction MSE and latent std; the first 8 reconstructions for figures
        mse, std, rec = measure(model, x[sets[g]], device)
        rows += [{**keys, "image": names[i], "test_group": g, "skin_type": int(t["skin_type"].iloc[i]),
                  "diagnosis": t["diagnosis_nine"].iloc[i], "mse": m, "latent_std": sd, "seed": args.seed}
                 for m, sd, i in zip(mse, std, sets[g])]
        recons[f"{g}_original"], recons[f"{g}_recon"] = x[sets[g][:8]].numpy(), rec[:8].numpy()
    if tests:
        pd.DataFrame(rows).to_csv(out / "preds.csv", index=False)
        np.savez_compressed(out / "recon.npz", **recons)
    write_json(out / "metrics.json", {"history": history, "seconds": time.time() - t0, "data": data,
                                      "vgg": vgg.source, "n_train": len(idx), "bf16_autocast": amp})
    print(f"ResVAE on set {args.train_set} ({data}, VGG19 {vgg.source}): final MSE {history[-1]['mse']:.4f}")


if __name__ == "__main__":
    run(main, parse_args)
