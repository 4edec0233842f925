"""CheXNet-style multi-label chest X-ray classifier (Rajpurkar et al. 2017), trained so that it actually learns.

Outputs: 14 finding logits (sigmoid, docs/METHODS.md order) + one "any finding" logit (= not 'No Finding').
Loss: class-weighted BCE from the training prevalence, CheXNet's weights by default (w+ = N / (P + N),
w- = P / (P + N) per output; `--class-weights pos_weight` for torch's pos_weight = N / P, which on NIH1000 let
findings with a handful of positives pull the shared trunk as hard as common ones: docs/chestxray.md). Adam with
reduce-on-plateau (x0.1) and early stopping on the validation any-finding AUROC (averaged over the last --smooth
epochs: with ~100 validation images one epoch's AUROC swings by 0.1), CheXNet's schedule; or (`--schedule cosine`,
the quick study's choice) a cosine decay over a fixed number of epochs, which does not let one noisy validation
epoch cut the learning rate early. The best-scoring weights are kept as a copy, or (`--keep last`) the last
epoch's. Per output, a decision threshold is chosen on validation data (Youden's J), never 0.5.
Augmentation (ours): random affine (rotation +-7 deg, scale 0.9-1.1, shift 6%),
brightness/contrast jitter; no horizontal flips (the heart is on the left).

Networks: `--arch densenet121` (torchvision DenseNet-121; --pretrained for ImageNet weights) is CheXNet's and the
full-scale default; `--arch cnn8` (a plain 8-conv CNN) learns more from 1,000 images at 64 px without
pretraining and is the quick-scale default (docs/chestxray.md: measured comparison).

    python -m classify.train_chexnet --arch cnn8 --size 64 --out-dir runs/chestxray/chexnet   # embedded NIH1000
    python -m classify.train_chexnet --arch densenet121 --pretrained --size 224 --data-root /data/nih \
        --csv /data/nih/Data_Entry_2017_v2020.csv --batch-size 64 --out-dir runs/chestxray/chexnet-full
    # N GPUs of one machine (DistributedDataParallel; --batch-size per GPU, global batch N x 64):
    torchrun --nproc_per_node=N -m classify.train_chexnet --arch densenet121 --pretrained --size 224 ...
    # several machines: the same on each, with --nnodes=M --node_rank=i --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT
"""
import argparse
import copy
from dataclasses import dataclass, fields
import math
from pathlib import Path
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from classify.nets import arch_spec, build, check_size
from common.cli import (ArgumentParser, key_values, nonneg_float, nonneg_int, positive_float, positive_int, run,
                        unit_interval)
from common.cache import load_images
from common.data import NIH_FINDINGS, NIH_LABELS, PROJECT_DATA, label_matrix, label_names, read_samples, to_signed
from common.errors import DataError
from common.runs import (add_common_args, local_rank_zero_first, prepare_out_dir, ranks_identical, save_checkpoint,
                         seed_everything, setup_distributed, use_amp, write_config, write_json)
from common.splits import patient_split, read_sets
from common.task_file import read_cxr
from fairness.metrics import auroc, binary_stats, youden_threshold

OUTPUTS = NIH_FINDINGS + ["any finding"]  # NIH's; a table's: its findings, then "any finding" (= not No Finding)


def targets(Y):
    """(N, L) multi-hot (findings, then No Finding; NIH: 14 + 1) -> (N, L) outputs (the findings, then any finding)."""
    Y = np.asarray(Y)
    return np.concatenate([Y[:, :-1], 1 - Y[:, -1:]], 1).astype(np.float32)


def jitter(n, gen):
    """Random augmentation of n images: affine (rotation +-7 deg, scale 0.9-1.1, shift 6%) as a (n, 2, 3) theta,
    contrast c and brightness b (n, 1, 1, 1). Drawn for a whole global batch, so that a rank's part of it is
    augmented as one process would augment it."""
    ang = (torch.rand(n, generator=gen) - 0.5) * 2 * math.radians(7)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.12
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    c = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    b = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return theta, c, b


def classic_jitter(n, gen):
    """`--augment classic`: the stronger augmentation a classic baseline adds (Ktena et al.'s non-generative rows):
    horizontal flips (p = 0.5; chest X-rays then show the heart on the right), rotation +-15 deg, scale 0.85-1.15,
    shift 10%, contrast and brightness +-0.2. Same return as jitter()."""
    ang = (torch.rand(n, generator=gen) - 0.5) * 2 * math.radians(15)
    scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    c = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    b = 0.4 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return theta, c, b


def augment(x, theta, c, b):
    """jitter()'s affine warp (border padding) and x * c + b on a (B, C, H, W) batch in [-1, 1]."""
    grid = F.affine_grid(theta.to(x.device), x.shape, align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return (x * c.to(x.device) + b.to(x.device)).clamp(-1, 1)


class Images:
    """Images by position, converted to [-1, 1] a batch at a time: rows `rows` of a uint8 (N, S, S) array (the
    memory-mapped image cache: at 112k x 224 x 224 it is 5.6 GB, shared by every process that maps it, where a
    float copy would be 22 GB per process), then `extra` float images (M, 1, s, s) in [-1, 1] (a generator's
    samples, kept at their own size s and resized to S per batch: 36k samples at 64 px are 0.6 GB, at 224 px 7 GB)."""

    def __init__(self, u8, rows, extra=None):
        self.u8, self.rows = u8, np.asarray(rows, dtype=np.int64)
        self.extra = extra if extra is not None else torch.zeros((0, 1) + tuple(u8.shape[1:]))
        self.shape = (len(self.rows) + len(self.extra), 1) + tuple(u8.shape[1:])

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, pos):  # positions (a slice or an index tensor) -> (B, 1, S, S) float in [-1, 1]
        pos = np.arange(len(self))[pos] if isinstance(pos, slice) else np.asarray(pos, dtype=np.int64)
        real = pos < len(self.rows)
        if real.all():
            return to_signed(self.u8[self.rows[pos]])
        out = torch.empty((len(pos),) + self.shape[1:])
        out[torch.from_numpy(real)] = to_signed(self.u8[self.rows[pos[real]]])
        out[torch.from_numpy(~real)] = to_size(self.extra[pos[~real] - len(self.rows)], self.shape[-1])
        return out


def sex_loss_weights(sex):
    """--reweight-sex: per-image loss weights N / (2 n_sex), so that each sex carries half of the loss and the mean
    weight is 1 (a set of one sex: all 1)."""
    is_f = np.asarray(sex) == "F"
    n_f, n_m = is_f.sum(), (~is_f).sum()
    if n_f == 0 or n_m == 0:
        return np.ones(len(is_f))
    return np.where(is_f, len(is_f) / (2 * n_f), len(is_f) / (2 * n_m))


def shard(n, rank, world):
    """This rank's contiguous part of a global batch of n images (the parts' sizes differ by at most one)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def epoch_order(n, epoch_size, weights, gen):
    """Sample indices of one epoch: epoch_size draws with replacement by weights, or shuffled passes over range(n)
    (the last pass cut short) without them."""
    if weights is not None:
        return torch.multinomial(torch.as_tensor(weights, dtype=torch.float), epoch_size, True, generator=gen)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(epoch_size / n))])[:epoch_size]


def class_weights(y, kind, known=None):
    """Per-output BCE weights (w_pos, w_neg) from the training prevalence of y (N, K), P positives, N negatives.
    'chexnet': w_pos = N / (P + N), w_neg = P / (P + N) (Rajpurkar et al. 2017): balanced within an output, and an
    output's share of the loss grows with its prevalence. 'pos_weight': w_pos = N / P, w_neg = 1 (torch's
    pos_weight): every output weighs about as much as the next, so a finding with 5 training positives pulls the
    shared trunk as hard as one with 200. Outputs without positives keep w_pos = w_neg = 1. known (N, K) bool: the
    labels that count (a class-conditional sample's 14 findings do not); N and P are counted over those."""
    n, pos = (len(y), y.sum(0)) if known is None else (known.sum(0), (y * known).sum(0))
    none = pos == 0
    if kind == "chexnet":
        w_pos, w_neg = (n - pos) / n, pos / n
    else:
        w_pos, w_neg = (n - pos) / pos.clamp(min=1), torch.ones_like(pos)
    return torch.where(none, 1.0, w_pos), torch.where(none, 1.0, w_neg)


@torch.no_grad()
def predict(net, x, device, batch_size=256):
    """Sigmoid outputs (N, 15) of images x (an Images or a tensor)."""
    net.eval()
    return torch.cat([torch.sigmoid(net(x[i:min(i + batch_size, len(x))].to(device))).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


@dataclass(frozen=True)
class Network:
    """The network: --arch, --width (cnn8), --dropout (cnn8, vit; None: the network's default), --pretrained."""
    arch: str
    width: int
    dropout: float | None
    pretrained: bool


@dataclass(frozen=True)
class Recipe:
    """How it is trained (the flags of the same names): Adam (lr, weight_decay) on the BCE weighted by
    class_weights, batch_size images per process, at most epochs epochs; the LR schedule ('plateau', with
    lr_patience, or 'cosine'); selection, stopping (patience; 0: never early) and the plateau schedule on the mean
    validation any-finding AUROC of the last `smooth` epochs; keep: the 'best' or the 'last' weights."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    class_weights: str
    schedule: str
    lr_patience: int
    smooth: int
    patience: int
    keep: str


def fit(x_tr, y_tr, x_val, y_val, network, recipe, seed, device, weights=None, epoch_size=None, loss_weight=None,
        augmentation="light", rank=0, world=1, sync_bn=False, amp=False, progress=True):
    """Train a Network by a Recipe on (x_tr (N, C, S, S) in [-1, 1] (an Images or a tensor), y_tr (N, 15) outputs);
    returns (net, history, thresholds (15,), spec); thresholds are None on ranks other than 0. seed: the epoch
    order and augmentation (and, under torchrun, dropout with the rank).
    weights: per-sample sampling weights (e.g. sex-balanced); each epoch draws epoch_size samples with them.
    epoch_size: samples per epoch (default len(x_tr)); a fixed value gives training sets of different sizes the
    same number of updates (without weights: shuffled passes over the set, the last one cut short).
    Under torchrun (world > 1): every rank draws the same epoch order and augmentation; a step is a global batch of
    world x batch_size images of which each rank trains on its part (shard), and DDP averages the gradients, so
    the step is one process's at the global batch, except for BatchNorm, whose statistics are each rank's own
    (sync_bn, --sync-bn on GPUs, makes them the global batch's) and dropout, drawn per rank. Rank 0 alone
    evaluates; it sends the validation score to the others, so that every rank schedules and stops alike. amp: bf16
    autocast of the training steps (common.runs.use_amp). loss_weight: (N, 15) factors on each image's BCE terms
    (--reweight-sex; 0 on the outputs a generator's sample has no label for). augmentation: "light" (jitter) or
    "classic" (classic_jitter)."""
    spec = arch_spec(network.arch, x_tr.shape[1], y_tr.shape[1], x_tr.shape[-1], network.width, network.dropout)
    net = build(**spec, pretrained=network.pretrained).to(device, memory_format=torch.channels_last)
    train_net = net
    if world > 1:
        if sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        train_net = torch.nn.parallel.DistributedDataParallel(net)
        torch.manual_seed(seed * 1000 + rank)  # dropout: each rank its own masks (the weights came from rank 0)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=recipe.lr_patience)
    n_epoch = epoch_size or len(x_tr)
    w_pos, w_neg = class_weights(y_tr, recipe.class_weights, None if loss_weight is None else loss_weight > 0)
    w_pos, w_neg = w_pos.to(device), w_neg.to(device)
    gen = torch.Generator().manual_seed(seed)  # the same stream on every rank
    best, best_auc, bad, history = None, -1.0, 0, []
    for epoch in tqdm(range(recipe.epochs), desc="chexnet", disable=not progress or rank > 0, leave=False):
        train_net.train()
        order = epoch_order(len(x_tr), n_epoch, weights, gen)
        losses = []
        for batch in order.split(recipe.batch_size * world):  # a global batch
            if len(batch) < world:  # a remainder too small to give every rank an image (one process would train
                break  # on it: the one step in which N processes differ from one)
            theta, c, b = (classic_jitter if augmentation == "classic" else jitter)(len(batch), gen)
            part = shard(len(batch), rank, world)
            idx = batch[part]
            x = augment(x_tr[idx].to(device), theta[part], c[part], b[part]).contiguous(
                memory_format=torch.channels_last)
            y = y_tr[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = train_net(x).float()
            w = y * w_pos + (1 - y) * w_neg
            if loss_weight is not None:
                w = w * loss_weight[idx].to(device)
            loss = F.binary_cross_entropy_with_logits(logits, y, weight=w)
            opt.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global batch makes
            # that average the gradient of the global batch's mean loss (x 1 in one process)
            (loss * (len(idx) * world / len(batch))).backward()
            opt.step()
            if world > 1:  # the global batch's loss, for the history every rank keeps alike
                loss = loss.detach() * len(idx) / len(batch)
                torch.distributed.all_reduce(loss)
            losses.append(loss.item())
        auc = None
        if rank == 0:
            p_val = predict(net, x_val, device)
            auc = auroc(y_val[:, -1].numpy(), p_val[:, -1])  # any-finding AUROC
        if world > 1:
            sent = [auc]
            torch.distributed.broadcast_object_list(sent, 0)
            auc = sent[0]
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_any_auroc": auc,
                        "lr": opt.param_groups[0]["lr"]})
        # a ~100-image validation set is noisy: select, stop and schedule on the mean of the last --smooth epochs
        score = float(np.mean([h["val_any_auroc"] for h in history[-recipe.smooth:]]))
        history[-1]["val_score"] = score
        if recipe.schedule == "plateau":
            sched.step(score)
        else:
            sched.step()
        if best is None or score > best_auc:  # a NaN score (one class in validation) never wins later
            best, best_auc, bad = copy.deepcopy(net.state_dict()), score, 0
        else:
            bad += 1
            if recipe.patience and bad >= recipe.patience:
                break
    if recipe.keep == "best":
        net.load_state_dict(best)
    if rank > 0:
        return net, history, None, spec
    p_val = predict(net, x_val, device)
    thresholds = np.array([youden_threshold(y_val[:, j].numpy(), p_val[:, j]) if 0 < y_val[:, j].sum() < len(y_val)
                           else 0.5 for j in range(y_val.shape[1])])
    return net, history, thresholds, spec


def per_output_table(y, p, thresholds, outputs=OUTPUTS, min_pos=1):
    """Per output: AUC, accuracy, sensitivity, specificity, positives, class ratio (positives : negatives)."""
    rows = []
    for j, name in enumerate(outputs):
        s = binary_stats(y[:, j], p[:, j] >= thresholds[j])
        rows.append({"output": name, "auroc": auroc(y[:, j], p[:, j]) if s["positives"] >= min_pos else float("nan"),
                     "accuracy": s["accuracy"], "sensitivity": s["sensitivity"], "specificity": s["specificity"],
                     "positives": s["positives"], "class_ratio": s["positives"] / max(1, s["n"] - s["positives"])})
    return rows


def add_args(p):
    """The classifier's flags, shared with classify/chestxray_study.py."""
    p.add_argument("--arch", default="cnn8", choices=["cnn8", "densenet121", "resnet50", "vit"],
                   help="network (classify/nets.py; quick: cnn8, full: densenet121)")
    p.add_argument("--width", type=positive_int, default=16, help="cnn8 base width (16: ~130 images/s at 64 px on one core)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="ImageNet weights for densenet121 (downloaded once on your machine)")
    p.add_argument("--size", type=positive_int, default=64, help="input size (64 quick, 224 full)")
    p.add_argument("--class-weights", default="chexnet", choices=["pos_weight", "chexnet"],
                   help="BCE class weighting from the training prevalence (see class_weights())")
    p.add_argument("--epochs", type=positive_int, default=20, help="maximum epochs")
    p.add_argument("--schedule", default="plateau", choices=["plateau", "cosine"],
                   help="LR schedule: reduce-on-plateau of the validation score, or cosine decay over --epochs")
    p.add_argument("--patience", type=nonneg_int, default=6,
                   help="early stopping patience on the validation score (0: never stop early)")
    p.add_argument("--smooth", type=positive_int, default=3,
                   help="validation score = mean any-finding AUROC of the last N epochs (selection, stopping, LR)")
    p.add_argument("--keep", default="best", choices=["best", "last"],
                   help="weights to keep: those of the best validation score, or the last epoch's")
    p.add_argument("--lr-patience", type=nonneg_int, default=3, help="reduce-on-plateau patience")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size (per process under torchrun)")
    p.add_argument("--dropout", type=unit_interval, default=None,
                   help="dropout of cnn8 (before the head; default 0.3) or vit (in its blocks; default 0.1)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm), so that "
                        "N GPUs compute what one would at N x --batch-size (slower; default: each GPU's own)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the training steps (evaluation stays fp32): auto = on GPUs with bf16, and "
                        "on CPUs with bf16 instructions for cnn8, whose bf16 training was checked against fp32 there "
                        "(1.8x per step; results/bench/bf16); bf16 = on any device; off = fp32")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-4, help="Adam weight decay")
    return p


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(PROJECT_DATA / "nih_cxr14"), help="NIH folder, or a study's task file")
    p.add_argument("--csv", default=None, help="label table (default: found under --data-root)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="patient-level split seed (70/10/20, by sex); not used with --sets")
    p.add_argument("--sets", default=None,
                   help="a split file (set,image rows; common.splits.write_sets) instead of the --split-seed split")
    p.add_argument("--train-set", default="train", help="--sets: the set to train on")
    p.add_argument("--val-set", default="val", help="--sets: the set that picks thresholds (and epochs)")
    p.add_argument("--test-set", default="test", help="--sets: the set scored in preds.csv")
    p.add_argument("--synthetic", default=None,
                   help="samples .npz (images, NIH multi-hot labels; vae.sample_cvae) appended to the training set")
    p.add_argument("--balance-sex", action="store_true",
                   help="sample the training images so that each sex is half of every epoch (reweighting)")
    p.add_argument("--augment", default="light", choices=["light", "classic"],
                   help="light: affine (rotation 7 deg, scale 0.9-1.1, shift 6%%) and contrast/brightness +-0.1, no "
                        "flips; classic: flips, rotation 15 deg, scale 0.85-1.15, shift 10%%, +-0.2 (classic_jitter)")
    p.add_argument("--reweight-sex", action="store_true",
                   help="weight each real training image's loss by 1 / (2 n_sex) x N, so that each sex carries half of "
                        "the loss (sampling stays uniform; --balance-sex is the oversampling alternative)")
    p.add_argument("--epoch-size", type=positive_int, default=None,
                   help="samples per epoch (default: the training set's size); a fixed value gives training sets of "
                        "different sizes the same number of updates")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a column written into preds.csv, e.g. --tag fold=0 --tag condition=balanced_real")
    add_args(p)
    add_common_args(p, "runs/chestxray/chexnet")
    args = p.parse_args(argv)
    if not args.sets and (args.train_set, args.val_set, args.test_set) != ("train", "val", "test"):
        p.error("--train-set, --val-set and --test-set name sets of a --sets file; pass one")
    check_size(args.arch, args.size)  # before anything is read or written
    return args


def col(name):
    return name.replace(" ", "_")


def pred_rows(t, Y, scores, thresholds, outputs=OUTPUTS, **keys):
    """preds.csv rows of one fold's test images under one condition: ids, sex (a table's: the side), its group, age,
    fold, seed, condition, and per output its label y_*, score p_* and the fold's validation threshold thr_*."""
    df = pd.DataFrame({"image": [Path(i).name for i in t["image"]], "patient_id": t["patient_id"].to_numpy(),
                       "sex": t["sex"].to_numpy(), "age": t["age"].to_numpy(),
                       **({"group": t["group"].to_numpy()} if "group" in t.columns else {}), **keys})
    for j, name in enumerate(outputs):
        df[f"y_{col(name)}"] = Y[:, j].astype(int)
        df[f"p_{col(name)}"] = scores[:, j]
        df[f"thr_{col(name)}"] = np.broadcast_to(thresholds, scores.shape)[:, j]
    return df


def to_size(x, size):
    """(N, 1, S, S) images in [-1, 1] resized to size px (e.g. a 64 px generator's samples for a classifier at
    --size)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


def read_synthetic(path, n_labels=len(NIH_LABELS)):
    """A generator's samples file -> (images (N, 1, S, S) in [-1, 1], multi-hot labels (N, L), known (N, L) bool:
    which outputs a sample has a label for). vae.sample_cvae's files: the table's L labels (NIH: 15), all known; a
    class-conditional sampler's: class indices into class_names "<group>|No Finding" / "<group>|finding", only the
    any-finding output known (the findings get no loss)."""
    images, labels = read_samples(path, "vae.sample_cvae, diffusion.sample_ddpm, gan.sample_dcgan or "
                                        "vae.sample_conv_ae")
    if labels.ndim == 1:
        with np.load(path) as z:
            names = [str(n) for n in z["class_names"]] if "class_names" in z.files else None
        if not names or any(n.rpartition("|")[2] not in ("No Finding", "finding") for n in names) \
                or labels.min() < 0 or labels.max() >= len(names):
            raise DataError(f"--synthetic {path}: class labels need class_names '<group>|No Finding' / "
                            f"'<group>|finding' (NIH any-finding classes), found {names}")
        multi, known = np.zeros((len(labels), n_labels), np.uint8), np.zeros((len(labels), n_labels), bool)
        multi[:, -1], known[:, -1] = [names[c].endswith("|No Finding") for c in labels], True
        return to_signed(images), multi, known
    if labels.shape[1] != n_labels:
        raise DataError(f"--synthetic {path}: labels of shape {labels.shape}, expected ({len(images)}, "
                        f"{n_labels}) multi-hot vectors of this data's labels")
    return to_signed(images), labels, np.ones((len(labels), n_labels), bool)


def main(args):
    device, rank, world = setup_distributed(args.device)
    if args.sync_bn and device.type != "cuda":
        raise DataError("--sync-bn: SyncBatchNorm needs GPUs (torchrun with CUDA); drop the flag on CPUs")
    if args.dropout is not None and args.arch not in ("cnn8", "vit"):
        raise DataError(f"--dropout: {args.arch} has no dropout to set (cnn8 and vit have)")
    keys = key_values(args.tag, reserved=("image", "patient_id", "sex", "age", "group", "seed", "arch", "split"))
    out = prepare_out_dir(args.out_dir, args.force) if rank == 0 else None
    seed_everything(args.seed)
    t = read_cxr(args.data_root, args.csv)
    outputs = label_names(t)[:-1] + ["any finding"]  # a task file's labels end with its primary's negation
    with local_rank_zero_first():  # one process per machine decodes the cache; the others then map it
        x, ok = load_images(t["image"], args.size, "L")  # uint8 (N, S, S); unreadable images: named and left out
    y = torch.from_numpy(targets(label_matrix(t)))
    if args.sets:  # a study's split file: the named sets, in the file's order
        idx = read_sets(args.sets, [Path(i).name for i in t["image"]], [args.train_set, args.val_set, args.test_set])
        tr, va, te = idx[args.train_set], idx[args.val_set], idx[args.test_set]
        tr, va, te = tr[ok[tr]], va[ok[va]], te[ok[te]]
    else:
        split = patient_split(t, seed=args.split_seed, stratify="sex")
        tr, va, te = (np.nonzero((split == s) & ok)[0] for s in ("train", "val", "test"))
    for s, m in (("training", tr), ("validation", va), ("test", te)):
        if not len(m):
            raise DataError(f"--data-root {args.data_root}: no readable {s} image (the patient split needs "
                            f"images of several patients)")
    if len(np.unique(y[tr, -1])) < 2:  # (one class: an AUROC of nothing learnt)
        raise DataError(f"--train-set {args.train_set}: one class only for the compared label (any finding) in its "
                        f"{len(tr)} images; a classifier needs both (more data, or fewer --folds)")
    sex = t["sex"].to_numpy()[tr]
    x_tr, y_tr = Images(x, tr), y[tr]
    n_syn, loss_weight = 0, None
    if args.synthetic:  # appended after the real images
        sx, sy, known = read_synthetic(args.synthetic, len(outputs))
        x_tr, y_tr = Images(x, tr, sx), torch.cat([y_tr, torch.from_numpy(targets(sy))])
        n_syn = len(sx)
        if not known.all():  # no loss on the outputs a sample has no label for
            loss_weight = torch.from_numpy(np.r_[np.ones((len(tr), len(outputs)), bool), known]).float()
    if args.reweight_sex:
        if args.synthetic or args.balance_sex:
            raise DataError("--reweight-sex: the weights cover real images only; drop --synthetic / --balance-sex")
        loss_weight = torch.from_numpy(np.repeat(sex_loss_weights(sex)[:, None], len(outputs), 1)).float()
    weights = None
    if args.balance_sex:  # each sex half of every epoch: w = 1 / (2 n_sex) over the real training images
        if args.synthetic:
            raise DataError("--balance-sex with --synthetic: the weights cover real images only; use one of them")
        is_f = sex == "F"  # (a set of one sex is sampled uniformly)
        weights = np.where(is_f, 0.5 / max(is_f.sum(), 1), 0.5 / max((~is_f).sum(), 1))
    weights_from = "imagenet" if args.pretrained else "none (from scratch)"
    counts = {"n_train_female": int((sex == "F").sum()), "n_train_male": int((sex == "M").sum()),
              "n_synthetic": n_syn}
    amp = use_amp(args.amp, device, cpu_checked=args.arch == "cnn8")
    if rank == 0:
        write_config(out, vars(args), data="nih1000" if "data/nih_cxr14" in args.data_root else args.data_root,
                     weights=weights_from, world_size=world, bf16_autocast=amp, **counts)
    t0 = time.time()
    network = Network(args.arch, args.width, args.dropout, args.pretrained)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})  # the flags of the same names
    net, history, thr, spec = fit(x_tr, y_tr, Images(x, va), y[va], network, recipe, args.seed, device, weights,
                                  epoch_size=args.epoch_size, loss_weight=loss_weight, augmentation=args.augment,
                                  rank=rank, world=world, sync_bn=args.sync_bn, amp=amp)
    ddp = {"world_size": world, "ranks_identical": ranks_identical(net)} if world > 1 else {}
    if rank > 0:
        return
    p = predict(net, Images(x, te), device)
    rows = per_output_table(y[te].numpy(), p, thr, outputs)
    keys = keys if args.sets else {"split": "test", **keys}
    pred_rows(t.iloc[te], y[te].numpy(), p, np.asarray(thr), outputs, **keys, seed=args.seed, arch=args.arch).to_csv(
        out / "preds.csv", index=False, float_format="%.9g")
    save_checkpoint({"arch": spec, "model": net.state_dict(), "thresholds": torch.tensor(thr),
                     "outputs": outputs, "weights": weights_from}, out / "ckpt.pt")
    write_json(out / "metrics.json", {"test": rows, "history": history, "seconds": time.time() - t0,
                                      "weights": weights_from, "labels": label_names(t), **counts, **ddp})
    any_row = rows[-1]
    print(f"{args.arch} ({weights_from}): {args.test_set} any-finding AUROC {any_row['auroc']:.3f}, sensitivity "
          f"{any_row['sensitivity']:.2f}, specificity {any_row['specificity']:.2f} ({time.time() - t0:.0f} s)"
          + (f"; {world} processes, weights identical across ranks: {ddp['ranks_identical']}" if ddp else ""))


if __name__ == "__main__":
    run(main, parse_args)
