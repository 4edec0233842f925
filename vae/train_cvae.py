"""Conditional VAE for chest X-rays (Korb & Hall, "Closing the Gender Gap in Medical Imaging with VAEs";
docs/METHODS.md "Chest X-ray CVAE"), trained on FEMALE images of the training split only.

Condition y: the 15-label multi-hot vector (14 findings + No Finding; on a label table's task file, its own labels,
common/table.py). Encoder sees the image with y spread as 15 constant planes: 5 x [Conv k3 s2 p1, BN, LeakyReLU]
(C+15 -> 32, 64, 128, 256, 512; 64 px -> 2 px), Linear to mu and logvar (latent 128). Decoder: Linear(128 + 15 ->
512*2*2), 4 x [ConvT k3 s2 p1 op1, BN, LeakyReLU] (512 -> 256, 128, 64, 32), ConvT 32 -> 32 (to 64 px), BN,
LeakyReLU, Conv 32 -> C k3, tanh.
Loss: MSE + 0.00025 KL (KL summed over latent dims, mean over the batch). Adam 5e-3, lr x0.95 per epoch,
batch 64, up to 100 epochs, early stopping on the validation loss (patience 10), best weights kept.

    python -m vae.train_cvae --out-dir runs/chestxray/cvae              # embedded NIH1000, 64 px, ~2 min on CPU
    python -m vae.train_cvae --data-root /data/nih --csv /data/nih/Data_Entry_2017_v2020.csv --epochs 100
    python -m vae.train_cvae --epochs 2 --limit 64 --out-dir /tmp/cvae   # smoke test
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

from common.cli import ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, run
from common.cache import load_images
from common.data import NIH_LABELS, PROJECT_DATA, label_matrix, label_names, to_signed
from common.errors import DataError
from common.report import fit_title, pyplot, save_grid
from common.runs import (add_common_args, check_finite, device_from, load_checkpoint, load_weights, prepare_out_dir,
                         save_checkpoint, seed_everything, use_amp, write_config, write_json)
from common.splits import patient_split, read_sets
from common.task_file import read_cxr

N_COND = 15
# bf16 under --amp auto on CPUs: bench/bf16_agreement.py --loop cvae agreed on 30 fresh seeds
# (results/bench/bf16_cvae30) after a 5-seed check too small to tell (results/bench/bf16_cvae); GPUs: not checked
BF16_CHECKED = True


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU())


def up(c_in, c_out):
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, 2, 1, output_padding=1), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU())


class CVAE(nn.Module):
    def __init__(self, channels=1, latent=128, n_cond=N_COND):
        super().__init__()
        self.latent, self.n_cond = latent, n_cond
        chans = [channels + n_cond, 32, 64, 128, 256, 512]
        self.enc = nn.Sequential(*[block(a, b) for a, b in zip(chans[:-1], chans[1:])])  # 64 px -> 2 px
        self.mu, self.logvar = nn.Linear(512 * 4, latent), nn.Linear(512 * 4, latent)
        self.dec_in = nn.Linear(latent + n_cond, 512 * 4)
        self.dec = nn.Sequential(up(512, 256), up(256, 128), up(128, 64), up(64, 32), up(32, 32),
                                 nn.Conv2d(32, channels, 3, padding=1), nn.Tanh())

    def encode(self, x, y):
        planes = y[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])  # (B, 15, H, W)
        h = self.enc(torch.cat([x, planes], 1)).flatten(1)  # (B, 2048)
        return self.mu(h), self.logvar(h)

    def decode(self, z, y):
        return self.dec(self.dec_in(torch.cat([z, y], 1)).view(-1, 512, 2, 2))

    def forward(self, x, y):
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation
        return self.decode(z, y), mu, logvar


def cvae_loss(x_hat, x, mu, logvar, beta=0.00025):
    mse = F.mse_loss(x_hat, x)
    # Kingma & Welling 2014, App. B: -0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2), summed over dims, mean over batch
    kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    return mse + beta * kld, mse, kld


@torch.no_grad()
def validation_loss(model, x, y, beta, batch_size=256):
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_hat, mu, logvar = model(xb, yb)
        total += cvae_loss(x_hat, xb, mu, logvar, beta)[0].item() * len(xb)
    return total / max(len(x), 1)


def resumable(ckpt, latent, amp):
    """The checkpoint a --resume continues, if it fits the model flags (--latent) and the arithmetic (amp: bf16
    autocast or fp32; checked before anything is written)."""
    ck = load_checkpoint(ckpt, flag="--resume")
    if not isinstance(ck, dict) or not {"last", "model", "opt", "epoch", "args"} <= set(ck):
        raise DataError(f"--resume: {ckpt} is not a train_cvae.py checkpoint (choose another --out-dir)")
    if ck.get("args", {}).get("latent") != latent:
        raise DataError(f"--resume: {ckpt} was trained with --latent {ck.get('args', {}).get('latent')}, not "
                        f"{latent} (pass the same --latent, or --force to start a new run)")
    if "bf16" not in ck:
        raise DataError(f"--resume: {ckpt} does not record whether it trained in bf16 or fp32 (an older "
                        f"train_cvae.py wrote it); pass --force to start a new run")
    if ck["bf16"] != amp:
        was, now = ("bf16", "fp32") if ck["bf16"] else ("fp32", "bf16")
        raise DataError(f"--resume: {ckpt} was trained in {was}, this run would continue in {now} (pass --amp "
                        f"{'bf16' if was == 'bf16' else 'off'} to continue it, or --force to start a new run)")
    return ck


def fit(x_tr, y_tr, x_val, y_val, out, device, *, latent, beta, epochs, patience, batch_size, lr, seed,
        resume=False, progress=True, names=NIH_LABELS, amp=False):
    """Train the CVAE (the flags of the same names) with early stopping; returns (model with the best weights,
    history). Checkpoints into out every epoch; resume: continue from out/ckpt.pt. amp: the training steps under
    bf16 autocast (the loss in fp32); the validation loss is computed in fp32 either way."""
    # channels_last: the (transposed) convolutions take the faster oneDNN path on a CPU (1.19x per step on 2 cores,
    # bench/cvae_format.py)
    model = CVAE(1, latent, y_tr.shape[1]).to(device, memory_format=torch.channels_last)  # NIH: 15 labels
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    start, best_state, best_val, bad, history = 0, None, float("inf"), 0, []
    ckpt = out / "ckpt.pt"
    if resume and ckpt.is_file():
        ck = resumable(ckpt, latent, amp)
        load_weights(model, ck["last"], ckpt)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, best_state, best_val, bad, history = ck["epoch"], ck["model"], ck["best_val"], ck["bad"], ck["history"]
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed {ckpt} at epoch {start}")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):  # replay the shuffles of finished epochs, so a resumed run equals an unbroken one
        torch.randperm(len(x_tr), generator=gen)
    xv, yv = x_val.to(device), y_val.to(device)
    for epoch in tqdm(range(start, epochs), initial=start, total=epochs, desc="cvae", disable=not progress):
        model.train()
        tot = []
        for idx in torch.randperm(len(x_tr), generator=gen).split(batch_size):
            x, y = x_tr[idx].to(device), y_tr[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                x_hat, mu, logvar = model(x, y)
            loss, mse, kld = cvae_loss(x_hat.float(), x, mu.float(), logvar.float(), beta)
            check_finite(loss, epoch, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot.append([loss.item(), mse.item(), kld.item()])
        sched.step()
        model.eval()
        val = validation_loss(model, xv, yv, beta)
        t = np.mean(tot, 0)
        history.append({"epoch": epoch + 1, "loss": float(t[0]), "mse": float(t[1]), "kl": float(t[2]),
                        "val_loss": float(val)})
        if val < best_val:
            best_state, best_val, bad = copy.deepcopy(model.state_dict()), val, 0
        else:
            bad += 1
        save_checkpoint({"model": best_state, "last": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "epoch": epoch + 1, "best_val": best_val, "bad": bad,
                         "history": history, "torch_rng": torch.get_rng_state(), "bf16": amp,
                         "args": {"latent": latent, "channels": 1, "size": 64, "n_cond": y_tr.shape[1],
                                  "label_names": list(names)},
                         "train_labels": y_tr.to(torch.uint8)}, ckpt)
        if bad >= patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), history


def write_figures(model, x_tr, y_tr, out, device, title, seed=0):
    """samples.png (fixed noise, label vectors from the training split), recon.png, loss_curve.png."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(y_tr), generator=g)[:32]  # fewer where the training set is smaller
    with torch.no_grad():
        z = torch.randn(len(pick), model.latent, generator=g).to(device)
        samples = model.decode(z, y_tr[pick].to(device))
        mu, _ = model.encode(x_tr[pick[:16]].to(device), y_tr[pick[:16]].to(device))
        recon = model.decode(mu, y_tr[pick[:16]].to(device))
    save_grid(samples, out / "samples.png", nrow=4, title=f"CVAE samples (female, training-split labels), {title}")
    pairs = torch.stack([x_tr[pick[:16]], recon.cpu()], 1).flatten(0, 1)
    save_grid(pairs, out / "recon.png", nrow=4, title=f"CVAE reconstructions (real | recon), {title}")


def plot_history(history, path, title):
    plt = pyplot()
    e = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(e, [h["loss"] for h in history], label="train loss")
    ax.plot(e, [h["val_loss"] for h in history], label="validation loss")
    ax.plot(e, [h["mse"] for h in history], "--", label="train MSE")
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fit_title(ax, title, 9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(PROJECT_DATA / "nih_cxr14"), help="NIH images (any depth) + labels")
    p.add_argument("--csv", default=None, help="label table (default: found under --data-root)")
    p.add_argument("--split-seed", type=int, default=0, help="patient-level split seed (70/10/20 by sex); not used "
                                                              "with --sets")
    p.add_argument("--sets", default=None,
                   help="a split file (set,image rows; common.splits.write_sets) instead of the --split-seed split")
    p.add_argument("--train-set", default="train", help="--sets: the set to train on")
    p.add_argument("--val-set", default="val", help="--sets: the set for early stopping")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most this many training images (smoke tests)")
    p.add_argument("--latent", type=positive_int, default=128, help="latent dimension")
    p.add_argument("--beta", type=nonneg_float, default=0.00025, help="KL weight")
    p.add_argument("--epochs", type=positive_int, default=100, help="maximum epochs")
    p.add_argument("--patience", type=nonneg_int, default=10, help="early stopping patience (epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="Adam learning rate (x0.95 per epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the training steps (the loss and the validation loss in fp32). auto: "
                        "bf16 on a CPU with bf16 instructions (bench/bf16_agreement.py --loop cvae: it trains the "
                        "CVAE as fp32 does, results/bench/bf16_cvae30), fp32 elsewhere (on GPUs: not checked there); "
                        "bf16: always (refused on a device without bf16); off: fp32")
    add_common_args(p, "runs/chestxray/cvae")
    args = p.parse_args(argv)
    if args.sets and args.limit:
        p.error("--limit cuts the --split-seed split; with --sets, write the sets you want instead")
    if not args.sets and (args.train_set, args.val_set) != ("train", "val"):
        p.error("--train-set and --val-set name sets of a --sets file; pass one")
    return args


def main(args):
    device = device_from(args.device)
    # auto: bf16 only where a check agreed; a bf16 request is refused here, before anything is written, where the
    # device has no bf16
    amp = use_amp(args.amp, device, cpu_checked=BF16_CHECKED, gpu_checked=False)
    out = prepare_out_dir(args.out_dir, args.force, args.resume)
    if args.resume and (out / "ckpt.pt").is_file():
        # refuse a checkpoint of another shape or arithmetic before config.json is rewritten
        resumable(out / "ckpt.pt", args.latent, amp)
    seed_everything(args.seed)
    t = read_cxr(args.data_root, args.csv)
    if args.sets:  # a study's split file: the named sets, as they are (the study puts women's images in them)
        idx = read_sets(args.sets, [Path(i).name for i in t["image"]], [args.train_set, args.val_set])
        tr, va = idx[args.train_set], idx[args.val_set]
        female = (t["sex"] == "F").to_numpy()
        x, ok = load_images(t["image"], 64, "L")  # the whole table: one cache for every fold's stage
        x, ok = x[np.r_[tr, va]], ok[np.r_[tr, va]]
    else:
        split = patient_split(t, seed=args.split_seed, stratify="sex")
        female = (t["sex"] == "F").to_numpy()
        tr, va = np.nonzero(female & (split == "train"))[0], np.nonzero(female & (split == "val"))[0]
        if args.limit:
            tr, va = tr[:args.limit], va[:max(8, args.limit // 4)]
        x, ok = load_images(t["image"].iloc[np.r_[tr, va]], 64, "L")  # unreadable images: named in a warning
    tr, va = tr[ok[:len(tr)]], va[ok[len(tr):]]  # ... and left out
    if len(tr) == 0 or len(va) == 0:
        raise DataError(f"--data-root {args.data_root}: {len(tr)} readable female training and {len(va)} validation "
                        f"images ({int(female.sum())} of {len(t)} images are of women); the CVAE trains on women's "
                        f"images only, so it needs a data set with female patients")
    y = torch.from_numpy(label_matrix(t)[np.r_[tr, va]]).float()
    x = to_signed(x[ok])
    data = "nih1000" if args.data_root == str(PROJECT_DATA / "nih_cxr14") else \
        f"{'table' if 'group' in t.columns else 'nih'} ({args.data_root})"
    write_config(out, vars(args), data=data, weights="none (from scratch)", n_train=len(tr), n_val=len(va),
                 sex="female only" if female[np.r_[tr, va]].all() else "mixed")
    t0 = time.time()
    model, history = fit(x[:len(tr)], y[:len(tr)], x[len(tr):], y[len(tr):], out, device, latent=args.latent,
                         beta=args.beta, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, resume=args.resume, names=label_names(t),
                         amp=amp)
    best = min(history, key=lambda h: h["val_loss"])
    write_json(out / "metrics.json", {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                                      "epochs_run": len(history), "n_train": len(tr), "n_val": len(va),
                                      "seconds": time.time() - t0, "data": data, "bf16_autocast": amp,
                                      "history": history})
    write_figures(model, x[:len(tr)], y[:len(tr)], out, device, data)
    plot_history(history, out / "loss_curve.png", f"CVAE loss ({data}, female training images)")
    print(f"CVAE: best validation loss {best['val_loss']:.4f} at epoch {best['epoch']} ({len(tr)} female images)")


if __name__ == "__main__":
    run(main, parse_args)
