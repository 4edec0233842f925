"""Fidelity and privacy of one fold's generators, per sex: a stage of the compare study (files in, JSON out).

Fidelity: KID and FD (docs/METHODS.md, "Statistics for comparisons") in the penultimate features of the fold's
imbalanced_real classifier (--features), each row's samples against the fold's real test images of that sex, every
row and sex at one n (the smallest of the real test sexes and of every samples set); features standardised by the
real test images' (both sexes) mean and sd, features constant on them left out. Privacy: fairness.memorization's
audit of each row's samples of a sex against the fold's training-pool images of that sex (its reference: distances
between different patients of the pool); real held-out test images (row real_heldout) as the yardstick.

    python -m classify.generator_audit --data-root data/nih_cxr14 --sets runs/.../fold0/sets.csv \
        --pool-sets runs/.../fold0/compare_sets.csv --features runs/.../fold0/imbalanced_real/ckpt.pt \
        --samples gan=runs/.../fold0/gan/samples_F.npz,runs/.../fold0/gan/samples_M.npz --out runs/.../fold0/audit.json
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from classify.nets import load_feature_extractor
from common.cache import load_images
from common.cli import ArgumentParser, key_files, run
from common.task_file import read_cxr
from common.errors import DataError
from common.runs import device_from, write_json
from common.splits import read_sets
from fairness.compare import fd_equal_n, kid
from fairness.fid import extract
from fairness.memorization import audit, closest_pairs_png

FEMALE, MALE = "F", "M"


def samples_by_sex(files):
    """{sex: uint8 images} of a row's samples files (the CVAE's, without groups, are women's); a finding-only
    model's samples (group 'any') have no sex and are left out."""
    images, groups = [], []
    for f in files:
        with np.load(f) as z:
            images.append(z["images"])
            groups.append(z["groups"] if "groups" in z.files else np.full(len(z["images"]), FEMALE))
    images, groups = np.concatenate(images), np.concatenate(groups)
    return {s: images[groups == s] for s in (FEMALE, MALE) if (groups == s).any()}


def standardiser(f_real):
    """f -> f standardised by the real test features' (both sexes) mean and sd, near-constant features left out."""
    both = np.concatenate(list(f_real.values()))
    mu, sd = both.mean(0), both.std(0)
    keep = sd > 1e-3 * np.median(sd[sd > 0]) if (sd > 0).any() else sd >= 0
    return lambda f: (f[:, keep] - mu[keep]) / sd[keep]


def audit_fold(net, x_test, sex_test, x_pool, sex_pool, pid_pool, fakes, seed, device, pairs_dir=None):
    """{row: {sex: {kid, fd, copies, nn, single}}} and the common n; closest-pair figures of the female samples in
    pairs_dir (fold 0's)."""
    real = {s: x_test[sex_test == s] for s in (FEMALE, MALE)}
    fakes = {**fakes, "real_heldout": real}
    n = min([len(v) for v in real.values()] + [len(v) for r, f in fakes.items() if r != "real_heldout"
                                               for v in f.values()])
    f_real = {s: extract(net, x, device=device) for s, x in real.items()}
    scale = standardiser(f_real)
    result = {}
    for row, by_sex in fakes.items():
        for s, fake in by_sex.items():
            pool = sex_pool == s
            cell = result.setdefault(row, {}).setdefault(s, {})
            if row != "real_heldout":
                fr, ff = scale(f_real[s]), scale(extract(net, fake, device=device))
                cell["kid"] = kid(fr, ff, n_subsets=50, subset_size=n, seed=seed)["mean"]
                cell["fd"] = fd_equal_n(fr, ff, n=n, seed=seed)["fd"]
            a, order, idx, d1 = audit(fake, x_pool[pool], seed=seed, train_patients=pid_pool[pool])
            cell.update(copies=a["fraction_closer_than_train_p1"], nn=a["pixel_nn_rmse"]["median"],
                        single=a["fraction_d1_below_d2_over_3"])
            if pairs_dir and s == FEMALE and row != "real_heldout":
                closest_pairs_png(fake, x_pool[pool], order, idx, d1, Path(pairs_dir) / f"closest_pairs_{row}.png",
                                  title=f"{row}: the 8 female samples closest to a training-pool image (fold 0; "
                                        f"sample | training image)")
    return result, n


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="NIH images + label table (the study's)")
    p.add_argument("--csv", default=None, help="label table (default: found under --data-root)")
    p.add_argument("--sets", required=True, help="the fold's split file: its 'test' set is the real reference")
    p.add_argument("--pool-sets", required=True, help="the fold's compare split file: its 'pool' set is what the "
                                                      "generators trained on")
    p.add_argument("--features", required=True, help="classifier checkpoint whose penultimate features KID/FD use")
    p.add_argument("--samples", action="append", default=[], metavar="ROW=FILE",
                   help="a samples file of a generator row (repeat per file: --samples gan=a.npz --samples gan=b.npz)")
    p.add_argument("--size", type=int, default=64, help="image side the audit compares at")
    p.add_argument("--seed", type=int, default=0, help="seed of the KID subsets, the FD subsample and the audit")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--pairs-dir", default=None, help="write closest_pairs_<row>.png of the female samples here")
    p.add_argument("--out", required=True, help="the JSON this stage writes")
    p.add_argument("--force", action="store_true", help="replace --out")
    return p.parse_args(argv)


def main(args):
    if Path(args.out).exists() and not args.force:
        raise DataError(f"--out {args.out} exists (pass --force to replace it)")
    t = read_cxr(args.data_root, args.csv)
    names = np.array([Path(i).name for i in t["image"]])
    test = read_sets(args.sets, names, ["test"])["test"]
    pool = read_sets(args.pool_sets, names, ["pool"], flag="--pool-sets")["pool"]
    x_test, _ = load_images(t["image"].iloc[test], args.size, "L")
    x_pool, _ = load_images(t["image"].iloc[pool], args.size, "L")
    sex, pid = t["sex"].to_numpy(), t["patient_id"].to_numpy()
    fakes = {row: samples_by_sex(files) for row, files in key_files(args.samples, "--samples").items()}
    net, _ = load_feature_extractor(args.features)
    result, n = audit_fold(net, np.asarray(x_test), sex[test], np.asarray(x_pool), sex[pool], pid[pool], fakes,
                           args.seed, device_from(args.device), args.pairs_dir)
    write_json(args.out, {"argv": ["classify.generator_audit", *sys.argv[1:]], "n": n, "rows": result})


if __name__ == "__main__":
    run(main, parse_args)
