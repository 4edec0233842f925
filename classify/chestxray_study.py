"""The chest X-ray study of Korb & Hall ("Closing the Gender Gap in Medical Imaging with VAEs"), done so that the
classifier learns: does rebalancing a male-dominated training set with CVAE-generated female X-rays help women?

Per patient-level fold (k-fold cross-validation, so every image is tested once; stratified by sex):
  the fold's test patients are held out; the rest split (by patient) into a validation set and a training pool;
  n_male = min(male, female images in the pool) real male images, the same in every condition;
  balanced_real        + n_male real female images
  imbalanced_real      + n_f = round(n_male f / (1 - f)) real female images (f = --female-fraction, 0.1)
  imbalanced_synth     imbalanced_real + (n_male - n_f) CVAE female images (labels drawn from the training pool)
  imbalanced_reweight  imbalanced_real, sampled so that each sex is half of every epoch (no generator)
The CVAE (vae/train_cvae.py) trains on the fold's female training-pool images (--cvae-female train_pool, as the
paper: note that it thereby sees more female images than imbalanced_real's classifier) or on the imbalanced set's
female images only (--cvae-female imbalanced); it never sees the fold's validation or test images.
The classifier is classify/train_chexnet.py's; every condition gets the same number of updates (epochs of the
balanced set's size; quick defaults: 16 epochs at a cosine schedule, the last epoch's weights kept: a
~120-image validation set is too noisy to pick an epoch by). Metrics come from the pooled out-of-fold
predictions (bootstrap CIs over patients) and per fold (mean +- std).

    python -m classify.chestxray_study                         # quick: embedded NIH1000, 64 px, 5 folds, CPU
    python -m classify.chestxray_study --scale full --data-root /data/nih --arch densenet121 --pretrained \
        --size 224 --folds 3 --out results/chestxray-full       # GPU
    python -m classify.chestxray_study --smoke --out smoke/chestxray   # seconds
"""
import argparse
import json
from pathlib import Path
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from classify.train_chexnet import OUTPUTS, add_args, col, fit, per_output_table, pred_rows, predict, targets
from common.cli import ArgumentParser, fraction, nonneg_int, positive_int, run
from common.cache import load_images
from common.data import DataError, PROJECT_DATA, label_matrix, read_nih, to_signed
from common.report import mean_std, with_ci, write_table
from common.runs import default_runs, device_from, prepare_out_dir, seed_everything, write_config, write_json
from common.splits import patient_kfold, patient_split
from fairness.figures import bars, lines
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, fmt_p, gap_permutation,
                              paired_difference, with_holm)
from fairness.metrics import auroc, binary_stats, bootstrap, demographic_parity, equal_opportunity
from vae.sample_cvae import sample
from vae.train_cvae import fit as fit_cvae, plot_history, write_figures

CVAE_SIZE = 64  # the CVAE's architecture is fixed at 64 px; its samples are resized to the classifier's --size
CONDITIONS = ["balanced_real", "imbalanced_real", "imbalanced_synth", "imbalanced_reweight"]
# CheXNet (Rajpurkar et al. 2017) reference AUROCs we can cite per class (FORMULAS.md); mean 0.841
CHEXNET_REF = {"Infiltration": 0.71, "Emphysema": 0.94}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(PROJECT_DATA / "nih_cxr14"), help="NIH images + label table")
    p.add_argument("--csv", default=None, help="label table (default: found under --data-root)")
    p.add_argument("--folds", type=positive_int, default=5, help="patient-level cross-validation folds")
    p.add_argument("--val-fraction", type=fraction, default=0.15, help="share of a fold's non-test patients for validation")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help="comma-separated training conditions to run (the CVAE is trained only for imbalanced_synth)")
    p.add_argument("--female-fraction", type=fraction, default=0.1, help="female share of the imbalanced training set")
    p.add_argument("--cvae-female", default="train_pool", choices=["train_pool", "imbalanced"],
                   help="which female images the CVAE trains on")
    p.add_argument("--cvae-epochs", type=positive_int, default=40, help="CVAE maximum epochs (early stopping on val loss)")
    p.add_argument("--cvae-patience", type=nonneg_int, default=10, help="CVAE early stopping patience")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--scale", default="quick", help="label written into the outputs (quick / full)")
    p.add_argument("--smoke", action="store_true", help="tiny run (2 folds, 2 epochs, 120 images) to test the chain")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, subsets and training")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", default="results/chestxray", help="tables, figures, summary.json")
    p.add_argument("--runs", default=None, help="per-fold run folders (default: runs/<--out>, e.g. runs/results/chestxray; "
                   "replaced with --out under --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the tables, figures, comparisons and summary.json of an existing --out "
                        "from its preds.csv and training.json (e.g. with another --n-boot)")
    add_args(p)
    # quick-scale classifier (measured, README): 16 epochs at a cosine schedule, no early stopping, last weights
    p.set_defaults(epochs=16, schedule="cosine", patience=0, keep="last")
    args = p.parse_args(argv)
    args.conditions = args.conditions.split(",")
    unknown = sorted(set(args.conditions) - set(CONDITIONS))
    if unknown:
        p.error(f"--conditions: unknown {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    if args.smoke:
        args.folds, args.epochs, args.cvae_epochs, args.n_boot, args.width = 2, 2, 2, 50, 8
    return args


def cvae_args(args):
    return argparse.Namespace(latent=128, beta=0.00025, epochs=args.cvae_epochs, patience=args.cvae_patience,
                              batch_size=64, lr=5e-3, seed=args.seed)


def to_size(x, size):
    """(N, 1, S, S) images in [-1, 1] resized to size px (the CVAE's 64 px samples for a classifier at --size)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


def synthetic_females(k, xc, Y15, cv_train, cv_val, n, size, args, device, runs):
    """Train fold k's CVAE on the female images cv_train (early stopping on cv_val) and draw n female images with
    label vectors from cv_train's; returns (images (n, 1, size, size) in [-1, 1], classifier targets (n, 15))."""
    fold_dir = Path(runs) / f"fold{k}"  # inside this invocation's run tree, prepared (empty) by main()
    fold_dir.mkdir(parents=True, exist_ok=True)
    y15 = torch.from_numpy(Y15).float()
    cvae, hist = fit_cvae(xc[cv_train], y15[cv_train], xc[cv_val], y15[cv_val], cvae_args(args), fold_dir, device,
                          progress=False)
    syn_x, syn_y15 = sample(cvae, Y15[cv_train], n, seed=args.seed * 100 + k, device=device)
    if k == 0:
        write_figures(cvae, xc[cv_train], y15[cv_train], fold_dir, device, "nih1000, fold 0")
        plot_history(hist, fold_dir / "loss_curve.png", "CVAE loss (female training images, fold 0)")
    syn_x = to_size(to_signed(syn_x), size)
    return syn_x, torch.from_numpy(targets(syn_y15))


def run_fold(k, fold, t, x, xc, Y15, args, device, runs):
    """Train the CVAE (on xc, 64 px; only for imbalanced_synth) and the classifiers of --conditions (on x, --size px)
    of one fold; return out-of-fold predictions and training counts."""
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
    y = torch.from_numpy(targets(Y15))

    imbalanced = np.r_[male_set, female_imb]
    sets = {"balanced_real": np.r_[male_set, female_bal], "imbalanced_real": imbalanced,
            "imbalanced_synth": imbalanced, "imbalanced_reweight": imbalanced}
    if "imbalanced_synth" in args.conditions:
        # the CVAE: female images of this fold's training pool (or of the imbalanced set) only
        cv_train = females if args.cvae_female == "train_pool" else female_imb
        syn_x, syn_y = synthetic_females(k, xc, Y15, cv_train, val[sex[val] == "F"], n_male - n_f, x.shape[-1], args,
                                         device, runs)
    preds, counts, curves = {}, {}, {}
    for cond in args.conditions:
        idx = sets[cond]
        xt, yt = x[idx], y[idx]
        weights = None
        if cond == "imbalanced_synth":
            xt, yt = torch.cat([xt, syn_x]), torch.cat([yt, syn_y])
        if cond == "imbalanced_reweight":  # each sex half of every epoch: w = 1 / (2 n_sex)
            is_f = sex[idx] == "F"
            weights = np.where(is_f, 0.5 / is_f.sum(), 0.5 / (~is_f).sum())
        seed_everything(args.seed * 100 + k)
        # every condition gets the same number of updates: epochs of the balanced set's size
        net, history, thr, _ = fit(xt, yt, x[val], y[val], args, device, weights, progress=False,
                                   epoch_size=2 * n_male)
        preds[cond] = (predict(net, x[test], device), thr)
        counts[cond] = {"n_train_female": int((sex[idx] == "F").sum()), "n_train_male": int((sex[idx] == "M").sum()),
                        "n_synthetic": len(syn_x) if cond == "imbalanced_synth" else 0}
        curves[cond] = [h["val_any_auroc"] for h in history]
    return np.nonzero(test)[0], preds, counts, curves


def main(args):
    t0 = time.time()
    if args.report_only:
        out = Path(args.out)
        for f in ("preds.csv", "training.json", "config.json"):
            if not (out / f).is_file():
                raise DataError(f"--out {out}: no {f} here; --report-only rebuilds a finished run's report (run the "
                                f"study without it first)")
        made = json.loads((out / "config.json").read_text())
        # the run's own settings (conditions, folds, size...), with this command's --n-boot and --out
        args = argparse.Namespace(**{**made["args"], "n_boot": args.n_boot, "out": args.out, "report_only": True})
        return report(out, args, args.runs or default_runs(args.out), made.get("data", "?"), made.get("weights", "?"))
    device = device_from(args.device)
    t = read_nih(args.data_root, args.csv)  # inputs first: a bad --data-root stops before anything is written
    seed_everything(args.seed)
    if args.smoke:
        t = t.groupby("sex", group_keys=False).head(60).reset_index(drop=True)
    xs, ok = load_images(t["image"], args.size, "L")  # an unreadable image is named in a warning and left out
    t, x = t[ok].reset_index(drop=True), to_signed(xs[ok])  # the classifier's input
    xc = x if args.size == CVAE_SIZE else to_signed(load_images(t["image"], CVAE_SIZE, "L")[0])  # the CVAE's
    Y15 = label_matrix(t)
    Y = targets(Y15)
    n_patients = t["patient_id"].nunique()
    if args.folds < 2 or args.folds > n_patients:
        raise DataError(f"--folds {args.folds}: cross-validation needs 2 to {n_patients} folds here (one per "
                        f"patient at most)")
    fold = patient_kfold(t, args.folds, seed=args.seed, stratify="sex")
    out = prepare_out_dir(args.out, args.force, flag="--out")
    runs = prepare_out_dir(args.runs or default_runs(args.out), args.force, flag="--runs")  # this --out's own tree
    write_config(runs, args, data=str(args.data_root), run_tree_of=str(out))
    data = "nih1000" if str(args.data_root) == str(PROJECT_DATA / "nih_cxr14") else f"nih ({args.data_root})"
    weights = "imagenet" if args.pretrained else "none (from scratch)"
    write_config(out, args, data=data, weights=weights)
    parts, counts, curves0 = [], {c: [] for c in args.conditions}, None
    for k in range(args.folds):
        print(f"fold {k + 1}/{args.folds} ({time.time() - t0:.0f} s)", flush=True)
        test_idx, preds, cnt, curves = run_fold(k, fold, t, x, xc, Y15, args, device, runs)
        for c in args.conditions:
            parts.append(pred_rows(t.iloc[test_idx], Y[test_idx], *preds[c], fold=k, seed=args.seed, condition=c))
            counts[c].append(cnt[c])
        curves0 = curves0 or curves
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv", index=False, float_format="%.9g")
    write_json(out / "training.json", {"counts_per_fold": counts, "val_any_auroc_fold0": curves0,
                                       "seconds": time.time() - t0})
    report(out, args, runs, data, weights)


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
    summary = {"data": data, "pretrained": args.pretrained, "scale": "smoke" if args.smoke else args.scale,
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
                       (f"CVAE trained on: {args.cvae_female} female images of each fold (never test or "
                        f"validation images). " if "imbalanced_synth" in args.conditions else "")
                       + f"Classifier weights: {weights}."])
    bars({c: {"female": (summary["conditions"][c]["any_auroc_female"], summary["conditions"][c]["any_auroc_female_ci"]),
              "male": (summary["conditions"][c]["any_auroc_male"], summary["conditions"][c]["any_auroc_male_ci"])}
          for c in args.conditions}, out / "auroc_by_sex.png",
         f"Any-finding AUROC by sex, 95% CI ({data}, {args.arch}, {args.size}px)", "AUROC")
    fold0 = Path(runs) / "fold0"  # this run's CVAE figures (none without imbalanced_synth: no stale copies)
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
    print(f"wall time {seconds / 60:.1f} min")
    return summary


if __name__ == "__main__":
    run(main, parse_args)
