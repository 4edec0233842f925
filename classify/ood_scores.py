"""Out-of-distribution scores: every row's fold classifiers rate another data set's frontal chest X-rays (CheXpert),
as in Ktena et al.; a stage of the compare study (checkpoints in, one CSV out).

Each row's score of an image is the mean any-finding probability of its fold classifiers. ood_preds.csv has one
line per image (path relative to --ood-root, patient id, sex, any-finding label) and a column p_<row> per row; the
compare report pairs the rows on these images (AUROCs and the sex gap; no DP / EO: the thresholds belong to the NIH
validation patients).

    python -m classify.ood_scores --ood-root /data/chexpert --size 64 \
        --cell imbalanced_real=runs/.../fold0/imbalanced_real/ckpt.pt --cell imbalanced_real=runs/.../fold1/... \
        --cell gan=... --out runs/.../ood_preds.csv
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from classify.nets import load_classifier
from classify.train_chexnet import Images, predict
from common.cache import load_images
from common.cli import ArgumentParser, key_files, positive_int, run
from common.data import read_chexpert
from common.errors import DataError
from common.runs import device_from, write_json


def read_ood(root, csv=None):
    """The frontal views of a CheXpert folder with sex, checked before any work."""
    ood = read_chexpert(root, csv)
    if ood["view"].notna().any():
        ood = ood[ood["view"] == "Frontal"].reset_index(drop=True)
    ood = ood[ood["sex"].isin(["F", "M"])].reset_index(drop=True)
    if ood.empty or ood["sex"].nunique() < 2:
        raise DataError(f"--ood-root {root}: no frontal images of both sexes to test on")
    return ood


def scores(ood, cells, size, device):
    """({row: mean any-finding score over its checkpoints per image}, ok): images from the mapped uint8 cache,
    converted a batch at a time; ok marks the images that decoded."""
    x, ok = load_images(ood["image"], size, "L")
    images = Images(x, np.arange(len(x)))
    return {row: np.mean([predict(load_classifier(c)[0].to(device), images, device)[:, -1] for c in ckpts], 0)
            for row, ckpts in cells.items()}, ok


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ood-root", required=True, help="a CheXpert folder (train.csv and its images)")
    p.add_argument("--ood-csv", default=None, help="its label table (default: train.csv there)")
    p.add_argument("--cell", action="append", default=[], metavar="ROW=CKPT",
                   help="a classifier of a row (repeat per fold and replicate: --cell gan=f0.pt --cell gan=f1.pt)")
    p.add_argument("--size", type=positive_int, required=True, help="the classifiers' input size")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, help="the CSV this stage writes (its command goes to <out>.json)")
    p.add_argument("--force", action="store_true", help="replace --out")
    return p.parse_args(argv)


def main(args):
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"--out {out} exists (pass --force to replace it)")
    ood = read_ood(args.ood_root, args.ood_csv)
    cells = key_files(args.cell, "--cell")
    s, ok = scores(ood, cells, args.size, device_from(args.device))
    root = Path(args.ood_root).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image": [os.path.relpath(Path(i).resolve(), root) for i in ood["image"][ok]],
                  "patient_id": ood["patient_id"].to_numpy()[ok], "sex": ood["sex"].to_numpy()[ok],
                  "y_any_finding": 1 - ood["label:No Finding"].to_numpy()[ok].astype(float),
                  **{f"p_{row}": v[ok] for row, v in s.items()}}).to_csv(out, index=False, float_format="%.9g")
    write_json(out.with_suffix(".json"), {"argv": ["classify.ood_scores", *sys.argv[1:]]})


if __name__ == "__main__":
    run(main, parse_args)
