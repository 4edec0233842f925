"""Every generator family on one task, under one fairness evaluation: which family, if any, helps the
under-represented sex most, at what cost to fidelity and privacy?

The task and protocol are the chest X-ray study's (classify/chestxray_study.py): any finding vs No Finding on NIH
ChestX-ray14, patient-level k-fold cross-validation, a male-dominated training set (--female-fraction), every
classifier given the same number of updates (2 n_male samples per epoch), thresholds on validation patients. Its
cells (same stage command, same folder: runs/<out's folder>/chestxray by default) are reused, not recomputed. Rows:
  balanced_real       n_male real women (the oracle)                                    [chestxray's cell]
  imbalanced_real     the baseline every row is compared with                           [chestxray's cell]
  loss_reweight       imbalanced, each sex half of the loss (--reweight-sex)
  oversample          imbalanced, each sex half of every epoch by sampling    [chestxray's imbalanced_reweight]
  classic_augment     imbalanced, flips + stronger affine and intensity jitter (--augment classic)
  ae                  imbalanced + conv AE images (decoded interpolations of same-class codes; vae/train_conv_ae.py)
  vae                 imbalanced + CVAE images (Korb & Hall; women of the pool only)    [chestxray's imbalanced_synth]
  gan                 imbalanced + conditional DCGAN images (gan/train_dcgan.py)
  ddpm                imbalanced + DDPM images, classifier-free guidance on sex x finding (diffusion/train_ddpm.py)
  ddpm_finding_only   imbalanced + the same number of images asked for by finding alone (Ktena et al.'s comparison
                      of what conditioning on the attribute adds): --finding-only separate trains a DDPM on the
                      finding alone (full scale); same (quick) asks the ddpm row's model, sex drawn as in the pool
  <family>_x<r>       the synthetic-amount sweep: r x the female deficit, for the family whose rows scored the
                      best mean VALIDATION any-finding AUROC over folds (chosen on validation data, never test)
Each generator trains on its fold's training pool only (compare_sets.csv: pool = every non-test, non-validation
image of the fold, both sexes; the CVAE: the pool's women) and draws n_male - n_f female images (the deficit), the
findings in the pool women's proportion; AE, GAN and DDPM also draw men (for fidelity and privacy per sex).
Class-conditional samples carry the any-finding label only: their 14 finding outputs get no loss.
Columns (from files: the cells' preds.csv, metrics.json, the samples, the image cache): AUROC overall / female /
male, signed gap (M - F), DP and EO of the thresholded any-finding decision, each paired against imbalanced_real on
the same test patients (patient-clustered bootstrap, Holm over the table, MDE); fidelity per sex (KID and FD in
the features of the fold's imbalanced_real classifier, generated vs the fold's real test images of that sex, both
sexes and rows of a fold at one n); privacy per sex (fairness.memorization: share of samples closer to a
training-pool image than the pool's own 1st percentile of distances between different patients, median
nearest-neighbour RMSE; real held-out images as the yardstick); cost (generator training and sampling seconds per
fold). Quick and smoke runs (`make compare`) run every stage inside the study's process (--in-process: the same
commands, recorded the same way, without ~2.5 s of interpreter start each); full scale writes them as a makefile.

    python -m classify.compare_study                       # quick: embedded NIH1000, CPU (`make compare`)
    python -m classify.compare_study --dry-run             # the stage commands (reused ones marked)
    python -m classify.compare_study --scale full --data-root /data/nih --out results-full/compare   # GPU
    python -m classify.compare_study --smoke --out smoke/compare    # seconds
"""
import argparse
import json
import os
from pathlib import Path
import time

import numpy as np
import pandas as pd

import classify.chestxray_study as cx
from classify.nets import load_classifier, load_feature_extractor
from classify.train_chexnet import Images, predict
from common.cache import load_images
from common.cli import ArgumentParser, name_list, nonneg_float, positive_int, run
from common.data import PROJECT_DATA, read_chexpert, read_nih
from common.errors import DataError
from common.report import save_grid, with_ci, write_table
from common.runs import default_runs, device_from, prepare_out_dir, write_config, write_json
from common.splits import patient_kfold, write_sets
from common.stages import Stages, add_study_args, parse_scaled, planned
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, fd_equal_n, kid,
                              paired_difference, with_holm)
from fairness.fid import extract
from fairness.figures import scatter
from fairness.memorization import audit, closest_pairs_png
from fairness.metrics import bootstrap, demographic_parity, equal_opportunity

# row: (the classifier cell's folder, its generator family or None); chestxray's cells keep chestxray's names
ROWS = {"balanced_real": ("balanced_real", None), "imbalanced_real": ("imbalanced_real", None),
        "loss_reweight": ("loss_reweight", None), "oversample": ("imbalanced_reweight", None),
        "classic_augment": ("classic_augment", None), "ae": ("synth_ae", "ae"), "vae": ("imbalanced_synth", "vae"),
        "gan": ("synth_gan", "gan"), "ddpm": ("synth_ddpm", "ddpm"),
        "ddpm_finding_only": ("synth_ddpm_finding", "ddpm_finding")}
FAMILIES = ["ae", "vae", "gan", "ddpm"]  # the sweep's candidates (ddpm_finding_only is the ablation of ddpm)
CX_CELLS = {"balanced_real", "imbalanced_real", "imbalanced_reweight", "imbalanced_synth"}
# generator settings per scale (the classifier's and the CVAE's are chestxray's SCALES, so its cells are reused)
# quick: what 45 minutes of a 2-core CPU afford beyond chestxray (measured on fold 0's pool of 677 images: the AE
# 4.2 s an epoch, the DCGAN 0.125 s a step, the DDPM 0.5 s a step and 0.05 s a DDIM step per image with guidance)
GEN = {"quick": {"ae_epochs": 10, "gan_steps": 400, "gan_width": 16, "ddpm_steps": 200, "ddpm_size": 32,
                 "ddpm_width": 32, "ddpm_mults": "1,2,2", "ddpm_num_res": 1, "ddpm_attn_res": 8, "sample_steps": 10,
                 "finding_only": "same", "male_samples": 100, "ratios": "0.5,1,2"},
       "full": {"ae_epochs": 100, "gan_steps": 20000, "gan_width": 64, "ddpm_steps": 50000, "ddpm_size": 64,
                "ddpm_width": 128, "ddpm_mults": "1,2,2", "ddpm_num_res": 2, "ddpm_attn_res": 16,
                "sample_steps": 100, "finding_only": "separate", "male_samples": 2000, "ratios": "0.5,1,4"},
       "smoke": {"ae_epochs": 1, "gan_steps": 3, "gan_width": 8, "ddpm_steps": 3, "ddpm_size": 16,
                 "ddpm_width": 8, "ddpm_mults": "1,2", "ddpm_num_res": 1, "ddpm_attn_res": 8, "sample_steps": 3,
                 "finding_only": "same", "male_samples": 20, "ratios": "0.5,1,2"}}
SCALES = {s: {**cx.SCALES[s], **GEN[s]} for s in cx.SCALES}
FEMALE, MALE = "F", "M"
SAMPLERS = {"ae": "vae.sample_conv_ae", "gan": "gan.sample_dcgan", "ddpm": "diffusion.sample_ddpm",
            "ddpm_finding": "diffusion.sample_ddpm"}  # the class-conditional families' samplers


def row_cell(row):
    """(the classifier cell's folder, its family or None) of a row; a sweep row <family>_x<r> -> synth_<row>."""
    if row in ROWS:
        return ROWS[row]
    family = row.rpartition("_x")[0]
    return f"synth_{row}", family


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/compare", SCALES)
    cx.add_flags(p, conditions=False)
    p.add_argument("--rows", type=name_list(list(ROWS)), default=",".join(ROWS),
                   help="comma-separated rows to run (imbalanced_real, the baseline, is always run)")
    p.add_argument("--ratios", help="the sweep's synthetic-to-deficit ratios (1 is the family's own row; empty: no "
                                    "sweep; quick 0.5,1,2: a DDPM's 4x would cost 9 more minutes)")
    p.add_argument("--finding-only", choices=["same", "separate"],
                   help="ddpm_finding_only's generator: 'separate', a DDPM trained on the finding alone (Ktena et "
                        "al.; full scale), or 'same', the ddpm row's model sampled with sex drawn as in the pool "
                        "(p(x | finding) = sum_s p(s | finding) p(x | s, finding); quick: no second training)")
    p.add_argument("--male-samples", type=positive_int,
                   help="male samples per fold and class-conditional generator, for fidelity and privacy per sex "
                        "(at most the deficit)")
    p.add_argument("--ae-epochs", type=positive_int, help="conv AE maximum epochs (early stopping on validation MSE)")
    p.add_argument("--gan-steps", type=positive_int, help="DCGAN training steps")
    p.add_argument("--gan-width", type=positive_int, help="DCGAN base width")
    p.add_argument("--ddpm-steps", type=positive_int, help="DDPM training steps (each DDPM row trains its own)")
    p.add_argument("--ddpm-size", type=positive_int,
                   help="DDPM image side (its samples are resized for the classifier)")
    p.add_argument("--ddpm-width", type=positive_int, help="DDPM U-Net base width")
    p.add_argument("--ddpm-mults", help="DDPM U-Net channel multipliers per level")
    p.add_argument("--ddpm-num-res", type=positive_int, help="DDPM residual blocks per level")
    p.add_argument("--ddpm-attn-res", type=positive_int, help="DDPM self-attention at this side (px)")
    p.add_argument("--sample-steps", type=positive_int, help="DDIM steps when sampling the DDPMs")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="classifier-free guidance scale w of the DDPMs")
    p.add_argument("--ood-root", default=None,
                   help="a CheXpert folder (train.csv and its images; common.data.read_chexpert): every row's fold "
                        "classifiers (their mean score) rate its frontal images, an out-of-distribution test as in "
                        "Ktena et al.; AUROCs and the gap paired against imbalanced_real (no DP / EO: the "
                        "thresholds belong to the NIH validation patients)")
    p.add_argument("--ood-csv", default=None, help="the --ood-root label table (default: train.csv there)")
    p.add_argument("--in-process", action="store_true",
                   help="run every stage inside this process (no ~2.5 s interpreter start per stage: `make compare "
                        "SMOKE=1` uses it); a crashing stage takes the study with it")
    args = parse_scaled(p, SCALES, argv)
    cx.check_female_fraction(p, args)
    if args.csv:
        p.error("--csv: the generators read the label table under --data-root; put it there")
    args.rows = list(dict.fromkeys(["imbalanced_real"] + args.rows.split(",")))
    if "ddpm_finding_only" in args.rows and "ddpm" not in args.rows and args.finding_only == "same":
        p.error("--rows: ddpm_finding_only with --finding-only same samples the ddpm row's model; add ddpm to --rows, "
                "or pass --finding-only separate")
    try:
        args.ratios = sorted({float(r) for r in args.ratios.split(",") if r.strip()})
    except ValueError:
        p.error(f"--ratios {args.ratios!r}: comma-separated positive numbers, e.g. 0.5,1,4")
    if any(r <= 0 for r in args.ratios):
        p.error(f"--ratios {args.ratios}: ratios must be positive")
    # chestxray's stage commands need its settings: its four conditions (the split file names the CVAE's sets)
    args.conditions = list(cx.CONDITIONS)
    return args


def class_counts(n, pool_sex_finding, sex):
    """--class-counts for n images of one sex, the findings in that sex's pool proportion."""
    n_fin = int(round(n * pool_sex_finding.mean())) if len(pool_sex_finding) else n // 2
    return f"{sex}|No Finding={n - n_fin},{sex}|finding={n_fin}"


def mixed_counts(n, pool_finding, pool_sex):
    """--class-counts for n images with the findings of the pool's women and, per finding class, the sex drawn in
    the pool's proportion (a finding-only request of a sex x finding model)."""
    fem = pool_finding[pool_sex == FEMALE]
    n_fin = int(round(n * fem.mean())) if len(fem) else n // 2
    parts = []
    for label, m, is_fin in (("No Finding", n - n_fin, False), ("finding", n_fin, True)):
        share_f = (pool_sex[pool_finding == is_fin] == FEMALE).mean() if (pool_finding == is_fin).any() else 0.5
        n_f = int(round(m * share_f))
        parts += [f"{FEMALE}|{label}={n_f}", f"{MALE}|{label}={m - n_f}"]
    return ",".join(parts)


def generator_stages(k, family, n_female, counts, sets_cmp, args, runs, stages):
    """Fold k's stages of one generator family: training on the pool, female samples (n_female), and for the
    class-conditional ones male samples (counts: {F, M, mixed}: --class-counts). Returns {what: samples file}, the
    classifier's under 'train' (the CVAE's: chestxray's, female only)."""
    r = runs / f"fold{k}"
    seed, dev = args.seed * 100 + k, ["--device", args.device]
    root = [] if str(args.data_root) == str(PROJECT_DATA / "nih_cxr14") else ["--data-root", args.data_root]
    data = ["--data", "nih", *root, "--sets", sets_cmp, "--train-set", "pool", "--seed", seed, *dev]
    folder = r / family
    if family == "vae":
        return {"train": r / "cvae" / "synth.npz"}
    if family == "ddpm_finding" and args.finding_only == "same":  # the ddpm row's model, sex not asked for
        out = r / "ddpm" / "samples_finding_only.npz"
        stages.samples("diffusion.sample_ddpm", ["--ckpt", r / "ddpm" / "ckpt.pt", "--class-counts", counts["mixed"],
                                                 *sampler_flags(family, args), "--seed", seed + 2, *dev, "--out", out],
                       out, deps=[r / "ddpm" / "metrics.json"])
        return {"train": out}
    if family == "ae":
        stages.script("vae.train_conv_ae", data + ["--val-set", "val", "--epochs", args.ae_epochs, "--out-dir",
                                                   folder], folder, deps=[sets_cmp])
    elif family == "gan":
        stages.script("gan.train_dcgan", data + ["--size", 64, "--width", args.gan_width, "--steps", args.gan_steps,
                                                 "--out-dir", folder], folder, deps=[sets_cmp])
    else:
        stages.script("diffusion.train_ddpm", data + [
            "--size", args.ddpm_size, "--width", args.ddpm_width, "--mults", args.ddpm_mults, "--num-res",
            args.ddpm_num_res, "--attn-res", args.ddpm_attn_res, "--steps", args.ddpm_steps, "--batch-size", 32,
            "--lr", 5e-4, "--warmup", 100, "--ema", 0.995, "--save-every", 200, "--sample-every", 0,
            *(["--condition", "label"] if family == "ddpm_finding" else []), "--out-dir", folder],
            folder, deps=[sets_cmp])
    files = {}
    for i, (what, c) in enumerate([("train", counts[FEMALE]), (MALE, counts[MALE])]):
        if family == "ddpm_finding":  # a finding-only model: the female counts, from its finding-only classes
            if what == MALE:
                break
            c = c.replace(f"{FEMALE}|", "any|")
        files[what] = folder / f"samples_{'F' if what == 'train' else 'M'}.npz"
        stages.samples(SAMPLERS[family], ["--ckpt", folder / "ckpt.pt", "--class-counts", c,
                                          *sampler_flags(family, args), "--seed", seed + i, *dev, "--out", files[what]],
                       files[what], deps=[folder / "metrics.json"])
    return files


def sampler_flags(family, args):
    """The sampler's own flags: DDIM steps and guidance for the DDPMs, none for the AE and the DCGAN."""
    return ["--steps", args.sample_steps, "--guidance", args.guidance] if SAMPLERS[family].startswith("diffusion") \
        else []


def sweep_file(k, family, ratio, deficit, female_finding, args, runs, stages):
    """Fold k's female samples of `family` at ratio x the deficit (the sweep), as a stage; returns the file."""
    r = runs / f"fold{k}"
    n = max(1, int(round(ratio * deficit)))
    seed, dev = args.seed * 100 + k, ["--device", args.device]
    if family == "vae":
        out = r / "cvae" / f"synth_x{ratio:g}.npz"
        stages.samples("vae.sample_cvae", ["--ckpt", r / "cvae" / "ckpt.pt", "--n", n, "--seed", seed + 7, *dev,
                                           "--out", out], out, deps=[r / "cvae" / "metrics.json"])
        return out
    out = r / family / f"samples_F_x{ratio:g}.npz"
    stages.samples(SAMPLERS[family], ["--ckpt", r / family / "ckpt.pt", "--class-counts",
                                      class_counts(n, female_finding, FEMALE), *sampler_flags(family, args), "--seed",
                                      seed + 7, *dev, "--out", out], out, deps=[r / family / "metrics.json"])
    return out


def validation_score(runs, cell, args):
    """Mean over folds of the validation score of the weights a cell kept (metrics.json history: the last epoch's
    with --keep last, the best with --keep best), or None before it has run."""
    scores = []
    for k in range(args.folds):
        f = runs / f"fold{k}" / cell / "metrics.json"
        if not f.is_file():
            return None
        h = [e["val_score"] for e in json.loads(f.read_text())["history"]]
        scores.append(max(h) if args.keep == "best" else h[-1])
    return float(np.mean(scores))


def main(args):
    t0 = time.time()
    t = read_nih(args.data_root)  # inputs first: a bad --data-root stops before anything is written
    ood = read_ood(args) if args.ood_root else None
    if args.images_per_sex:
        t = t.groupby("sex", group_keys=False).head(args.images_per_sex).reset_index(drop=True)
    _, ok = load_images(t["image"], args.size, "L")
    t = t[ok].reset_index(drop=True)
    if args.folds < 2 or args.folds > t["patient_id"].nunique():
        raise DataError(f"--folds {args.folds}: cross-validation needs 2 to {t['patient_id'].nunique()} folds here")
    fold = patient_kfold(t, args.folds, seed=args.seed, stratify="sex")
    runs = Path(args.runs or default_runs(Path(args.out).parent / "chestxray"))  # chestxray's tree: its cells reused
    stages = Stages(dry=args.dry_run or bool(args.makefile), in_process=args.in_process)
    names = np.array([Path(i).name for i in t["image"]])
    finding = (t["label:No Finding"] == 0).to_numpy()
    sex = t["sex"].to_numpy()
    cx_cells = [c for c in cx.CONDITIONS if any(ROWS[r][0] == c for r in args.rows)]
    families = [ROWS[r][1] for r in args.rows if ROWS[r][1]]
    plan = {"folds": []}
    for k in range(args.folds):
        sets, n_male, deficit = cx.fold_sets(k, fold, t, args)
        sets_file, sets_cmp = runs / f"fold{k}" / "sets.csv", runs / f"fold{k}" / "compare_sets.csv"
        held = set(sets["test"]) | set(sets["val"])
        pool = np.array([i for i, n in enumerate(names) if n not in held])
        for f, content in ((sets_file, sets), (sets_cmp, {"pool": names[pool], "val": sets["val"],
                                                          "test": sets["test"]})):
            if write_sets(f, content, dry=args.dry_run) and args.dry_run:
                stages.changed.add(f)
        cx.fold_stages(k, sets_file, n_male, deficit, argparse.Namespace(**{**vars(args), "conditions": cx_cells}),
                       runs, stages)
        pf = {s: finding[pool][sex[pool] == s] for s in (FEMALE, MALE)}
        counts = {FEMALE: class_counts(deficit, pf[FEMALE], FEMALE),
                  MALE: class_counts(min(deficit, args.male_samples), pf[MALE], MALE),
                  "mixed": mixed_counts(deficit, finding[pool], sex[pool])}
        files = {fam: generator_stages(k, fam, deficit, counts, sets_cmp, args, runs, stages) for fam in families}
        for row in args.rows:
            cell, fam = ROWS[row]
            if cell in CX_CELLS:
                continue
            extra = {"loss_reweight": ["--reweight-sex"], "classic_augment": ["--augment", "classic"]}.get(row, [])
            deps = []
            if fam:
                extra, deps = ["--synthetic", files[fam]["train"]], [files[fam]["train"]]
            cx.classifier(k, cell, "imbalanced", extra, sets_file, n_male, args, runs, stages, deps)
        plan["folds"].append({"n_male": n_male, "deficit": deficit, "files": files, "pool": pool,
                              "female_finding": pf[FEMALE], "sets": sets})
    # the sweep: the family with the best mean validation AUROC, once its rows have run
    scores = {f: validation_score(runs, ROWS[f][0], args) for f in FAMILIES if f in families}  # row = family
    best = None if not scores or any(v is None for v in scores.values()) else max(scores, key=scores.get)
    sweep_rows = []
    if best and args.ratios:
        for ratio in [r for r in args.ratios if r != 1]:
            row = f"{best}_x{ratio:g}"
            sweep_rows.append((row, ratio))
            for k, fp in enumerate(plan["folds"]):
                f = sweep_file(k, best, ratio, fp["deficit"], fp["female_finding"], args, runs, stages)
                cx.classifier(k, row_cell(row)[0], "imbalanced", ["--synthetic", f], runs / f"fold{k}" / "sets.csv",
                              fp["n_male"], args, runs, stages, [f])
    elif args.ratios and families:
        print(f"# the ratio sweep ({args.ratios}) follows once the generator rows have run: it takes the family with "
              f"the best mean validation any-finding AUROC (a rerun of this command adds its stages)")
    if planned(stages, args, f"the tables, figures and summary.json in {args.out}"):
        return
    out = prepare_out_dir(args.out, args.force)
    weights = "imagenet" if args.pretrained else "none (from scratch)"
    write_config(out, args, data="nih1000" if str(args.data_root) == str(PROJECT_DATA / "nih_cxr14") else
                 f"nih ({args.data_root})", weights=weights)
    rows = args.rows + [r for r, _ in sweep_rows]
    report(out, args, t, runs, plan, rows, {"validation_any_auroc": scores, "family": best,
                                            "ratios": args.ratios}, stages, time.time() - t0, ood)


def read_ood(args):
    """The --ood-root images (frontal views) as a table with any-finding labels and sex, checked before any work."""
    ood = read_chexpert(args.ood_root, args.ood_csv)
    if ood["view"].notna().any():
        ood = ood[ood["view"] == "Frontal"].reset_index(drop=True)
    ood = ood[ood["sex"].isin([FEMALE, MALE])].reset_index(drop=True)
    if ood.empty or ood["sex"].nunique() < 2:
        raise DataError(f"--ood-root {args.ood_root}: no frontal images of both sexes to test on")
    return ood


def ood_rows(ood, rows, runs, args):
    """{row: any-finding score per --ood-root image}: the mean over folds of the row's classifiers (images from the
    mapped uint8 cache, converted a batch at a time)."""
    x, ok = load_images(ood["image"], args.size, "L")
    images = Images(x, np.arange(len(x)))
    scores, device = {}, device_from(args.device)
    for row in rows:
        per_fold = [predict(load_classifier(runs / f"fold{k}" / row_cell(row)[0] / "ckpt.pt")[0].to(device), images,
                            device)[:, 14] for k in range(args.folds)]
        scores[row] = np.mean(per_fold, 0)
    return scores, ok


def gather(out, rows, runs, args):
    """preds.csv.gz: every row's out-of-fold predictions (condition = the row's name; gzip: 12 rows x 1,000 images
    x 45 columns are 5 MB as text, 1.5 MB compressed; pandas reads either)."""
    parts = []
    for row in rows:
        for k in range(args.folds):
            d = pd.read_csv(runs / f"fold{k}" / row_cell(row)[0] / "preds.csv")
            parts.append(d.assign(condition=row))
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv.gz", index=False, float_format="%.9g")


def utility_stats(Y, p, dec, sex):
    """{metric: f(idx)} of the table's paired comparisons: the any-finding AUROCs and gaps of chestxray's
    auroc_stat, DP and EO of the decision."""
    y, d = Y[:, 14].astype(int), dec[:, 14].astype(int)
    names = {"any-finding AUROC": "any_auroc", "female AUROC": "any_auroc_female", "male AUROC": "any_auroc_male",
             "AUROC gap (M - F)": "any_auroc_gap", "|AUROC gap|": "any_auroc_abs_gap"}
    return {**{name: cx.auroc_stat(Y, p, sex, key) for name, key in names.items()},
            "DP (any finding)": lambda i: demographic_parity(d[i], sex[i]),
            "EO (any finding)": lambda i: equal_opportunity(y[i], d[i], sex[i])}


def fidelity_privacy(t, runs, plan, rows, args, out):
    """Per generator row and sex: KID (mean, sd over folds) and FD in the penultimate features of the fold's
    imbalanced_real classifier, samples against the fold's real test images of that sex, every row and sex of a fold
    at one n (the smallest of the real test sexes and of every samples set); features standardised once per fold
    by the real test images' mean and sd (features constant on them left out); the memorization audit against the
    fold's training-pool images of that sex (its reference: pool-to-pool distances between different patients);
    real held-out test images as the yardstick ('real_heldout')."""
    x64, _ = load_images(t["image"], 64, "L")
    sex, pid = t["sex"].to_numpy(), t["patient_id"].to_numpy()
    names = np.array([Path(i).name for i in t["image"]])
    result, n_common, device = {}, [], device_from(args.device)
    wanted = [r for r in rows if r in ROWS and ROWS[r][1]] + ["real_heldout"]
    for k, fp in enumerate(plan["folds"]):
        net, _ = load_feature_extractor(runs / f"fold{k}" / "imbalanced_real" / "ckpt.pt")
        test = np.nonzero(np.isin(names, fp["sets"]["test"]))[0]
        real = {s: x64[test[sex[test] == s]] for s in (FEMALE, MALE)}
        fakes = {row: real if row == "real_heldout" else samples_by_sex(fp["files"][ROWS[row][1]].values())
                 for row in wanted}
        n = min([len(v) for v in real.values()] + [len(v) for r in wanted if r != "real_heldout"
                                                   for v in fakes[r].values()])
        n_common.append(n)
        f_real = {s: extract(net, x, device=device) for s, x in real.items()}
        both = np.concatenate(list(f_real.values()))
        mu, sd = both.mean(0), both.std(0)
        keep = sd > 1e-3 * np.median(sd[sd > 0]) if (sd > 0).any() else sd >= 0
        scale = lambda f: (f[:, keep] - mu[keep]) / sd[keep]
        for row in wanted:
            for s, fake in fakes[row].items():
                in_pool = fp["pool"][sex[fp["pool"]] == s]
                cell = result.setdefault(row, {}).setdefault(s, {"kid": [], "fd": [], "copies": [], "nn": [],
                                                                         "single": []})
                if row != "real_heldout":
                    fr, ff = scale(f_real[s]), scale(extract(net, fake, device=device))
                    cell["kid"].append(kid(fr, ff, n_subsets=50, subset_size=n, seed=args.seed)["mean"])
                    cell["fd"].append(fd_equal_n(fr, ff, n=n, seed=args.seed)["fd"])
                a, order, idx, d1 = audit(fake, x64[in_pool], seed=args.seed, train_patients=pid[in_pool])
                cell["copies"].append(a["fraction_closer_than_train_p1"])
                cell["nn"].append(a["pixel_nn_rmse"]["median"])
                cell["single"].append(a["fraction_d1_below_d2_over_3"])
                if k == 0 and s == FEMALE and row != "real_heldout":
                    closest_pairs_png(fake, x64[in_pool], order, idx, d1, out / f"closest_pairs_{row}.png",
                                      title=f"{row}: the 8 female samples closest to a training-pool image (fold 0; "
                                            f"sample | training image)")
    summary = {"n_per_fold": n_common}
    for row, by_sex in result.items():
        summary[row] = {s: {"kid": float(np.mean(v["kid"])) if v["kid"] else None,
                            "kid_sd_over_folds": float(np.std(v["kid"], ddof=1)) if len(v["kid"]) > 1 else None,
                            "fd": float(np.mean(v["fd"])) if v["fd"] else None,
                            "fraction_closer_than_pool_p1": float(np.mean(v["copies"])),
                            "median_nn_rmse": float(np.mean(v["nn"])),
                            "fraction_d1_below_d2_over_3": float(np.mean(v["single"]))} for s, v in by_sex.items()}
    return summary


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


def sample_grids(runs, plan, rows, out):
    """One grid per generator row from fold 0: a row per class (female / male x No Finding / finding)."""
    for row in [r for r in rows if r in ROWS and ROWS[r][1]]:
        files = plan["folds"][0]["files"][ROWS[row][1]]
        imgs, labels = [], []
        for f in files.values():
            with np.load(f) as z:
                lab, images = z["labels"], z["images"]
                names = [str(n) for n in z["class_names"]] if lab.ndim == 1 else None
            if names is None:  # the CVAE's file: female images with drawn NIH label vectors
                imgs.append(images[:8])
                labels.append("F (CVAE)")
                continue
            for c in sorted(set(lab.tolist())):
                pick = np.nonzero(lab == c)[0][:8]
                if len(pick) == 8:
                    imgs.append(images[pick])
                    labels.append(names[c])
        if imgs:
            save_grid(np.concatenate(imgs), out / f"samples_{row}.png", nrow=len(imgs), row_labels=labels,
                      title=f"{row}: samples of fold 0's generator (a row per class)")


def cost(runs, plan, rows, args):
    """Generator training and sampling seconds per fold (mean), from the stages' metrics.json and samples meta."""
    out = {}
    for row in [r for r in rows if r in ROWS and ROWS[r][1]]:
        fam = ROWS[row][1]
        shared = fam == "ddpm_finding" and args.finding_only == "same"  # the ddpm row's model: no training of its own
        folder = {"vae": "cvae"}.get(fam, fam)
        train, sample = [], []
        for k in range(args.folds):
            m = {} if shared else json.loads((runs / f"fold{k}" / folder / "metrics.json").read_text())
            train.append(0.0 if shared else m.get("seconds", m.get("wall_s_this_session", np.nan)))
            with np.load(plan["folds"][k]["files"][fam]["train"]) as z:
                sample.append(json.loads(str(z["meta"])).get("seconds", np.nan))
        out[row] = {"train_s_per_fold": float(np.mean(train)), "sample_female_s_per_fold": float(np.mean(sample))}
    return out


def fmt(v, digits=3, kind="f"):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}{kind}}"


def report(out, args, t, runs, plan, rows, sweep, stages, seconds, ood=None):
    gather(out, rows, runs, args)
    tab, arrays = cx.read_preds(out / "preds.csv.gz", rows)
    sex, pid = tab["sex"].to_numpy(), tab["patient_id"].to_numpy()
    Y = arrays["imbalanced_real"][0]
    stats = {row: utility_stats(Y, arrays[row][1], arrays[row][1] >= arrays[row][2], sex) for row in rows}
    comps = []
    for row in rows:
        if row != "imbalanced_real":
            for metric in stats[row]:
                comps.append(comparison(metric, row, "imbalanced_real", paired_difference(
                    stats[row][metric], stats["imbalanced_real"][metric], clusters=pid, n_boot=args.n_boot,
                    seed=args.seed)))
    if {"ddpm", "ddpm_finding_only"} <= set(rows):  # what asking for women adds (Ktena et al.)
        for metric in ("female AUROC", "|AUROC gap|"):
            comps.append(comparison(metric, "ddpm", "ddpm_finding_only", paired_difference(
                stats["ddpm"][metric], stats["ddpm_finding_only"][metric], clusters=pid, n_boot=args.n_boot,
                seed=args.seed)))
    if ood is not None:  # the same classifiers on another data set (CheXpert): AUROCs and the gap, paired
        scores, ok = ood_rows(ood, rows, runs, args)
        o_sex, o_pid = ood["sex"].to_numpy()[ok], ood["patient_id"].to_numpy()[ok]
        o_y = np.zeros((int(ok.sum()), 15))
        o_y[:, 14] = 1 - ood["label:No Finding"].to_numpy()[ok]
        o_stats = {row: utility_stats(o_y, np.repeat(scores[row][ok, None], 15, 1), np.zeros_like(o_y), o_sex)
                   for row in rows}
        for row in [r for r in rows if r != "imbalanced_real"]:
            for metric in ("any-finding AUROC", "female AUROC", "male AUROC", "AUROC gap (M - F)", "|AUROC gap|"):
                comps.append(comparison(f"OOD {metric}", row, "imbalanced_real", paired_difference(
                    o_stats[row][metric], o_stats["imbalanced_real"][metric], clusters=o_pid, n_boot=args.n_boot,
                    seed=args.seed)))
        root = Path(args.ood_root).resolve()
        pd.DataFrame({"image": [os.path.relpath(Path(i).resolve(), root) for i in ood["image"][ok]],
                      "patient_id": o_pid, "sex": o_sex,
                      "y_any_finding": o_y[:, 14], **{f"p_{row}": scores[row][ok] for row in rows}}).to_csv(
            out / "ood_preds.csv", index=False, float_format="%.9g")
    comps = with_holm(comps)
    fid = fidelity_privacy(t, runs, plan, rows, args, out)
    costs = cost(runs, plan, rows, args)
    sample_grids(runs, plan, rows, out)
    find = {(c["metric"], c["a"], c["b"]): c for c in comps}
    summary = {"scale": args.scale, "folds": args.folds, "female_fraction": args.female_fraction,
               "n_images": len(tab), "n_patients": int(tab["patient_id"].nunique()), "model": args.arch,
               "pretrained": args.pretrained, "seconds": seconds, "sweep": sweep, "finding_only": args.finding_only,
               "generators_train_on": "each fold's training pool (both sexes, every pool woman; the CVAE: the "
                                      "pool's women), early stopping (AE, CVAE) on the fold's validation patients",
               "fidelity_n_per_fold": fid["n_per_fold"], "rows": {}}
    table, csv_rows = [], []
    for row in rows:
        point = {m: f(np.arange(len(Y))) for m, f in stats[row].items()}
        ci = bootstrap(lambda idx: {m: f(idx) for m, f in stats[row].items()}, len(Y), clusters=pid,
                       n_boot=args.n_boot, seed=args.seed)
        r = {"cell": row_cell(row)[0], "family": row_cell(row)[1],
             "utility": {m: {"value": point[m], "ci": list(ci[m])} for m in list(point)[:3]},
             "fairness": {m: {"value": point[m], "ci": list(ci[m])} for m in list(point)[3:]},
             "vs_imbalanced_real": {m: find.get((m, row, "imbalanced_real")) for m in point},
             "fidelity": {s: {k: v for k, v in d.items() if k in ("kid", "kid_sd_over_folds", "fd")}
                          for s, d in fid.get(row, {}).items()},
             "privacy": {s: {k: v for k, v in d.items() if k in ("fraction_closer_than_pool_p1", "median_nn_rmse",
                                                                  "fraction_d1_below_d2_over_3")}
                         for s, d in fid.get(row, {}).items()},
             "cost": costs.get(row)}
        summary["rows"][row] = r
        diff = lambda m: "" if row == "imbalanced_real" else \
            f"{find[(m, row, 'imbalanced_real')]['diff']:+.3f} [{find[(m, row, 'imbalanced_real')]['ci'][0]:+.3f}, " \
            f"{find[(m, row, 'imbalanced_real')]['ci'][1]:+.3f}] p_H {find[(m, row, 'imbalanced_real')]['p_holm']:.2g}"
        fF, fM = fid.get(row, {}).get(FEMALE, {}), fid.get(row, {}).get(MALE, {})
        c = costs.get(row, {})
        table.append([row, with_ci(point["any-finding AUROC"], ci["any-finding AUROC"]),
                      with_ci(point["female AUROC"], ci["female AUROC"]), diff("female AUROC"),
                      with_ci(point["male AUROC"], ci["male AUROC"]),
                      with_ci(point["AUROC gap (M - F)"], ci["AUROC gap (M - F)"]), diff("|AUROC gap|"),
                      f"{point['DP (any finding)']:.3f}", f"{point['EO (any finding)']:.3f}",
                      f"{fmt(fF.get('kid'), 3, 'g')} ± {fmt(fF.get('kid_sd_over_folds'), 2, 'g')}"
                      if fF.get("kid") is not None else "", fmt(fM.get("kid"), 3, "g") if fM.get("kid") is not None
                      else "", fmt(fF.get("fd"), 3, "g") if fF.get("fd") is not None else "",
                      f"{fmt(fF.get('fraction_closer_than_pool_p1'))} / "
                      f"{fmt(fM.get('fraction_closer_than_pool_p1'))}" if fF else "",
                      f"{fmt(c.get('train_s_per_fold'), 0)} + {fmt(c.get('sample_female_s_per_fold'), 0)}"
                      if c else ""])
        csv_rows.append({"row": row, **{m: point[m] for m in point},
                         **{f"{m} vs imbalanced_real": (find.get((m, row, "imbalanced_real")) or {}).get("diff")
                            for m in point},
                         "kid_female": fF.get("kid"), "kid_male": fM.get("kid"), "fd_female": fF.get("fd"),
                         "fd_male": fM.get("fd"), "copies_female": fF.get("fraction_closer_than_pool_p1"),
                         "copies_male": fM.get("fraction_closer_than_pool_p1"),
                         "train_s_per_fold": c.get("train_s_per_fold"),
                         "sample_s_per_fold": c.get("sample_female_s_per_fold")})
    ref = fid.get("real_heldout", {})
    summary["real_heldout_privacy"] = ref
    summary["comparisons"] = comps
    summary["answers"] = answers(comps, fid, rows)
    write_table(out / "table", ["row", "any-finding AUROC", "female AUROC", "female vs imbalanced", "male AUROC",
                                "gap (M - F)", "|gap| vs imbalanced", "DP", "EO", "KID F (sd folds)", "KID M",
                                "FD F", "closer than pool p1 F / M", "generator s/fold (train + sample)"], table,
                title=f"Every row on one task: any finding vs No Finding by sex, pooled out-of-fold predictions "
                      f"({len(tab)} images, {tab['patient_id'].nunique()} patients, {args.folds} folds, "
                      f"{args.arch} {args.size} px, weights: {'imagenet' if args.pretrained else 'none'})",
                notes=summary["answers"] + [
                    f"95% CIs: patient bootstrap ({args.n_boot}); 'vs imbalanced': paired difference on the same test "
                    f"patients with its CI and Holm p over all {len(comps)} comparisons (comparisons.md, with MDEs). "
                    f"One training run per row and fold: training noise is not in the CIs.",
                    f"KID/FD: penultimate features of each fold's imbalanced_real classifier, standardised by the real "
                    f"test images' (both sexes) mean and sd per feature; samples vs the fold's real test images of "
                    f"that sex, every row and sex at one n per fold ({fid['n_per_fold']}); mean over folds (± sd over "
                    f"folds). Privacy: "
                    f"share of samples closer to a training-pool image of that sex than the pool's own 1st "
                    f"percentile of distances between different patients; real held-out test images score F "
                    f"{fmt(ref.get(FEMALE, {}).get('fraction_closer_than_pool_p1'))}"
                    f" / M {fmt(ref.get(MALE, {}).get('fraction_closer_than_pool_p1'))} (what no copying looks like).",
                    (f"The sweep's family ({sweep['family']}) was chosen by mean validation any-finding AUROC over "
                     f"folds ({', '.join(f'{k} {fmt(v)}' for k, v in sweep['validation_any_auroc'].items() if v)}), "
                     f"not by test numbers; its rows add r x the female deficit (n_male - n_f) of synthetic women. "
                     if sweep["family"] else "No ratio sweep in this run. ") +
                    "Every generator trains on its fold's training pool (all of the pool's women: more real women "
                    "than imbalanced_real's classifier sees, as in Korb & Hall) and never on test or validation "
                    "images; the AE and the CVAE stop early on the validation patients. The VAE (CVAE) is "
                    "chestxray's: trained on the pool's women only, so it has no male samples. " +
                    ("ddpm_finding_only: the ddpm row's model asked for the finding with sex drawn as in the pool "
                     "(not a separately trained finding-only DDPM): ddpm vs ddpm_finding_only measures what asking "
                     "for women adds with the generator held fixed." if args.finding_only == "same" else
                     "ddpm_finding_only: a DDPM trained on the finding alone (its samples have no sex).")])
    pd.DataFrame(csv_rows).to_csv(out / "table.csv", index=False, float_format="%.6g")
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(comps),
                title="Paired comparisons on the same out-of-fold test patients (a - b)",
                notes=[f"patient-clustered paired bootstrap ({args.n_boot}); Holm over the {len(comps)} rows; "
                       f"MDE = 2.8 x SE. Recompute from preds.csv.gz."])
    figures(out, summary, rows, find, fid)
    write_json(out / "summary.json", summary)
    write_json(out / "stages.json", {"stages": stages.commands, "reused": stages.reused})
    print(open(out / "table.md").read())
    return summary


def figures(out, summary, rows, find, fid):
    """The female AUROC gain against fidelity (KID, female) and the gap against AUROC, both with CIs."""
    pts = {}
    for row in rows:
        c, f = find.get(("female AUROC", row, "imbalanced_real")), fid.get(row, {}).get(FEMALE, {})
        if c and f.get("kid") is not None:
            sd = f.get("kid_sd_over_folds") or 0
            pts[row] = (f["kid"], (f["kid"] - sd, f["kid"] + sd), c["diff"], tuple(c["ci"]))
    if pts:
        scatter(pts, out / "gain_vs_fidelity.png", "Female AUROC gain over imbalanced_real (paired 95% CI) against "
                "the generator's female KID (mean ± sd over folds)", "KID, female samples vs real test women",
                "female AUROC - imbalanced_real's", hline=0)
    pts = {}
    for row in rows:
        r = summary["rows"][row]
        u, f = r["utility"]["any-finding AUROC"], r["fairness"]["AUROC gap (M - F)"]
        pts[row] = (u["value"], tuple(u["ci"]), f["value"], tuple(f["ci"]))
    scatter(pts, out / "gap_vs_auroc.png", "Sex gap (male - female AUROC) against any-finding AUROC, 95% CIs",
            "any-finding AUROC", "AUROC gap (M - F)", hline=0)


def answers(comps, fid, rows):
    """The answer sentences: which generator family, if any, closes the sex gap, and which copy training images."""
    gen = [r for r in rows if r in ROWS and ROWS[r][1]]
    find = {(c["metric"], c["a"]): c for c in comps if c["b"] == "imbalanced_real"}
    rows_gap = [find[("|AUROC gap|", r)] for r in gen if ("|AUROC gap|", r) in find]
    closed = [c for c in rows_gap if c["p_holm"] < 0.05 and c["diff"] < 0]
    out = []
    by = lambda c: (f"female AUROC {find[('female AUROC', c['a'])]['diff']:+.3f}, male AUROC "
                    f"{find[('male AUROC', c['a'])]['diff']:+.3f}")
    if closed:
        best = min(closed, key=lambda c: c["diff"])
        out.append(answer(best, f"{best['a']} narrows the sex gap here: |AUROC M - F|, {best['a']} minus imbalanced")
                   + f" ({by(best)})")
    elif rows_gap:
        widest = min(rows_gap, key=lambda c: c["diff"])
        lead = "the largest narrowing" if widest["diff"] < 0 else "none narrows it on average; the smallest widening"
        out.append(f"No generator family closes the sex gap detectably at this scale: {lead}, {widest['a']}, "
                   f"changes |AUROC M - F| by {widest['diff']:+.3f} (95% CI {widest['ci'][0]:+.3f} to "
                   f"{widest['ci'][1]:+.3f}, Holm p {widest['p_holm']:.2g}; {by(widest)}; the smallest difference "
                   f"this design detects is {widest['mde']:.3f}).")
    for c in [c for c in comps if c["metric"] == "female AUROC" and c["b"] == "imbalanced_real" and c["a"] in gen]:
        out.append(answer(c, f"Does {c['a']} help women? Female AUROC, {c['a']} minus imbalanced"))
    ref = fid.get("real_heldout", {}).get(FEMALE, {}).get("fraction_closer_than_pool_p1")
    if gen and ref is not None:  # copying: more than twice the held-out share and over 2% (our rule, stated)
        copying = [r for r in gen if fid.get(r, {}).get(FEMALE, {}).get("fraction_closer_than_pool_p1", 0)
                   > max(2 * ref, 0.02)]
        single = lambda r: fid[r][FEMALE]["fraction_d1_below_d2_over_3"]
        out.append(("Copying by our rule (female samples closer to a training-pool image of another patient than "
                    "the pool's own 1st percentile, above twice real held-out women's share and 2%): " +
                    ", ".join(f"{r} {fid[r][FEMALE]['fraction_closer_than_pool_p1']:.1%} (samples near one training "
                              f"image alone, d1 < d2 / 3: {single(r):.1%})" for r in copying)
                    if copying else "No generator copies training images beyond what real held-out images do by "
                    "our rule (over twice their share and over 2% of female samples closer to a training-pool "
                    "image than the pool's own 1st percentile)") + f"; real held-out women: {ref:.1%}. A blurred "
                   "average image is close to many training images at once (d1 near d2): the rule flags it too; a "
                   "copy is close to one (d1 < d2 / 3, Carlini et al. 2023). The closest pairs are in "
                   "closest_pairs_<row>.png.")
    return out


if __name__ == "__main__":
    run(main, parse_args)
