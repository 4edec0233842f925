"""The chest X-ray study's report (classify/chestxray_study.py is its plan): tables, figures, comparisons and
summary.json from the files in --out alone (plan.json, preds.csv, training.json, the CVAE figures).

Metrics come from the pooled out-of-fold predictions (bootstrap CIs over patients) and per fold (mean +- std); with
replicates (several training seeds per condition and fold) each metric is the mean over them. Conditions are compared
paired on the same test patients (patient-clustered bootstrap of the difference, replicates resampled first where
there are several; Holm over the declared questions, the smallest detectable difference beside each:
docs/METHODS.md, "Statistics for comparisons").

    python -m classify.chestxray_report --out results/chestxray               # rebuild the report from its files
    python -m classify.chestxray_report --out results/chestxray --n-boot 2000 # the same, with more resamples
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from classify.cxr_task import ANY, auroc_stat, output_names, read_preds
from classify.train_chexnet import per_output_table
from common.report import mean_std, report_command, stage_times, with_ci, write_readme, write_table
from common.task_file import reading_key
from common.runs import write_json
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, family_facts, fmt_p,
                              gap_permutation, paired_difference_replicates, with_holm)
from fairness.figures import bars, lines
from fairness.metrics import auroc, binary_stats, bootstrap, demographic_parity, equal_opportunity

CONDITIONS = ["balanced_real", "imbalanced_real", "imbalanced_synth", "imbalanced_reweight"]
# CheXNet's per-class test AUROC on the full ChestX-ray14 (Rajpurkar et al. 2017, Table 1; docs/METHODS.md):
# a reference from 112k images at 224 px with ImageNet weights, never a target for 1,000 images at 64 px
CHEXNET_REF = {"Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Consolidation": 0.7901, "Edema": 0.8878,
               "Effusion": 0.8638, "Emphysema": 0.9371, "Fibrosis": 0.8047, "Hernia": 0.9164, "Infiltration": 0.7345,
               "Mass": 0.8676, "Nodule": 0.7802, "Pleural_Thickening": 0.8062, "Pneumonia": 0.7680,
               "Pneumothorax": 0.8887}
# the study's questions: each condition against the imbalanced baseline, and synthetic against real women
PAIRS = [("balanced_real", "imbalanced_real"), ("imbalanced_synth", "imbalanced_real"),
         ("imbalanced_reweight", "imbalanced_real"), ("imbalanced_synth", "balanced_real")]
COMPARED = {"any_auroc_female": "female AUROC", "any_auroc_male": "male AUROC",
            "any_auroc_gap": "AUROC gap (M - F)", "any_auroc_abs_gap": "|AUROC gap|", "any_auroc": "any-finding AUROC"}
# The study's questions, declared before its runs: its primary comparisons (Holm over these alone; every other row of
# comparisons.md is exploratory). The fairness outcome is the signed gap M - F, oriented in advance by the training
# data: women are the minority of the imbalanced set, so a change that favours them is negative (it narrows the gap
# only where the baseline gap is positive). |gap| stays an exploratory row (it is biased toward "no change").
QUESTIONS = [(("female AUROC", "imbalanced_synth", "imbalanced_real"),
              "Do CVAE-generated female X-rays help women? Female AUROC, synthetic minus imbalanced"),
             (("AUROC gap (M - F)", "imbalanced_synth", "imbalanced_real"),
              "Do they move the sex gap toward women? AUROC M - F (negative: toward women), synthetic minus "
              "imbalanced"),
             (("female AUROC", "balanced_real", "imbalanced_real"),
              "Do more real women help women? Female AUROC, balanced minus imbalanced"),
             (("AUROC gap (M - F)", "balanced_real", "imbalanced_real"),
              "Do more real women move the sex gap toward women? AUROC M - F, balanced minus imbalanced")]
FINDING_HEADER = ["finding", "AUC (folds)", "AUC (pooled)", "accuracy (folds)", "sensitivity (folds)",
                  "sensitivity (pooled)", "specificity (folds)", "specificity (pooled)", "class ratio (pos:neg)",
                  "Korb & Hall AUC", "CheXNet AUC"]
FAIRNESS_HEADER = ["condition", "any-finding AUROC", "female", "male", "gap (M - F)", "DP (any finding)",
                   "EO (any finding)", "mean AUROC (findings, >=5 pos)", "train F / M / synthetic F"]


def metrics_of(Y, p, dec, sex, findings):
    """The per-condition statistics of rows idx: any-finding AUROC overall and by sex, M - F gap, mean AUROC, DP, EO."""
    def stat(idx):
        fi, mi = idx[sex[idx] == "F"], idx[sex[idx] == "M"]
        s = {"any_auroc": auroc(Y[idx, ANY], p[idx, ANY]),
             "mean_auroc": float(np.nanmean([auroc(Y[idx, j], p[idx, j]) for j in findings])),
             "any_auroc_female": auroc(Y[fi, ANY], p[fi, ANY]), "any_auroc_male": auroc(Y[mi, ANY], p[mi, ANY]),
             "dp": demographic_parity(dec[idx, ANY].astype(int), sex[idx]),
             "eo": equal_opportunity(Y[idx, ANY].astype(int), dec[idx, ANY].astype(int), sex[idx])}
        s["any_auroc_gap"] = s["any_auroc_male"] - s["any_auroc_female"]
        return s
    return stat


def comparisons(arrays, sex, pid, n_boot, seed):
    """Paired differences on the same out-of-fold test patients (patient-clustered bootstrap; with replicates, the
    two-level bootstrap of fairness.compare.paired_difference_replicates, replicate r of a paired with replicate r
    of b); Holm over the declared questions of the conditions run (the primary family), and separately over the
    other rows (exploratory)."""
    rows = []
    for a, b in PAIRS:
        if a in arrays and b in arrays:
            for key, name in COMPARED.items():
                pairs = [(auroc_stat(*ra[:2], sex, key), auroc_stat(*rb[:2], sex, key), pid)
                         for ra, rb in zip(arrays[a], arrays[b])]
                rows.append(comparison(name, a, b, paired_difference_replicates(pairs, n_boot=n_boot, seed=seed)))
    declared = {key for key, _ in QUESTIONS if key[1] in arrays and key[2] in arrays}
    return with_holm(rows, primary=declared)


def permutation_or_nan(stat_group, sex, pid, n_perm, seed):
    """gap_permutation, or NaNs with the reason where a patient has images under both sexes (no permutation of sex
    across patients then)."""
    try:
        return gap_permutation(stat_group, sex, pid, n_perm, seed)
    except ValueError as e:
        return {"gap": float("nan"), "p": float("nan"), "null_median": float("nan"), "excess": float("nan"),
                "method": str(e)}


def gap_cell(point, perm):
    return f"{point:.3f} (perm. p {fmt_p(perm['p'])}, excess {perm['excess']:+.3f})"


def answers(rows):
    """The study's question, answered in one sentence per comparison that asks it."""
    find = {(r["metric"], r["a"], r["b"]): r for r in rows}
    return [answer(find[key], what) for key, what in QUESTIONS if key in find]


def mean_of(dicts):
    """{key: mean over the dicts} (the replicates' statistics; one dict is returned as it is)."""
    return dicts[0] if len(dicts) == 1 else {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def condition_stats(Y, reps, sex, pid, findings, plan, counts):
    """One condition's point estimates, bootstrap CIs over patients, DP/EO permutation tests and pooled decisions
    (the mean over replicates, and each replicate's); reps: its replicates' (Y, scores, thresholds, fold), every
    statistic the mean over them, except DP and EO with several replicates: the gap between the sexes of the
    replicates' mean decision rates, the statistic their permutation test shuffles."""
    decs = [p >= th for _, p, th, _ in reps]
    stats = [metrics_of(Y, p, dec, sex, findings) for (_, p, _, _), dec in zip(reps, decs)]

    def stat(idx):
        return mean_of([s(idx) for s in stats])
    point = stat(np.arange(len(Y)))
    ci = bootstrap(stat, len(Y), clusters=pid, n_boot=plan["n_boot"], seed=plan["seed"])
    # DP and EO are max - min gaps (>= 0): a percentile CI cannot contain 0, so each gets a permutation p
    yany, danys = Y[:, ANY].astype(bool), [dec[:, ANY] for dec in decs]
    dp_perm = permutation_or_nan(lambda idx: np.mean([d[idx].mean() for d in danys]) if len(idx) else np.nan, sex,
                                 pid, plan["n_boot"], plan["seed"])
    eo_perm = permutation_or_nan(lambda idx: np.mean([d[idx][yany[idx]].mean() for d in danys])
                                 if yany[idx].any() else np.nan, sex, pid, plan["n_boot"], plan["seed"])
    if len(reps) > 1:  # the statistic shown is the one tested
        point["dp"], point["eo"] = dp_perm["gap"], eo_perm["gap"]
    # each image at its fold's threshold
    each = [[binary_stats(Y[:, j], dec[:, j]) for j in range(Y.shape[1])] for dec in decs]
    pooled = [mean_of([e[j] for e in each]) for j in range(Y.shape[1])]
    return point, ci, dp_perm, eo_perm, (pooled, each), pd.DataFrame(counts).mean().to_dict()


def condition_summary(point, ci, dp_perm, eo_perm, pooled, cnt, per_fold, reps, findings, names):
    """summary.json's entry of one condition (per_fold: per replicate, per fold; pooled: (the mean over
    replicates, each replicate's))."""
    pooled, each = pooled
    out = {}
    for k in ("any_auroc", "any_auroc_female", "any_auroc_male", "any_auroc_gap", "mean_auroc"):
        out[k], out[f"{k}_ci"] = point[k], list(ci[k])
    out = {k: out[k] for k in ("any_auroc", "any_auroc_ci", "any_auroc_female", "any_auroc_female_ci",
                               "any_auroc_male", "any_auroc_male_ci", "any_auroc_gap", "any_auroc_gap_ci",
                               "mean_auroc", "mean_auroc_ci")}
    out.update({"dp_any": point["dp"], "dp_any_permutation": dp_perm, "eo_any": point["eo"],
                "eo_any_permutation": eo_perm,
                "any_auroc_per_fold": [float(np.mean([rep[k][-1]["auroc"] for rep in per_fold]))
                                       for k in range(len(per_fold[0]))],
                "any_auroc_per_replicate": [auroc(y[:, ANY], p[:, ANY]) for y, p, _, _ in reps],
                "n_train_female": cnt["n_train_female"], "n_train_male": cnt["n_train_male"],
                "n_synthetic": cnt["n_synthetic"],
                "score_std_any": float(np.concatenate([p[:, ANY] for _, p, _, _ in reps]).std()),
                "sensitivity_above_0_every_finding_5plus": all(e[j]["sensitivity"] > 0 for e in each
                                                               for j in findings),  # in every replicate
                "pooled_sensitivity": {n: pooled[j]["sensitivity"] for j, n in enumerate(names)},
                "pooled_specificity": {n: pooled[j]["specificity"] for j, n in enumerate(names)}})
    return out


def finding_table(out, c, Y, reps, per_fold, pooled, plan, n_folds, names):
    """table_<condition>: per finding, mean +- std over folds (and replicates) and pooled (the mean over replicates),
    beside Korb & Hall's and CheXNet's."""
    rows = []
    cells = [pf for rep in per_fold for pf in rep]
    for j, name in enumerate(names):
        vals = {m: [pf[j][m] for pf in cells] for m in ("auroc", "accuracy", "sensitivity", "specificity")}
        pooled_auc = float(np.mean([auroc(Y[:, j], p[:, j]) for _, p, _, _ in reps]))
        rows.append([name, mean_std(vals["auroc"]), f"{pooled_auc:.3f}", mean_std(vals["accuracy"]),
                     mean_std(vals["sensitivity"]), f"{pooled[j]['sensitivity']:.2f}", mean_std(vals["specificity"]),
                     f"{pooled[j]['specificity']:.2f}", f"{int(Y[:, j].sum())}:{int(len(Y) - Y[:, j].sum())}",
                     "0.50 (collapse)" if j < len(names) - 1 and not plan.get("table") else "n/a",
                     f"{CHEXNET_REF[name]:.3f}" if name in CHEXNET_REF and not plan.get("table") else ""])
    write_table(out / f"table_{c}", FINDING_HEADER, rows,
                title=f"{c}: per finding, mean ± std over {n_folds} patient-level folds"
                      f"{f' x {len(reps)} training seeds' if len(reps) > 1 else ''} ({plan['data']}, "
                      f"{plan['size']} px, {plan['arch']}, weights: {plan['weights']})",
                notes=["Folds: mean ± std of the per-fold test metrics; pooled: all out-of-fold predictions "
                       "together (with several seeds: the mean of each seed's pooled value). Thresholds per "
                       "finding are chosen on each fold's validation patients (Youden's J), never 0.5. Korb & "
                       "Hall's classifier gave ~0.50 AUC and sensitivity 0 on every finding (a collapse); "
                       "CheXNet's published mean is 0.841 on the full data set at 224 px with ImageNet weights."])


def fairness_row(c, point, ci, dp_perm, eo_perm, cnt):
    return [c, with_ci(point["any_auroc"], ci["any_auroc"]), with_ci(point["any_auroc_female"], ci["any_auroc_female"]),
            with_ci(point["any_auroc_male"], ci["any_auroc_male"]), with_ci(point["any_auroc_gap"], ci["any_auroc_gap"]),
            gap_cell(point["dp"], dp_perm), gap_cell(point["eo"], eo_perm),
            with_ci(point["mean_auroc"], ci["mean_auroc"]),
            f"{cnt['n_train_female']:.0f} / {cnt['n_train_male']:.0f} / {cnt['n_synthetic']:.0f}"]


def training_noise(plan):
    """How the CIs of a run treat training noise, in one sentence."""
    r = plan.get("replicates", 1)
    if r == 1:
        return "One training run per condition and fold: training noise is not in the CI"
    cvae = " (the CVAE: one per fold, so the generator's own seed-to-seed noise is not)" \
        if "imbalanced_synth" in plan["conditions"] else ""
    return f"{r} training runs (seeds) per condition and fold, resampled before the patients: the CI carries " \
           f"their noise{cvae}"


def training_arithmetic(bf16):
    """How a set of stages trained, in words: bf16, the sorted set of their bf16_autocast flags."""
    return {(True,): "bf16 autocast (--amp auto on a CPU or GPU with bf16 instructions; evaluation in fp32)",
            (False,): "fp32", (): "not recorded by this run (each fold's cvae/metrics.json says)"}.get(
        tuple(bf16), "mixed (bf16 in some stages, fp32 in others)")


def fairness_table(out, rows, plan, t, bf16, cvae_bf16=()):
    arithmetic = training_arithmetic(bf16)
    cvae = (f"CVAE trained on: {plan['cvae_female']} female images of each fold (never test or validation images), "
            f"arithmetic: {training_arithmetic(cvae_bf16)}. " if "imbalanced_synth" in plan["conditions"] else "")
    write_table(out / "fairness", FAIRNESS_HEADER, rows,
                title=f"Any finding vs No Finding by sex, pooled out-of-fold predictions ({plan['data']}, {len(t)} "
                      f"images, {t['patient_id'].nunique()} patients, {plan['folds']} folds)",
                notes=["95% CIs: percentile bootstrap over patients (" + str(plan["n_boot"]) + " resamples) of "
                       + ("the statistic" if plan.get("replicates", 1) == 1 else
                          f"the mean over {plan['replicates']} training seeds") + "; these CIs carry test sampling, "
                       "not training noise (comparisons.md carries both where there are replicates). DP and EO are "
                       "between-sex differences of the any-finding decision at each fold's validation threshold "
                       + ("" if plan.get("replicates", 1) == 1 else "(of the seeds' mean decision rates) ") +
                       "(fractions; x100 for FairGen's scale); being |M - F| they get no percentile CI (it cannot "
                       "contain 0) but a permutation p (sex shuffled across patients; not Holm-corrected) and the "
                       "gap's excess over the null median. Compare conditions with comparisons.md (paired), not by "
                       "overlapping CIs. Reference (Larrazabal et al. 2020, full NIH, "
                       "DenseNet-121): the under-represented sex loses ~0.02-0.025 mean AUC.",
                       "Classifier training arithmetic: " + arithmetic, cvae + f"Classifier weights: {plan['weights']}."])


def comparisons_table(out, summary, plan, t, preds_name="preds.csv.gz"):
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(summary["comparisons"]),
                title=f"Paired comparisons of conditions on the same out-of-fold test patients ({plan['data']}, "
                      f"{len(t)} images, {t['patient_id'].nunique()} patients)",
                notes=[f"a - b on the pooled out-of-fold any-finding scores (with replicates: the mean of "
                       f"replicate r of a minus replicate r of b); 95% CI and p from a patient-clustered paired "
                       f"bootstrap{' of replicates, then patients' if plan.get('replicates', 1) > 1 else ''} "
                       f"({plan['n_boot']} resamples, percentile). Primary: the "
                       f"{summary['primary_family_size']} comparisons the study declares in code (the questions below); "
                       f"p (Holm) over them alone (the smallest it can reach with these resamples is "
                       f"{summary['min_holm_p']:.3f}), and "
                       f"separately over the rows marked exploratory, which answer no question. MDE = (z + 0.84) x "
                       f"bootstrap SE at the family's first Holm step (alpha 0.05 / family size): effects smaller "
                       f"would usually be missed. {training_noise(plan)}. "
                       f"Recompute from {preds_name} (one row per image, condition and replicate)."] + summary["answers"])


def figures(out, summary, curves0, plan):
    conds = summary["conditions"]
    bars({c: {"female": (conds[c]["any_auroc_female"], conds[c]["any_auroc_female_ci"]),
              "male": (conds[c]["any_auroc_male"], conds[c]["any_auroc_male_ci"])} for c in plan["conditions"]},
         out / "auroc_by_sex.png", f"Any-finding AUROC by sex, 95% CI ({plan['data']}, {plan['arch']}, "
                                   f"{plan['size']}px)", "AUROC")
    lines({c: dict(enumerate(v, 1)) for c, v in curves0.items()}, out / "classifier_val_auroc.png",
          f"Validation any-finding AUROC per epoch (fold 0, {plan['data']})", "epoch", "AUROC")


def write_report(out, n_boot=None):
    """Tables, figures, summary.json and README.md from the files alone: plan.json, preds.csv and training.json in
    out (n_boot: another number of resamples than the run's)."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    plan["n_boot"] = n_boot or plan["n_boot"]
    training = json.loads((out / "training.json").read_text())
    preds = out / "preds.csv.gz"
    preds = preds if preds.is_file() else out / "preds.csv"  # runs before 2026-12-03 wrote it as text
    t, arrays = read_preds(preds, plan["conditions"])
    sex, pid = t["sex"].to_numpy(), t["patient_id"].to_numpy()
    Y = arrays[plan["conditions"][0]][0][0]
    findings = [j for j in range(Y.shape[1] - 1) if Y[:, j].sum() >= 5]
    names = output_names(t)
    summary = {"data": plan["data"], "table": plan.get("table"), "plant": plan.get("plant"), "pretrained": plan["pretrained"], "scale": plan["scale"], "model": plan["arch"],
               "size": plan["size"], "folds": plan["folds"], "female_fraction": plan["female_fraction"],
               "cvae_female": plan["cvae_female"], "n_images": len(t), "n_patients": int(t["patient_id"].nunique()),
               "seconds": training["seconds"], "replicates": len(arrays[plan["conditions"][0]]),
               "training_noise": training_noise(plan), "conditions": {}}
    fair_rows = []
    for c in plan["conditions"]:
        reps = arrays[c]
        point, ci, dp, eo, pooled, cnt = condition_stats(Y, reps, sex, pid, findings, plan,
                                                         training["counts_per_fold"][c])
        per_fold = [[per_output_table(Y[fold == k], p[fold == k], th[fold == k][0], names) for k in range(plan["folds"])]
                    for _, p, th, fold in reps]
        summary["conditions"][c] = condition_summary(point, ci, dp, eo, pooled, cnt, per_fold, reps, findings, names)
        finding_table(out, c, Y, reps, per_fold, pooled[0], plan, plan["folds"], names)
        fair_rows.append(fairness_row(c, point, ci, dp, eo, cnt))
    fairness_table(out, fair_rows, plan, t, training.get("bf16_autocast", [False]),
                   training.get("cvae_bf16_autocast", []))
    figures(out, summary, training["val_any_auroc_fold0"], plan)
    summary["comparisons"] = comparisons(arrays, sex, pid, plan["n_boot"], plan["seed"])
    summary.update(family_facts(summary["comparisons"], plan["n_boot"]))
    summary["answers"] = answers(summary["comparisons"])
    comparisons_table(out, summary, plan, t, preds.name)
    summary["stage_times"] = stage_times(out)  # where the time went, per stage and by kind (stages.json)
    write_json(out / "summary.json", summary)
    planted = f"{plan['plant']['label']}, a positive control: " if plan.get("plant") else ""
    if plan.get("table"):
        planted = f"Your data ({plan['table']['minority']} vs the rest of {plan['table']['group']}): "
    write_readme(out, planted + "Do CVAE-generated female chest X-rays help a sex-imbalanced classifier on women? "
                 "(Korb & Hall)",
                 summary["answers"] + [n for n in [reading_key(plan.get("table"))] if n], ["fairness.md", "comparisons.md"],
                 notes=[f"Per-finding tables: {', '.join(f'table_{c}.md' for c in plan['conditions'])}; every "
                        f"prediction, per image with its patient and sex: {preds.name}; the stage commands: stages.json."])
    print((out / "comparisons.md").read_text())
    print((out / "fairness.md").read_text())
    return summary


if __name__ == "__main__":
    report_command(__doc__, write_report, "classify.chestxray_study",
                   needs=("plan.json", "preds.csv.gz|preds.csv", "training.json"), n_boot=True)
