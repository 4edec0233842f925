"""The positive control, repeated: how often the chest X-ray design says "yes" when a planted effect is there (its
power, at each strength) and when nothing is (its false-positive rate), over many seeds.

One repeat of the design (design seed d) draws new patient-level folds and training subsets with d, as the study
does with --seed d, and per strength of the plant trains balanced_real and imbalanced_real R times each (training
seeds d * 100 + k + 10000 r, the study's). Their out-of-fold predictions are compared as the planted study compares
them: balanced minus imbalanced female any-finding AUROC and signed gap M - F, by the two-level bootstrap
(replicates, then patients), with Holm over those two: the primary family of a planted run of these two conditions
(`make planted ARGS="--conditions balanced_real,imbalanced_real"`; with every condition the family is four, and
its first Holm step is stricter). "Yes" means a Holm p below 0.05 for the female AUROC with a positive difference.
The rule was fixed before the run.

The null here is a true null: imbalanced_real against the same design with other women. Both arms train on the
fold's men and n_f women of its pool (the study's imbalanced set, and the next n_f women of the same draw), with
the same seeds, on the unplanted data; they differ only in which women were drawn, as two draws of the study's
design would. The share of repeats on which either of the two comparisons has a Holm p below 0.05 (either sign) is
the family-wise false-positive rate (nominal 0.05); the SD over repeats of diff / SE (near 1 if the CIs are as wide
as the noise) checks the calibration with more power than a count of 30. Balanced vs imbalanced at strength 0 is
not a null: more real women may help women without any plant. It is the curve's first point.

The grid was 0.1, 0.2, 0.4 until the first repeat showed a bootstrap SE of about 0.05 for every strength's female
AUROC difference, against differences of 0.07-0.10 (with 0.4 the largest): a grid without a strength near power
0.8 draws no curve, so 0.8 replaced 0.1 (same cost). The rule for "yes" and for the strength named in the README
(the smallest with power >= 0.8) did not change.

Reduced scale, so that 30 repeats fit in two hours on 2 cores: 32 px, cnn8 of width 8, 8 epochs, 3 folds, R = 2,
499 resamples. Training runs in this process with the study's own pieces: the planted copies (fairness/plant.py),
the training sets (classify.cxr_task.fold_sets) and the training loop (classify.train_chexnet.fit). The power is
this reduced design's. The study at quick scale (64 px, 16 epochs, 5 folds, R = 3) has more images per fold and
better classifiers.

    python bench/planted_power.py                         # 30 repeats, lesion at 0.2, 0.4, 0.8 (~2 h on 2 cores)
    python bench/planted_power.py --repeats 4 --out /tmp/pp    # a quick look

Resumable: each repeat's outcome and every prediction go to --runs (repeat<d>.npz); a rerun skips finished repeats.
Writes <out>.md, .csv, .json and .png.
"""
import argparse
import json
from pathlib import Path
import sys
import time

import numpy as np
import torch
from scipy.stats import binomtest
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from classify.cxr_task import ANY, FEMALE, MALE, fold_sets  # noqa: E402
from classify.train_chexnet import Images, Network, Recipe, fit, predict, targets  # noqa: E402
from common.cache import load_images  # noqa: E402
from common.cli import ArgumentParser, nonneg_int, positive_int, run  # noqa: E402
from common.data import PROJECT_DATA, label_matrix, read_nih  # noqa: E402
from common.report import write_table  # noqa: E402
from common.runs import git_commit, seed_everything, write_json  # noqa: E402
from common.splits import patient_kfold  # noqa: E402
from fairness.compare import holm, paired_difference_replicates  # noqa: E402
from fairness.figures import lines  # noqa: E402
from fairness.metrics import auroc  # noqa: E402
from fairness.plant import KINDS, plant  # noqa: E402

CELLS = {"balanced_real": "balanced", "imbalanced_real": "imbalanced", "other_women": "imbalanced_other"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=positive_int, default=30, help="design seeds (each: new folds, subsets, seeds)")
    p.add_argument("--first", type=nonneg_int, default=0, help="the first design seed")
    p.add_argument("--kind", default="lesion", choices=sorted(KINDS), help="the planted signature (fairness/plant.py)")
    p.add_argument("--strengths", default="0.2,0.4,0.8", help="comma-separated strengths above 0 (0 is always run)")
    p.add_argument("--folds", type=positive_int, default=3, help="patient-level folds per repeat")
    p.add_argument("--replicates", type=positive_int, default=2, help="training seeds per condition and fold")
    p.add_argument("--size", type=positive_int, default=32, help="image size (px)")
    p.add_argument("--width", type=positive_int, default=8, help="cnn8 width")
    p.add_argument("--epochs", type=positive_int, default=8, help="training epochs (cosine schedule, last weights)")
    p.add_argument("--n-boot", type=positive_int, default=499, help="bootstrap resamples per comparison")
    p.add_argument("--runs", default="runs/bench/planted_power", help="planted copies and each repeat's record")
    p.add_argument("--out", default="results/bench/planted_power", help="table prefix (.md, .csv, .json, .png)")
    args = p.parse_args(argv)
    try:
        args.strengths = sorted(float(s) for s in args.strengths.split(","))
    except ValueError:
        p.error(f"--strengths {args.strengths}: give numbers separated by commas, e.g. 0.1,0.2,0.4")
    lo, hi = KINDS[args.kind]
    if any(not lo < s <= hi for s in args.strengths):
        p.error(f"--strengths: {args.kind} takes strengths in ({lo:g}, {hi:g}]; 0 (the unplanted data) is always run")
    return args


def planted_images(kind, strength, size, runs):
    """(table, uint8 images (N, size, size)) of the planted copy at this strength (written once into runs; strength 0
    is the embedded data itself, which the copy would repeat byte for byte)."""
    root = PROJECT_DATA / "nih_cxr14"
    if strength > 0:
        copy = Path(runs) / f"{kind}_{strength:g}"
        if not (copy / "plant.json").is_file():
            facts = plant(root, None, kind, strength, FEMALE, 0, copy)
            write_json(copy / "plant.json", facts)
        root = copy
    t = read_nih(root)
    x, ok = load_images(t["image"], size, "L")
    assert ok.all(), "every embedded image decodes"
    return t, x


def train_scores(x, y, idx, train_set, n_male, seed, network, recipe):
    """One classifier (the study's fit, at this scale) trained on idx[train_set], validated on idx['val']; its
    any-finding scores of idx['test']."""
    seed_everything(seed)
    tr, va = idx[train_set], idx["val"]
    net, _, _, _ = fit(Images(x, tr), y[tr], Images(x, va), y[va], network, recipe, seed, torch.device("cpu"),
                       epoch_size=2 * n_male, progress=False)
    return predict(net, Images(x, idx["test"]), torch.device("cpu"))[:, ANY]


def compare(y_any, sex, pid, a_scores, b_scores, n_boot, seed):
    """Female AUROC and signed gap M - F, a minus b (lists of pooled scores, one per replicate), two-level bootstrap,
    Holm over the two: [(diff, p, p_holm) for the female AUROC, then the gap]."""
    f, m = sex == FEMALE, sex == MALE

    def female(s):
        return lambda i: auroc(y_any[i][f[i]], s[i][f[i]])

    def gap(s):
        return lambda i: auroc(y_any[i][m[i]], s[i][m[i]]) - auroc(y_any[i][f[i]], s[i][f[i]])
    rows = [paired_difference_replicates([(stat(a), stat(b), pid) for a, b in zip(a_scores, b_scores)],
                                         n_boot=n_boot, seed=seed) for stat in (female, gap)]
    adjusted = holm([r["p"] for r in rows])
    return [(r["diff"], r["p"], ph, r["se"]) for r, ph in zip(rows, adjusted)]


def one_repeat(d, data, args, network, recipe):
    """Every classifier of design seed d; returns its record: per strength the two comparisons, and the null's."""
    t0, _ = data[0.0]
    fold = patient_kfold(t0, args.folds, seed=d, stratify="sex")
    names = {Path(i).name: j for j, i in enumerate(t0["image"])}
    y_any = targets(label_matrix(t0))[:, ANY].astype(int)
    sex, pid = t0["sex"].to_numpy(), t0["patient_id"].to_numpy()
    record, preds = {"repeat": d}, {}
    for s, (t, x) in data.items():
        assert [Path(i).name for i in t["image"]] == list(names), "a planted copy lists the images in one order"
        y = torch.from_numpy(targets(label_matrix(t)))
        cells = CELLS if s == 0 else {c: v for c, v in CELLS.items() if c != "other_women"}  # the null: unplanted
        scores = {c: np.zeros((args.replicates, len(t))) for c in cells}
        for k in range(args.folds):
            sets, n_male, _ = fold_sets(k, fold, t0, d, 0.15, 0.1)
            n_f = len(sets["imbalanced"]) - n_male  # balanced: the men, then n_male women, the first n_f imbalanced's
            men, women = sets["balanced"][:n_male], sets["balanced"][n_male:]
            sets["imbalanced_other"] = np.r_[men, women[n_f:2 * n_f]]
            idx = {name: np.array([names[i] for i in v]) for name, v in sets.items()}
            for r in range(args.replicates):
                for c, train_set in cells.items():
                    scores[c][r, idx["test"]] = train_scores(x, y, idx, train_set, n_male, d * 100 + k + 10000 * r,
                                                             network, recipe)
        record[f"{s:g}"] = compare(y_any, sex, pid, list(scores["balanced_real"]), list(scores["imbalanced_real"]),
                                   args.n_boot, d)
        if s == 0:
            record["null"] = compare(y_any, sex, pid, list(scores["other_women"]), list(scores["imbalanced_real"]),
                                     args.n_boot, d)
        preds.update({f"{c}_{s:g}": v for c, v in scores.items()})
    return record, preds


def said_yes(row, two_sided=False):
    diff, _, p_holm, _ = row
    return bool(p_holm < 0.05 and (two_sided or diff > 0))


def summarise(records, args):
    """Per strength: the share of repeats that said yes (female AUROC, Holm p < 0.05, positive), its exact binomial
    95% CI and Monte Carlo SE; the mean difference and the SD of diff / SE. The null: the family-wise rate (either
    row, either sign)."""
    rows = []
    for key in ["null", "0", *[f"{s:g}" for s in args.strengths]]:
        yes = [said_yes(r[key][0], two_sided=key == "null") or (key == "null" and said_yes(r[key][1], True))
               for r in records]
        gap_yes = [said_yes(r[key][1], two_sided=True) for r in records]
        n, k = len(yes), int(sum(yes))
        ci = binomtest(k, n).proportion_ci(method="exact")
        rows.append({"run": key, "repeats": n, "yes": k, "rate": k / n, "ci": [ci.low, ci.high],
                     "mc_se": float(np.sqrt(k / n * (1 - k / n) / n)),
                     "mean_diff": float(np.mean([r[key][0][0] for r in records])),
                     "sd_diff": float(np.std([r[key][0][0] for r in records], ddof=1)) if n > 1 else float("nan"),
                     "mean_se": float(np.mean([r[key][0][3] for r in records])),
                     "sd_z": float(np.std([r[key][0][0] / r[key][0][3] for r in records], ddof=1))
                     if n > 1 else float("nan"),
                     "gap_yes_rate": float(np.mean(gap_yes))})
    return rows


def write_outputs(rows, records, args, seconds):
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    planted = [r for r in rows if r["run"] not in ("null", "0")]
    detected = [r for r in planted if r["rate"] >= 0.8]
    smallest = detected[0]["run"] if detected else None
    null = rows[0]
    what = {"null": "true null: imbalanced_real vs the same design with other women, no plant",
            "0": "balanced_real vs imbalanced_real, no plant (more real women, nothing planted)"}
    table = [[what.get(r["run"], f"balanced_real vs imbalanced_real, PLANTED {args.kind}:{r['run']} on F"),
              f"{r['yes']} / {r['repeats']}", f"{r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] "
              f"(MC SE {r['mc_se']:.3f})", f"{r['mean_diff']:+.3f} (sd {r['sd_diff']:.3f})", f"{r['mean_se']:.3f}",
              f"{r['sd_z']:.2f}", f"{r['gap_yes_rate']:.2f}"] for r in rows]
    header = ["comparison", "said yes", "rate [exact 95% CI]", "female AUROC diff, mean over repeats",
              "mean bootstrap SE", "SD of diff / SE", "signed-gap row said yes"]
    verdict = (f"The smallest strength detected at power >= 0.8 (point estimate): {args.kind}:{smallest}."
               if smallest else "No strength of the grid reached power 0.8 (point estimates).")
    write_table(out, header, table,
                title=f"The positive control repeated: {len(records)} repeats of the chest X-ray design at a reduced "
                      f"scale ({args.folds} folds, {args.replicates} training seeds per condition and fold, "
                      f"{args.size} px, cnn8 width {args.width}, {args.epochs} epochs, {args.n_boot} resamples)",
                notes=[f"'Yes': Holm p < 0.05 over the two primary comparisons (female AUROC and signed gap M - F), "
                       f"on the female AUROC with a positive difference; on the null row, either comparison with "
                       f"either sign (the family-wise rate). The false-positive rate on the true null is "
                       f"{null['rate']:.3f} (exact 95% CI [{null['ci'][0]:.3f}, {null['ci'][1]:.3f}], Monte Carlo "
                       f"SE {null['mc_se']:.3f}); nominal 0.05. On the null, the SD of diff / SE over repeats is "
                       f"{null['sd_z']:.2f} (1 if the bootstrap SE is as large as the noise; above 1: CIs too narrow). "
                       f"{verdict}",
                       "Each repeat draws new folds, training subsets and training seeds; the planted copies are the "
                       "same in every repeat (plant seed 0). This is the reduced design's power, not the quick "
                       "study's (64 px, 16 epochs, 5 folds, 3 seeds). Every prediction: "
                       f"{args.runs}/repeat<d>.npz. Training time in the invocation that wrote this table: "
                       f"{seconds / 60:.0f} min (repeats found in --runs are not retrained)."])
    write_json(out.with_suffix(".json"), {"rows": rows, "records": records, "smallest_detected": smallest,
                                          "settings": {k: v for k, v in vars(args).items()}, "commit": git_commit()})
    lines({"power (female AUROC, Holm p < 0.05)": {0.0: rows[1]["rate"],
                                                   **{float(r["run"]): r["rate"] for r in planted}},
           "false-positive rate (true null)": {0.0: null["rate"]}},
          out.with_suffix(".png"), f"Positive control, {len(records)} repeats (reduced scale)",
          f"planted {args.kind} strength", "share of repeats that said yes")
    print(out.with_suffix(".md").read_text())


def main(args):
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    data = {s: planted_images(args.kind, s, args.size, runs) for s in [0.0, *args.strengths]}
    network = Network("cnn8", args.width, None, False)
    recipe = Recipe(epochs=args.epochs, batch_size=32, lr=1e-3, weight_decay=1e-4, class_weights="chexnet",
                    schedule="cosine", lr_patience=3, smooth=3, patience=0, keep="last")
    settings = json.dumps({k: v for k, v in vars(args).items() if k not in ("repeats", "first", "out", "runs")},
                          sort_keys=True)
    records, t0 = [], time.time()
    for d in tqdm(range(args.first, args.first + args.repeats), desc="repeats"):
        f = runs / f"repeat{d}.npz"
        if f.is_file() and str(np.load(f)["settings"]) == settings:
            records.append(json.loads(str(np.load(f)["record"])))
            continue
        record, preds = one_repeat(d, data, args, network, recipe)
        np.savez_compressed(f.with_suffix(".partial.npz"), settings=settings, record=json.dumps(record), **preds)
        f.with_suffix(".partial.npz").replace(f)
        records.append(record)
    write_outputs(summarise(records, args), records, args, time.time() - t0)


if __name__ == "__main__":
    run(main, parse_args)
