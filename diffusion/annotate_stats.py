"""The statistics of diffusion.annotate's export: agreement between annotators (Cohen's kappa per two annotators,
Fleiss' kappa over all), for blinded sets each method's preference rate, and for the reader study each reader's
accuracy against chance and the detection rate per method and per group; CIs from a crossed bootstrap.
"""
import numpy as np
from scipy import stats

MIN_SHARED = 10  # fewer shared pairs than this: a kappa is too noisy to report (null, with the reason)

def cohen_kappa(a, b):
    """Cohen's kappa of two annotators' choices on the same pairs (NaN when undefined)."""
    cats = sorted(set(a) | set(b))
    if len(a) < 2 or len(cats) < 2:
        return float("nan")
    p_o = np.mean(np.array(a) == np.array(b))
    p_e = sum(np.mean(np.array(a) == c) * np.mean(np.array(b) == c) for c in cats)
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def fleiss_kappa(table):
    """Fleiss' kappa from an (items, categories) table of counts, the same number of raters per item."""
    t = np.asarray(table, float)
    if len(t) < 2 or t.sum(1).min() < 2:
        return float("nan")
    n = t.sum(1)[0]
    p_j = t.sum(0) / t.sum()
    p_i = ((t * (t - 1)).sum(1)) / (n * (n - 1))
    p_e = (p_j ** 2).sum()
    return float((p_i.mean() - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def reported(kappa, n, min_shared=MIN_SHARED):
    """A kappa for the summary: null with the reason where too few pairs are shared or it is undefined (strict
    JSON: never NaN)."""
    if n < min_shared:
        return {"kappa": None, "n_pairs": n, "reason": f"{n} shared pairs; at least {min_shared} are needed"}
    if not np.isfinite(kappa):
        return {"kappa": None, "n_pairs": n, "reason": "undefined: every answer falls in one category"}
    return {"kappa": kappa, "n_pairs": n}


def agreement(answers, pair_ids, choices, min_shared=MIN_SHARED):
    """Pairwise Cohen's kappa on shared pairs, and Fleiss' kappa over the pairs every annotator answered.
    answers: {annotator: {pair id: (choice, note)}}, only annotators with a standing answer."""
    names = sorted(answers)
    pairwise = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(answers[a]) & set(answers[b]))
            k = cohen_kappa([answers[a][p][0] for p in shared], [answers[b][p][0] for p in shared])
            pairwise[f"{a} vs {b}"] = reported(k, len(shared), min_shared)
    common = [p for p in pair_ids if len(names) > 1 and all(p in answers[a] for a in names)]
    table = [[sum(answers[a][p][0] == c for a in names) for c in choices] for p in common]
    fleiss = reported(fleiss_kappa(table), len(common), min_shared) if len(names) > 1 else \
        {"kappa": None, "n_pairs": 0, "reason": "one annotator"}
    return {"cohen": pairwise, "fleiss": {**fleiss, "n_annotators": len(names)}}


def crossed_ci(W, rng, n_boot=2000):
    """95% percentile CI of the mean of W (annotators x items, NaN where not answered) from a crossed bootstrap
    (Owen 2007): each resample draws the items once, shared by all annotators, and the annotators, both with
    replacement, and pools the drawn annotators' answers on the drawn items; so items and annotators both count
    as samples."""
    W = W[np.isfinite(W).any(1)]  # annotators with no answer here add nothing but noise to the draw
    if W.size == 0:
        return None
    boot = []
    for _ in range(n_boot):
        sub = W[np.ix_(rng.integers(0, W.shape[0], W.shape[0]), rng.integers(0, W.shape[1], W.shape[1]))]
        if np.isfinite(sub).any():
            boot.append(np.nanmean(sub))
    return np.percentile(boot, [2.5, 97.5]).tolist() if boot else None


def preference_rates(manifest, answers, n_boot=2000, seed=0):
    """Blinded sets: per (method, opponent) the share of decisive answers preferring the method's image, with a
    95% CI from the crossed bootstrap over pairs and annotators (crossed_ci)."""
    rng = np.random.default_rng(seed)
    pairs = {p["id"]: p for p in manifest["pairs"]}
    names = sorted(answers)
    wins = {}  # (method, opponent) -> {pair id: {annotator: 1 / 0}}
    for a, ans in answers.items():
        for pid, (choice, _) in ans.items():
            if choice not in ("left", "right"):
                continue
            p = pairs[pid]
            chosen, other = (p["left_source"], p["right_source"]) if choice == "left" else \
                (p["right_source"], p["left_source"])
            for m, opp, won in ((chosen, other, 1), (other, chosen, 0)):
                if m != "real":
                    wins.setdefault((m, opp), {}).setdefault(pid, {})[a] = won
    out = {}
    for (m, opp), by_pair in sorted(wins.items()):
        W = np.array([[by_pair[pid].get(a, np.nan) for pid in by_pair] for a in names])  # (annotators, pairs)
        out.setdefault(m, {})[f"vs {opp}"] = {
            "rate": float(np.nanmean(W)), "ci": crossed_ci(W, rng, n_boot),
            "n_answers": int(np.isfinite(W).sum()), "n_pairs": W.shape[1],
            "n_annotators": int(np.isfinite(W).any(1).sum())}
    return out


def binomial_facts(k, n):
    """k of n correct: the share, its exact (Clopper-Pearson) 95% CI and the two-sided exact binomial p against
    chance (0.5)."""
    t = stats.binomtest(k, n, 0.5)
    ci = t.proportion_ci(0.95, method="exact")
    return {"accuracy": k / n, "ci": [float(ci.low), float(ci.high)], "p_vs_chance": float(t.pvalue),
            "n_images": n}


def reader_study(manifest, answers, ratings, n_boot=2000, seed=0):
    """The reader study (real or synthetic?): each reader's accuracy with its exact CI and binomial p against 50%
    (each reader's queue holds whole blocks of one real and one synthetic image, so a reader who always answers one
    way scores 50% once their queue is done), with the share of synthetic images they called synthetic
    (sensitivity), of real ones called real (specificity) and the mean of the two (balanced accuracy, 50% by chance
    even for an unfinished queue); pooled over readers, the accuracy, each source's share called correctly, and per
    group the share of its synthetic images called synthetic beside the share of its real images called real (are
    one group's synthetic images easier to spot, or its real ones harder to believe?), each with a crossed-bootstrap
    CI over images and readers; the mean realism rating per source and group. answers: {reader: {item id: (call,
    note)}}, ratings: {reader: {item id: 1-5}}."""
    rng = np.random.default_rng(seed)
    items = {p["id"]: p for p in manifest["pairs"]}
    names = sorted(answers)
    ids = sorted({pid for a in names for pid in answers[a]})
    called_synth = np.array([[float(answers[a][pid][0] == "synthetic") if pid in answers[a] else np.nan
                              for pid in ids] for a in names])  # (readers, items)
    is_synth = np.array([items[pid]["source"] != "real" for pid in ids])
    correct = np.where(np.isnan(called_synth), np.nan, called_synth == is_synth)
    per_reader = {}
    for i, a in enumerate(names):
        ok = correct[i][np.isfinite(correct[i])]
        sens = np.nanmean(correct[i][is_synth]) if np.isfinite(correct[i][is_synth]).any() else None
        spec = np.nanmean(correct[i][~is_synth]) if np.isfinite(correct[i][~is_synth]).any() else None
        per_reader[a] = {**binomial_facts(int(ok.sum()), len(ok)),
                         "synthetic_called_synthetic": None if sens is None else float(sens),
                         "real_called_real": None if spec is None else float(spec),
                         "balanced_accuracy": None if sens is None or spec is None else float((sens + spec) / 2)}
    pooled = {"accuracy": float(np.nanmean(correct)), "ci": crossed_ci(correct, rng, n_boot),
              "n_answers": int(np.isfinite(correct).sum())}
    by_source = {}
    for src in sorted({items[pid]["source"] for pid in ids}):
        cols = np.array([items[pid]["source"] == src for pid in ids])
        W = correct[:, cols]
        by_source[src] = {"share_called_" + ("real" if src == "real" else "synthetic"): float(np.nanmean(W)),
                          "ci": crossed_ci(W, rng, n_boot), "n_answers": int(np.isfinite(W).sum()),
                          "mean_realism": mean_rating(ratings, names, [p for p, c in zip(ids, cols) if c])}
    by_group = {}
    for g in sorted({items[pid]["group"] for pid in ids}):
        in_g = np.array([items[pid]["group"] == g for pid in ids])
        by_group[g] = {}
        for what, cols in (("synthetic_called_synthetic", in_g & is_synth), ("real_called_real", in_g & ~is_synth)):
            if cols.any():
                W = correct[:, cols]
                by_group[g][what] = {"share": float(np.nanmean(W)), "ci": crossed_ci(W, rng, n_boot),
                                     "n_answers": int(np.isfinite(W).sum()),
                                     "mean_realism": mean_rating(ratings, names, [p for p, c in zip(ids, cols) if c])}
    return {"per_reader": per_reader, "pooled": pooled, "by_source": by_source, "by_group": by_group,
            "ci_method": "per reader: exact binomial (Clopper-Pearson), p against 0.5; pooled: crossed bootstrap over "
                         f"images and readers (Owen 2007), {n_boot} resamples, percentile"}


def mean_rating(ratings, names, ids):
    r = [ratings.get(a, {}).get(pid) for a in names for pid in ids]
    r = [x for x in r if x is not None]
    return float(np.mean(r)) if r else None
