"""The fairgen study's Table 1 and paired comparisons from its per-image predictions alone (preds_<modality>.csv:
a row per test image, Table-1 cell, generator and downstream seed), so that anyone can recompute them from the
files: diffusion/fairgen_report.py writes them into the report.

    from diffusion.fairgen_compare import comparisons_from_preds, read_preds
    comparisons_from_preds(read_preds("results/fairgen/preds_cxr.csv"), ["F", "M"])
"""
import warnings

import numpy as np
import pandas as pd

from common.errors import DataError
from fairness.compare import (comparison, gap_permutation, group_gap, map_forked, paired_difference_replicates,
                              with_holm)
from fairness.metrics import RowsAUROC, bootstrap, essp, fairness_summary, group_accuracy

METHODS = ["base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "fairgen"]  # the paper's order
# the comparisons of Table 1's cells, (method, reweighting) a vs b: every method vs base, without and with
# reweighting on both sides, FairGen with reweighting (the paper's FairGen includes it) vs base without, and FairGen
# vs FairDiffusion (the paper's strongest earlier fair generator) without and with reweighting
PAIRS = [((m, rw), ("base", rw)) for rw in (False, True) for m in METHODS[1:]] + \
    [(("fairgen", True), ("base", False))] + [(("fairgen", rw), ("fairdiffusion", rw)) for rw in (False, True)]
PRIMARY_PAIRS = [(("fairgen", True), ("base", False)), (("fairgen", True), ("fairdiffusion", True))]


def replicate_words(preset):
    """What a Table-1 value is the mean of: '2 generators x 2 downstream ViT seeds', or '3 downstream ViT seeds'."""
    G, D = preset.get("gen_seeds", 1), preset["down_seeds"]  # a run from before generator replicates: one
    return (f"{G} generators x " if G > 1 else "") + f"{D} downstream ViT seeds"


def cell_name(method, reweight):
    """Table 1's row name of a cell: 'real only', 'base', 'fairgen + reweighting', ..."""
    return method + (" + reweighting" if reweight else "")


# ---- from preds.csv: Table 1 and the comparisons ------------------------------------------------------------------
def read_preds(path):
    """preds.csv(.gz) as the study writes it: a row per test image, cell, generator and downstream seed (a group NA
    stays NA). A file from before generator replicates (no generator column) had one generator: 0 (real only: -1)."""
    df = pd.read_csv(path, dtype=dict(patient_id=str, group=str, method=str), keep_default_na=False, na_values="")
    if "generator" not in df:
        df.insert(df.columns.get_loc("down_seed"), "generator", np.where(df["method"] == "real only", -1, 0))
    return df


def _cell_arrays(df, method, reweight, split_seed):
    """One cell of one split, rows in image order, per replicate (generator, downstream seed) in that order:
    (y, groups, patients, [(pred, probs, auc, (generator, downstream seed))]) with auc a RowsAUROC of that
    replicate's probabilities."""
    d = df[(df["method"] == method) & (df["reweight"] == reweight) & (df["split_seed"] == split_seed)]
    parts = [(key, p.sort_values("image")) for key, p in d.groupby(["generator", "down_seed"], sort=True)]
    first = parts[0][1]
    assert all(np.array_equal(p["image"].to_numpy(), first["image"].to_numpy()) for _, p in parts), \
        "every replicate must predict the same test images"
    pcols = sorted((c for c in df.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    y = first["label"].to_numpy()
    return (y, first["group"].to_numpy().astype(str), first["patient_id"].to_numpy(),
            [(p["pred"].to_numpy(), p[pcols].to_numpy(float), RowsAUROC(y, p[pcols].to_numpy(float)),
              tuple(int(k) for k in key)) for key, p in parts])


def paired_runs(runs_a, runs_b):
    """The replicate pairs of two cells, [(run_a, run_b)], and each pair's generator: the same (generator, downstream
    seed) on both sides; a cell without generators (real only, generator -1) pairs its downstream seed d with
    every generator's d. The ViT seeds match, so each pair differs only in its training images."""
    a, b = ({r[3]: r for r in runs} for runs in (runs_a, runs_b))
    keys = sorted({k for k in list(a) + list(b) if k[0] >= 0} or set(a))

    def side(runs, k):
        for key in (k, (-1, k[1])):
            if key in runs:
                return runs[key]
        raise DataError(f"preds: the two cells have different replicates (one has no generator {k[0]}, downstream "
                        f"seed {k[1]}); were they written by one downstream stage?")
    return [(side(a, k), side(b, k)) for k in keys], [k[0] for k in keys]


def _binary_or_probs(probs):
    return probs[:, 1] if probs.shape[1] == 2 else probs


def table1_from_preds(df, n_boot, seed=0):
    """Table 1 of one split from its preds rows: for each cell, every metric of fairness_summary as the mean over
    its replicates (generators x downstream seeds; {value, ci, seeds: one value per replicate}); CI: percentile
    bootstrap over test patients of that mean (the replicates held fixed; the comparisons resample them too)."""
    split_seed = sorted(df["split_seed"].unique())[0]
    cells = [key for key, _ in df.groupby(["method", "reweight"], sort=False)]

    def cell(k):  # one cell: its own resampling (seeded alike for every cell), so cells can run in any process
        y, g, pid, runs = _cell_arrays(df, *cells[k], split_seed)

        def stat(idx):
            per = [fairness_summary(y[idx], pred[idx], g[idx], _binary_or_probs(probs)[idx])
                   for pred, probs, *_ in runs]
            return {k: float(np.mean([p[k] for p in per])) for k in per[0]}
        point = stat(np.arange(len(y)))
        seeds = [fairness_summary(y, pred, g, _binary_or_probs(probs)) for pred, probs, *_ in runs]
        ci = bootstrap(stat, len(y), clusters=pid, n_boot=n_boot, seed=seed)
        return {k: {"value": v, "ci": list(ci.get(k, (np.nan, np.nan))), "seeds": [float(s[k]) for s in seeds]}
                for k, v in point.items()}
    return {cell_name(*key): result for key, result in zip(cells, map_forked(cell, len(cells)))}


def signed_gap_name(attrs):
    """The signed AUROC gap of a modality, first group minus last (F - M; light - dark: the lightest skin type minus
    the darkest, the group a dermatology set under-represents), its declared fairness outcome."""
    return f"AUROC gap {attrs[0]} - {attrs[-1]}"


def primary_keys(attrs):
    """The comparisons each modality declares in code (its primary family; Holm over these alone): the signed AUROC
    gap of FairGen + reweighting against base and against FairDiffusion + reweighting, the two questions of the
    README. ESSP and max - min gaps are built from absolute differences, which are biased toward "no change": they
    stay exploratory rows."""
    return [(signed_gap_name(attrs), cell_name(*a), cell_name(*b)) for a, b in PRIMARY_PAIRS]


def metric_functions(attrs, declared=None):
    """{name: f(y, groups, run, idx) -> float} of the comparisons, run = (pred, probs, auc): accuracy, ESSP on
    accuracy, and the gap in AUROC (binary: of class 1; more classes: one-vs-rest mean) between groups: signed,
    first - last of the declared groups (signed_gap_name; NaN where one of the two is absent, so a missing group
    never turns the declared comparison into another), and for more than two present groups max - min (see
    gap_tables). declared: the modality's groups as declared (default: attrs, the groups present)."""
    declared = list(attrs) if declared is None else list(declared)
    def acc(y, g, run, i):
        return float(np.mean(y[i] == run[0][i]))

    def es(y, g, run, i):
        return essp(acc(y, g, run, i), group_accuracy(y[i], run[0][i], g[i]).values())

    def gap(y, g, run, i):
        a, b = (i[g[i] == s] for s in (declared[0], declared[-1]))
        return run[2](a) - run[2](b) if len(a) and len(b) else float("nan")

    def spread(y, g, run, i):
        return group_gap(run[2], g, i, attrs)
    return {"accuracy": acc, "ESSP (accuracy)": es, signed_gap_name(declared): gap,
            **({"AUROC gap max - min": spread} if len(attrs) > 2 else {})}


def comparisons_from_preds(df, attrs, n_boot=2000, seed=0):
    """The paired comparisons of one modality, from its preds DataFrame alone (every split seed in it): each PAIR
    of cells on accuracy, ESSP and the AUROC gap, a - b, with compare.paired_difference_replicates (units: test
    patients). One split: the replicates are the (generator, downstream seed) pairs on its test set (paired_runs;
    one draw of patients serves them all), nested in their generators where there are several (a resample draws
    generators, then seeds within them); several splits: the replicates are the splits, each statistic the mean
    over its replicates.
    Holm over the modality's declared comparisons (primary_keys), and separately over its other rows. Each row also
    has value_a / value_b (the mean over replicates)."""
    declared, attrs = list(attrs), [a for a in attrs if a in set(df["group"].astype(str))]
    splits = sorted(df["split_seed"].unique())
    rows, cells = [], {}

    def cell(m, r, s):  # (y, groups, patients, runs) and the image ids of one cell, built once for every metric
        if (m, r, s) not in cells:
            images = df[(df.method == m) & (df.reweight == r) & (df.split_seed == s)]["image"]
            cells[m, r, s] = _cell_arrays(df, m, r, s), np.sort(images.unique())
        return cells[m, r, s]
    for metric, f in metric_functions(attrs, declared).items():
        for (ma, ra), (mb, rb) in PAIRS:
            reps, groups = [], None  # (stat_a, stat_b, patients) per replicate; their generators
            for s in splits:
                (y, g, pid, runs_a), img_a = cell(ma, ra, s)
                (y_b, _, _, runs_b), img_b = cell(mb, rb, s)
                assert np.array_equal(y, y_b) and np.array_equal(img_a, img_b), \
                    "a and b must be evaluated on the same test images"
                if len(splits) == 1:  # replicates: (generator, downstream seed)
                    pairs, groups = paired_runs(runs_a, runs_b)
                    reps += [(_seed_mean(f, y, g, [a]), _seed_mean(f, y, g, [b]), pid) for a, b in pairs]
                else:  # replicates: the splits (paired_runs checks that both cells have the same replicates)
                    pairs = list(zip(*paired_runs(runs_a, runs_b)[0]))
                    reps.append((_seed_mean(f, y, g, pairs[0]), _seed_mean(f, y, g, pairs[1]), pid))
            rows.append((metric, cell_name(ma, ra), cell_name(mb, rb), reps, groups))

    def compared(k):  # one row: its own resampling (seeded alike for every row), so rows can run in any process
        metric, a_name, b_name, reps, groups = rows[k]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a resample without a class: NaN, left out
            res = paired_difference_replicates(reps, n_boot=n_boot, seed=seed, groups=groups)
            if len(splits) > 1:
                res["method"] += "; each replicate a split (its own test patients), its statistic the mean " \
                                 "over its generators x downstream seeds"
            every = [np.arange(len(pid)) for _, _, pid in reps]
            return {**comparison(metric, a_name, b_name, res),
                    "value_a": float(np.nanmean([a(i) for (a, _, _), i in zip(reps, every)])),
                    "value_b": float(np.nanmean([b(i) for (_, b, _), i in zip(reps, every)]))}
    return with_holm(map_forked(compared, len(rows)), primary=primary_keys(declared))


def _seed_mean(f, y, g, runs):
    """idx -> the mean over replicates (runs: [(pred, probs, auc, key)]) of the metric f on the rows idx."""
    if len(runs) == 1:
        return lambda idx: f(y, g, runs[0], idx)
    return lambda idx: float(np.mean([f(y, g, run, idx) for run in runs]))


def gap_tables(df, attrs, n_perm=2000, seed=0):
    """For more than two groups: each cell's max - min AUROC gap against its permutation null (group labels
    shuffled across patients; compare.gap_permutation) on split seed 0, the AUROC the mean over downstream seeds:
    {cell: {gap, p, null_median, excess, n_units, method}}. Empty for two groups (their signed gap has a CI)."""
    attrs = [a for a in attrs if a in set(df["group"].astype(str))]
    if len(attrs) <= 2:
        return {}
    split_seed = sorted(df["split_seed"].unique())[0]
    cells = [key for key, _ in df.groupby(["method", "reweight"], sort=False)]

    def cell(k):  # one cell: its own permutations (seeded alike for every cell), so cells can run in any process
        y, g, pid, runs = _cell_arrays(df, *cells[k], split_seed)
        stat = _seed_mean(lambda y_, g_, run, rows: run[2](rows), y, g, runs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                return gap_permutation(stat, g, pid, n_perm=n_perm, seed=seed)
            except ValueError as e:  # a patient in two groups: no permutation across patients
                return {"gap": float("nan"), "p": float("nan"), "excess": float("nan"), "method": str(e)}
    return {cell_name(*key): result for key, result in zip(cells, map_forked(cell, len(cells)))}
