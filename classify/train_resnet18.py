"""ResNet-18 for 28x28 MedMNIST images (3x3 stride-1 stem, no max-pool; MedMNIST v2, Yang et al. 2023).

Cross-entropy (BCE with logits for multi-label sets). Two recipes:
    --recipe paper     Chaptoukaev: SGD lr 1e-3 (momentum 0.9: ours, the paper is silent), batch 128, 100 epochs,
                       early stopping on the validation AUC (patience --patience)
    --recipe medmnist  MedMNIST v2: Adam lr 1e-3, x0.1 at epochs 50 and 75, 100 epochs, batch 128
Both keep a copy of the best-validation-AUC weights (ties, common on a small validation set, go to the lower
validation loss) and report that model's test AUC (multi-class: unweighted mean
of one-vs-rest AUCs; binary: AUC of class 1) and ACC (argmax), as MedMNIST's evaluator does.

    # the benchmark check (docs/medmnist.md): full BreastMNIST, MedMNIST v2 recipe; test AUC should be ~0.901
    python -m classify.train_resnet18 --npz data/medmnist/breastmnist.npz --recipe medmnist --out-dir runs/medmnist/breast-v2
"""
import argparse
import copy
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from classify.nets import arch_spec, build
from common.cli import ArgumentParser, key_values, nonneg_float, nonneg_int, positive_float, positive_int, run
from common.data import label_matrix, medmnist_arrays, medmnist_subset, read_medmnist, read_samples, to_signed
from common.errors import DataError
from common.cache import load_images
from common.runs import (add_common_args, device_from, prepare_out_dir, save_checkpoint, seed_everything,
                         write_config, write_json)
from fairness.metrics import auroc, auroc_ovr


def logits_of(net, x, device, batch_size=512):
    net.eval()
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def probabilities(net, x, device, multilabel=False):
    """Per-image class probabilities (N, K): softmax, or sigmoid per label for multi-label sets."""
    logits = logits_of(net, x, device)
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy()


def evaluate(net, x, y, multilabel, device, batch_size=512, with_loss=False):
    """(AUC, ACC) of a model on (x, y), and the mean loss with with_loss; y: class indices (N,) or multi-hot (N, L)."""
    logits = logits_of(net, x, device, batch_size)
    loss = float(F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel else F.cross_entropy(logits, y))
    y = y.numpy()
    if multilabel:
        p = torch.sigmoid(logits).numpy()
        res = float(np.nanmean([auroc(y[:, j], p[:, j]) for j in range(y.shape[1])])), float(((p > 0.5) == y).mean())
    else:
        p = torch.softmax(logits, 1).numpy()
        res = auroc_ovr(y, p), float((p.argmax(1) == y).mean())
    return (*res, loss) if with_loss else res


def fit(x_tr, y_tr, x_val, y_val, device, *, recipe, epochs, batch_size, width, lr, momentum, patience, select, seed,
        multilabel=False, progress=True):
    """Train with the chosen recipe (add_args' flags of the same names); returns (net with the best-validation
    weights, history, spec)."""
    n_out = y_tr.shape[1] if multilabel else int(max(y_tr.max(), y_val.max())) + 1  # read_medmnist checks the classes
    spec = arch_spec("resnet18_28", x_tr.shape[1], n_out, x_tr.shape[-1], width)
    net = build(**spec).to(device, memory_format=torch.channels_last)
    if recipe == "paper":
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
        sched = None
    else:
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.5 * epochs), int(0.75 * epochs)],
                                                     gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    best, best_key, bad, history = None, (-math.inf, -math.inf), 0, []
    for epoch in tqdm(range(epochs), desc="resnet18", disable=not progress, leave=False):
        net.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(batch_size):
            out = net(x_tr[idx].to(device).contiguous(memory_format=torch.channels_last))
            yb = y_tr[idx].to(device)
            loss = F.binary_cross_entropy_with_logits(out, yb.float()) if multilabel else F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched:
            sched.step()
        auc, acc, val_loss = evaluate(net, x_val, y_val, multilabel, device, with_loss=True)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_auc": auc, "val_acc": acc, "val_loss": val_loss})
        # a small validation set reaches AUC 1.0 within a few epochs: ties go to the lower validation loss
        key = (auc, -val_loss) if select == "auc" else (-val_loss, auc)
        if best is None or key > best_key:  # a NaN validation AUC (one class) never wins later
            best, best_key, bad = copy.deepcopy(net.state_dict()), key, 0  # a copy of the weights, not a reference
        else:
            bad += 1
            if recipe == "paper" and bad >= patience:
                break
    net.load_state_dict(best)
    return net, history, spec


def add_args(p):
    p.add_argument("--recipe", default="paper", choices=["paper", "medmnist"], help="training recipe (see above)")
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size")
    p.add_argument("--width", type=positive_int, default=64,
                   help="channels of the first stage: 64 is ResNet-18 itself; smaller scales every stage (CPU quick)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate")
    p.add_argument("--momentum", type=nonneg_float, default=0.9, help="SGD momentum (paper recipe)")
    p.add_argument("--patience", type=nonneg_int, default=20, help="early stopping patience (paper recipe)")
    p.add_argument("--select", default="auc", choices=["auc", "loss"],
                   help="best-validation weights by AUC (ties: lower loss) or by loss (steadier on a tiny validation set)")
    return p


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", required=True, help="an official MedMNIST .npz (e.g. data/medmnist/breastmnist.npz)")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help="train on Chaptoukaev's subset: about N images per class of the official train split, split "
                        "9:1 into training and validation, drawn by --seed (default: the whole official splits)")
    p.add_argument("--synthetic", default=None,
                   help="a generator's samples.npz (images uint8, class labels) appended to the training images")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a column written into preds.csv, e.g. --tag dataset=breast --tag method=AE")
    add_args(p)
    add_common_args(p, "runs/medmnist/resnet18")
    return p.parse_args(argv)


def read_synthetic(path, shape):
    """A generator's samples.npz (images uint8, labels: class indices): (images in [-1, 1] (N, C, H, W), labels)."""
    images, labels = read_samples(path, "vae.train_mlp_ae, vae.train_mlp_cvae or gan.train_mlp_cgan")
    if images.shape[1:] != shape:
        raise DataError(f"--synthetic {path}: images of shape {images.shape[1:]}, the data's are {shape}")
    return to_signed(images), torch.from_numpy(labels.astype(np.int64))


def main(args):
    device = device_from(args.device)
    keys = key_values(args.tag, reserved=("seed", "image", "label", "pred"))  # bad input first
    t = read_medmnist(args.npz)
    multilabel = t.attrs["task"] == "multi-label"
    if args.synthetic and multilabel:
        raise DataError(f"--synthetic with {args.npz}: the generators are class-conditional, this set is "
                        f"multi-label")
    out = prepare_out_dir(args.out_dir, args.force)
    seed_everything(args.seed)
    if args.per_class:  # Chaptoukaev's subset (the seed draws it) and the official test split
        xi, yi, xv, yv, _ = medmnist_subset(args.npz, args.per_class, args.seed)
        images, labels, split, _, _ = medmnist_arrays(args.npz)
        te = np.nonzero(split == "test")[0]
        x_tr, y_tr = to_signed(xi), torch.from_numpy(yi).long()
        x_val, y_val = to_signed(xv), torch.from_numpy(yv).long()
        x_te, y_te = to_signed(images[te]), torch.tensor(labels[te]).long()
        n = {"train": len(xi), "val": len(xv), "test": len(te)}
    else:
        rgb = "RGB" if np.load(args.npz, mmap_mode="r")["train_images"].ndim == 4 else "L"
        size = np.load(args.npz, mmap_mode="r")["train_images"].shape[1]
        x, ok = load_images(t["image"], size, rgb)  # an image that cannot be read is named and left out
        x = to_signed(x)
        y = torch.tensor(label_matrix(t) if multilabel else t["target"].to_numpy()).long()  # copies pandas' view
        s = {k: (t["split"] == k).to_numpy() & ok for k in ("train", "val", "test")}
        for k, m in s.items():
            if not m.any():
                raise DataError(f"--npz {args.npz}: no {k} images")
        te = np.nonzero(s["test"])[0]
        x_tr, y_tr, x_val, y_val = x[s["train"]], y[s["train"]], x[s["val"]], y[s["val"]]
        x_te, y_te = x[te], y[te]
        n = {k: int(v.sum()) for k, v in s.items()}
    if args.synthetic:  # appended after the real training images
        gx, gy = read_synthetic(args.synthetic, tuple(np.load(args.npz, mmap_mode="r")["train_images"].shape[1:]))
        x_tr, y_tr = torch.cat([x_tr, gx]), torch.cat([y_tr, gy])
        n["synthetic"] = len(gx)
    y_seen = y_tr if multilabel else torch.bincount(y_tr, minlength=2)
    if (multilabel and not ((y_tr == 0).any() and (y_tr == 1).any())) or (not multilabel and (y_seen > 0).sum() < 2):
        raise DataError(f"--npz {args.npz}: the training set holds one class only ({int(y_tr.max())}); a classifier "
                        f"needs at least two (a bigger --per-class, or another split)")
    write_config(out, vars(args), data=str(args.npz), weights="none (from scratch)")
    t0 = time.time()
    net, history, spec = fit(x_tr, y_tr, x_val, y_val, device, recipe=args.recipe, epochs=args.epochs,
                             batch_size=args.batch_size, width=args.width, lr=args.lr, momentum=args.momentum,
                             patience=args.patience, select=args.select, seed=args.seed, multilabel=multilabel)
    auc, acc = evaluate(net, x_te, y_te, multilabel, device)
    probs = probabilities(net, x_te, device, multilabel)
    preds = pd.DataFrame({**keys, "seed": args.seed, "image": te, "label": y_te.numpy() if not multilabel else
                          [" ".join(map(str, r)) for r in y_te.numpy()], "pred": probs.argmax(1)})
    for k in range(probs.shape[1]):
        preds[f"p_{k}"] = probs[:, k]
    preds.to_csv(out / "preds.csv", index=False, float_format="%.9g")
    save_checkpoint({"arch": spec, "model": net.state_dict()}, out / "ckpt.pt")
    best = max(history, key=lambda h: (h["val_auc"], -h["val_loss"]) if args.select == "auc"
               else (-h["val_loss"], h["val_auc"]))
    metrics = {"test_auc": auc, "test_acc": acc, "best_epoch": best["epoch"], "best_val_auc": best["val_auc"],
               "recipe": args.recipe, "epochs_run": len(history), "seconds": time.time() - t0, "n": n,
               "history": history}
    write_json(out / "metrics.json", metrics)
    print(f"{t.attrs['flag']}mnist, {args.recipe} recipe: test AUC {auc:.3f}, ACC {acc:.3f} "
          f"(best val epoch {best['epoch']}, {time.time() - t0:.0f} s)")
    return metrics


if __name__ == "__main__":
    run(main, parse_args)
