"""The skintone study's report (the plan is vae/skintone_study.py): reads only the files the study gathered into
--out, and writes the tables, figures, summary.json and README.md.

    plan.json           the settings the report needs (sizes, repeats, bootstrap, data and VGG19 used, wall time)
    preds.csv           one row per test image, training set and repeat: reconstruction MSE and mean latent std
    recon/<set>.npz     repeat 0's light and dark test images and their reconstructions after training set <set>

Inference is at the level of repeats (docs/METHODS.md): a statistic is the median of a repeat's test images,
averaged over repeats. A comparison's p is the exact sign-flip test over the repeats' differences, its CI the one
that inverts the same test (fairness.compare.sign_flip_test; smallest p 2 / 2^R); a median's CI in medians.md is a
two-level bootstrap (repeats, then test images within each; fairness/compare.py).

    python -m vae.skintone_report --out results/skintone     # rebuild a finished run's report from its files
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu, spearmanr

from common.errors import DataError
from common.report import footer, markdown_table, report_command, save_grid, stage_times, write_table
from common.runs import write_json
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, family_facts,
                              paired_difference_replicates, sign_flip_test, with_holm)
from fairness.figures import boxplots
from vae.skin import SETS

GROUPS = ("light", "dark")
QUESTIONS = ("Does the VAE reconstruct dark skin worse when trained on light skin (set A)?",
             "Does more dark skin in training fix it?")
# the comparisons that answer them, declared in code: the primary family (Holm over these alone; the other
# rows of comparisons.md are exploratory)
PRIMARY = [(f"median MSE, training set A ({SETS['A']})", "dark", "light"),
           ("median MSE, dark test images", f"C ({SETS['C']})", f"A ({SETS['A']})"),
           ("median MSE, dark test images", f"B ({SETS['B']})", f"A ({SETS['A']})"),
           ("median MSE gap dark - light", f"C ({SETS['C']})", f"A ({SETS['A']})")]
COLORS = {"light": "#e8c39e", "dark": "#6b4226"}
MEDIANS_HEADER = ["training set", "MSE light", "MSE dark", "latent std light", "latent std dark"]


def median_of(v):
    """The median, NaN for no values (a resample without one of the groups), so that the bootstrap leaves it out."""
    return float(np.median(v)) if len(v) else float("nan")


def two_level(replicates, n_boot, seed):
    """paired_difference_replicates over the repeats, its method named in this study's units (one test image per
    unit; each repeat has its own test images, so each draws its own): the CI of a median in medians.md."""
    d = paired_difference_replicates(replicates, n_boot=n_boot, seed=seed)
    method = d["method"].replace("test patients", "test images").replace("patients", "test images")
    return {**d, "method": method}


def over_repeats(replicates):
    """A comparison at the level of repeats (the independent units: each trains its own models on its own draw):
    the mean of the repeats' differences, with the exact sign-flip test over them and the CI that inverts the same
    test (fairness.compare.sign_flip_test), so that p and CI agree; each repeat's difference is taken on all of its
    test images, whose noise is inside the spread between repeats. The smallest p, 2 / 2^R, sets how many repeats a
    family needs."""
    per_repeat = [a(np.arange(len(c))) - b(np.arange(len(c))) for a, b, c in replicates]
    n = sum(len(c) for _, _, c in replicates)
    method = (f"exact sign-flip test over the {len(per_repeat)} repeats' differences, CI by inverting it; each "
              f"difference on its repeat's own test images")
    if not np.all(np.isfinite(per_repeat)):
        return {"diff": float("nan"), "ci": [float("nan")] * 2, "p": float("nan"), "se": float("nan"),
                "mde": float("nan"), "n_units": n, "replicates": len(per_repeat), "method": method}
    d = sign_flip_test(per_repeat)
    return {**d, "mde": float("nan"), "n_units": n, "replicates": len(per_repeat), "method": method}


def cell(df, r, s, g=None):
    """preds rows of repeat r, training set s (and test group g), in the order they were written."""
    keep = (df["repeat"] == r) & (df["train_set"] == s)
    return df[keep if g is None else keep & (df["test_group"] == g)]


def replicate_median(df, s, g, col, n_boot, seed):
    """Mean over repeats of the per-repeat median of `col` (set s, group g), with its two-level bootstrap CI (0 as
    the second condition). Returns (value, ci, per-repeat medians)."""
    reps = []
    for r in sorted(df["repeat"].unique()):
        v = cell(df, r, s, g)[col].to_numpy()
        reps.append((lambda i, v=v: median_of(v[i]), lambda i: 0.0, cell(df, r, s, g)["image"].to_numpy()))
    d = two_level(reps, n_boot, seed)
    return d["diff"], d["ci"], [a(np.arange(len(c))) for a, _, c in reps]


def compare_groups(df):
    """The study's comparisons of median MSE, each at the level of repeats (over_repeats: exact sign-flip p and the
    CI that inverts it), Holm over the declared primaries and, separately, over the rest:
    dark - light within each training set (the repeat's 2 n_test test images of that set), and each group across
    training sets (B - A, C - A, C - B: the same test images within a repeat, so paired). A list of
    fairness.compare.comparison rows with p_holm."""
    repeats = sorted(df["repeat"].unique())
    rows = []
    for s in SETS:
        reps = []
        for r in repeats:
            d = cell(df, r, s)
            mse, dark = d["mse"].to_numpy(), (d["test_group"] == "dark").to_numpy()
            reps.append((lambda i, m=mse, k=dark: median_of(m[i][k[i]]),
                         lambda i, m=mse, k=dark: median_of(m[i][~k[i]]), d["image"].to_numpy()))
        rows.append(comparison(f"median MSE, training set {s} ({SETS[s]})", "dark", "light",
                               over_repeats(reps)))
    for a, b in (("C", "A"), ("B", "A")):  # does more dark skin close the gap: (dark - light) under a minus under b
        reps = []
        for r in repeats:
            da, db = cell(df, r, a), cell(df, r, b)
            assert np.array_equal(da["image"].to_numpy(), db["image"].to_numpy()), "paired on the same images"
            dark = (da["test_group"] == "dark").to_numpy()

            def gap(m, k=dark):
                return lambda i: median_of(m[i][k[i]]) - median_of(m[i][~k[i]])
            reps.append((gap(da["mse"].to_numpy()), gap(db["mse"].to_numpy()), da["image"].to_numpy()))
        rows.append(comparison("median MSE gap dark - light", f"{a} ({SETS[a]})", f"{b} ({SETS[b]})",
                               over_repeats(reps)))
    for g in GROUPS:
        for a, b in (("B", "A"), ("C", "A"), ("C", "B")):
            reps = []
            for r in repeats:
                da, db = cell(df, r, a, g), cell(df, r, b, g)
                assert np.array_equal(da["image"].to_numpy(), db["image"].to_numpy()), "paired on the same images"
                reps.append((lambda i, m=da["mse"].to_numpy(): median_of(m[i]),
                             lambda i, m=db["mse"].to_numpy(): median_of(m[i]), da["image"].to_numpy()))
            rows.append(comparison(f"median MSE, {g} test images", f"{a} ({SETS[a]})", f"{b} ({SETS[b]})",
                                   over_repeats(reps)))
    return with_holm(rows, primary=PRIMARY)


def answers(comparisons):
    """One sentence per question (QUESTIONS), from the comparisons' effect, CI, Holm p and MDE."""
    by = {(c["metric"], c["a"], c["b"]): c for c in comparisons}
    gap_a = by[(f"median MSE, training set A ({SETS['A']})", "dark", "light")]
    fix = [answer(by[("median MSE, dark test images", f"{a} ({SETS[a]})", f"A ({SETS['A']})")], f"{a} - A")
           for a in ("C", "B")]
    closes = answer(by[("median MSE gap dark - light", f"C ({SETS['C']})", f"A ({SETS['A']})")],
                    "the dark - light gap under C minus under A")
    return [f"{QUESTIONS[0]} " + answer(gap_a, "median MSE dark - light"),
            f"{QUESTIONS[1]} Dark-skin median MSE (negative: lower error), " + fix[0][:-1] + "; " + fix[1][:-1]
            + "; and " + closes]


def read_run(out):
    """(plan.json as a dict, preds.csv as a table) of a finished run; a missing file stops with one line."""
    out = Path(out)
    for name in ("plan.json", "preds.csv"):
        if not (out / name).is_file():
            raise DataError(f"--out {out}: no {name} there (run `python -m vae.skintone_study --out {out}` first; "
                            f"the report reads the files a finished run gathered)")
    return json.loads((out / "plan.json").read_text()), pd.read_csv(out / "preds.csv")


def title_tag(plan):
    """What every title says about the data and the VGG19 term (PHANTOM data is always named)."""
    data, vgg = plan["data"], plan["vgg"]
    return ("PHANTOM data" if data == "phantom" else data) + ("" if vgg.startswith("imagenet")
                                                              else ", random VGG19 (no ImageNet weights)") + \
        ("" if plan["perceptual_weight"] else ", perceptual term off")


def group_medians(df, repeats, n_boot, seed):
    """{mse,latent_std}_median, _median_ci and the per-repeat medians per training set and test group, and the
    Spearman rho of latent std with MSE within each repeat; keyed as in summary.json."""
    s_ = {k: {} for k in ("mse_median", "mse_median_ci", "latent_std_median", "latent_std_median_ci",
                          "median_per_repeat", "latent_std_median_per_repeat", "spearman_std_mse")}
    for s in SETS:
        for key, per in (("mse", "median_per_repeat"), ("latent_std", "latent_std_median_per_repeat")):
            for k in (f"{key}_median", f"{key}_median_ci", per):
                s_[k][s] = {}
            for g in GROUPS:
                (s_[f"{key}_median"][s][g], s_[f"{key}_median_ci"][s][g],
                 s_[per][s][g]) = replicate_median(df, s, g, key, n_boot, seed)
        s_["spearman_std_mse"][s] = {}
        for g in GROUPS:  # within each repeat: pooling repeats would mix models with different error levels
            rhos = [float(spearmanr(cell(df, r, s, g)["latent_std"], cell(df, r, s, g)["mse"])[0]) for r in repeats]
            s_["spearman_std_mse"][s][g] = {"rho_median": float(np.median(rhos)), "rho_per_repeat": rhos}
    return s_


def medians_rows(summary):
    """The rows of medians.md: per training set, MSE and latent std per group, mean of medians [95% CI]."""
    rows = []
    for s in SETS:
        m, c = summary["mse_median"][s], summary["mse_median_ci"][s]
        sm, sc = summary["latent_std_median"][s], summary["latent_std_median_ci"][s]
        rows.append([f"{s} ({SETS[s]})", *[f"{m[g]:.4f} [{c[g][0]:.4f}, {c[g][1]:.4f}]" for g in GROUPS],
                     *[f"{sm[g]:.5f} [{sc[g][0]:.5f}, {sc[g][1]:.5f}]" for g in GROUPS]])
    return rows


def write_medians(out, rows, summary, plan, tag):
    n = f"n = {plan['n_test']} test images per group in each of {summary['repeats']} repeats (each its own draw " \
        f"and models)"
    write_table(out / "medians", MEDIANS_HEADER, rows,
                title=f"Reconstruction MSE and latent std: mean over repeats of the per-repeat median [95% CI] "
                      f"({tag})",
                notes=[f"{n}; MSE of decode(mu(x)) on the [0, 1] scale. CI: {summary['ci_method']}. Light vs dark "
                       f"and the training sets are compared in comparisons.md. Paper (Fitzpatrick17k): MSE below "
                       f"0.07 for all, light < dark in every training set including 50/50. Sizes: "
                       f"{summary['sizes']} (quick scale chosen for a 2-core CPU; full: 64 px, 500 / 1,668, 15 "
                       f"epochs, 10 repeats). VGG19: {plan['vgg']}. Wall time of this invocation "
                       f"{plan['seconds'] / 60:.1f} min (stages it reused not counted)."])


def write_comparisons(out, comparisons, said, repeats, n_test, tag):
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(comparisons, digits=4),
                title=f"Median reconstruction MSE compared, at the level of repeats ({tag})",
                notes=[said[0], said[1],
                       f"Each difference is the mean over {repeats} repeats of the per-repeat difference of "
                       f"median MSE; {comparisons[0]['method']}. Units: the {repeats} repeats (n is their test "
                       f"images: dark - light within a training set on the repeat's {2 * n_test} test images of both "
                       f"groups; across training sets on the same test images, paired). The smallest p {repeats} "
                       f"repeats allow is 2 / 2^{repeats} = {2 / 2 ** repeats:.2g}. Primary: the "
                       f"{sum(c['primary'] for c in comparisons)} comparisons that answer the questions, declared in "
                       f"code, p (Holm) over them alone; the other rows are exploratory. MDE = (t + t_0.8) x the SE "
                       f"over repeats (SD / sqrt(R), Student t on R - 1 df) at the family's first Holm step (power "
                       f"0.8); infinite where the family cannot pass Holm at all."])


def write_per_repeat(out, df, repeats, tag):
    """Per repeat and training set: the group medians and a Mann-Whitney U test within that repeat only."""
    rows = []
    for s in SETS:
        for r in repeats:
            light, dark = cell(df, r, s, "light")["mse"], cell(df, r, s, "dark")["mse"]
            rows.append([r, s, f"{np.median(light):.4f}", f"{np.median(dark):.4f}",
                         f"{np.median(dark) - np.median(light):+.4f}",
                         f"{mannwhitneyu(light, dark, alternative='two-sided').pvalue:.2g}"])
    write_table(out / "per_repeat", ["repeat", "training set", "median MSE light", "median MSE dark", "dark - light",
                                     "Mann-Whitney p, this repeat only"], rows,
                title=f"Per repeat: median MSE and a Mann-Whitney U test of light vs dark within the repeat ({tag})",
                notes=["Each p tests the images of one repeat's models only; the repeats are not pooled (their models "
                       "differ), see comparisons.md for the inference over repeats."])


def write_std_vs_mse(out, spearman, n_test, tag):
    rows = [[f"{s} ({SETS[s]})", g, f"{spearman[s][g]['rho_median']:+.2f}",
             " ".join(f"{v:+.2f}" for v in spearman[s][g]["rho_per_repeat"]), n_test] for s in SETS for g in GROUPS]
    write_table(out / "std_vs_mse", ["training set", "test group", "Spearman rho (latent std, MSE), median over "
                                     "repeats", "rho per repeat", "images per repeat"],
                rows, title=f"Does the latent std track the reconstruction error? ({tag})",
                notes=["Spearman rho computed within each repeat (its own models), not pooled across repeats; the "
                       "median over repeats and each repeat's value. The paper's claim: the latent std is no warning "
                       "sign of the larger error on dark skin."])


def write_boxplots(out, df, summary, tag):
    """Fig. 3 (MSE) and Fig. 6 (latent std): boxes of all images, dots of each repeat's median."""
    for col, label, fig, title, per in (
            ("mse", "MSE", "fig3_mse.png", "Fig. 3: reconstruction MSE", "median_per_repeat"),
            ("latent_std", "latent std", "fig6_latent_std.png", "Fig. 6: mean latent std",
             "latent_std_median_per_repeat")):
        by = {s: {g: df.loc[(df.train_set == s) & (df.test_group == g), col] for g in GROUPS} for s in SETS}
        boxplots(by, out / fig, f"{title} by training set and test group, images of all repeats (boxes) and each "
                                f"repeat's median (dots) ({tag})", label, COLORS,
                 points=summary[per], points_label="median of one repeat")


def write_recon_grids(out, tag):
    """Figs. 4-5: repeat 0's light / dark test images and their reconstructions after A, B, C (recon/<set>.npz)."""
    grids = {}
    for s in SETS:
        if (out / "recon" / f"{s}.npz").is_file():
            with np.load(out / "recon" / f"{s}.npz") as z:
                for g in GROUPS:
                    grids[(s, g)] = (torch.from_numpy(z[f"{g}_original"]), torch.from_numpy(z[f"{g}_recon"]))
    for g, fig in (("light", "fig4_recon_light.png"), ("dark", "fig5_recon_dark.png")):
        if ("A", g) in grids:
            rows = torch.cat([grids[("A", g)][0]] + [grids[(s, g)][1] for s in SETS])
            save_grid(rows, out / fig, nrow=4, title=f"{g} test images (row 1) and reconstructions after A, B, C "
                                                     f"({tag})", row_labels=["original", "A", "B", "C"])


def write_by_diagnosis(out, df, tag):
    """Fig. 8: median MSE per diagnosis (csv) and boxes for training sets A and C."""
    diag = df.groupby(["diagnosis", "train_set", "test_group"])["mse"].median().unstack(["train_set", "test_group"])
    diag.to_csv(out / "fig8_mse_by_diagnosis.csv")
    boxplots({d[:14]: {f"{s}-{g}": df.loc[(df.diagnosis == d) & (df.train_set == s) & (df.test_group == g), "mse"]
                       for s in ("A", "C") for g in GROUPS} for d in sorted(df["diagnosis"].unique())},
             out / "fig8_mse_by_diagnosis.png", f"Fig. 8: MSE by diagnosis, training sets A and C ({tag})", "MSE")


def write_readme(out, said, rows, summary, tag):
    """README.md: the answers, the medians table, how to read the files, the command and commit."""
    text = [f"# Skin tone: is a VAE's reconstruction fair across skin types? ({tag})", "", *[f"- {a}" for a in said],
            "", "## Reconstruction MSE and latent std (mean over repeats of the per-repeat median [95% CI])", "",
            markdown_table(MEDIANS_HEADER, rows), "", "## How to read it", "",
            f"Each training set (A 100% light, B 50/50, C 100% dark) trains its own residual VAE in each of "
            f"{summary['repeats']} repeats; every repeat draws its own light and dark test images. The answers come "
            f"from comparisons.md (dark - light within a set, and each group across sets; differences of medians "
            f"averaged over repeats, p from an exact sign-flip test over the repeats and the CI that inverts it, "
            f"Holm over the primary rows); 'cannot tell at this scale' "
            f"means the CI holds 0 or the difference does not survive Holm's correction, and the MDE is the "
            f"smallest effect the design would have seen. per_repeat.md has each repeat alone, std_vs_mse.md whether the latent std tracks the error, "
            f"fig3-fig8 the figures. Sizes {summary['sizes']}, scale {summary['scale']}, VGG19 {summary['vgg']}, "
            f"training arithmetic {summary['arithmetic']}. "
            f"preds.csv holds one row per test image, training set and repeat: every number here can be "
            f"recomputed from it (`python -m vae.skintone_report --out {out}`).", "", footer(), ""]
    (out / "README.md").write_text("\n".join(text))


def write_report(out):
    """Every table, figure, summary.json and README.md from the files under out (plan.json, preds.csv, recon/)."""
    out = Path(out)
    plan, df = read_run(out)
    tag, n_boot, seed = title_tag(plan), plan["n_boot"], plan["seed"]
    repeats = sorted(df["repeat"].unique())
    how = (f"two-level bootstrap ({n_boot}): repeats with replacement, then test images within each; percentile "
           f"95% CI of the mean over repeats of the per-repeat median")
    medians = group_medians(df, repeats, n_boot, seed)
    summary = {**{k: medians[k] for k in ("mse_median", "mse_median_ci", "latent_std_median", "latent_std_median_ci",
                                          "median_per_repeat", "latent_std_median_per_repeat", "spearman_std_mse")},
               "ci_method": how, "repeats": len(repeats), "data": plan["data"],
               "pretrained": plan["vgg"].startswith("imagenet"), "vgg": plan["vgg"], "scale": plan["scale"],
               "sizes": plan["sizes"], "seconds": plan["seconds"],
               "arithmetic": plan.get("arithmetic", "not recorded (a run from before the stages recorded it)")}
    rows = medians_rows(summary)
    write_medians(out, rows, summary, plan, tag)
    comparisons = compare_groups(df)
    summary["comparisons"], summary["answers"] = comparisons, answers(comparisons)
    summary.update(family_facts(comparisons, plan["n_boot"], sign_flip_units=len(repeats)))
    write_comparisons(out, comparisons, summary["answers"], len(repeats), plan["n_test"], tag)
    write_per_repeat(out, df, repeats, tag)
    write_std_vs_mse(out, summary["spearman_std_mse"], plan["n_test"], tag)
    write_boxplots(out, df, summary, tag)
    write_recon_grids(out, tag)
    write_by_diagnosis(out, df, tag)
    summary["stage_times"] = stage_times(out)  # where the time went, per stage and by kind (stages.json)
    write_json(out / "summary.json", summary)
    write_readme(out, summary["answers"], rows, summary, tag)
    print((out / "medians.md").read_text())
    print((out / "comparisons.md").read_text())
    print("\n".join(summary["answers"]))
    return summary


if __name__ == "__main__":
    report_command(__doc__, write_report, "vae.skintone_study",
                   needs=("plan.json", "preds.csv"))
