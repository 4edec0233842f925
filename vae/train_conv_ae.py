"""Convolutional autoencoder that generates by interpolating latent codes: the AE row of `make compare`.

The network is the chest X-ray CVAE's (vae/train_cvae.py: 5 x [Conv k3 s2, BN, LeakyReLU] from 64 px to 2 px,
Linear to a 128-d code; the mirrored transposed-convolution decoder, tanh) without a condition and without the
KL term: a plain autoencoder, MSE on pixels in [-1, 1], Adam 2e-3 (x0.95 per epoch), batch 64, early stopping on
the validation MSE (--patience), best weights kept, a checkpoint every epoch (--resume). An AE is not a sampler:
as the MedMNIST study's AE (vae/train_mlp_ae.py), a new image of class c (attribute x label, common/modalities.py)
is the decoded code lam z_a + (1 - lam) z_b + noise of two training images a, b of class c (vae.sample_conv_ae),
so the class conditions it through the images it starts from. The checkpoint keeps the training images' codes and
classes for that.

    python -m vae.train_conv_ae --out-dir runs/conv_ae/nih64                     # embedded NIH1000, training split
    python -m vae.train_conv_ae --sets runs/results/chestxray/fold0/compare_sets.csv --train-set pool --val-set val
    python -m vae.train_conv_ae --data toy:200 --epochs 2 --out-dir /tmp/ae      # seconds
"""
import argparse
import copy
from pathlib import Path
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import ArgumentParser, nonneg_int, positive_float, positive_int, run
from common.errors import DataError
from common.modalities import add_set_args, training_images
from common.report import save_grid
from common.runs import (add_common_args, check_finite, device_from, load_checkpoint, load_weights, prepare_out_dir,
                         resume_differences, save_checkpoint, seed_everything, use_amp, write_config, write_json)
from fairness.figures import lines
from vae.train_cvae import block, up

BF16_CHECKED = True  # bf16 under --amp auto: bench/bf16_agreement.py --loop convae agreed (results/bench/bf16_convae)


class ConvAE(nn.Module):
    def __init__(self, channels=1, latent=128):
        super().__init__()
        chans = [channels, 32, 64, 128, 256, 512]
        self.latent = latent
        self.encoder = nn.Sequential(*[block(a, b) for a, b in zip(chans[:-1], chans[1:])])  # 64 px -> 2 px
        self.code = nn.Linear(512 * 4, latent)
        self.dec_in = nn.Linear(latent, 512 * 4)
        self.decoder = nn.Sequential(up(512, 256), up(256, 128), up(128, 64), up(64, 32), up(32, 32),
                                     nn.Conv2d(32, channels, 3, padding=1), nn.Tanh())

    def enc(self, x):
        return self.code(self.encoder(x).flatten(1))

    def dec(self, z):
        return self.decoder(self.dec_in(z).view(-1, 512, 2, 2))

    def forward(self, x):
        return self.dec(self.enc(x))


@torch.no_grad()
def codes(model, x, device, batch_size=256):
    """Codes (N, latent) of uint8 images x (N, C, 64, 64), model in eval mode."""
    model.eval()
    return torch.cat([model.enc(to_float(x[i:i + batch_size]).to(device)).cpu() for i in range(0, len(x), batch_size)])


def to_float(u8):
    return torch.as_tensor(u8).float() / 127.5 - 1  # uint8 (N, C, S, S) -> [-1, 1]


@torch.no_grad()
def val_mse(model, x, device, batch_size=256):
    model.eval()
    errs = [F.mse_loss(model(to_float(x[i:i + batch_size]).to(device)), to_float(x[i:i + batch_size]).to(device),
                       reduction="sum").item() for i in range(0, len(x), batch_size)]
    return float(sum(errs) / (len(x) * np.prod(x.shape[1:])))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_set_args(p)
    p.add_argument("--val-set", default="val", help="--sets: the set for early stopping (without --sets: the 10%% "
                                                    "validation split)")
    p.add_argument("--latent", type=positive_int, default=128, help="code size")
    p.add_argument("--epochs", type=positive_int, default=30, help="maximum epochs")
    p.add_argument("--patience", type=nonneg_int, default=5, help="early stopping patience (0: never stop early)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (x0.95 per epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the training steps (the loss and the validation MSE in fp32). auto: bf16 "
                        "on a CPU with bf16 instructions (bench/bf16_agreement.py --loop convae: it trains the AE as "
                        "fp32 does, results/bench/bf16_convae), fp32 elsewhere (on GPUs: not checked there); bf16: "
                        "always (refused on a device without bf16); off: fp32")
    add_common_args(p, "runs/conv_ae/nih64")
    args = p.parse_args(argv)
    if not args.sets and (args.train_set, args.val_set) != ("train", "val"):
        p.error("--train-set and --val-set name sets of a --sets file; pass one")
    if args.force and args.resume:
        p.error("--force replaces the run in --out-dir and --resume continues it: pass one of them")
    return args


def main(args):
    device = device_from(args.device)
    bf16 = use_amp(args.amp, device, cpu_checked=BF16_CHECKED, gpu_checked=False)  # refused before any data is read
    mod, x_tr, cls = training_images(args.data, 64, args.data_root, "train", args.split_seed, args.sets,
                                     args.train_set)
    _, x_val, _ = training_images(args.data, 64, args.data_root, "val", args.split_seed, args.sets, args.val_set)
    if len(x_tr) < 2 or len(x_val) < 1:
        raise DataError(f"--data {args.data}: {len(x_tr)} training and {len(x_val)} validation images; the AE "
                        f"needs both")
    ckpt = Path(args.out_dir) / "ckpt.pt"
    ck = load_checkpoint(ckpt, flag="--resume") if args.resume and ckpt.is_file() else None
    shape = {"channels": mod.channels, "latent": args.latent}
    data_args = {**{k: getattr(args, k) for k in ("data", "data_root", "split_seed", "sets", "train_set", "val_set",
                                                   "batch_size", "lr", "seed")},
                 "bf16": bf16}  # a run resumes in its own arithmetic
    diffs = resume_differences(ck, model_args=shape, data_args=data_args) if ck is not None else []
    if isinstance(ck, dict) and "last" not in ck:
        diffs.append("not a train_conv_ae.py checkpoint (no last weights)")
    if diffs:
        raise DataError(f"--resume: {ckpt} does not continue this run ({'; '.join(diffs)}); pass its flags, or "
                        f"--force to start afresh")
    out = prepare_out_dir(args.out_dir, args.force, args.resume)
    seed_everything(args.seed)
    model = ConvAE(**shape).to(device, memory_format=torch.channels_last)  # the CVAE's faster oneDNN path on CPUs
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    amp = data_args["bf16"]
    start, best, best_val, bad, history, before = 0, None, float("inf"), 0, [], 0.0
    if ck is not None:
        load_weights(model, ck["last"], ckpt)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, best, best_val, bad, history = ck["epoch"], ck["model"], ck["best_val"], ck["bad"], ck["history"]
        before = ck.get("seconds", 0.0)
        print(f"resumed {ckpt} at epoch {start}")
    write_config(out, vars(args), data=mod.data, weights="none (from scratch)", classes=mod.class_names,
                 n_train=len(x_tr), n_val=len(x_val), notes=mod.notes)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(start):  # the shuffles of finished epochs replayed: a resumed run equals an unbroken one
        torch.randperm(len(x_tr), generator=gen)
    t0 = time.time()
    for epoch in tqdm(range(start, args.epochs), initial=start, total=args.epochs, desc="conv-ae"):
        if args.patience and bad >= args.patience:
            break
        model.train()
        losses = []
        for idx in torch.randperm(len(x_tr), generator=gen).split(args.batch_size):
            xb = to_float(x_tr[idx.numpy()]).to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                x_hat = model(xb)
            loss = F.mse_loss(x_hat.float(), xb)
            check_finite(loss, epoch, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        val = val_mse(model, x_val, device)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_mse": val})
        if val < best_val:
            best, best_val, bad = copy.deepcopy(model.state_dict()), val, 0
        else:
            bad += 1
        save_checkpoint({"model": best, "last": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "epoch": epoch + 1, "best_val": best_val, "bad": bad,
                         "history": history, "model_args": shape, "data_args": data_args,
                         "seconds": before + time.time() - t0}, ckpt)
    model.load_state_dict(best)
    z = codes(model, x_tr, device)
    save_checkpoint({"model": best, "last": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "epoch": len(history), "best_val": best_val, "bad": bad, "history": history, "model_args": shape,
                     "data_args": data_args, "seconds": before + time.time() - t0, "codes": z,
                     "classes": torch.from_numpy(cls), "class_names": mod.class_names,
                     "data": mod.data}, ckpt)
    pick = np.arange(min(16, len(x_tr)))
    with torch.no_grad():
        recon = model(to_float(x_tr[pick]).to(device)).cpu()
    save_grid(torch.stack([to_float(x_tr[pick]), recon], 1).flatten(0, 1), out / "recon.png", nrow=4,
              title=f"conv AE reconstructions (real | recon), {mod.data}")
    lines({"train MSE": {h["epoch"]: h["loss"] for h in history},
           "validation MSE": {h["epoch"]: h["val_mse"] for h in history}}, out / "loss_curve.png",
          f"conv AE loss ({mod.data})", "epoch", "MSE")
    best_epoch = min(history, key=lambda h: h["val_mse"])
    write_json(out / "metrics.json", {"best_epoch": best_epoch["epoch"], "best_val_mse": best_epoch["val_mse"],
                                      "epochs_run": len(history), "n_train": len(x_tr), "n_val": len(x_val),
                                      "seconds": before + time.time() - t0, "data": mod.data, "bf16_autocast": amp,
                                      "history": history})
    print(f"conv AE: best validation MSE {best_epoch['val_mse']:.4f} at epoch {best_epoch['epoch']} "
          f"({len(x_tr)} training images, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run(main, parse_args)
