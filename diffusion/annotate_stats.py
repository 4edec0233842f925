"""The statistics of diffusion.annotate's export: agreement between annotators (Cohen's kappa per two annotators,
Fleiss' kappa over all) and, for blinded sets, each method's preference rate with a crossed bootstrap CI.
"""
import numpy as np

from diffusion.annotate_answers import CHOICES

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


def agreement(answers, pair_ids):
    """Pairwise Cohen's kappa on shared pairs, and Fleiss' kappa over the pairs every annotator answered."""
    names = sorted(answers)
    pairwise = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(answers[a]) & set(answers[b]))
            pairwise[f"{a} vs {b}"] = {"kappa": cohen_kappa([answers[a][p][0] for p in shared],
                                                            [answers[b][p][0] for p in shared]), "n_pairs": len(shared)}
    common = [p for p in pair_ids if len(names) > 1 and all(p in answers[a] for a in names)]
    table = [[sum(answers[a][p][0] == c for a in names) for c in CHOICES] for p in common]
    return {"cohen": pairwise, "fleiss": {"kappa": fleiss_kappa(table), "n_pairs": len(common),
                                          "n_annotators": len(names)}}


def preference_rates(manifest, answers, n_boot=2000, seed=0):
    """Blinded sets: per (method, opponent) the share of decisive answers preferring the method's image, with a
    95% percentile CI from a crossed bootstrap (Owen 2007): each resample draws the pairs once, shared by all
    annotators, and the annotators, both with replacement, and pools the answers of the drawn annotators on the
    drawn pairs; so both the pairs and the annotators count as samples."""
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
        boot = []
        for _ in range(n_boot):
            sub = W[np.ix_(rng.integers(0, len(names), len(names)), rng.integers(0, W.shape[1], W.shape[1]))]
            if np.isfinite(sub).any():
                boot.append(np.nanmean(sub))
        out.setdefault(m, {})[f"vs {opp}"] = {
            "rate": float(np.nanmean(W)), "ci": np.percentile(boot, [2.5, 97.5]).tolist(),
            "n_answers": int(np.isfinite(W).sum()), "n_pairs": W.shape[1],
            "n_annotators": int(np.isfinite(W).any(1).sum())}
    return out
