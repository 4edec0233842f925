"""Is a VAE fair across skin types? The protocol of Lopez-Perez, Hauberg & Feragen (docs/METHODS.md), as a plan:

Skin types: light = Fitzpatrick 1-2, dark = 5-6 (3-4 and unknown dropped). Per repeat: two test sets (light and
dark, --n-test each, disjoint), then three training sets of --n-train images drawn with replacement from the rest:
A 100% light, B 50/50, C 100% dark (the repeat's split file, runs/<out>/repeat<r>/sets.csv). Stage: a residual
perceptual VAE (vae.train_resvae, its own command; `--dry-run` prints them) is trained on each set, and every
test image gets its reconstruction MSE and mean latent std (its preds.csv). The study gathers into --out:
preds.csv (one row per test image, training set and repeat), recon/<set>.npz (repeat 0's reconstructions) and
plan.json (the settings the report needs); vae/skintone_report.py then writes the tables, figures, summary.json
and README.md from those files alone. SCALES below holds each scale's settings.

Inference is at the level of repeats, since each repeat trains its own models on its own draw (the report's
docstring and docs/METHODS.md): dark - light within each training set, and each group across training sets.

Data: Fitzpatrick17k under --data-root (`python -m common.download fitzpatrick17k --root DIR`); without it, the
procedural skin phantom (common/phantom.py), and every title says PHANTOM.

    python -m vae.skintone_study                                # quick: phantom, 32 px, 10 repeats (CPU)
    python -m vae.skintone_study --scale full --data-root /data/fitzpatrick17k --out results/skintone-full   # GPU
    python -m vae.skintone_study --smoke --out smoke/skintone   # seconds
    python -m vae.skintone_report --out smoke/skintone          # the report again, from the run's files
"""
import argparse
import json
from pathlib import Path
import shutil
import time

import numpy as np
import pandas as pd

from common.cli import ArgumentParser, as_argv, positive_int, run
from common.errors import DataError
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.splits import write_sets
from common.stages import TIMES_FILE, Stages, add_study_args, parse_scaled, planned, portable
from vae.skin import SETS, draw_train_set, load_skin
from vae.skintone_report import GROUPS, write_report
from vae.train_resvae import add_args

# Every setting a scale sets, in one place (a flag given on the command line wins). quick: 10 repeats, the fewest
# whose exact sign-flip p (the report's test over repeats, smallest value 2 / 2^R) lets the 4 primary rows reach a
# Holm p below 0.01 (4 x 2 / 1024 = 0.008; 6 repeats could never go below 4 x 1/32 = 0.125); 6 took 17.3 min on
# 2 cores (docs/skintone.md), so 10 take ~29; a random VGG19 (no download; pass --pretrained for ImageNet weights). full: the paper's sizes and ImageNet VGG19. smoke: tiny, but 2 repeats so that
# the two-level bootstrap has replicates to draw.
SCALES = {
    "quick": {"size": 32, "n_test": 100, "n_train": 200, "epochs": 15, "repeats": 10, "pretrained": False,
              "width": 32, "latent_res": 8, "n_boot": 1000},
    "full": {"size": 64, "n_test": 500, "n_train": 1668, "epochs": 15, "repeats": 10, "pretrained": True,
             "width": 32, "latent_res": 8, "n_boot": 1000},
    "smoke": {"size": 16, "n_test": 8, "n_train": 24, "epochs": 1, "repeats": 2, "pretrained": False,
              "width": 8, "latent_res": 4, "n_boot": 50},
}
SIZES = ("size", "n_test", "n_train", "epochs")  # recorded in config.json and plan.json


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/skintone", SCALES)
    p.add_argument("--data-root", default=None, help="Fitzpatrick17k folder; default: the skin phantom")
    p.add_argument("--n-test", type=positive_int, help="test images per group")
    p.add_argument("--n-train", type=positive_int, help="training images per set")
    p.add_argument("--repeats", type=positive_int, help="repeats (each its own test images, training draws, models)")
    p.add_argument("--n-boot", type=positive_int, help="two-level bootstrap resamples (repeats, then test images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and of the random VGG19; the model of repeat "
                                                        "r and set s gets seed * 1000 + 10 r + ord(s)")
    add_args(p)  # the VAE's flags (vae/train_resvae.py), passed to every training stage
    args = parse_scaled(p, SCALES, argv)
    return args


def image_name(path):
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def repeat_sets(t, r, seed, n_test, n_train):
    """Repeat r's sets {name: image names}: the light and dark test images, and the training sets A, B, C drawn
    with replacement from the rest (one generator per repeat, in this order)."""
    groups = t["group"].to_numpy()
    rng = np.random.default_rng(seed + r)
    test = {g: rng.choice(np.nonzero(groups == g)[0], n_test, replace=False) for g in GROUPS}
    pool = np.setdiff1d(np.arange(len(t)), np.r_[test["light"], test["dark"]])
    idx = {**test, **{s: draw_train_set(t, pool, s, n_train, rng) for s in SETS}}
    names = np.array([image_name(i) for i in t["image"]])
    return {k: names[v] for k, v in idx.items()}


def sets_file(runs, r):
    return Path(runs) / f"repeat{r}" / "sets.csv"


def plan(stages, runs, repeats, seed, vae_flags, data_root=None, device="auto"):
    """The study's stages, added to `stages` (a dry Stages only lists them): for each repeat r and training set s,
    vae.train_resvae on set s of the repeat's split file, scoring its light and dark test images, in
    runs/repeat<r>/<s>. vae_flags: the VAE's flags as a command line (every stage gets the same). Returns the
    [(repeat, set, stage folder)] in order."""
    cells = []
    for r in range(repeats):
        for s in SETS:
            cell = Path(runs) / f"repeat{r}" / s
            stages.script("vae.train_resvae", (["--data-root", data_root] if data_root else []) + [
                "--sets", sets_file(runs, r), "--train-set", s, "--test-sets", ",".join(GROUPS), "--seed",
                seed * 1000 + r * 10 + ord(s), "--vgg-seed", seed, "--device", device, "--tag", f"repeat={r}",
                "--tag", f"train_set={s}", *vae_flags, "--out-dir", cell], cell, deps=[sets_file(runs, r)])
            cells.append((r, s, cell))
    return cells


def gather(out, cells):
    """The stages' outputs under out: preds.csv (one row per test image, training set and repeat) and
    recon/<set>.npz (repeat 0's reconstructions). Returns the VGG19 the stages used and their training arithmetic
    (bf16 autocast, fp32 or mixed: --amp auto depends on the machine), from their metrics.json."""
    df = pd.concat([pd.read_csv(cell / "preds.csv") for _, _, cell in cells], ignore_index=True)
    df.to_csv(out / "preds.csv", index=False)
    (out / "recon").mkdir(exist_ok=True)
    for r, s, cell in cells:
        if r == 0:
            shutil.copyfile(cell / "recon.npz", out / "recon" / f"{s}.npz")
    metrics = [json.loads((cell / "metrics.json").read_text()) for _, _, cell in cells]
    bf16 = {bool(m.get("bf16_autocast")) for m in metrics}
    arithmetic = "mixed (bf16 autocast in some stages, fp32 in others)" if len(bf16) > 1 else \
        "bf16 autocast (the loss terms in fp32)" if bf16 == {True} else "fp32"
    return metrics[0]["vgg"], arithmetic


def main(args):
    t0 = time.time()
    t, _, data = load_skin(args.data_root, args.size)  # inputs first: the phantom is made (once) here
    for g in GROUPS:  # every repeat draws its own test images of each group, so each needs more than n_test
        n = int((t["group"] == g).sum())
        if n <= args.n_test:
            raise DataError(f"--data-root {args.data_root}: {n} {g} images (Fitzpatrick {'I-II' if g == 'light' else 'V-VI'}); the study "
                            f"tests on --n-test {args.n_test} of them and trains on the rest: it needs more {g} "
                            f"images, or a smaller --n-test")
    runs = Path(args.runs or default_runs(args.out))
    stages = Stages(dry=True, log=runs / TIMES_FILE)
    sizes = {k: getattr(args, k) for k in SIZES}
    for r in range(args.repeats):
        sets = repeat_sets(t, r, args.seed, args.n_test, args.n_train)
        if write_sets(sets_file(runs, r), sets, dry=args.dry_run) and args.dry_run:
            stages.changed.add(sets_file(runs, r))  # a run would rewrite it: its stages would run again
    cells = plan(stages, runs, args.repeats, args.seed, as_argv(add_args, args),
                 args.data_root and portable(args.data_root), args.device)
    if planned(stages, args.dry_run, args.makefile, f"preds.csv (the stages' preds.csv together), plan.json, then "
                                                    f"vae.skintone_report: the tables and figures in {args.out}"):
        return
    out = prepare_out_dir(args.out, args.force)
    write_config(out, args, data=data, sizes={**sizes, "repeats": args.repeats})
    stages.run_all()
    vgg, arithmetic = gather(out, cells)
    stages.record(out / "stages.json")
    write_json(out / "plan.json", {"study": "skintone", "scale": args.scale, "data": data, "vgg": vgg,
                                   "arithmetic": arithmetic,
                                   "perceptual_weight": args.perceptual_weight, "sizes": sizes,
                                   "n_test": args.n_test, "repeats": args.repeats, "n_boot": args.n_boot,
                                   "seed": args.seed, "seconds": time.time() - t0})
    write_report(out)


if __name__ == "__main__":
    run(main, parse_args)
