"""The chest X-ray study of Korb & Hall ("Closing the Gender Gap in Medical Imaging with VAEs"), done so that the
classifier learns: does rebalancing a male-dominated training set with CVAE-generated female X-rays help women?

Per patient-level fold (k-fold cross-validation, so every image is tested once; stratified by sex), this script
writes the fold's split file (runs/<out>/fold<k>/sets.csv): the test patients; the rest split (by patient) into a
validation set and a training pool; n_male = min(male, female images in the pool) real male images, the same in
every condition. Then the fold's stages, each a script run as its own command (`--dry-run` prints them):
  vae.train_cvae          the CVAE, on the fold's female training-pool images (--cvae-female train_pool, as the
                          paper: it thereby sees more female images than imbalanced_real's classifier) or on the
                          imbalanced set's female images (--cvae-female imbalanced); never validation or test images
  vae.sample_cvae         n_male - n_f female images, labels drawn from the CVAE's training images
  classify.train_chexnet  --replicates classifiers per condition (seeds), each scoring the fold's test images:
      balanced_real        n_male real male + n_male real female images
      imbalanced_real      n_male male + n_f = round(n_male f / (1 - f)) real female images (f = --female-fraction)
      imbalanced_synth     imbalanced_real + the CVAE's images
      imbalanced_reweight  imbalanced_real, sampled so that each sex is half of every epoch (no generator)
    every condition gets the same number of updates (--epoch-size: epochs of the balanced set's size); the
    replicates of a cell differ only in their seed, so that the comparisons' CIs carry training noise (the CVAE is
    trained once per fold: the generator's own seed-to-seed noise is not in them)
This module is the plan: the settings of each scale (SCALES below) and the stage commands they make. The study then
gathers the stages' files into --out (preds.csv.gz, training.json, plan.json, the CVAE's figures) and calls the report
(classify/chestxray_report.py), which reads only those files: metrics from the pooled out-of-fold predictions
(bootstrap CIs over patients) and per fold (mean +- std); conditions compared paired on the same test patients.
classify/compare_study.py builds on this study's split files and cells (classify/cxr_task.py holds what both use).

    python -m classify.chestxray_study                         # quick: embedded NIH1000, 64 px, 5 folds, CPU
    python -m classify.chestxray_study --dry-run               # the stage commands, without running them
    python -m classify.chestxray_study --scale full --data-root /data/nih --out results-full/chestxray   # GPU
    python -m classify.chestxray_study --smoke --out smoke/chestxray   # seconds
    python -m classify.chestxray_report --out results/chestxray --n-boot 2000   # the report again, from the files
"""
import argparse
import json
from pathlib import Path
import shutil
import time

import pandas as pd

from classify.chestxray_report import CONDITIONS, write_report
from classify.cxr_task import CONDITION_FLAGS, FEMALE, Task, classifier_stage, fold_sets, read_data, replicate_cell
from classify.nets import MIN_SIZE, check_size
from classify.train_chexnet import add_args
from common.cli import ArgumentParser, as_argv, fraction, nonneg_int, positive_int, run
from common.data import PROJECT_DATA
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.splits import patient_kfold, write_sets
from common.stages import TIMES_FILE, Stages, add_study_args, parse_scaled, planned, portable
from common.table import check_sizes
from common.task_file import TASK_FILE, add_task_args, task_from_args, write_task_file
from fairness.plant import parse_plant, plant_label

# Every setting a scale sets, in one place (a flag given on the command line wins). quick: 2-core CPU, embedded
# NIH1000 (measured, docs/chestxray.md: cnn8 learns more from 1,000 images at 64 px than DenseNet-121 from scratch; a
# ~120-image validation set is too noisy to pick an epoch by, so a cosine schedule and the last epoch's weights);
# full: a GPU, the user's NIH data, CheXNet's DenseNet-121 with ImageNet weights and its plateau schedule;
# smoke: seconds, to test the chain (60 images of each sex).
SCALES = {
    "quick": {"folds": 5, "arch": "cnn8", "width": 16, "size": 64, "pretrained": False, "batch_size": 32,
              "epochs": 16, "schedule": "cosine", "patience": 0, "keep": "last", "cvae_epochs": 40,
              "cvae_patience": 10, "n_boot": 1000, "images_per_sex": None, "replicates": 3},
    "full": {"folds": 3, "arch": "densenet121", "width": 16, "size": 224, "pretrained": True, "batch_size": 64,
             "epochs": 40, "schedule": "plateau", "patience": 6, "keep": "best", "cvae_epochs": 100,
             "cvae_patience": 10, "n_boot": 1000, "images_per_sex": None, "replicates": 3},
    "smoke": {"folds": 2, "arch": "cnn8", "width": 8, "size": 64, "pretrained": False, "batch_size": 32,
              "epochs": 2, "schedule": "cosine", "patience": 0, "keep": "last", "cvae_epochs": 2,
              "cvae_patience": 10, "n_boot": 50, "images_per_sex": 60, "replicates": 1},
}
# each condition's classifier: its training set in the fold's split file and its extra flags


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/chestxray", SCALES)
    p.add_argument("--data-root", default=str(PROJECT_DATA / "nih_cxr14"), help="NIH images + label table")
    p.add_argument("--csv", default=None, help="label table (default: found under --data-root)")
    add_task_args(p)  # --table and its flags: your own data (common/table.py)
    p.add_argument("--folds", type=positive_int, help="patient-level cross-validation folds")
    p.add_argument("--images-per-sex", type=positive_int, help="use only the first N images of each sex (smoke)")
    p.add_argument("--val-fraction", type=fraction, default=0.15, help="share of a fold's non-test patients for validation")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="comma-separated training conditions to run (the CVAE is trained only for imbalanced_synth)")
    p.add_argument("--female-fraction", type=fraction, default=0.1, help="female share of the imbalanced training set")
    p.add_argument("--cvae-female", default="train_pool", choices=["train_pool", "imbalanced"],
                   help="which female images the CVAE trains on")
    p.add_argument("--cvae-epochs", type=positive_int, help="CVAE maximum epochs (early stopping on val loss)")
    p.add_argument("--cvae-patience", type=nonneg_int, help="CVAE early stopping patience")
    p.add_argument("--n-boot", type=positive_int, help="bootstrap resamples for CIs")
    p.add_argument("--plant", type=parse_plant, default=None, metavar="KIND:STRENGTH",
                   help="the positive control: run on a copy of the data in which the women's images carry a planted "
                        "signature (fairness/plant.py: invert:SHARE, noise:SD, blur:SIGMA; strength 0 is the planted "
                        "null), written by a first stage; every title then says PLANTED")
    p.add_argument("--replicates", type=positive_int,
                   help="classifiers per condition and fold, each with its own seed (replicate r of fold k: seed * "
                        "100 + k + 10000 r); the comparisons resample them, so their CIs carry training noise")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and subsets; fold k's CVAE gets "
                                                        "seed * 100 + k")
    add_args(p)  # the classifier's flags (classify/train_chexnet.py), passed to every classifier stage
    args = parse_scaled(p, SCALES, argv)
    args.conditions = args.conditions.split(",")
    if args.female_fraction >= 0.5:
        p.error(f"--female-fraction {args.female_fraction}: the imbalanced set has fewer women than men, so it "
                f"must be below 0.5")
    if args.table and (args.plant or args.csv):
        p.error(f"--table with {'--plant' if args.plant else '--csv'}: the positive control plants into NIH folders, "
                f"and --csv is NIH's table; a label table needs neither")
    unknown = sorted(set(args.conditions) - set(CONDITIONS))
    if unknown:
        p.error(f"--conditions: unknown {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    return args


def plan(task, folds, conditions, cvae_epochs, cvae_patience, plant=None, replicates=1):
    """The study's stages, a pure function of its settings: per fold (folds: [{n_male, n_synthetic}]) the CVAE and
    its samples (only for imbalanced_synth) and `replicates` classifiers per condition, every condition with the same
    number of updates (epochs of the balanced set's size). plant: (argv, record) of the planted copy's stage, which then
    comes first and which every other stage reads (task.data_argv names the copy)."""
    stages = Stages(dry=True)
    data_deps = []
    if plant:
        stages.output("fairness.plant", plant[0], plant[1])
        data_deps = [plant[1]]
    for k, f in enumerate(folds):
        r = task.folder(k)
        synth = r / "cvae" / "synth.npz"
        if "imbalanced_synth" in conditions:
            seed = task.seed * 100 + k
            stages.script("vae.train_cvae", [*task.data_argv, "--sets", r / "sets.csv", "--seed", seed, "--device",
                                             task.device, "--train-set", "cvae_train", "--val-set", "cvae_val",
                                             "--epochs", cvae_epochs, "--patience", cvae_patience, "--out-dir",
                                             r / "cvae"], r / "cvae", deps=[r / "sets.csv", *data_deps])
            stages.samples("vae.sample_cvae", ["--ckpt", r / "cvae" / "ckpt.pt", "--n", f["n_synthetic"], "--seed",
                                               seed, "--device", task.device, "--out", synth], synth,
                           deps=[r / "cvae" / "metrics.json"])
        for rep in range(replicates):
            for c in conditions:
                train_set, extra = CONDITION_FLAGS[c]
                extra = [a for e in extra for a in ([e, synth] if e == "--synthetic" else [e])]
                classifier_stage(stages, task, k, c, train_set, extra, f["n_male"],
                                 deps=([synth] if c == "imbalanced_synth" else []) + data_deps, replicate=rep)
    return stages


def gather(runs, folds, conditions, out, seconds, replicates=1):
    """preds.csv.gz (every classifier stage's preds.csv, fold by fold, with its replicate), training.json (counts per
    fold, fold 0's validation curves, times) and fold 0's CVAE figures in --out: the files the report reads."""
    parts, counts, curves0, bf16 = [], {c: [] for c in conditions}, {}, set()
    for rep in range(replicates):
        for k in range(folds):
            for c in conditions:
                cell = runs / f"fold{k}" / replicate_cell(c, rep)
                parts.append(pd.read_csv(cell / "preds.csv").assign(replicate=rep))
                m = json.loads((cell / "metrics.json").read_text())
                bf16.add(json.loads((cell / "config.json").read_text()).get("bf16_autocast", False))
                if rep == 0:  # the same sets in every replicate
                    counts[c].append({key: m[key] for key in ("n_train_female", "n_train_male", "n_synthetic")})
                if k == 0 and rep == 0:
                    curves0[c] = [h["val_any_auroc"] for h in m["history"]]
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv.gz", index=False, float_format="%.9g",
                                               compression={"method": "gzip", "mtime": 0})  # the same bytes each run
    cvae_bf16 = sorted({json.loads((runs / f"fold{k}" / "cvae" / "metrics.json").read_text())["bf16_autocast"]
                        for k in range(folds)}) if "imbalanced_synth" in conditions else []
    write_json(out / "training.json", {"counts_per_fold": counts, "val_any_auroc_fold0": curves0,
                                       "bf16_autocast": sorted(bf16), "cvae_bf16_autocast": cvae_bf16,
                                       "seconds": seconds})
    for name in ("samples.png", "recon.png", "loss_curve.png"):  # none without imbalanced_synth: no stale copies
        if "imbalanced_synth" in conditions and (runs / "fold0" / "cvae" / name).is_file():
            shutil.copyfile(runs / "fold0" / "cvae" / name, out / f"cvae_{name}")


def main(args):
    t0 = time.time()
    runs = Path(args.runs or default_runs(args.out))  # this --out's own tree
    table = None
    if args.table:  # your own data: checked, then written as the task file every stage reads (--data-root)
        check_size(args.arch, args.size)
        table, args.table_facts = task_from_args(args, args.folds)
        args.data_root, args.csv = str(runs / TASK_FILE), None
        check_sizes(table, MIN_SIZE[args.arch], "--table")
        task_changed = write_task_file(table, runs / TASK_FILE, dry=args.dry_run)
    t = read_data(args.data_root, args.csv, args.images_per_sex, args.size, args.folds, table)
    fold = patient_kfold(t, args.folds, seed=args.seed, stratify="sex")
    args.data_root = data_root = portable(args.data_root)  # recorded relative to the repository where it lies there
    data_argv = ("--data-root", data_root, *(["--csv", portable(args.csv)] if args.csv else []))
    plant = None
    if args.plant:  # the stages read the planted copy; the folds come from the original table (the same rows)
        copy = runs / "planted_data"
        plant = ([*data_argv, "--plant", f"{args.plant[0]}:{args.plant[1]:g}", "--group", FEMALE, "--seed",
                  args.seed, "--out", copy], copy / "plant.json")
        data_argv = ("--data-root", copy, *(["--csv", copy / Path(args.csv).name] if args.csv else []))
    task = Task(data_argv=data_argv, seed=args.seed, device=args.device,
                classifier_argv=tuple(as_argv(add_args, args)), runs=runs)
    folds, changed = [], set()
    for k in range(args.folds):
        sets, n_male, n_synthetic = fold_sets(k, fold, t, args.seed, args.val_fraction, args.female_fraction,
                                              args.cvae_female if "imbalanced_synth" in args.conditions else None,
                                              data_flag=f"--data-root {args.data_root}")
        if write_sets(task.folder(k) / "sets.csv", sets, dry=args.dry_run) and args.dry_run:
            changed.add(task.folder(k) / "sets.csv")  # a run would rewrite it: its stages would run again
        folds.append({"sets": str(task.folder(k) / "sets.csv"), "n_male": n_male, "n_synthetic": n_synthetic})
    stages = plan(task, folds, args.conditions, args.cvae_epochs, args.cvae_patience, plant, args.replicates)
    stages.log = runs / TIMES_FILE
    stages.changed = changed | ({Path(portable(runs / TASK_FILE))} if args.table and task_changed else set())
    if planned(stages, args.dry_run, args.makefile, f"preds.csv.gz (the stages' preds.csv together), the tables and "
                                                    f"figures in {args.out}"):
        return
    out = prepare_out_dir(args.out, args.force)
    data = "nih1000" if Path(args.data_root).resolve() == (PROJECT_DATA / "nih_cxr14").resolve() else \
        f"nih ({data_root})"
    if args.table:
        f = args.table_facts
        data = f"label table {portable(args.table)}: {f['minority']} vs the rest of {f['group']}, label {f['primary']}"
    if args.plant:
        data += ", " + plant_label(*args.plant, FEMALE)
    weights = "imagenet" if args.pretrained else "none (from scratch)"
    write_config(out, args, data=data, weights=weights)
    stages.run_all()
    gather(runs, args.folds, args.conditions, out, time.time() - t0, args.replicates)
    stages.record(out / "stages.json")
    write_json(out / "plan.json", {
        "study": "chestxray", "data": data, "weights": weights, "scale": args.scale, "arch": args.arch,
        "size": args.size, "pretrained": args.pretrained, "folds": args.folds, "female_fraction": args.female_fraction,
        "cvae_female": args.cvae_female, "conditions": args.conditions, "n_boot": args.n_boot, "seed": args.seed,
        "replicates": args.replicates,
        "keep": args.keep, "runs": str(runs), "data_root": str(task.data_argv[1]), "source_data_root": data_root,
        "csv": args.csv,
        "images_per_sex": args.images_per_sex, "data_argv": [str(a) for a in task.data_argv], "device": args.device,
        "plant": {k: v for k, v in json.loads(plant[1].read_text()).items() if k != "argv"} if plant else None,
        "table": {**args.table_facts, "table": portable(args.table)} if args.table else None,
        "classifier_argv": list(task.classifier_argv), "fold_sets": folds})
    return write_report(out)


if __name__ == "__main__":
    run(main, parse_args)
