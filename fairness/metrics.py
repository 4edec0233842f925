"""Group metrics and fairness metrics, exactly as docs/METHODS.md defines them, with patient-level bootstrap CIs.

Cross-checked in tests: AUROC against scikit-learn, DP / EO / accuracy gaps against fairlearn, ESSP and NAR against
hand-computed values. Conventions:
- scores are "higher = more positive"; a decision is `score >= threshold`;
- thresholds come from validation data (Youden's J, or the highest threshold reaching a target sensitivity),
  never a blind 0.5; multi-class decisions are the argmax;
- multi-class AUROC is the unweighted mean of one-vs-rest AUROCs (as MedMNIST's evaluator);
- DP, EO, ESSP are fractions here; tables multiply them by 100 where FairGen does.
"""
import numpy as np
import pandas as pd


def average_ranks(x):
    """Ranks 1..n of x, ties given the mean of the ranks they span (scipy.stats.rankdata's 'average'; written here
    because importing scipy.stats costs every stage process half a second)."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]  # the first position of each run of equal values
    run = np.cumsum(starts) - 1  # the run of each sorted position
    first = np.nonzero(starts)[0]
    last = np.r_[first[1:], len(xs)]  # one past each run's end
    ranks = np.empty(len(x))
    ranks[order] = (first[run] + 1 + last[run]) / 2  # mean of ranks first+1 .. last
    return ranks


# ---- per-label metrics --------------------------------------------------------------------------------------------
def auroc(y, score):
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count 1/2); NaN if y has one class."""
    y = np.asarray(y).astype(bool)
    n1, n0 = y.sum(), (~y).sum()
    score = np.asarray(score, dtype=float)
    if n1 == 0 or n0 == 0 or np.isnan(score).any():  # a NaN score has no rank
        return float("nan")
    r = average_ranks(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def resampled_auroc(y, score):
    """f(idx, keep=None) -> auroc(y[idx], score[idx]), keep: a boolean mask over the rows, applied to idx (e.g. one
    sex). Bit for bit auroc's value, in O(n) per call for a bootstrap's thousands of resamples: the scores are sorted
    once, a resample's repeated rows enter the Mann-Whitney U as integer weights (U is an integer or a half-integer,
    exact in float64, as auroc's rank sums are), and the division is auroc's. NaN where a row drawn (and kept) has a
    NaN score, as auroc; idx must index the rows (0 <= idx < n)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=float)
    nan_rows = np.nonzero(np.isnan(score))[0]  # sorted last, each its own run; they count only where drawn
    order = np.argsort(score, kind="mergesort")
    xs, pos = score[order], y[order].astype(np.int64)
    neg = 1 - pos
    starts = np.nonzero(np.r_[True, xs[1:] != xs[:-1]])[0]  # the first sorted position of each run of equal scores
    ties = len(starts) < len(xs)

    def f(idx, keep=None):
        w = np.bincount(idx, minlength=len(y))
        if len(w) > len(y):
            raise IndexError(f"resampled_auroc: row {len(w) - 1} drawn, but there are {len(y)} rows")
        if keep is not None:
            w = w * keep
        if len(nan_rows) and w[nan_rows].any():  # a NaN score has no rank
            return float("nan")
        ws = w[order]
        n1, n0 = ws * pos, ws * neg  # (weighted) positives and negatives in ascending score order
        if ties:  # per run of tied scores: each lower negative counts 1, each tied one 1/2
            n1, n0 = np.add.reduceat(n1, starts), np.add.reduceat(n0, starts)
            u = (n1 * (2 * (np.cumsum(n0) - n0) + n0)).sum() / 2
        else:  # a position holds positives or negatives, never both: U = sum of positives x negatives below them
            u = n1 @ np.cumsum(n0)
        n1, n0 = n1.sum(), n0.sum()
        return float("nan") if n1 == 0 or n0 == 0 else float(u / (n1 * n0))
    return f


def auroc_ovr(y, probs):
    """Multi-class AUROC: unweighted mean of the one-vs-rest AUROCs defined on y (a class absent from y, or y of one
    class, has none); NaN, without a warning, where none is (a bootstrap resample of a small group); binary (2
    columns): AUROC of class 1."""
    y, probs = np.asarray(y), np.asarray(probs)
    if probs.shape[1] == 2:
        return auroc(y == 1, probs[:, 1])
    vals = [v for v in (auroc(y == k, probs[:, k]) for k in range(probs.shape[1])) if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def roc_points(y, score):
    """(thresholds descending, TPR, FPR) for the decisions score >= threshold at each distinct score."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score), kind="mergesort")
    s, yy = np.asarray(score)[order], y[order]
    last = np.r_[np.diff(s) != 0, True]  # the last index of each run of equal scores
    tp, fp = np.cumsum(yy)[last], np.cumsum(~yy)[last]
    return s[last], tp / max(y.sum(), 1), fp / max((~y).sum(), 1)


def youden_threshold(y, score):
    """The validation threshold that maximises Youden's J = sensitivity + specificity - 1."""
    t, tpr, fpr = roc_points(y, score)
    if len(t) == 0:
        return 0.5
    return float(t[int(np.argmax(tpr - fpr))])


def sensitivity_threshold(y, score, target=0.8):
    """The highest validation threshold whose sensitivity reaches `target` (fewest false positives)."""
    t, tpr, _ = roc_points(y, score)
    ok = np.nonzero(tpr >= target)[0]
    return float(t[ok[0]]) if len(ok) else float(t[-1])


def choose_threshold(y, score, rule="youden", target=0.8):
    return youden_threshold(y, score) if rule == "youden" else sensitivity_threshold(y, score, target)


def binary_stats(y, decision):
    """accuracy, sensitivity (TPR), specificity (TNR), prevalence, positive rate."""
    y, d = np.asarray(y).astype(bool), np.asarray(decision).astype(bool)
    pos, neg = y.sum(), (~y).sum()
    return {"n": int(len(y)), "positives": int(pos), "prevalence": float(y.mean()) if len(y) else float("nan"),
            "accuracy": float((y == d).mean()) if len(y) else float("nan"),
            "sensitivity": float((d & y).sum() / pos) if pos else float("nan"),
            "specificity": float((~d & ~y).sum() / neg) if neg else float("nan"),
            "positive_rate": float(d.mean()) if len(y) else float("nan")}


def group_table(y, score, groups, threshold, label="label"):
    """Per group (and 'all'): n, prevalence, AUROC, accuracy, sensitivity, specificity at a fixed threshold."""
    y, score, groups = np.asarray(y), np.asarray(score), np.asarray(groups)
    rows = []
    for g in ["all"] + sorted(set(groups.tolist())):
        m = np.ones(len(y), bool) if g == "all" else groups == g
        rows.append({"label": label, "group": g, "auroc": auroc(y[m], score[m]),
                     **binary_stats(y[m], score[m] >= threshold)})
    return pd.DataFrame(rows)


def worst_and_gap(table, metric):
    """(worst group's value, max - min over groups) of a group_table metric, 'all' excluded."""
    v = table.loc[table["group"] != "all", metric].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max() - v.min())) if len(v) else (float("nan"), float("nan"))


def multilabel_group_table(Y, S, groups, thresholds, names):
    """group_table for every column of a multi-label problem, stacked."""
    return pd.concat([group_table(Y[:, j], S[:, j], groups, thresholds[j], names[j]) for j in range(Y.shape[1])],
                     ignore_index=True)


# ---- fairness metrics (docs/METHODS.md) ----------------------------------------------------------------------------------
def _classes(y_true, y_pred, classes=None):
    """(binary?, the classes to go over). With `classes` (every class of the task) a resample that lacks a class
    stays multi-class; without it the classes are those present, binary when they lie in {0, 1}."""
    labels = np.unique(np.r_[np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()]) if classes is None else \
        np.asarray(classes)
    binary = set(labels.tolist()) <= {0, 1}
    return binary, labels


def demographic_parity(y_pred, groups, y_true=None, classes=None):
    """DP = max over classes k of [max_g P(y_hat=k | g) - min_g P(y_hat=k | g)]; binary = fairlearn's
    demographic_parity_difference (selection rate of class 1). classes: every class of the task (see _classes)."""
    y_pred, groups = np.asarray(y_pred), np.asarray(groups)
    binary, labels = _classes(y_pred if y_true is None else y_true, y_pred, classes)
    ks = [1] if binary else labels
    gaps = []
    for k in ks:
        rates = [np.mean(y_pred[groups == g] == k) for g in np.unique(groups)]
        gaps.append(max(rates) - min(rates))
    return float(max(gaps))


def equal_opportunity(y_true, y_pred, groups, classes=None):
    """EO = max over classes k of [max_g TPR_k,g - min_g TPR_k,g], TPR_k,g = P(y_hat=k | y=k, g).
    Binary: fairlearn's equal_opportunity_difference (class 1), which counts a group without positives as TPR 0
    (scikit-learn's recall with zero_division=0); multi-class (ours): a group without members of class k is left
    out for that k. classes: every class of the task, so that a resample lacking a class stays multi-class."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    binary, labels = _classes(y_true, y_pred, classes)
    if binary:
        tpr = [np.mean(y_pred[(groups == g) & (y_true == 1)] == 1) if ((groups == g) & (y_true == 1)).any() else 0.0
               for g in np.unique(groups)]
        return float(max(tpr) - min(tpr))
    gaps = []
    for k in labels:
        tpr = [np.mean(y_pred[(groups == g) & (y_true == k)] == k) for g in np.unique(groups)
               if ((groups == g) & (y_true == k)).any()]
        if len(tpr) >= 2:
            gaps.append(max(tpr) - min(tpr))
    return float(max(gaps)) if gaps else float("nan")


def essp(overall, per_group):
    """Equity-scaled performance (FairSeg): ES = I / (1 + sum_g |I - I_g|)."""
    per_group = np.asarray(list(per_group), dtype=float)
    return float(overall / (1 + np.abs(overall - per_group).sum()))


def nar(per_group_acc):
    """NAR = (max_g acc_g - min_g acc_g) / mean_g acc_g."""
    a = np.asarray(list(per_group_acc), dtype=float)
    return float((a.max() - a.min()) / a.mean())


def group_accuracy(y_true, y_pred, groups):
    y_true, y_pred, groups = map(np.asarray, (y_true, y_pred, groups))
    return {g: float(np.mean(y_true[groups == g] == y_pred[groups == g])) for g in np.unique(groups)}


def group_auroc(y_true, probs, groups):
    """Per group AUROC (binary: probs (N,) or (N,2); multi-class: one-vs-rest mean)."""
    y_true, probs, groups = np.asarray(y_true), np.asarray(probs), np.asarray(groups)
    out = {}
    for g in np.unique(groups):
        m = groups == g
        out[g] = auroc(y_true[m], probs[m]) if probs.ndim == 1 else auroc_ovr(y_true[m], probs[m])
    return out


def fairness_summary(y_true, y_pred, groups, probs=None):
    """Every downstream fairness number for one classifier: accuracy (overall and per group), DP, EO, ESSP (on
    accuracy, and on AUROC when probs are given), NAR, per-group AUROC."""
    y_true, y_pred, groups = map(np.asarray, (y_true, y_pred, groups))
    acc_g = group_accuracy(y_true, y_pred, groups)
    acc = float(np.mean(y_true == y_pred))
    classes = None if probs is None or np.ndim(probs) == 1 else np.arange(np.shape(probs)[1])
    out = {"accuracy": acc, "dp": demographic_parity(y_pred, groups, y_true, classes),
           "eo": equal_opportunity(y_true, y_pred, groups, classes), "essp_acc": essp(acc, acc_g.values()),
           "nar": nar(acc_g.values()), **{f"accuracy[{g}]": v for g, v in acc_g.items()}}
    if probs is not None:
        probs = np.asarray(probs)
        auc = auroc(y_true, probs) if probs.ndim == 1 else auroc_ovr(y_true, probs)
        auc_g = group_auroc(y_true, probs, groups)
        out.update({"auroc": auc, "essp_auc": essp(auc, auc_g.values()),
                    **{f"auroc[{g}]": v for g, v in auc_g.items()}})
    return out


# ---- bootstrap -------------------------------------------------------------------------------------------------------
def cluster_members(clusters, n_rows):
    """The row indices of each cluster (patient), in order of first appearance; one row each without clusters."""
    if clusters is None:
        return [np.array([i]) for i in range(n_rows)]
    codes, uniq = pd.factorize(np.asarray(clusters))
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes, minlength=len(uniq)))[:-1])


def bootstrap(stat, n_rows, clusters=None, n_boot=1000, seed=0, alpha=0.05, draws=False):
    """Percentile bootstrap CIs of stat(idx) -> float or {name: float}, resampling clusters (patients) with
    replacement where given, rows otherwise. Returns {name: (lo, hi)} (name 'value' for a float stat), and with
    draws=True also the resampled values (a DataFrame, one row per resample).
    Replicates where a statistic is undefined (NaN, e.g. AUROC of a one-class resample) are dropped for it."""
    rng = np.random.default_rng(seed)
    members = cluster_members(clusters, n_rows)
    reps = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        v = stat(idx)
        reps.append(v if isinstance(v, dict) else {"value": v})
    frame = pd.DataFrame(reps)
    cis = {c: (float(np.nanpercentile(frame[c], 100 * alpha / 2)), float(np.nanpercentile(frame[c],
               100 * (1 - alpha / 2)))) if frame[c].notna().any() else (float("nan"), float("nan"))
           for c in frame.columns}
    return (cis, frame) if draws else cis


def with_ci(stat, n_rows, clusters=None, n_boot=1000, seed=0):
    """{name: {'value': stat(all rows), 'ci': [lo, hi]}} for a dict-valued stat."""
    point = stat(np.arange(n_rows))
    point = point if isinstance(point, dict) else {"value": point}
    cis = bootstrap(stat, n_rows, clusters, n_boot, seed)
    return {k: {"value": float(v), "ci": list(cis.get(k, (float("nan"),) * 2))} for k, v in point.items()}


class RowsAUROC:
    """auroc_ovr(y[rows], probs[rows]) for any rows, repeats included, in microseconds (resampled_auroc per class).
    Binary (2 columns): the AUROC of class 1; more: the mean over the classes present of one-vs-rest AUROCs (tests:
    equal to auroc_ovr)."""

    def __init__(self, y, probs):
        y, probs = np.asarray(y), np.asarray(probs, dtype=float)
        self.parts = [resampled_auroc(y == k, probs[:, k]) for k in ([1] if probs.shape[1] == 2
                                                                     else range(probs.shape[1]))]

    def __call__(self, rows):
        vals = [v for v in (f(rows) for f in self.parts) if not np.isnan(v)]  # NaN: a class absent from rows
        return float(np.mean(vals)) if vals else float("nan")
