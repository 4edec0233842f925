"""The chest X-ray classifier's quick-scale settings, chosen on validation patients only.

The settings were first chosen by comparing candidates on the study's test folds (docs/chestxray.md says so). This
redoes the choice without any test score: for each candidate, the study's balanced_real classifier is trained in
each of its 5 folds, with the study's own stage command and quick settings, except that it scores its fold's
validation patients instead of its test patients (--test-set val). The candidates keep the last epoch (cosine
schedule), so the validation patients play no part in training and score the candidate as unseen data.

The rule, fixed before the run: the candidate with the highest mean over the folds of the validation any-finding
AUROC; a candidate within --tie of that highest mean is preferred when it trains fewer epochs (cheaper), then when it
is the study's current default. Fold k's validation patients are test patients of the other folds (cross-fitting
tests every patient once): the choice uses no test score, but those patients are not held out from the later test.

    python bench/chestxray_settings.py                       # 4 candidates x 5 folds, ~15 min on 2 cores

Writes results/bench/chestxray_settings.{md,csv,json}.
"""
import argparse
from pathlib import Path
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from classify import chestxray_study  # noqa: E402  (the study's settings, so the choice is made on its design)
from classify.cxr_task import Task, classifier_stage, fold_sets, read_data  # noqa: E402
from classify.train_chexnet import add_args  # noqa: E402
from common.cli import ArgumentParser, as_argv, positive_float, run  # noqa: E402
from common.report import write_table  # noqa: E402
from common.runs import write_json  # noqa: E402
from common.splits import patient_kfold, write_sets  # noqa: E402
from common.stages import Stages  # noqa: E402
from fairness.metrics import auroc  # noqa: E402

CANDIDATES = [("chexnet", 16), ("chexnet", 30), ("pos_weight", 16), ("pos_weight", 30)]  # class weights, epochs


def any_auroc(preds):
    """The any-finding AUROC over the rows of one classifier's preds.csv."""
    d = pd.read_csv(preds)
    return auroc(d["y_any_finding"].to_numpy(), d["p_any_finding"].to_numpy())


def candidate_stages(stages, weights, epochs, t, fold, runs):
    """balanced_real of every fold under one candidate, scoring validation patients; returns [preds path per fold]."""
    study = chestxray_study.parse_args(["--scale", "quick", "--class-weights", weights, "--epochs", str(epochs),
                                        "--keep", "last"])
    task = Task(data_argv=("--data-root", study.data_root), seed=study.seed, device=study.device,
                classifier_argv=tuple(as_argv(add_args, study)), runs=runs / f"{weights}_{epochs}")
    preds = []
    for k in range(study.folds):
        sets, n_male, _ = fold_sets(k, fold, t, study.seed, study.val_fraction, study.female_fraction)
        write_sets(task.folder(k) / "sets.csv", sets)
        classifier_stage(stages, task, k, "balanced_real", "balanced", [], n_male, test_set="val")
        preds.append(task.folder(k) / "balanced_real" / "preds.csv")
    return preds


def choose(means, default, tie):
    """The rule above: among candidates within `tie` of the best mean, the fewest epochs, then the default."""
    best = max(means.values())
    near = [c for c in means if means[c] >= best - tie]
    return min(near, key=lambda c: (c[1], c != default, -means[c]))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tie", type=positive_float, default=0.01,
                   help="validation AUROC within which a cheaper candidate (fewer epochs) is preferred")
    p.add_argument("--runs", default="runs/bench/chestxray_settings", help="the stages' folder")
    p.add_argument("--out", default="results/bench/chestxray_settings", help="table prefix (.md, .csv, .json)")
    return p.parse_args(argv)


def main(args):
    study = chestxray_study.parse_args(["--scale", "quick"])
    default = (study.class_weights, study.epochs)
    t = read_data(study.data_root, study.csv, study.images_per_sex, study.size, study.folds)
    fold = patient_kfold(t, study.folds, seed=study.seed, stratify="sex")
    stages, runs = Stages(), Path(args.runs)
    preds = {c: candidate_stages(stages, *c, t, fold, runs) for c in CANDIDATES}
    per_fold = {c: [any_auroc(p) for p in paths] for c, paths in preds.items()}
    means = {c: float(np.mean(v)) for c, v in per_fold.items()}
    chosen = choose(means, default, args.tie)
    rows = [[f"{w}, {e} epochs, last" + (" (default)" if (w, e) == default else ""), *[f"{a:.3f}" for a in v],
             f"{means[(w, e)]:.3f}"] for (w, e), v in per_fold.items()]
    verdict = (f"chosen: --class-weights {chosen[0]} --epochs {chosen[1]} --keep last"
               + (" (the default stays)" if chosen == default else f" (the default was {default[0]}, {default[1]})"))
    write_table(Path(args.out), ["setting", *[f"fold {k}" for k in range(study.folds)], "mean"], rows,
                title="balanced_real's any-finding AUROC on validation patients (no test score), chest X-ray quick "
                      "scale, one seed per fold",
                notes=[verdict, f"Rule fixed before the run: the highest mean over the folds; within {args.tie:g} of "
                                f"it, fewer epochs, then the default. Each fold's validation patients (~15% of its "
                                f"non-test patients) are test patients of other folds: no test score is used, but "
                                f"the patients are not held out from the later test."])
    write_json(Path(args.out).with_suffix(".json"), {
        "candidates": [{"class_weights": w, "epochs": e, "keep": "last", "per_fold": per_fold[(w, e)],
                        "mean": means[(w, e)]} for w, e in CANDIDATES],
        "tie": args.tie, "default": list(default), "chosen": list(chosen), "verdict": verdict})
    print(verdict)


if __name__ == "__main__":
    run(main, parse_args)
