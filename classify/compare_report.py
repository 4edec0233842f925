"""The compare study's report (classify/compare_study.py is its plan): the table, comparisons, figures and
summary.json from the files gathered into --out alone (plan.json, preds.csv.gz, audit.json, cost.json,
ood_preds.csv).

Every row is paired against imbalanced_real on the same out-of-fold test patients (patient-clustered bootstrap of
the difference, Holm over the table, the smallest detectable difference beside each: docs/METHODS.md, "Statistics
for comparisons"); fidelity and privacy are the fold audits' means over folds.

    python -m classify.compare_report --out results/compare     # rebuild the report from its files
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from classify.cxr_task import ANY, FEMALE, MALE, auroc_stat, read_preds
from common.report import arithmetic, report_command, stage_times, with_ci, write_readme, write_table
from common.task_file import reading_key
from common.runs import write_json
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, draw_replicates, family_facts,
                              nested_levels, nested_mean, paired_difference_replicates, with_holm)
from fairness.figures import scatter
from fairness.metrics import bootstrap, cluster_members, demographic_parity, equal_opportunity

# row: (the classifier cell's folder, its generator family or None); chestxray's cells keep chestxray's names
ROWS = {"balanced_real": ("balanced_real", None), "imbalanced_real": ("imbalanced_real", None),
        "loss_reweight": ("loss_reweight", None), "oversample": ("imbalanced_reweight", None),
        "classic_augment": ("classic_augment", None), "ae": ("synth_ae", "ae"), "vae": ("imbalanced_synth", "vae"),
        "gan": ("synth_gan", "gan"), "ddpm": ("synth_ddpm", "ddpm"),
        "ddpm_finding_only": ("synth_ddpm_finding", "ddpm_finding")}
FAMILIES = ["ae", "vae", "gan", "ddpm"]  # the sweep's candidates (ddpm_finding_only is the ablation of ddpm)
# The study's primary comparisons, declared before its runs: each generator family against imbalanced_real on the
# female AUROC and on the signed gap M - F (women are the training data's minority, so a narrowing is negative).
# Holm runs over these alone; every other row (non-generative fixes, sweep rows, |gap|, DP, EO, OOD) is exploratory.
PRIMARY_METRICS = ("female AUROC", "AUROC gap (M - F)")
OOD_METRICS = ("any-finding AUROC", "female AUROC", "male AUROC", "AUROC gap (M - F)", "|AUROC gap|")
HEADER = ["row", "any-finding AUROC", "female AUROC", "female vs imbalanced", "male AUROC", "gap (M - F)",
          "gap vs imbalanced", "DP", "EO", "KID F (sd folds)", "KID M", "FD F", "closer than pool p1 F / M",
          "generator s/fold (train + sample)"]


def row_cell(row):
    """(the classifier cell's folder, its family or None) of a row; a sweep row <family>_x<r> -> synth_<row>."""
    if row in ROWS:
        return ROWS[row]
    family = row.rpartition("_x")[0]
    return f"synth_{row}", family


def fmt(v, digits=3, kind="f"):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}{kind}}"


def utility_stats(Y, p, dec, sex):
    """{metric: f(idx)} of the table's paired comparisons: the any-finding AUROCs and gaps, DP and EO of the
    decision."""
    y, d = Y[:, ANY].astype(int), dec[:, ANY].astype(int)
    names = {"any-finding AUROC": "any_auroc", "female AUROC": "any_auroc_female", "male AUROC": "any_auroc_male",
             "AUROC gap (M - F)": "any_auroc_gap", "|AUROC gap|": "any_auroc_abs_gap"}
    group = np.unique(sex, return_inverse=True)[1]  # sex as integer codes: the same groups, cheaper to resample
    return {**{name: auroc_stat(Y, p, sex, key) for name, key in names.items()},
            "DP (any finding)": lambda i: demographic_parity(d[i], group[i], classes=(0, 1)),
            "EO (any finding)": lambda i: equal_opportunity(y[i], d[i], group[i], classes=(0, 1))}


def generator_groups(plan):
    """The generator seed each classifier replicate trained on (replicate r: r mod G), or None without replicates."""
    r, g = plan.get("replicates", 1), plan.get("generator_seeds", 1)
    return [k % g for k in range(r)] if r > 1 else None


def has_generator(row):
    return bool(row_cell(row)[1])


def row_levels(row, levels):
    """How a row's replicates are averaged: over its generator seeds (levels) if it has a generator, else plainly."""
    return levels if has_generator(row) else None


def paired(name, a, b, stats, pid, n_boot, seed, groups=None):
    """a - b on `name` (stats: {row: [per replicate {metric: f(idx)}]}): replicate r of a paired with replicate r of
    b. Where a row has a generator, the bootstrap draws generator seeds (groups), then replicates within them, then
    patients, and a row without one (b) is the plain mean over the drawn replicates; between two rows without a
    generator: replicates, then patients (one replicate: the patient bootstrap)."""
    pairs = [(sa[name], sb[name], pid) for sa, sb in zip(stats[a], stats[b])]
    if has_generator(b) and not has_generator(a):
        raise ValueError(f"paired: {a} has no generator and {b} has; put the generator row first")
    if not (has_generator(a) or has_generator(b)):
        groups = None  # two classifiers on real data: no generator seed to draw
    return comparison(name, a, b, paired_difference_replicates(pairs, n_boot=n_boot, seed=seed, groups=groups,
                                                               plain_b=not has_generator(b)))


def ood_comparisons(path, rows, n_boot, seed):
    """The same classifiers on another data set (ood_preds.csv): AUROCs and the gap, each row vs imbalanced_real."""
    ood = pd.read_csv(path)
    o_sex, o_pid = ood["sex"].to_numpy(), ood["patient_id"].to_numpy()
    o_y = np.zeros((len(ood), 15))
    o_y[:, 14] = ood["y_any_finding"].to_numpy()
    stats = {row: utility_stats(o_y, np.repeat(ood[f"p_{row}"].to_numpy()[:, None], 15, 1), np.zeros_like(o_y),
                                o_sex) for row in rows}
    stats = {row: [{f"OOD {m}": f for m, f in s.items()}] for row, s in stats.items()}  # one score: the mean
    return [paired(f"OOD {m}", row, "imbalanced_real", stats, o_pid, n_boot, seed)
            for row in rows if row != "imbalanced_real" for m in OOD_METRICS]


def comparisons(stats, rows, pid, plan, out):
    """Every row vs imbalanced_real on every metric, ddpm vs ddpm_finding_only, the OOD rows; Holm over the
    declared primary comparisons, and separately over the rest (exploratory)."""
    n_boot, seed, groups = plan["n_boot"], plan["seed"], generator_groups(plan)
    comps = [paired(m, row, "imbalanced_real", stats, pid, n_boot, seed, groups)
             for row in rows if row != "imbalanced_real" for m in stats[row][0]]
    if {"ddpm", "ddpm_finding_only"} <= set(rows):  # what asking for women adds (Ktena et al.)
        comps += [paired(m, "ddpm", "ddpm_finding_only", stats, pid, n_boot, seed, groups)
                  for m in ("female AUROC", "|AUROC gap|")]
    if plan["ood"]:
        comps += ood_comparisons(out / "ood_preds.csv", rows, n_boot, seed)
    return with_holm(comps, primary=primary_keys(rows))


def primary_keys(rows):
    """The declared primary comparisons among the rows run: (metric, family, imbalanced_real)."""
    return [(m, f, "imbalanced_real") for f in FAMILIES if f in rows for m in PRIMARY_METRICS]


def fidelity(audit):
    """Per generator row and sex: the fold audits' KID (mean, sd over folds), FD and privacy numbers, averaged."""
    cells = {}
    for fold in audit["folds"]:
        for row, by_sex in fold.items():
            for s, v in by_sex.items():
                c = cells.setdefault(row, {}).setdefault(s, {"kid": [], "fd": [], "copies": [], "nn": [],
                                                                     "single": []})
                for k in c:
                    if k in v:
                        c[k].append(v[k])
    summary = {"n_per_fold": audit["n_per_fold"]}
    for row, by_sex in cells.items():
        summary[row] = {s: {"kid": float(np.mean(v["kid"])) if v["kid"] else None,
                            "kid_sd_over_folds": float(np.std(v["kid"], ddof=1)) if len(v["kid"]) > 1 else None,
                            "fd": float(np.mean(v["fd"])) if v["fd"] else None,
                            "fraction_closer_than_pool_p1": float(np.mean(v["copies"])),
                            "median_nn_rmse": float(np.mean(v["nn"])),
                            "fraction_d1_below_d2_over_3": float(np.mean(v["single"]))} for s, v in by_sex.items()}
    return summary


def mean_stats(reps, levels=None):
    """f(idx) -> {metric: the mean over the replicates' statistics on rows idx} (reps: [{metric: f(idx)}]; levels:
    fairness.compare.nested_levels of their generator seeds, whose means are then averaged)."""
    return lambda idx: {m: nested_mean([s[m](idx) for s in reps], levels) for m in reps[0]}


def row_summary(row, point, ci, find, fid, costs):
    """summary.json's entry of one row."""
    keep = lambda d, keys: {s: {k: v for k, v in x.items() if k in keys} for s, x in d.items()}
    return {"cell": row_cell(row)[0], "family": row_cell(row)[1],
            "utility": {m: {"value": point[m], "ci": list(ci[m])} for m in list(point)[:3]},
            "fairness": {m: {"value": point[m], "ci": list(ci[m])} for m in list(point)[3:]},
            "vs_imbalanced_real": {m: find.get((m, row, "imbalanced_real")) for m in point},
            "fidelity": keep(fid.get(row, {}), ("kid", "kid_sd_over_folds", "fd")),
            "privacy": keep(fid.get(row, {}), ("fraction_closer_than_pool_p1", "median_nn_rmse",
                                               "fraction_d1_below_d2_over_3")),
            "cost": costs.get(row)}


def table_row(row, point, ci, find, fF, fM, c):
    """The Markdown table's line of one row."""
    def diff(m):
        if row == "imbalanced_real":
            return ""
        d = find[(m, row, "imbalanced_real")]
        return f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] p_H {d['p_holm']:.2g}"
    return [row, with_ci(point["any-finding AUROC"], ci["any-finding AUROC"]),
            with_ci(point["female AUROC"], ci["female AUROC"]), diff("female AUROC"),
            with_ci(point["male AUROC"], ci["male AUROC"]),
            with_ci(point["AUROC gap (M - F)"], ci["AUROC gap (M - F)"]), diff("AUROC gap (M - F)"),
            f"{point['DP (any finding)']:.3f}", f"{point['EO (any finding)']:.3f}",
            f"{fmt(fF.get('kid'), 3, 'g')} ± {fmt(fF.get('kid_sd_over_folds'), 2, 'g')}"
            if fF.get("kid") is not None else "", fmt(fM.get("kid"), 3, "g") if fM.get("kid") is not None else "",
            fmt(fF.get("fd"), 3, "g") if fF.get("fd") is not None else "",
            f"{fmt(fF.get('fraction_closer_than_pool_p1'))} / {fmt(fM.get('fraction_closer_than_pool_p1'))}"
            if fF else "",
            f"{fmt(c.get('train_s_per_fold'), 0)} + {fmt(c.get('sample_female_s_per_fold'), 0)}" if c else ""]


def csv_row(row, point, find, fF, fM, c):
    return {"row": row, **{m: point[m] for m in point},
            **{f"{m} vs imbalanced_real": (find.get((m, row, "imbalanced_real")) or {}).get("diff") for m in point},
            "kid_female": fF.get("kid"), "kid_male": fM.get("kid"), "fd_female": fF.get("fd"),
            "fd_male": fM.get("fd"), "copies_female": fF.get("fraction_closer_than_pool_p1"),
            "copies_male": fM.get("fraction_closer_than_pool_p1"), "train_s_per_fold": c.get("train_s_per_fold"),
            "sample_s_per_fold": c.get("sample_female_s_per_fold")}


def notes(summary, plan, fid, n_comps, costs=None):
    """The table's notes: the answers, how the CIs and the fidelity / privacy columns are made, what the rows are
    and how their generators computed (costs: cost.json's rows)."""
    ref, sweep, costs = fid.get("real_heldout", {}), plan["sweep"], costs or {}
    return summary["answers"] + [
        f"95% CIs: patient bootstrap ({plan['n_boot']}); 'vs imbalanced': paired difference on the same test "
        f"patients with its CI and Holm p within its family of the {n_comps} comparisons (primary: each "
        f"generator family on the female AUROC and the signed gap; the rest exploratory; comparisons.md, with MDEs). "
        + training_noise(plan) + ".",
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
        arithmetic_note(costs) +
        ("ddpm_finding_only: the ddpm row's model asked for the finding with sex drawn as in the pool "
         "(not a separately trained finding-only DDPM): ddpm vs ddpm_finding_only measures what asking "
         "for women adds with the generator held fixed." if plan["finding_only"] == "same" else
         "ddpm_finding_only: a DDPM trained on the finding alone (its samples have no sex).")]


def arithmetic_note(costs):
    """One sentence: how each generator family trained (cost.json's bf16_autocast flags, generator seed 0)."""
    flags = {row: c["bf16_autocast"] for row, c in costs.items() if "bf16_autocast" in c}
    if not flags:
        return "Generators' training arithmetic: not recorded by this run. "
    return ("Generators' training arithmetic (generator seed 0): " +
            ", ".join(f"{row} {arithmetic(v)}" for row, v in flags.items()) + " (bf16: --amp auto, on a CPU with "
            "bf16 instructions for a network whose bf16 check agreed and ran faster, BF16_CHECKED; the DDPM on a GPU "
            "with bf16; sampling in fp32). ")


def training_noise(plan):
    """How the run's CIs treat training noise, in one sentence."""
    r, g = plan.get("replicates", 1), plan.get("generator_seeds", 1)
    if r == 1:
        return "One training run per row and fold: training noise is not in the CIs"
    how = ("generator seeds, then the classifier replicates within each, then patients (between two rows without a "
           "generator: replicates, then patients)" if 1 < g < r else
           "replicates, then patients" + ("" if g > 1 else " (one generator per family and fold: the generator's own "
                                          "seed-to-seed noise is not in them)"))
    return (f"{r} classifiers (seeds) per row and fold and {g} generator{'s' if g > 1 else ''} (seeds) per family "
            f"and fold, classifier replicate r trained on generator seed r mod {g}; each statistic of a generator row "
            f"is the mean over generator seeds of the mean over their replicates, of a row without a generator the "
            f"plain mean over its replicates, and the paired comparisons resample {how}, so their CIs carry "
            f"training noise (not the OOD rows: their score is the mean over every fold's and replicate's "
            f"classifier; a row's own CI in the table is over patients; fidelity, privacy and cost are generator seed "
            f"0's)")


def summary_head(plan, tab, fid):
    return {"scale": plan["scale"], "folds": plan["folds"], "female_fraction": plan["female_fraction"],
            "replicates": plan.get("replicates", 1), "generator_seeds": plan.get("generator_seeds", 1),
            "training_noise": training_noise(plan),
            "n_images": len(tab), "n_patients": int(tab["patient_id"].nunique()), "model": plan["arch"],
            "pretrained": plan["pretrained"], "seconds": plan["seconds"], "sweep": plan["sweep"],
            "finding_only": plan["finding_only"],
            "generators_train_on": "each fold's training pool (both sexes, every pool woman; the CVAE: the "
                                   "pool's women), early stopping (AE, CVAE) on the fold's validation patients",
            "fidelity_n_per_fold": fid["n_per_fold"], "rows": {}}


def write_report(out, n_boot=None):
    """table, comparisons, figures, summary.json and README.md from the files in out alone."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    plan["n_boot"] = n_boot or plan["n_boot"]
    rows = plan["rows"]
    tab, arrays = read_preds(out / "preds.csv.gz", rows)  # {row: [(Y, scores, thresholds, fold) per replicate]}
    sex, pid = tab["sex"].to_numpy(), tab["patient_id"].to_numpy()
    Y = arrays["imbalanced_real"][0][0]
    stats = {row: [utility_stats(Y, p, p >= th, sex) for _, p, th, _ in arrays[row]] for row in rows}
    comps = comparisons(stats, rows, pid, plan, out)
    fid = fidelity(json.loads((out / "audit.json").read_text()))
    costs = json.loads((out / "cost.json").read_text())
    find = {(c["metric"], c["a"], c["b"]): c for c in comps}
    summary, table, csv_rows = summary_head(plan, tab, fid), [], []
    levels = nested_levels(generator_groups(plan), len(stats["imbalanced_real"]))
    for row in rows:
        point = mean_stats(stats[row], row_levels(row, levels))(np.arange(len(Y)))
        ci = bootstrap(mean_stats(stats[row], row_levels(row, levels)), len(Y), clusters=pid, n_boot=plan["n_boot"],
                       seed=plan["seed"])
        summary["rows"][row] = row_summary(row, point, ci, find, fid, costs)
        fF, fM, c = fid.get(row, {}).get(FEMALE, {}), fid.get(row, {}).get(MALE, {}), costs.get(row, {})
        table.append(table_row(row, point, ci, find, fF, fM, c))
        csv_rows.append(csv_row(row, point, find, fF, fM, c))
    summary["real_heldout_privacy"] = fid.get("real_heldout", {})
    summary["comparisons"] = comps
    summary.update(family_facts(comps, plan["n_boot"]))
    summary["recovery"] = recovery(stats, rows, pid, plan, find)
    recovery_table(out, summary["recovery"], plan)
    summary["answers"] = answers(comps, fid, rows, summary)
    summary["table"] = plan.get("table")  # your data: the table, group, minority and labels (None: NIH)
    write_table(out / "table", HEADER, table,
                title=f"Every row on one task: any finding vs No Finding by sex, pooled out-of-fold predictions "
                      f"({plan['data']}, {len(tab)} images, {tab['patient_id'].nunique()} patients, "
                      f"{plan['folds']} folds, "
                      f"{plan['arch']} {plan['size']} px, weights: {'imagenet' if plan['pretrained'] else 'none'})",
                notes=notes(summary, plan, fid, len(comps), costs))
    pd.DataFrame(csv_rows).to_csv(out / "table.csv", index=False, float_format="%.6g")
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(comps),
                title=f"Paired comparisons on the same out-of-fold test patients (a - b; {plan['data']})",
                notes=[f"patient-clustered paired bootstrap ({plan['n_boot']}). Primary: the "
                       f"{summary['primary_family_size']} comparisons the study declares in code (each generator "
                       f"family vs imbalanced_real on the female AUROC and the signed gap M - F); p (Holm) over them alone "
                       f"(the smallest it can reach: {summary['min_holm_p']:.3f}) and separately over the rows "
                       f"marked exploratory. MDE = (z + 0.84) x SE at the family's first Holm step. Recompute from "
                       f"preds.csv.gz."])
    figures(out, summary, rows, find, fid)
    summary["stage_times"] = stage_times(out)  # where the time went, per stage and by kind (stages.json)
    write_json(out / "summary.json", summary)
    planted = f"{plan['data']}, a positive control: " if "PLANTED" in plan["data"] else ""
    if plan.get("table"):
        planted = f"Your data ({plan['table']['minority']} vs the rest of {plan['table']['group']}): "
    write_readme(out, planted + "Which generator family, if any, helps the under-represented sex most, at what "
                                "cost to fidelity and privacy?",
                 summary["answers"] + [n for n in [reading_key(plan.get("table"))] if n],
                 ["table.md", "comparisons.md", "recovery.md"],
                 notes=["Figures: gain_vs_fidelity.png, gap_vs_auroc.png, samples_<row>.png, closest_pairs_<row>.png;"
                        " every prediction: preds.csv.gz; the stage commands: stages.json."])
    print((out / "table.md").read_text())
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


def recovery(stats, rows, pid, plan, find):
    """Per row, the share of what more real women recover for women that the row recovers: (female AUROC of the row
    - imbalanced_real's) / (balanced_real's - imbalanced_real's), with a patient bootstrap percentile CI (one draw
    serves all three). A ratio is only as good as its denominator: it is given where balanced_real's female gain is
    at least 3 SE (the planted control is built to give one), resamples whose denominator is not positive are left
    out of the CI and counted. With replicates each AUROC is the mean over them (a generator row's: over generator
    seeds of the mean over their replicates; a row without one: plainly), and a resample draws generator seeds, then
    replicates within them (replicate r of every row together; a row without a generator takes the mean of the
    drawn replicates), then patients. Returns {"rows": {row: {value, ci}}, "denominator_not_positive_share"} or
    {"reason": why there is none}."""
    ref = find.get(("female AUROC", "balanced_real", "imbalanced_real"))
    if ref is None:
        return {"reason": "no balanced_real row in this run"}
    if not ref["diff"] >= 3 * ref["se"]:
        return {"reason": f"balanced_real's female AUROC gain over imbalanced_real ({ref['diff']:+.3f}, SE "
                          f"{ref['se']:.3f}) is under 3 SE: a share of it would be mostly noise"}
    others = [r for r in rows if r not in ("balanced_real", "imbalanced_real")]
    n_reps = len(stats["imbalanced_real"])
    levels = nested_levels(generator_groups(plan), n_reps)
    everyone = [list(m) for m in levels] if levels else [[i] for i in range(n_reps)]

    nested = {r: has_generator(r) for r in rows}  # looked up once, not in each of the n_boot resamples

    def shares(idx, drawn=everyone):  # drawn: groups of replicate indices (draw_replicates)
        female = {r: np.mean([np.mean([stats[r][i]["female AUROC"](idx) for i in grp]) for grp in drawn])
                  if nested[r] else np.mean([stats[r][i]["female AUROC"](idx) for grp in drawn for i in grp])
                  for r in rows}
        base, full = female["imbalanced_real"], female["balanced_real"]
        return {**{r: (female[r] - base) / (full - base) if full > base else np.nan for r in others},
                "denominator": full - base}
    point = shares(np.arange(len(pid)))
    if n_reps == 1:
        ci, frame = bootstrap(shares, len(pid), clusters=pid, n_boot=plan["n_boot"], seed=plan["seed"], draws=True)
    else:
        rng, members = np.random.default_rng(plan["seed"]), cluster_members(pid, len(pid))
        frame = pd.DataFrame([shares(np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))]),
                                     draw_replicates(rng, n_reps, levels)) for _ in range(plan["n_boot"])])
        ci = {r: np.nanpercentile(frame[r], [2.5, 97.5]).tolist() for r in others}
    return {"rows": {r: {"value": float(point[r]), "ci": list(ci[r])} for r in others},
            "denominator_not_positive_share": float(np.mean(frame["denominator"] <= 0))}


def recovery_table(out, rec, plan):
    if "reason" in rec:
        rows = [["n/a", rec["reason"], ""]]
    else:
        rows = [[r, f"{v['value']:.2f}", f"[{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]"] for r, v in rec["rows"].items()]
    write_table(out / "recovery", ["row", "share of balanced_real's female gain", "95% CI"], rows,
                title=f"How much of what more real women recover for women each row recovers ({plan['data']})",
                notes=["(female AUROC of the row - imbalanced_real's) / (balanced_real's - imbalanced_real's) on the "
                       "same test patients; 1 = as much as real women, 0 = nothing, below 0 = worse than the baseline. "
                       f"Percentile CI from a bootstrap ({plan['n_boot']}) of "
                       f"{'generator seeds, replicates within them, then ' if plan.get('replicates', 1) > 1 else ''}"
                       f"patients; resamples in which balanced_real "
                       "does not beat imbalanced_real are left out (share: "
                       f"{rec.get('denominator_not_positive_share', float('nan')):.3f}). Given only where "
                       "balanced_real's gain is at least 3 SE. Exploratory: not in the Holm family."])


def baseline_gap(summary):
    """Whether imbalanced_real has a gap to close at all: its signed gap M - F with its CI."""
    base = summary["rows"]["imbalanced_real"]
    women, men = (base["utility"][f"{s} AUROC"]["value"] for s in ("female", "male"))
    g, (lo, hi) = base["fairness"]["AUROC gap (M - F)"]["value"], base["fairness"]["AUROC gap (M - F)"]["ci"]
    return (f"The baseline (imbalanced_real) scores women {women:.3f} and men {men:.3f}: "
            f"gap M - F {g:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})" +
            (", so there is no detectable gap here for any row to close; a row that narrows it cannot be told from "
             "one that does nothing." if lo <= 0 <= hi else "."))


def answers(comps, fid, rows, summary=None):
    """The answer sentences: which generator family, if any, closes the sex gap, and which copy training images."""
    gen = [r for r in rows if r in ROWS and ROWS[r][1]]
    find = {(c["metric"], c["a"]): c for c in comps if c["b"] == "imbalanced_real"}
    rows_gap = [find[("AUROC gap (M - F)", r)] for r in gen if ("AUROC gap (M - F)", r) in find and
                find[("AUROC gap (M - F)", r)]["primary"]]
    closed = [c for c in rows_gap if c["p_holm"] < 0.05 and c["diff"] < 0]
    out = [baseline_gap(summary)] if summary else []
    by = lambda c: (f"female AUROC {find[('female AUROC', c['a'])]['diff']:+.3f}, male AUROC "
                    f"{find[('male AUROC', c['a'])]['diff']:+.3f}")
    if closed:
        best = min(closed, key=lambda c: c["diff"])
        out.append(answer(best, f"{best['a']} moves the sex gap toward women here: AUROC M - F, {best['a']} minus "
                                f"imbalanced") + f" ({by(best)})")
    elif rows_gap:
        widest = min(rows_gap, key=lambda c: c["diff"])
        lead = ("the largest move toward women" if widest["diff"] < 0 else
                "none moves it toward women on average; the smallest move away")
        out.append(f"No generator family moves the sex gap toward women detectably at this scale: {lead}, "
                   f"{widest['a']}, "
                   f"changes AUROC M - F by {widest['diff']:+.3f} (95% CI {widest['ci'][0]:+.3f} to "
                   f"{widest['ci'][1]:+.3f}, Holm p {widest['p_holm']:.2g}; {by(widest)}; effects smaller than "
                   f"{widest['mde']:.3f} would usually be missed).")
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
    report_command(__doc__, write_report, "classify.compare_study",
                   needs=("plan.json", "preds.csv.gz", "audit.json", "cost.json"), n_boot=True)
