"""Is a VAE fair across skin types? The protocol of Lopez-Perez, Hauberg & Feragen (docs/METHODS.md):

Skin types: light = Fitzpatrick 1-2, dark = 5-6 (3-4 and unknown dropped). Per repeat: two test sets (light and
dark, --n-test each, disjoint), then three training sets of --n-train images drawn with replacement from the rest:
A 100% light, B 50/50, C 100% dark (the repeat's split file, runs/<out>/repeat<r>/sets.csv). Stage: a residual
perceptual VAE (vae.train_resvae, its own command; `--dry-run` prints them) is trained on each set, and every
test image gets its reconstruction MSE and mean latent std (its preds.csv; gathered into --out/preds.csv, one row
per test image, training set and repeat). The report reads only those files; SCALES below holds each scale's
settings.

Inference is at the level of repeats, since each repeat trains its own models on its own draw: a statistic is the
median MSE of a repeat's test images, averaged over repeats, and its CI comes from a two-level bootstrap (draw
repeats with replacement, then test images within each; fairness/compare.py). Compared (comparisons.md, Holm over
all): dark - light within each training set, and each group across training sets (B - A, C - A, C - B, paired on
the repeat's same test images). Also the Spearman correlation of latent std with MSE per group within each repeat
(is the std a warning sign?), the MSE per diagnosis (paper Fig. 8), the figures, and one sentence per question.

Data: Fitzpatrick17k under --data-root (`python -m common.download fitzpatrick17k --root DIR`); without it, the
procedural skin phantom (common/phantom.py), and every title says PHANTOM.

    python -m vae.skintone_study                                # quick: phantom, 32 px, 6 repeats (CPU)
    python -m vae.skintone_study --scale full --data-root /data/fitzpatrick17k --out results/skintone-full   # GPU
    python -m vae.skintone_study --smoke --out smoke/skintone   # seconds
"""
import argparse
import json
from pathlib import Path
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu, spearmanr

from common.cli import ArgumentParser, as_argv, positive_int, run
from common.report import save_grid, write_table
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.splits import write_sets
from common.stages import Stages, add_study_args, parse_scaled, planned
from fairness.compare import COMPARISON_HEADER, answer, comparison, comparison_rows, paired_difference_replicates, \
    with_holm
from fairness.figures import boxplots
from vae.skin import SETS, draw_train_set, load_skin
from vae.train_resvae import add_args

# Every setting a scale sets, in one place (a flag given on the command line wins). quick: as many repeats as 30
# min on 2 CPU cores allow: 3 repeats took 10.8 min (README), so 6 take ~22 min, with room for machines 1.5x slower
# (inference is at the level of repeats, so the repeats are what buys power); a random VGG19 (no download; pass
# --pretrained for ImageNet weights). full: the paper's sizes and ImageNet VGG19. smoke: tiny, but 2 repeats so that
# the two-level bootstrap has replicates to draw.
SCALES = {
    "quick": {"size": 32, "n_test": 100, "n_train": 200, "epochs": 15, "repeats": 6, "pretrained": False,
              "width": 32, "latent_res": 8, "n_boot": 1000},
    "full": {"size": 64, "n_test": 500, "n_train": 1668, "epochs": 15, "repeats": 10, "pretrained": True,
             "width": 32, "latent_res": 8, "n_boot": 1000},
    "smoke": {"size": 16, "n_test": 8, "n_train": 24, "epochs": 1, "repeats": 2, "pretrained": False,
              "width": 8, "latent_res": 4, "n_boot": 50},
}
GROUPS = ("light", "dark")
QUESTIONS = ("Does the VAE reconstruct dark skin worse when trained on light skin (set A)?",
             "Does more dark skin in training fix it?")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/skintone", SCALES)
    p.add_argument("--data-root", default=None, help="Fitzpatrick17k folder; default: the skin phantom")
    p.add_argument("--n-test", type=positive_int, help="test images per group")
    p.add_argument("--n-train", type=positive_int, help="training images per set")
    p.add_argument("--repeats", type=positive_int, help="repeats (each its own test images, training draws, models)")
    p.add_argument("--n-boot", type=positive_int, help="two-level bootstrap resamples (repeats, then test images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and of the random VGG19; the model of repeat "
                                                        "r and set s gets seed * 1000 + 10 r + ord(s)")
    add_args(p)  # the VAE's flags (vae/train_resvae.py), passed to every training stage
    args = parse_scaled(p, SCALES, argv)
    return args


def image_name(path):
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def repeat_sets(t, r, args):
    """Repeat r's sets {name: image names}: the light and dark test images, and the training sets A, B, C drawn
    with replacement from the rest (one generator per repeat, in this order)."""
    groups = t["group"].to_numpy()
    rng = np.random.default_rng(args.seed + r)
    test = {g: rng.choice(np.nonzero(groups == g)[0], args.n_test, replace=False) for g in GROUPS}
    pool = np.setdiff1d(np.arange(len(t)), np.r_[test["light"], test["dark"]])
    idx = {**test, **{s: draw_train_set(t, pool, s, args.n_train, rng) for s in SETS}}
    names = np.array([image_name(i) for i in t["image"]])
    return {k: names[v] for k, v in idx.items()}


def main(args):
    t0 = time.time()
    t, _, data = load_skin(args.data_root, args.size)  # inputs first: the phantom is made (once) here
    runs = Path(args.runs or default_runs(args.out))
    stages = Stages(dry=args.dry_run or bool(args.makefile))
    if not stages.dry:
        out = prepare_out_dir(args.out, args.force)
        write_config(out, args, data=data, sizes={k: getattr(args, k) for k in (
            "size", "n_test", "n_train", "epochs", "repeats")})
    cells = []
    for r in range(args.repeats):
        sets_file = runs / f"repeat{r}" / "sets.csv"
        sets = repeat_sets(t, r, args)
        if write_sets(sets_file, sets, dry=args.dry_run) and args.dry_run:
            stages.changed.add(sets_file)  # a run would rewrite it: its stages would run again
        for s in SETS:
            if not stages.dry:
                print(f"repeat {r + 1}/{args.repeats}, training set {s} ({time.time() - t0:.0f} s)", flush=True)
            cell = runs / f"repeat{r}" / s
            stages.script("vae.train_resvae", (["--data-root", args.data_root] if args.data_root else []) + [
                "--sets", sets_file, "--train-set", s, "--test-sets", ",".join(GROUPS), "--seed",
                args.seed * 1000 + r * 10 + ord(s), "--vgg-seed", args.seed, "--device", args.device, "--tag", f"repeat={r}", "--tag",
                f"train_set={s}", *as_argv(add_args, args), "--out-dir", cell], cell, deps=[sets_file])
            cells.append((r, s, cell))
    if planned(stages, args, f"preds.csv (the stages' preds.csv together), the tables and figures in {args.out}"):
        return
    df = pd.concat([pd.read_csv(cell / "preds.csv") for _, _, cell in cells], ignore_index=True)
    df.to_csv(out / "preds.csv", index=False)  # one row per test image, training set and repeat
    grids = {}
    for r, s, cell in cells:
        if r == 0:
            with np.load(cell / "recon.npz") as z:
                for g in GROUPS:
                    grids[(s, g)] = (torch.from_numpy(z[f"{g}_original"]), torch.from_numpy(z[f"{g}_recon"]))
    vgg = json.loads((cells[0][2] / "metrics.json").read_text())["vgg"]
    tag = ("PHANTOM data" if data == "phantom" else data) + ("" if vgg.startswith("imagenet")
                                                              else ", random VGG19 (no ImageNet weights)") + \
        ("" if args.perceptual_weight else ", perceptual term off")
    write_json(out / "stages.json", {"stages": stages.commands, "reused": stages.reused})
    report(df, grids, args, out, data, tag, vgg, args.scale, time.time() - t0)


def median_of(v):
    """The median, NaN for no values (a resample without one of the groups), so that the bootstrap leaves it out."""
    return float(np.median(v)) if len(v) else float("nan")


def two_level(replicates, n_boot, seed):
    """paired_difference_replicates over the repeats, its method named in this study's units (one test image per
    unit; each repeat has its own test images, so each draws its own)."""
    d = paired_difference_replicates(replicates, n_boot=n_boot, seed=seed)
    method = d["method"].replace("test patients", "test images").replace("patients", "test images")
    return {**d, "method": method}


def cell(df, r, s, g=None):
    """preds rows of repeat r, training set s (and test group g), in the order they were written."""
    keep = (df["repeat"] == r) & (df["train_set"] == s)
    return df[keep if g is None else keep & (df["test_group"] == g)]


def replicate_median(df, s, g, col, n_boot, seed):
    """Mean over repeats of the per-repeat median of `col` (set s, group g), with its two-level bootstrap CI: the
    same bootstrap as the comparisons, with 0 as the second condition. Returns (value, ci, per-repeat medians)."""
    reps = []
    for r in sorted(df["repeat"].unique()):
        v = cell(df, r, s, g)[col].to_numpy()
        reps.append((lambda i, v=v: median_of(v[i]), lambda i: 0.0, cell(df, r, s, g)["image"].to_numpy()))
    d = two_level(reps, n_boot, seed)
    return d["diff"], d["ci"], [a(np.arange(len(c))) for a, _, c in reps]


def compare_groups(df, n_boot=1000, seed=0):
    """The study's comparisons of median MSE, each over repeats with the two-level bootstrap, Holm over all:
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
                               two_level(reps, n_boot, seed)))
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
                               two_level(reps, n_boot, seed)))
    for g in GROUPS:
        for a, b in (("B", "A"), ("C", "A"), ("C", "B")):
            reps = []
            for r in repeats:
                da, db = cell(df, r, a, g), cell(df, r, b, g)
                assert np.array_equal(da["image"].to_numpy(), db["image"].to_numpy()), "paired on the same images"
                reps.append((lambda i, m=da["mse"].to_numpy(): median_of(m[i]),
                             lambda i, m=db["mse"].to_numpy(): median_of(m[i]), da["image"].to_numpy()))
            rows.append(comparison(f"median MSE, {g} test images", f"{a} ({SETS[a]})", f"{b} ({SETS[b]})",
                                   two_level(reps, n_boot, seed)))
    return with_holm(rows)


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


def report(df, grids, args, out, data, tag, vgg, scale, seconds):
    """Tables, figures and summary.json from the per-image rows (preds.csv)."""
    repeats = sorted(df["repeat"].unique())
    how = (f"two-level bootstrap ({args.n_boot}): repeats with replacement, then test images within each; percentile "
           f"95% CI of the mean over repeats of the per-repeat median")
    summary = {"mse_median": {}, "mse_median_ci": {}, "latent_std_median": {}, "latent_std_median_ci": {},
               "median_per_repeat": {}, "latent_std_median_per_repeat": {}, "spearman_std_mse": {}, "ci_method": how,
               "repeats": len(repeats), "data": data, "pretrained": vgg.startswith("imagenet"),
               "vgg": vgg, "scale": scale,
               "sizes": {k: getattr(args, k) for k in ("size", "n_test", "n_train", "epochs")}, "seconds": seconds}
    table, corr_rows, repeat_rows = [], [], []
    for s in SETS:
        for key, col in (("mse", "mse"), ("latent_std", "latent_std")):
            per = "median_per_repeat" if key == "mse" else "latent_std_median_per_repeat"
            for k in (f"{key}_median", f"{key}_median_ci", per):
                summary[k][s] = {}
            for g in GROUPS:
                (summary[f"{key}_median"][s][g], summary[f"{key}_median_ci"][s][g],
                 summary[per][s][g]) = replicate_median(df, s, g, col, args.n_boot, args.seed)
        summary["spearman_std_mse"][s] = {}
        for g in GROUPS:  # within each repeat: pooling repeats would mix models with different error levels
            rhos = [float(spearmanr(cell(df, r, s, g)["latent_std"], cell(df, r, s, g)["mse"])[0]) for r in repeats]
            summary["spearman_std_mse"][s][g] = {"rho_median": float(np.median(rhos)), "rho_per_repeat": rhos}
            corr_rows.append([f"{s} ({SETS[s]})", g, f"{np.median(rhos):+.2f}", " ".join(f"{v:+.2f}" for v in rhos),
                              args.n_test])
        for r in repeats:
            light, dark = cell(df, r, s, "light")["mse"], cell(df, r, s, "dark")["mse"]
            repeat_rows.append([r, s, f"{np.median(light):.4f}", f"{np.median(dark):.4f}",
                                f"{np.median(dark) - np.median(light):+.4f}",
                                f"{mannwhitneyu(light, dark, alternative='two-sided').pvalue:.2g}"])
        m, c = summary["mse_median"][s], summary["mse_median_ci"][s]
        sm, sc = summary["latent_std_median"][s], summary["latent_std_median_ci"][s]
        table.append([f"{s} ({SETS[s]})", *[f"{m[g]:.4f} [{c[g][0]:.4f}, {c[g][1]:.4f}]" for g in GROUPS],
                      *[f"{sm[g]:.5f} [{sc[g][0]:.5f}, {sc[g][1]:.5f}]" for g in GROUPS]])
    n = f"n = {args.n_test} test images per group in each of {len(repeats)} repeats (each its own draw and models)"
    write_table(out / "medians", ["training set", "MSE light", "MSE dark", "latent std light", "latent std dark"],
                table, title=f"Reconstruction MSE and latent std: mean over repeats of the per-repeat median [95% CI] "
                             f"({tag})",
                notes=[f"{n}; MSE of decode(mu(x)) on the [0, 1] scale. CI: {how}. Light vs dark and the training "
                       f"sets are compared in comparisons.md. Paper (Fitzpatrick17k): MSE below 0.07 for all, light < "
                       f"dark in every training set including 50/50. Sizes: {summary['sizes']} (quick scale chosen "
                       f"for a 2-core CPU; full: 64 px, 500 / 1,668, 15 epochs, 10 repeats). VGG19: {vgg}. "
                       f"Wall time of this invocation {seconds / 60:.1f} min (stages it reused not counted)."])
    comparisons = compare_groups(df, args.n_boot, args.seed)
    summary["comparisons"], summary["answers"] = comparisons, answers(comparisons)
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(comparisons, digits=4),
                title=f"Median reconstruction MSE compared, at the level of repeats ({tag})",
                notes=[summary["answers"][0], summary["answers"][1],
                       f"Each difference is the mean over {len(repeats)} repeats of the per-repeat difference of "
                       f"median MSE; {comparisons[0]['method']}. Units: test images (one per unit): dark - light "
                       f"within a training set resamples the repeat's {2 * args.n_test} test images of both groups; "
                       f"across training sets the same test images are drawn for both sets (paired). Holm over the "
                       f"{len(comparisons)} rows; MDE = 2.8 x the bootstrap SE (alpha 0.05, power 0.8)."])
    write_table(out / "per_repeat", ["repeat", "training set", "median MSE light", "median MSE dark", "dark - light",
                                     "Mann-Whitney p, this repeat only"], repeat_rows,
                title=f"Per repeat: median MSE and a Mann-Whitney U test of light vs dark within the repeat ({tag})",
                notes=["Each p tests the images of one repeat's models only; the repeats are not pooled (their models "
                       "differ), see comparisons.md for the inference over repeats."])
    write_table(out / "std_vs_mse", ["training set", "test group", "Spearman rho (latent std, MSE), median over "
                                     "repeats", "rho per repeat", "images per repeat"],
                corr_rows, title=f"Does the latent std track the reconstruction error? ({tag})",
                notes=["Spearman rho computed within each repeat (its own models), not pooled across repeats; the "
                       "median over repeats and each repeat's value. The paper's claim: the latent std is no warning "
                       "sign of the larger error on dark skin."])
    colors = {"light": "#e8c39e", "dark": "#6b4226"}
    for col, label, fig, title, per in (
            ("mse", "MSE", "fig3_mse.png", "Fig. 3: reconstruction MSE", "median_per_repeat"),
            ("latent_std", "latent std", "fig6_latent_std.png", "Fig. 6: mean latent std",
             "latent_std_median_per_repeat")):
        by = {s: {g: df.loc[(df.train_set == s) & (df.test_group == g), col] for g in GROUPS} for s in SETS}
        boxplots(by, out / fig, f"{title} by training set and test group, images of all repeats (boxes) and each "
                                f"repeat's median (dots) ({tag})", label, colors,
                 points=summary[per], points_label="median of one repeat")
    for g, fig in (("light", "fig4_recon_light.png"), ("dark", "fig5_recon_dark.png")):
        if ("A", g) in grids:
            orig = grids[("A", g)][0]
            rows = torch.cat([orig] + [grids[(s, g)][1] for s in SETS])
            save_grid(rows, out / fig, nrow=4, title=f"{g} test images (row 1) and reconstructions after A, B, C "
                                                     f"({tag})", row_labels=["original", "A", "B", "C"])
    diag = df.groupby(["diagnosis", "train_set", "test_group"])["mse"].median().unstack(["train_set", "test_group"])
    diag.to_csv(out / "fig8_mse_by_diagnosis.csv")
    boxplots({d[:14]: {f"{s}-{g}": df.loc[(df.diagnosis == d) & (df.train_set == s) & (df.test_group == g), "mse"]
                       for s in ("A", "C") for g in GROUPS} for d in sorted(df["diagnosis"].unique())},
             out / "fig8_mse_by_diagnosis.png", f"Fig. 8: MSE by diagnosis, training sets A and C ({tag})", "MSE")
    write_json(out / "summary.json", summary)
    print((out / "medians.md").read_text())
    print((out / "comparisons.md").read_text())
    print("\n".join(summary["answers"]))
    return summary


if __name__ == "__main__":
    run(main, parse_args)
