"""Comparisons that can answer: paired differences between conditions on the same test patients, gaps between groups
against a permutation null, replicates, Holm's correction and the minimum detectable effect; KID and FD at equal n.
Definitions: docs/METHODS.md, "Statistics for comparisons". Every result names its method.

A statistic is a function of row indices, `stat(idx) -> float` (e.g. the AUROC of condition A's scores on the rows
idx), so one resample of patients serves both conditions of a paired comparison. Units are patients: a resample
draws patients with replacement and keeps all their images (fairness.metrics.cluster_members).

    d = paired_difference(lambda i: auroc(y[i], s_a[i]), lambda i: auroc(y[i], s_b[i]), clusters=patient)
    # {'diff', 'ci', 'p', 'se', 'mde', 'n_units', 'method'}
    holm([d1['p'], d2['p'], ...])

Tested by simulation (tests/test_compare.py): the paired CI of an AUROC difference and of a two-group gap cover
the true value >= 90% of the time (nominal 95%), and the permutation p is uniform under the null.
"""
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
import os
from statistics import NormalDist
import sys

import numpy as np

from common.stage_server import FORK
from fairness.metrics import cluster_members

NORMAL = NormalDist()  # the standard normal (the standard library's: scipy.stats costs a stage ~0.7 s to import)
Z_POWER = NORMAL.inv_cdf(0.8)  # 0.84: power 0.8


def mde(se, tests=1, df=None):
    """Minimum detectable effect at power 0.8 and two-sided alpha 0.05 / tests (Holm's first step over a family of
    `tests` comparisons: the level the family's smallest p must pass): (z(1 - alpha / 2) + 0.84) * SE; for one test
    (1.96 + 0.84) * SE. df: a test over few replicates (the sign-flip test over R repeats, SE their SD / sqrt(R)):
    Student t quantiles on df = R - 1 instead of normal ones (t(9): 3.11 + 0.88 for a family of 4 instead of 2.50 +
    0.84)."""
    if df is None:
        return float((NORMAL.inv_cdf(1 - 0.025 / tests) + Z_POWER) * se)
    from scipy.stats import t as student_t  # only the reports' repeat-level tests need it
    return float((student_t.ppf(1 - 0.025 / tests, df) + student_t.ppf(0.8, df)) * se)


def min_holm_p(family_size, n_resamples):
    """The smallest Holm-adjusted p a family can reach when each p comes from n_resamples resamples (a resampling p
    is at least 2 / (n_resamples + 1)): 2 family_size / (n_resamples + 1); NaN for an empty family. Above 0.05 the
    family can never reject; a study's primary family needs it below 0.01 (tests/test_primary.py)."""
    return 2 * family_size / (n_resamples + 1) if family_size else float("nan")


def sign_flip_p(values):
    """Exact two-sided sign-flip test over independent replicate-level differences (one per repeat, each with its own
    models and test images), under the null that each is symmetric about 0: the share of the 2^R sign patterns whose
    |sum| is at least the observed one. Its smallest value is 2 / 2^R (all R differences of one sign; 2 / 2^(R - z)
    with z exact zeros): 6 repeats can never go below 1/32, 10 reach 1/512. 1 to 20 values."""
    return float(_sign_flip_ps(values, [0.0])[0])


def _sign_flip_ps(values, shifts):
    """sign_flip_p(values - d) for every d in shifts, with the 2^R sign patterns built once: a pattern's sum of
    values - d is its sum of values minus d times its sum of signs."""
    v = np.asarray(values, float)
    if not 1 <= len(v) <= 20 or not np.all(np.isfinite(v)):
        raise ValueError(f"sign_flip_p: {len(v)} values; 1 to 20 finite ones needed")
    signs = 1 - 2 * ((np.arange(2 ** len(v))[:, None] >> np.arange(len(v))) & 1)
    d = np.asarray(shifts, float)
    sums = np.abs((signs @ v)[:, None] - np.outer(signs.sum(1), d))  # (patterns, shifts)
    observed = np.abs(v.sum() - len(v) * d)
    tol = 1e-9 * np.abs(v[:, None] - d).sum(0)  # mirror patterns tie up to rounding
    return np.mean(sums >= observed - tol, axis=0)


def sign_flip_floor(family_size, n_values):
    """The smallest Holm p a family of sign_flip_p's over n_values replicates can reach: family_size x 2 / 2^R."""
    return min(1.0, family_size * 2.0 ** (1 - n_values)) if family_size else float("nan")


def sign_flip_test(values, alpha=0.05):
    """The sign-flip test of sign_flip_p with its own (1 - alpha) confidence interval, the shifts d that it does not
    reject (sign_flip_p(values - d) > alpha; the hull of them, searched on a grid between the smallest and largest
    value, where all of them lie once 2 / 2^R <= alpha), its SE (SD / sqrt(R)) and df R - 1 for the MDE. The p and
    the CI come from one test, so the CI excludes 0 exactly when p <= alpha (up to the grid's 1/4000 of the range)."""
    v = np.asarray(values, float)
    p = sign_flip_p(v)
    grid = np.linspace(v.min(), v.max(), 4001)
    kept = grid[_sign_flip_ps(v, grid) > alpha]
    ci = [float(kept.min()), float(kept.max())] if len(kept) and sign_flip_floor(1, len(v)) <= alpha \
        else [float("-inf"), float("inf")]  # too few replicates: no shift can be rejected
    se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"diff": float(v.mean()), "ci": ci, "p": p, "se": se, "df": len(v) - 1}


def _p_two_sided(diffs):
    """2 (1 + min(#resamples <= 0, #resamples >= 0)) / (n + 1), at most 1: the two-sided resampling p with the
    usual +1 (never 0; its smallest value is 2 / (n + 1))."""
    tail = min(int(np.sum(diffs <= 0)), int(np.sum(diffs >= 0)))
    return float(min(1.0, 2 * (1 + tail) / (len(diffs) + 1)))


def _summary(point, diffs, n_units, method, alpha=0.05):
    """diff, percentile CI, p (_p_two_sided over the valid resamples), SE, MDE. Resamples where the statistic is
    undefined (an AUROC without both classes) are left out and counted; a NaN point estimate gives NaNs."""
    valid = diffs[np.isfinite(diffs)]
    out = {"diff": float(point), "ci": [float("nan")] * 2, "p": float("nan"), "se": float("nan"),
           "mde": float("nan"), "n_units": n_units, "n_valid": int(len(valid)), "method": method}
    if not np.isfinite(point) or len(valid) < 2:
        return out
    se = float(np.std(valid, ddof=1))
    return {**out, "ci": np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)]).tolist(),
            "p": _p_two_sided(valid), "se": se, "mde": mde(se)}


def paired_difference(stat_a, stat_b, n_rows=None, clusters=None, n_boot=2000, seed=0):
    """stat_a - stat_b on the same rows, with a patient-clustered paired bootstrap: each resample draws patients
    with replacement and evaluates both conditions on the same drawn rows. Percentile CI; p as docs/METHODS.md."""
    if n_rows is None and clusters is None:
        raise ValueError("give n_rows or clusters")
    n_rows = len(clusters) if n_rows is None else n_rows
    assert clusters is None or len(clusters) == n_rows, "one cluster label per row"
    members = cluster_members(clusters, n_rows)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        diffs[b] = stat_a(idx) - stat_b(idx)
    everything = np.arange(n_rows)
    return _summary(stat_a(everything) - stat_b(everything), diffs, len(members),
                    f"paired bootstrap over {'patients' if clusters is not None else 'rows'} ({n_boot}), percentile")


def nested_levels(groups, n):
    """The upper level of n replicates nested in groups (e.g. the generator seed whose samples each classifier
    replicate trained on): a list of index arrays, one per group in order of first appearance; None where there is
    no nesting to resample (no groups, one group, or a group per replicate)."""
    if groups is None:
        return None
    labels = list(dict.fromkeys(groups))
    if not 1 < len(labels) < n:
        return None
    return [np.array([r for r in range(n) if groups[r] == g]) for g in labels]


def nested_mean(values, levels=None):
    """The mean over groups of the mean of their members' values (levels: nested_levels, or None: the plain mean)."""
    if levels is None:
        return float(np.mean(values))
    return float(np.mean([np.mean([values[r] for r in members]) for members in levels]))


def draw_replicates(rng, n, levels=None):
    """One resample of the replicate level: a list of drawn groups, each a list of replicate indices. Plain: n
    replicates with replacement (a group each); nested: the groups with replacement, then each drawn group's
    replicates with replacement among its own."""
    if levels is None:
        return [[r] for r in rng.integers(0, n, n)]
    return [[members[i] for i in rng.integers(0, len(members), len(members))]
            for members in (levels[g] for g in rng.integers(0, len(levels), len(levels)))]


def _drawn_difference(drawn, plain_b=False):
    """a - b over one resample's drawn groups of (a, b) replicate values: the mean over groups of their mean
    difference; plain_b: a's mean over groups of its group means minus b's plain mean over every drawn replicate."""
    if not plain_b:
        return np.mean([np.mean([a - b for a, b in grp]) for grp in drawn])
    return np.mean([np.mean([a for a, _ in grp]) for grp in drawn]) - np.mean([b for grp in drawn for _, b in grp])


_FORKED = None  # the function map_forked's workers call: it reaches them through fork, never pickled


def _call_forked(i):
    return _FORKED(i)


def map_forked(fn, n, jobs=None):
    """[fn(0), ..., fn(n - 1)], computed by up to `jobs` forked processes (default: the cores this process may use)
    and returned in order. fn, and what it reads, reach the workers through fork; only the results are pickled. Each
    call must stand alone (a resampling that seeds its own generator): the list is then the plain loop's, bit for
    bit. An exception in a call is raised here (a worker that dies: BrokenProcessPool). The plain loop off Linux,
    under FAIRSYNTH_FORK_STAGES=0 (as for stages), with one job or one item, and inside a worker. Workers run numpy
    only: a parent's CUDA or torch threads are never used in them."""
    global _FORKED
    forks = sys.platform == "linux" and _FORKED is None and os.environ.get(FORK, "1") != "0"
    jobs = min(n, jobs or len(os.sched_getaffinity(0))) if forks else 1
    if jobs < 2:
        return [fn(i) for i in range(n)]
    _FORKED = fn
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_call_forked, range(n)))
    finally:
        _FORKED = None


def paired_difference_replicates(replicates, n_boot=2000, seed=0, groups=None, plain_b=False):
    """The same for replicates (seeds, repeats): `replicates` is a list of (stat_a, stat_b, clusters), one per
    replicate; the difference is the mean over replicates. Two-level bootstrap: draw replicates with replacement,
    then patients. Where every replicate was evaluated on the same test patients (seeds of one split), one draw of
    patients serves all drawn replicates, so that the test set's variance is not divided by the replicate count;
    with different test sets (folds, repeats) each replicate draws its own. One replicate is paired_difference.
    groups: a label per replicate where replicates share an upper level (classifiers trained on the samples of one
    generator seed): then the difference is the mean over groups of their replicates' mean, and a resample draws
    groups, then replicates within each drawn group, then patients (three levels), so that the upper level's noise
    is not counted as if every replicate had its own. plain_b: b has no upper level (a classifier trained on real
    data, whose replicate r shares only its seed with a's): b's statistic is then the plain mean over its replicates
    (each weighted alike, as where it is compared with a row without groups), a's the mean over groups, and a
    resample draws the groups for both, replicate r of b with replicate r of a."""
    if len(replicates) == 1:
        a, b, clusters = replicates[0]
        return {**paired_difference(a, b, clusters=clusters, n_boot=n_boot, seed=seed), "replicates": 1}
    rng = np.random.default_rng(seed)
    clusters = [np.asarray(c) for _, _, c in replicates]
    shared = all(len(c) == len(clusters[0]) and np.array_equal(c, clusters[0]) for c in clusters)
    parts = [(a, b, cluster_members(c, len(c))) for (a, b, _), c in zip(replicates, clusters)]
    levels = nested_levels(groups, len(parts))
    plain_b = plain_b and levels is not None  # without groups both sides are plain means already
    diffs = np.empty(n_boot)
    for k in range(n_boot):
        drawn = draw_replicates(rng, len(parts), levels)
        if shared:
            members = parts[0][2]
            idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
            vals = [[(parts[r][0](idx), parts[r][1](idx)) for r in grp] for grp in drawn]
        else:
            vals = []
            for grp in drawn:
                in_group = []
                for r in grp:
                    a, b, members = parts[r]
                    idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
                    in_group.append((a(idx), b(idx)))
                vals.append(in_group)
        diffs[k] = _drawn_difference(vals, plain_b)
    whole = [(a(np.arange(len(c))), b(np.arange(len(c)))) for (a, b, _), c in zip(replicates, clusters)]
    everyone = [list(m) for m in levels] if levels is not None else [[r] for r in range(len(parts))]
    point = float(_drawn_difference([[whole[r] for r in grp] for grp in everyone], plain_b))
    how = ("the same test patients for all" if shared else
           "each its own test patients: test-set variance enters twice, so the CI is conservative")
    if levels is None:
        how += f"; with {len(parts)} replicates the resampled replicate spread is (R - 1) / R of theirs, and coarse"
        method = f"two-level bootstrap: {len(parts)} replicates ({how}), then patients ({n_boot}), percentile"
    else:
        how += f"; with {len(levels)} groups the resampled group spread is (G - 1) / G of theirs, and coarse"
        method = (f"three-level bootstrap: {len(levels)} groups (generator seeds) of the {len(parts)} replicates, "
                  f"then the replicates within each drawn group ({how}), then patients ({n_boot}), percentile")
        if plain_b:
            method += ("; b has no generator: its point weights its replicates alike, a resample takes the mean of "
                       "the replicates drawn with a's (in expectation not quite alike: a small shift of the CI)")
    return {**_summary(point, diffs, len(parts[0][2]) if shared else sum(len(m) for _, _, m in parts), method),
            "replicates": len(parts)}


def group_gap(stat_group, groups, idx, expected=None):
    """max - min over groups of stat_group(rows of that group within idx); NaN when a group of `expected` (default:
    the groups present) is missing or its statistic undefined, so that every gap compares the same groups."""
    expected = np.unique(groups[idx]) if expected is None else expected
    vals = [stat_group(idx[groups[idx] == g]) for g in expected]
    return max(vals) - min(vals) if len(vals) > 1 and np.all(np.isfinite(vals)) else float("nan")


def gap_permutation(stat_group, groups, clusters=None, n_perm=2000, seed=0):
    """A max - min gap over groups against its permutation null: the group labels are shuffled across patients
    (each patient keeps one group), the gap recomputed. p = (1 + #{null >= observed}) / (n_valid + 1); the excess
    gap = observed - median(null), since max - min is positive even when the groups do not differ. The null is
    that patients are exchangeable between groups (scores, labels and their prevalence alike): where prevalence
    differs between groups, a gap can be found without any difference in the statistic itself; read it so."""
    groups = np.asarray(groups)
    n = len(groups)
    members = cluster_members(clusters, n)
    if any(len(set(groups[m])) > 1 for m in members):
        raise ValueError("a patient with images in two groups: the permutation needs one group per patient")
    patient_of_row = np.empty(n, int)
    for k, m in enumerate(members):
        patient_of_row[m] = k
    patient_group = np.array([groups[m[0]] for m in members])
    present = np.unique(groups)
    everything = np.arange(n)
    observed = group_gap(stat_group, groups, everything, present)
    method = f"permutation of group labels across patients ({n_perm}); null: patients exchangeable between groups"
    if not np.isfinite(observed):
        return {"gap": float("nan"), "p": float("nan"), "null_median": float("nan"), "excess": float("nan"),
                "n_units": len(members), "n_valid": 0, "method": method}
    rng = np.random.default_rng(seed)
    null = np.array([group_gap(stat_group, rng.permutation(patient_group)[patient_of_row], everything, present)
                     for _ in range(n_perm)])
    null = null[np.isfinite(null)]
    return {"gap": float(observed), "p": float((1 + np.sum(null >= observed)) / (len(null) + 1)),
            "null_median": float(np.median(null)), "excess": float(observed - np.median(null)),
            "n_units": len(members), "n_valid": int(len(null)), "method": method}


def holm(pvalues):
    """Holm's step-down adjustment: p_holm(k) = max over j <= k of min(1, (m - j + 1) p(j)), in input order."""
    p = np.asarray(pvalues, float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.minimum(1, (m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.maximum.accumulate(adjusted)
    return out.tolist()


# ---- fidelity at equal n ----------------------------------------------------------------------------------------
def _mmd2_unbiased(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), x and y of equal size m."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.sum() / m ** 2


def kid(f_real, f_fake, n_subsets=100, subset_size=1000, seed=2020):
    """KID: the unbiased MMD^2 averaged over n_subsets random subsets of m = min(subset_size, n_real, n_fake) from
    each set, {mean, std, m}. Subsets are drawn as torch-fidelity draws them: the same seed gives its numbers when
    f_real is its input1 (the order of the two sets changes the draws, not the expectation)."""
    f_real, f_fake = np.asarray(f_real, np.float64), np.asarray(f_fake, np.float64)
    m = min(subset_size, len(f_real), len(f_fake))
    if m < 2:
        return {"mean": float("nan"), "std": float("nan"), "m": m}
    rng = np.random.RandomState(seed)
    vals = np.empty(n_subsets)
    for i in range(n_subsets):
        x = f_real[rng.choice(len(f_real), m, replace=False)]
        y = f_fake[rng.choice(len(f_fake), m, replace=False)]
        vals[i] = _mmd2_unbiased(x, y)
    return {"mean": float(vals.mean()), "std": float(vals.std()), "m": m}


def fd_equal_n(f_real, f_fake, n=None, seed=0):
    """The Frechet distance with both sets subsampled to the same n (default: the smaller set's size), since FD's
    bias grows as n shrinks: {fd, n}. Compare subgroups at one common n: pass the same n for every subgroup."""
    from fairness.fid import fid_from_features
    rng = np.random.default_rng(seed)
    n = min(len(f_real), len(f_fake)) if n is None else n
    x = f_real[rng.choice(len(f_real), n, replace=False)]
    y = f_fake[rng.choice(len(f_fake), n, replace=False)]
    return {"fd": float(fid_from_features(x, y)), "n": int(n)}


# ---- a study's list of comparisons --------------------------------------------------------------------------------
def comparison(metric, a, b, result):
    """One row of a summary's `comparisons`: {metric, a, b, diff, ci, p, mde, n_units, replicates, method}
    (a - b), from paired_difference(_replicates); `p_holm` is added by with_holm over the whole table."""
    return {"metric": metric, "a": a, "b": b, "diff": result["diff"], "ci": result["ci"], "p": result["p"],
            "mde": result["mde"], "se": result["se"], "n_units": result["n_units"],
            "replicates": result.get("replicates", 1), "n_valid": result.get("n_valid"), "method": result["method"],
            **({"df": result["df"]} if "df" in result else {})}


def with_holm(comparisons, primary=None):
    """The same rows with `p_holm`, `primary` and `family_size`. primary: the (metric, a, b) of the comparisons a
    study declares in code (its questions); Holm's adjustment runs over them alone, and separately over the
    rest (exploratory rows, which never answer a question). primary None: every row is one family, as in the studies
    that have not declared theirs. Each row's MDE is taken at its family's first Holm step (alpha 0.05 / family
    size): the effect its family would detect with 80% power at its strictest step. A declared row whose p is
    undefined counts in its family (as p = 1) and keeps a NaN Holm p; exploratory NaN rows do not count."""
    keys = None if primary is None else {tuple(k) for k in primary}
    if keys is not None:
        missing = keys - {(c["metric"], c["a"], c["b"]) for c in comparisons}
        assert not missing, f"declared primary comparisons missing from the table: {sorted(missing)}"
    is_primary = [keys is None or (c["metric"], c["a"], c["b"]) in keys for c in comparisons]
    out = [dict(c) for c in comparisons]
    for family in (True, False):
        # every declared row counts in m, one whose p is undefined as p = 1 (so a NaN cannot shrink the family)
        rows = [i for i in range(len(out)) if is_primary[i] == family]
        members = [i for i in rows if family or np.isfinite(out[i]["p"])]
        adjusted = holm([out[i]["p"] if np.isfinite(out[i]["p"]) else 1.0 for i in members]) if members else []
        for i in rows:
            out[i].update(primary=family, family_size=len(members), p_holm=float("nan"))
        for i, p_holm in zip(members, adjusted):
            se, df = out[i].get("se", float("nan")), out[i].get("df")
            out[i].update(p_holm=p_holm if np.isfinite(out[i]["p"]) else float("nan"),
                          mde=mde(se, len(members), df) if np.isfinite(se) else out[i]["mde"])
            if df is not None and sign_flip_floor(len(members), df + 1) >= 0.05:  # sign-flip p's over df + 1
                out[i]["mde"] = float("inf")  # cannot pass this family's first Holm step whatever the effect
    return out


def family_facts(comparisons, n_resamples, sign_flip_units=None):
    """What summary.json records of a table's primary family: its size, the resamples per p and the smallest Holm p
    it can reach (the design can say yes only if that is below 0.05). sign_flip_units: R where each p is the exact
    sign-flip test over R replicates (sign_flip_p: smallest p 2 / 2^R) instead of a resampling p."""
    k = sum(1 for c in comparisons if c.get("primary"))
    if sign_flip_units is None:
        return {"primary_family_size": k, "n_boot": n_resamples, "min_holm_p": min_holm_p(k, n_resamples)}
    return {"primary_family_size": k, "n_boot": n_resamples, "p_test": f"exact sign-flip over {sign_flip_units} "
            f"replicates", "min_holm_p": sign_flip_floor(k, sign_flip_units)}


def fmt_p(p):
    return "n/a" if not np.isfinite(p) else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def comparison_rows(comparisons, digits=3):
    """Markdown/CSV cells: metric (exploratory rows marked), a - b, difference [95% CI], p, p (Holm within its
    family), MDE, units, replicates."""
    f = f"{{:+.{digits}f}}"
    return [[c["metric"] + ("" if c.get("primary", True) else " (exploratory)"), f"{c['a']} - {c['b']}",
             f"{f.format(c['diff'])} [{f.format(c['ci'][0])}, {f.format(c['ci'][1])}]" if np.isfinite(c["diff"])
             else "n/a", fmt_p(c["p"]), fmt_p(c["p_holm"]), f"{c['mde']:.{digits}f}" if np.isfinite(c["mde"]) else
             "n/a", c["n_units"], c["replicates"]] for c in comparisons]


COMPARISON_HEADER = ["metric", "a - b", "difference [95% CI]", "p", "p (Holm)", "MDE (80% power, Holm level)",
                     "units", "replicates"]


def answer(c, what, digits=3):
    """A one-sentence reading of a comparison row: the effect, CI, Holm p and MDE, and 'cannot tell' when the CI
    contains 0 (then the MDE says how large an effect the design could have seen)."""
    f = f"{{:+.{digits}f}}"
    ci = f"[{f.format(c['ci'][0])}, {f.format(c['ci'][1])}]"
    if not np.isfinite(c["diff"]):
        return f"{what}: undefined at this scale."
    if not np.all(np.isfinite(c["ci"])):
        return f"{what}: {f.format(c['diff'])}, no CI (too few valid resamples or replicates): cannot tell at this scale."
    body = f"{what}: {f.format(c['diff'])} (95% CI {ci}, Holm p {fmt_p(c['p_holm'])}, MDE {c['mde']:.{digits}f})"
    missed = f"effects smaller than {c['mde']:.{digits}f} would usually be missed" if np.isfinite(c["mde"]) else \
        "too few replicates for any effect to pass Holm's correction"
    if c["ci"][0] <= 0 <= c["ci"][1]:
        return body + f"; cannot tell at this scale ({missed})."
    if not c["p_holm"] < 0.05:
        family = (f"the {c['family_size']} {'primary' if c['primary'] else 'exploratory'} comparisons"
                  if "family_size" in c else "the table")
        return body + f"; its CI excludes 0 but not after Holm's correction over {family}: cannot tell at this " \
                      f"scale ({missed})."
    return body + "."
