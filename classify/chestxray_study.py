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
  classify.train_chexnet  one classifier per condition, each scoring the fold's test images (preds.csv):
      balanced_real        n_male real male + n_male real female images
      imbalanced_real      n_male male + n_f = round(n_male f / (1 - f)) real female images (f = --female-fraction)
      imbalanced_synth     imbalanced_real + the CVAE's images
      imbalanced_reweight  imbalanced_real, sampled so that each sex is half of every epoch (no generator)
    every condition gets the same number of updates (--epoch-size: epochs of the balanced set's size)
The report reads only files: the stages' preds.csv (gathered into --out/preds.csv) and metrics.json. Metrics come
from the pooled out-of-fold predictions (bootstrap CIs over patients) and per fold (mean +- std); conditions are
compared paired on the same test patients (comparisons.md). The settings of each scale are in SCALES below.

    python -m classify.chestxray_study                         # quick: embedded NIH1000, 64 px, 5 folds, CPU
    python -m classify.chestxray_study --dry-run               # the stage commands, without running them
    python -m classify.chestxray_study --scale full --data-root /data/nih --out results-full/chestxray   # GPU
    python -m classify.chestxray_study --smoke --out smoke/chestxray   # seconds
"""
import argparse
import json
from pathlib import Path
import time

import numpy as np
import pandas as pd

from classify.train_chexnet import OUTPUTS, add_args, col, per_output_table
from common.cli import ArgumentParser, as_argv, fraction, nonneg_int, positive_int, run
from common.cache import load_images
from common.data import PROJECT_DATA, read_nih
from common.errors import DataError
from common.report import mean_std, with_ci, write_table
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.splits import patient_kfold, patient_split, write_sets
from common.stages import Stages, add_study_args, parse_scaled, planned
from fairness.figures import bars, lines
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, fmt_p, gap_permutation,
                              paired_difference, with_holm)
from fairness.metrics import auroc, binary_stats, bootstrap, demographic_parity, equal_opportunity

CONDITIONS = ["balanced_real", "imbalanced_real", "imbalanced_synth", "imbalanced_reweight"]
# CheXNet (Rajpurkar et al. 2017) reference AUROCs we can cite per class (docs/METHODS.md); mean 0.841
CHEXNET_REF = {"Infiltration": 0.71, "Emphysema": 0.94}
# Every setting a scale sets, in one place (a flag given on the command line wins). quick: 2-core CPU, embedded
# NIH1000 (measured, README: cnn8 learns more from 1,000 images at 64 px than DenseNet-121 from scratch; a
# ~120-image validation set is too noisy to pick an epoch by, so a cosine schedule and the last epoch's weights);
# full: a GPU, the user's NIH data, CheXNet's DenseNet-121 with ImageNet weights and its plateau schedule;
# smoke: seconds, to test the chain (60 images of each sex).
SCALES = {
    "quick": {"folds": 5, "arch": "cnn8", "width": 16, "size": 64, "pretrained": False, "batch_size": 32,
              "epochs": 16, "schedule": "cosine", "patience": 0, "keep": "last", "cvae_epochs": 40,
              "cvae_patience": 10, "n_boot": 1000, "images_per_sex": None},
    "full": {"folds": 3, "arch": "densenet121", "width": 16, "size": 224, "pretrained": True, "batch_size": 64,
             "epochs": 40, "schedule": "plateau", "patience": 6, "keep": "best", "cvae_epochs": 100,
             "cvae_patience": 10, "n_boot": 1000, "images_per_sex": None},
    "smoke": {"folds": 2, "arch": "cnn8", "width": 8, "size": 64, "pretrained": False, "batch_size": 32,
              "epochs": 2, "schedule": "cosine", "patience": 0, "keep": "last", "cvae_epochs": 2,
              "cvae_patience": 10, "n_boot": 50, "images_per_sex": 60},
}


def add_flags(p, conditions=True):
    """The study's flags after add_study_args (shared with classify/compare_study.py, whose stages reuse these
    cells: the same flags make the same stage commands); conditions=False leaves out --conditions and
    --report-only."""
    p.add_argument("--data-root", default=str(PROJECT_DATA / "nih_cxr14"), help="NIH images + label table")
    p.add_argument("--csv", default=None, help="label table (default: found under --data-root)")
    p.add_argument("--folds", type=positive_int, help="patient-level cross-validation folds")
    p.add_argument("--images-per-sex", type=positive_int, help="use only the first N images of each sex (smoke)")
    p.add_argument("--val-fraction", type=fraction, default=0.15, help="share of a fold's non-test patients for validation")
    if conditions:
        p.add_argument("--conditions", default=",".join(CONDITIONS),
                       help="comma-separated training conditions to run (the CVAE is trained only for "
                            "imbalanced_synth)")
    p.add_argument("--female-fraction", type=fraction, default=0.1, help="female share of the imbalanced training set")
    p.add_argument("--cvae-female", default="train_pool", choices=["train_pool", "imbalanced"],
                   help="which female images the CVAE trains on")
    p.add_argument("--cvae-epochs", type=positive_int, help="CVAE maximum epochs (early stopping on val loss)")
    p.add_argument("--cvae-patience", type=nonneg_int, help="CVAE early stopping patience")
    p.add_argument("--n-boot", type=positive_int, help="bootstrap resamples for CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and subsets; fold k's models get "
                                                        "seed * 100 + k")
    if conditions:
        p.add_argument("--report-only", action="store_true",
                       help="train nothing: rebuild the tables, figures, comparisons and summary.json of an existing "
                            "--out from its preds.csv and training.json (e.g. with another --n-boot)")
    add_args(p)  # the classifier's flags (classify/train_chexnet.py), passed to every classifier stage
    return p


def check_female_fraction(p, args):
    if args.female_fraction >= 0.5:
        p.error(f"--female-fraction {args.female_fraction}: the imbalanced set has fewer women than men, so it "
                f"must be below 0.5")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/chestxray", SCALES)
    add_flags(p)
    args = parse_scaled(p, SCALES, argv)
    args.conditions = args.conditions.split(",")
    check_female_fraction(p, args)
    unknown = sorted(set(args.conditions) - set(CONDITIONS))
    if unknown:
        p.error(f"--conditions: unknown {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    return args


def fold_sets(k, fold, t, args):
    """Fold k's sets {name: image names}: test, val, and the conditions' training sets (male images first, then
    female), plus the CVAE's female training and validation images."""
    rng = np.random.default_rng(args.seed * 100 + k)
    test = fold == k
    rest = np.nonzero(~test)[0]
    inner = patient_split(t.iloc[rest], fractions=(1 - args.val_fraction, args.val_fraction), names=("pool", "val"),
                          seed=args.seed * 100 + k, stratify="sex")
    pool, val = rest[inner == "pool"], rest[inner == "val"]
    sex = t["sex"].to_numpy()
    males, females = pool[sex[pool] == "M"], pool[sex[pool] == "F"]
    if len(males) == 0 or len(females) == 0:
        raise DataError(f"--data-root {args.data_root}: fold {k}'s training pool has {len(females)} female and "
                        f"{len(males)} male images; the study compares the sexes, so the data need both (or use "
                        f"fewer --folds)")
    n_male = min(len(males), len(females))
    male_set = rng.choice(males, n_male, replace=False)
    female_bal = rng.choice(females, n_male, replace=False)
    n_f = int(round(n_male * args.female_fraction / (1 - args.female_fraction)))
    female_imb = female_bal[:n_f]
    idx = {"test": np.nonzero(test)[0], "val": val, "balanced": np.r_[male_set, female_bal],
           "imbalanced": np.r_[male_set, female_imb]}
    if "imbalanced_synth" in args.conditions:
        idx.update(cvae_val=val[sex[val] == "F"],
                   cvae_train=females if args.cvae_female == "train_pool" else female_imb)
    names = np.array([Path(i).name for i in t["image"]])
    return {name: names[i] for name, i in idx.items()}, n_male, n_male - n_f


# each condition's classifier: its training set in the fold's split file and its extra flags
CONDITION_FLAGS = {"balanced_real": ("balanced", []), "imbalanced_real": ("imbalanced", []),
                   "imbalanced_synth": ("imbalanced", ["--synthetic"]),
                   "imbalanced_reweight": ("imbalanced", ["--balance-sex"])}


def fold_stages(k, sets_file, n_male, n_synthetic, args, runs, stages):
    """Fold k's stage commands: the CVAE and its samples (only for imbalanced_synth), one classifier per condition.
    Every condition gets the same number of updates: epochs of the balanced set's size (--epoch-size 2 n_male)."""
    seed = args.seed * 100 + k
    r = runs / f"fold{k}"
    data = ["--data-root", args.data_root] + (["--csv", args.csv] if args.csv else [])
    common = ["--sets", sets_file, "--seed", seed, "--device", args.device]
    synth = r / "cvae" / "synth.npz"
    if "imbalanced_synth" in args.conditions:
        stages.script("vae.train_cvae", data + common + ["--train-set", "cvae_train", "--val-set", "cvae_val",
                                                         "--epochs", args.cvae_epochs, "--patience",
                                                         args.cvae_patience, "--out-dir", r / "cvae"],
                      r / "cvae", deps=[sets_file])
        stages.samples("vae.sample_cvae", ["--ckpt", r / "cvae" / "ckpt.pt", "--n", n_synthetic, "--seed", seed,
                                           "--device", args.device, "--out", synth], synth,
                       deps=[r / "cvae" / "metrics.json"])
    for c in args.conditions:
        train_set, extra = CONDITION_FLAGS[c]
        extra = [a for e in extra for a in ([e, synth] if e == "--synthetic" else [e])]
        classifier(k, c, train_set, extra, sets_file, n_male, args, runs, stages,
                   deps=[synth] if c == "imbalanced_synth" else [])


def classifier(k, cell, train_set, extra, sets_file, n_male, args, runs, stages, deps=()):
    """Fold k's classifier stage `cell` (runs/fold<k>/<cell>): trained on the split file's set train_set with the
    stage flags `extra`, the fold's validation and test sets, 2 n_male samples per epoch and the study's classifier
    flags; also the stage of every classify/compare_study.py row."""
    r = runs / f"fold{k}"
    data = ["--data-root", args.data_root] + (["--csv", args.csv] if args.csv else [])
    stages.script("classify.train_chexnet", data + [
        "--sets", sets_file, "--seed", args.seed * 100 + k, "--device", args.device, "--train-set", train_set,
        "--val-set", "val", "--test-set", "test", *extra, "--epoch-size", 2 * n_male, "--tag", f"fold={k}",
        "--tag", f"condition={cell}", *as_argv(add_args, args), "--out-dir", r / cell], r / cell,
        deps=[sets_file, *deps])


def main(args):
    t0 = time.time()
    if args.report_only:
        out = Path(args.out)
        for f in ("preds.csv", "training.json", "config.json"):
            if not (out / f).is_file():
                raise DataError(f"--out {out}: no {f} here; --report-only rebuilds a finished run's report (run the "
                                f"study without it first)")
        made = json.loads((out / "config.json").read_text())
        # the run's own command (conditions, folds, size...) parsed again, with this command's --n-boot and --out
        args = parse_args(made["argv"][1:] + ["--n-boot", str(args.n_boot), "--out", args.out, "--report-only"])
        return report(out, args, args.runs or default_runs(args.out), made.get("data", "?"), made.get("weights", "?"))
    t = read_nih(args.data_root, args.csv)  # inputs first: a bad --data-root stops before anything is written
    if args.images_per_sex:
        t = t.groupby("sex", group_keys=False).head(args.images_per_sex).reset_index(drop=True)
    _, ok = load_images(t["image"], args.size, "L")  # an unreadable image is named in a warning and left out
    t = t[ok].reset_index(drop=True)
    n_patients = t["patient_id"].nunique()
    if args.folds < 2 or args.folds > n_patients:
        raise DataError(f"--folds {args.folds}: cross-validation needs 2 to {n_patients} folds here (one per "
                        f"patient at most)")
    fold = patient_kfold(t, args.folds, seed=args.seed, stratify="sex")
    runs = Path(args.runs or default_runs(args.out))  # this --out's own tree
    stages = Stages(dry=args.dry_run or bool(args.makefile))
    if not stages.dry:
        out = prepare_out_dir(args.out, args.force)
        data = "nih1000" if str(args.data_root) == str(PROJECT_DATA / "nih_cxr14") else f"nih ({args.data_root})"
        weights = "imagenet" if args.pretrained else "none (from scratch)"
        write_config(out, args, data=data, weights=weights)
    for k in range(args.folds):
        if not stages.dry:
            print(f"fold {k + 1}/{args.folds} ({time.time() - t0:.0f} s)", flush=True)
        sets, n_male, n_synthetic = fold_sets(k, fold, t, args)
        sets_file = runs / f"fold{k}" / "sets.csv"
        if write_sets(sets_file, sets, dry=args.dry_run) and args.dry_run:
            stages.changed.add(sets_file)  # a run would rewrite it: its stages would run again
        fold_stages(k, sets_file, n_male, n_synthetic, args, runs, stages)
    if planned(stages, args, f"preds.csv (the stages' preds.csv together), the tables and figures in {args.out}"):
        return
    gather(runs, args, out, time.time() - t0, stages)
    report(out, args, runs, data, weights)


def gather(runs, args, out, seconds, stages):
    """preds.csv (every classifier stage's preds.csv, fold by fold) and training.json (counts per fold, fold 0's
    validation curves, times) in --out: the files the report reads."""
    parts, counts, curves0, bf16 = [], {c: [] for c in args.conditions}, {}, set()
    for k in range(args.folds):
        for c in args.conditions:
            cell = runs / f"fold{k}" / c
            parts.append(pd.read_csv(cell / "preds.csv"))
            m = json.loads((cell / "metrics.json").read_text())
            bf16.add(json.loads((cell / "config.json").read_text()).get("bf16_autocast", False))
            counts[c].append({key: m[key] for key in ("n_train_female", "n_train_male", "n_synthetic")})
            if k == 0:
                curves0[c] = [h["val_any_auroc"] for h in m["history"]]
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv", index=False, float_format="%.9g")
    write_json(out / "training.json", {"counts_per_fold": counts, "val_any_auroc_fold0": curves0,
                                       "bf16_autocast": sorted(bf16), "seconds": seconds})
    write_json(out / "stages.json", {"stages": stages.commands, "reused": stages.reused})


def read_preds(path, conditions):
    """preds.csv -> (per-image table in one order, {condition: (Y, scores, thresholds, fold)}); every condition must
    score the same images (the pairing of every comparison)."""
    df = pd.read_csv(path)
    first = None
    arrays = {}
    for c in conditions:
        d = df[df["condition"] == c].sort_values("image").reset_index(drop=True)
        if first is None:
            first = d
        if not d["image"].equals(first["image"]):
            raise DataError(f"{path}: condition {c} scores other images than {conditions[0]}; a paired comparison "
                            f"needs the same test images (rerun the study)")
        arrays[c] = tuple(d[[f"{k}_{col(o)}" for o in OUTPUTS]].to_numpy(float) for k in ("y", "p", "thr")) + \
            (d["fold"].to_numpy(),)
    return first, arrays


def metrics_of(Y, p, dec, sex, findings):
    """The per-condition statistics of rows idx: any-finding AUROC overall and by sex, M - F gap, mean AUROC, DP, EO."""
    def stat(idx):
        fi, mi = idx[sex[idx] == "F"], idx[sex[idx] == "M"]
        s = {"any_auroc": auroc(Y[idx, 14], p[idx, 14]),
             "mean_auroc": float(np.nanmean([auroc(Y[idx, j], p[idx, j]) for j in findings])),
             "any_auroc_female": auroc(Y[fi, 14], p[fi, 14]), "any_auroc_male": auroc(Y[mi, 14], p[mi, 14]),
             "dp": demographic_parity(dec[idx, 14].astype(int), sex[idx]),
             "eo": equal_opportunity(Y[idx, 14].astype(int), dec[idx, 14].astype(int), sex[idx])}
        s["any_auroc_gap"] = s["any_auroc_male"] - s["any_auroc_female"]
        return s
    return stat


# the study's questions: each condition against the imbalanced baseline, and synthetic against real women
PAIRS = [("balanced_real", "imbalanced_real"), ("imbalanced_synth", "imbalanced_real"),
         ("imbalanced_reweight", "imbalanced_real"), ("imbalanced_synth", "balanced_real")]
COMPARED = {"any_auroc_female": "female AUROC", "any_auroc_male": "male AUROC",
            "any_auroc_gap": "AUROC gap (M - F)", "any_auroc_abs_gap": "|AUROC gap|", "any_auroc": "any-finding AUROC"}


def auroc_stat(Y, p, sex, key):
    """f(idx) -> the any-finding AUROC named by key (overall, female, male, or the M - F gap) on rows idx."""
    def on(idx, who=None):
        idx = idx if who is None else idx[sex[idx] == who]
        return auroc(Y[idx, 14], p[idx, 14])
    return {"any_auroc": on, "any_auroc_female": lambda idx: on(idx, "F"), "any_auroc_male": lambda idx: on(idx, "M"),
            "any_auroc_gap": lambda idx: on(idx, "M") - on(idx, "F"),
            "any_auroc_abs_gap": lambda idx: abs(on(idx, "M") - on(idx, "F"))}[key]


def comparisons(arrays, sex, pid, args):
    """Paired differences on the same out-of-fold test patients (patient-clustered bootstrap), Holm over the table."""
    rows = []
    for a, b in PAIRS:
        if a in arrays and b in arrays:
            for key, name in COMPARED.items():
                r = paired_difference(auroc_stat(*arrays[a][:2], sex, key), auroc_stat(*arrays[b][:2], sex, key),
                                      clusters=pid, n_boot=args.n_boot, seed=args.seed)
                rows.append(comparison(name, a, b, r))
    return with_holm(rows)


def permutation_or_nan(stat_group, sex, pid, args):
    """gap_permutation, or NaNs with the reason where a patient has images under both sexes (no permutation of sex
    across patients then)."""
    try:
        return gap_permutation(stat_group, sex, pid, args.n_boot, args.seed)
    except ValueError as e:
        return {"gap": float("nan"), "p": float("nan"), "null_median": float("nan"), "excess": float("nan"),
                "method": str(e)}


def gap_cell(point, perm):
    return f"{point:.3f} (perm. p {fmt_p(perm['p'])}, excess {perm['excess']:+.3f})"


def answers(rows, args):
    """The study's question, answered in one sentence per comparison that asks it."""
    find = {(r["metric"], r["a"], r["b"]): r for r in rows}
    out = []
    for (metric, a, b), what in [(("female AUROC", "imbalanced_synth", "imbalanced_real"),
                                  "Do CVAE-generated female X-rays help women? Female AUROC, synthetic minus imbalanced"),
                                 (("|AUROC gap|", "imbalanced_synth", "imbalanced_real"),
                                  "Do they narrow the sex gap? |AUROC M - F|, synthetic minus imbalanced"),
                                 (("female AUROC", "balanced_real", "imbalanced_real"),
                                  "Do more real women help women? Female AUROC, balanced minus imbalanced")]:
        if (metric, a, b) in find:
            out.append(answer(find[(metric, a, b)], what))
    return out


def report(out, args, runs, data, weights):
    """Tables, figures and summary.json from the files alone: preds.csv and training.json in --out."""
    training = json.loads((out / "training.json").read_text())
    counts, curves0, seconds = training["counts_per_fold"], training["val_any_auroc_fold0"], training["seconds"]
    t, arrays = read_preds(out / "preds.csv", args.conditions)
    sex, pid = t["sex"].to_numpy(), t["patient_id"].to_numpy()
    Y = arrays[args.conditions[0]][0]
    findings = [j for j in range(14) if Y[:, j].sum() >= 5]
    summary = {"data": data, "pretrained": args.pretrained, "scale": args.scale,
               "model": args.arch, "size": args.size, "folds": args.folds, "female_fraction": args.female_fraction,
               "cvae_female": args.cvae_female, "n_images": len(t), "n_patients": int(t["patient_id"].nunique()),
               "seconds": seconds, "conditions": {}}
    fair_rows = []
    for c in args.conditions:
        _, p, th, fold = arrays[c]
        dec = p >= th
        stat = metrics_of(Y, p, dec, sex, findings)
        point = stat(np.arange(len(Y)))
        ci = bootstrap(stat, len(Y), clusters=pid, n_boot=args.n_boot, seed=args.seed)
        per_fold = [per_output_table(Y[fold == k], p[fold == k], th[fold == k][0]) for k in range(args.folds)]
        # DP and EO are max - min gaps (>= 0): a percentile CI cannot contain 0, so each gets a permutation p
        yany, dany = Y[:, 14].astype(bool), dec[:, 14]
        dp_perm = permutation_or_nan(lambda idx: dany[idx].mean() if len(idx) else np.nan, sex, pid, args)
        eo_perm = permutation_or_nan(lambda idx: dany[idx][yany[idx]].mean() if yany[idx].any() else np.nan, sex,
                                     pid, args)
        cnt = pd.DataFrame(counts[c]).mean().to_dict()
        pooled = [binary_stats(Y[:, j], dec[:, j]) for j in range(len(OUTPUTS))]  # each image at its fold's threshold
        sens_ok = all(pooled[j]["sensitivity"] > 0 for j in findings)
        summary["conditions"][c] = {
            "any_auroc": point["any_auroc"], "any_auroc_ci": list(ci["any_auroc"]),
            "any_auroc_female": point["any_auroc_female"], "any_auroc_female_ci": list(ci["any_auroc_female"]),
            "any_auroc_male": point["any_auroc_male"], "any_auroc_male_ci": list(ci["any_auroc_male"]),
            "any_auroc_gap": point["any_auroc_gap"], "any_auroc_gap_ci": list(ci["any_auroc_gap"]),
            "mean_auroc": point["mean_auroc"], "mean_auroc_ci": list(ci["mean_auroc"]),
            "dp_any": point["dp"], "dp_any_permutation": dp_perm, "eo_any": point["eo"],
            "eo_any_permutation": eo_perm,
            "any_auroc_per_fold": [pf[-1]["auroc"] for pf in per_fold],
            "n_train_female": cnt["n_train_female"], "n_train_male": cnt["n_train_male"],
            "n_synthetic": cnt["n_synthetic"], "score_std_any": float(p[:, 14].std()),
            "sensitivity_above_0_every_finding_5plus": sens_ok,
            "pooled_sensitivity": {OUTPUTS[j]: pooled[j]["sensitivity"] for j in range(len(OUTPUTS))},
            "pooled_specificity": {OUTPUTS[j]: pooled[j]["specificity"] for j in range(len(OUTPUTS))}}
        rows = []
        for j, name in enumerate(OUTPUTS):
            vals = {m: [pf[j][m] for pf in per_fold] for m in ("auroc", "accuracy", "sensitivity", "specificity")}
            ref = "0.50 (collapse)" if j < 14 else "n/a"
            pa = auroc(Y[:, j], p[:, j])
            rows.append([name, mean_std(vals["auroc"]), f"{pa:.3f}", mean_std(vals["accuracy"]),
                         mean_std(vals["sensitivity"]), f"{pooled[j]['sensitivity']:.2f}", mean_std(vals["specificity"]),
                         f"{pooled[j]['specificity']:.2f}", f"{int(Y[:, j].sum())}:{int(len(Y) - Y[:, j].sum())}", ref,
                         CHEXNET_REF.get(name, "")])
        write_table(out / f"table_{c}", ["finding", "AUC (folds)", "AUC (pooled)", "accuracy (folds)",
                                         "sensitivity (folds)", "sensitivity (pooled)", "specificity (folds)",
                                         "specificity (pooled)", "class ratio (pos:neg)", "Korb & Hall AUC",
                                         "CheXNet AUC"], rows,
                    title=f"{c}: per finding, mean ± std over {args.folds} patient-level folds ({data}, "
                          f"{args.size} px, {args.arch}, weights: {weights})",
                    notes=["Folds: mean ± std of the per-fold test metrics; pooled: all out-of-fold predictions "
                           "together. Thresholds per finding are chosen on each fold's validation patients "
                           "(Youden's J), never 0.5. Korb & Hall's classifier "
                           "gave ~0.50 AUC and sensitivity 0 on every finding (a collapse); CheXNet's published "
                           "mean is 0.841 on the full data set at 224 px with ImageNet weights."])
        fair_rows.append([c, with_ci(point["any_auroc"], ci["any_auroc"]),
                          with_ci(point["any_auroc_female"], ci["any_auroc_female"]),
                          with_ci(point["any_auroc_male"], ci["any_auroc_male"]),
                          with_ci(point["any_auroc_gap"], ci["any_auroc_gap"]),
                          gap_cell(point["dp"], dp_perm), gap_cell(point["eo"], eo_perm),
                          with_ci(point["mean_auroc"], ci["mean_auroc"]),
                          f"{cnt['n_train_female']:.0f} / {cnt['n_train_male']:.0f} / {cnt['n_synthetic']:.0f}"])
    write_table(out / "fairness", ["condition", "any-finding AUROC", "female", "male", "gap (M - F)",
                                   "DP (any finding)", "EO (any finding)", "mean AUROC (findings, >=5 pos)",
                                   "train F / M / synthetic F"], fair_rows,
                title=f"Any finding vs No Finding by sex, pooled out-of-fold predictions ({data}, {len(t)} images, "
                      f"{t['patient_id'].nunique()} patients, {args.folds} folds)",
                notes=["95% CIs: percentile bootstrap over patients (" + str(args.n_boot) + " resamples), one "
                       "training run per fold (the CIs carry test sampling, not training noise). DP and EO are "
                       "between-sex differences of the any-finding decision at each fold's validation threshold "
                       "(fractions; x100 for FairGen's scale); being |M - F| they get no percentile CI (it cannot "
                       "contain 0) but a permutation p (sex shuffled across patients; not Holm-corrected) and the gap's "
                       "excess over the null median. Compare conditions with comparisons.md (paired), not by overlapping CIs. "
                       "Reference (Larrazabal et al. 2020, full NIH, "
                       "DenseNet-121): the under-represented sex loses ~0.02-0.025 mean AUC.",
                       "Classifier training arithmetic: " + {(True,): "bf16 autocast (--amp auto on a CPU or GPU with "
                       "bf16 instructions; evaluation in fp32)", (False,): "fp32"}.get(
                           tuple(training.get("bf16_autocast", [False])), "mixed (bf16 in some stages, fp32 in others)"),
                       (f"CVAE trained on: {args.cvae_female} female images of each fold (never test or "
                        f"validation images). " if "imbalanced_synth" in args.conditions else "")
                       + f"Classifier weights: {weights}."])
    bars({c: {"female": (summary["conditions"][c]["any_auroc_female"], summary["conditions"][c]["any_auroc_female_ci"]),
              "male": (summary["conditions"][c]["any_auroc_male"], summary["conditions"][c]["any_auroc_male_ci"])}
          for c in args.conditions}, out / "auroc_by_sex.png",
         f"Any-finding AUROC by sex, 95% CI ({data}, {args.arch}, {args.size}px)", "AUROC")
    fold0 = Path(runs) / "fold0" / "cvae"  # this run's CVAE figures (none without imbalanced_synth: no stale copies)
    for name in ("samples.png", "recon.png", "loss_curve.png"):
        if "imbalanced_synth" in args.conditions and (fold0 / name).is_file():
            (out / f"cvae_{name}").write_bytes((fold0 / name).read_bytes())
    lines({c: dict(enumerate(v, 1)) for c, v in curves0.items()}, out / "classifier_val_auroc.png",
          "Validation any-finding AUROC per epoch (fold 0)", "epoch", "AUROC")
    summary["comparisons"] = comparisons(arrays, sex, pid, args)
    summary["answers"] = answers(summary["comparisons"], args)
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(summary["comparisons"]),
                title=f"Paired comparisons of conditions on the same out-of-fold test patients ({data}, {len(t)} "
                      f"images, {t['patient_id'].nunique()} patients)",
                notes=[f"a - b on the pooled out-of-fold any-finding scores; 95% CI and p from a patient-clustered "
                       f"paired bootstrap ({args.n_boot} resamples, percentile); p (Holm) over the "
                       f"{len(summary['comparisons'])} rows; MDE = (1.96 + 0.84) x bootstrap SE, the smallest "
                       f"difference this design detects with 80% power. One training run per condition and fold: "
                       f"training noise is not in the CI. Recompute from preds.csv."] + summary["answers"])
    write_json(out / "summary.json", summary)
    print(open(out / "comparisons.md").read())
    print(open(out / "fairness.md").read())
    print(f"wall time of this invocation {seconds / 60:.1f} min (stages it reused not counted: `time make chestxray` "
          f"measures the whole study)")
    return summary


if __name__ == "__main__":
    run(main, parse_args)
