"""How strong the planted bias of the positive control is by default, chosen on validation patients only.

For each strength of the grid, the chest X-ray study's balanced_real and imbalanced_real classifiers are trained on
the planted copy (fairness/plant.py) in the study's own folds, settings and stage commands, except that each scores
its fold's validation patients instead of its test patients (--test-set val): no test image is scored here. The
rule, fixed before the run: the default is the smallest strength of the grid at which balanced_real's female
any-finding AUROC exceeds imbalanced_real's by at least --margin, averaged over the folds used (the validation
patients of a fold are ~15% of its non-test patients, so a single fold is too noisy to choose by); where no strength
reaches it, the strongest of the grid. Fold k's validation patients are test patients of the other folds (every
patient is tested once in cross-fitting): the choice uses no test score, but it is not blind to the patients later
tested; for a positive control, whose strength is meant to be detectable, that is said rather than avoided.

    python bench/plant_strength.py                                   # lesion at 0.2 and 0.4; folds 0-2 (~20 min)
    python bench/plant_strength.py --kind invert --grid 0.5,1        # another kind

Writes results/bench/plant_strength.{md,csv,json}.
"""
import argparse
from pathlib import Path
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from classify import chestxray_study  # noqa: E402  (the study's settings, so the choice is made on its design)
from classify.cxr_task import FEMALE, Task, classifier_stage, fold_sets, read_data  # noqa: E402
from classify.train_chexnet import add_args  # noqa: E402
from common.cli import ArgumentParser, as_argv, positive_float, positive_int, run  # noqa: E402
from common.report import write_table  # noqa: E402
from common.runs import write_json  # noqa: E402
from common.splits import patient_kfold, write_sets  # noqa: E402
from common.stages import Stages, portable  # noqa: E402
from fairness.metrics import auroc  # noqa: E402
from fairness.plant import KINDS  # noqa: E402

CELLS = {"balanced_real": "balanced", "imbalanced_real": "imbalanced"}


def female_auroc(preds):
    """The any-finding AUROC on the female rows of one classifier's preds.csv."""
    d = pd.read_csv(preds)
    d = d[d["sex"] == FEMALE]
    return auroc(d["y_any_finding"].to_numpy(), d["p_any_finding"].to_numpy())


def strength_stages(stages, s, kind, study, t, fold, folds_used, runs):
    """The plant and the two classifiers of each fold used, for strength s; returns {fold: {cell: preds path}}."""
    copy = runs / f"{kind}_{s:g}" / "planted_data"
    stages.output("fairness.plant", ["--data-root", portable(study.data_root), "--plant", f"{kind}:{s:g}", "--group",
                                     FEMALE, "--seed", study.seed, "--out", copy], copy / "plant.json")
    task = Task(data_argv=("--data-root", copy), seed=study.seed, device=study.device,
                classifier_argv=tuple(as_argv(add_args, study)), runs=runs / f"{kind}_{s:g}")
    preds = {}
    for k in folds_used:
        sets, n_male, _ = fold_sets(k, fold, t, study.seed, study.val_fraction, study.female_fraction)
        write_sets(task.folder(k) / "sets.csv", sets)
        for cell, train_set in CELLS.items():
            classifier_stage(stages, task, k, cell, train_set, [], n_male, deps=[copy / "plant.json"], test_set="val")
            preds.setdefault(k, {})[cell] = task.folder(k) / cell / "preds.csv"
    return preds


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="lesion", choices=sorted(KINDS), help="the planted signature (fairness/plant.py)")
    p.add_argument("--grid", default="0.2,0.4", help="comma-separated strengths, ascending")
    p.add_argument("--folds-used", type=positive_int, default=3, help="the first N folds of the study's 5")
    p.add_argument("--margin", type=positive_float, default=0.1,
                   help="balanced minus imbalanced female validation AUROC that the default must reach")
    p.add_argument("--runs", default="runs/bench/plant_strength", help="the stages' folder")
    p.add_argument("--out", default="results/bench/plant_strength", help="table prefix (.md, .csv, .json)")
    return p.parse_args(argv)


def main(args):
    grid = sorted(float(x) for x in args.grid.split(","))
    study = chestxray_study.parse_args(["--scale", "quick"])  # the study's quick settings, flags and folds
    t = read_data(study.data_root, study.csv, study.images_per_sex, study.size, study.folds)
    fold = patient_kfold(t, study.folds, seed=study.seed, stratify="sex")
    stages, runs = Stages(), Path(args.runs)
    preds = {s: strength_stages(stages, s, args.kind, study, t, fold, range(args.folds_used), runs) for s in grid}
    rows, record = [], {}
    for s in grid:
        per_fold = {k: {c: female_auroc(p) for c, p in cells.items()} for k, cells in preds[s].items()}
        diffs = [v["balanced_real"] - v["imbalanced_real"] for v in per_fold.values()]
        record[f"{s:g}"] = {"per_fold": per_fold, "mean_difference": float(np.mean(diffs))}
        rows.append([f"{args.kind}:{s:g}", *[f"{v['balanced_real']:.3f} / {v['imbalanced_real']:.3f}"
                                            for v in per_fold.values()], f"{np.mean(diffs):+.3f}"])
    chosen = next((s for s in grid if record[f"{s:g}"]["mean_difference"] >= args.margin), None)
    verdict = (f"default: {args.kind}:{chosen:g}, the smallest strength whose mean difference reaches {args.margin:g}"
               if chosen is not None else f"default: {args.kind}:{grid[-1]:g}, the strongest of the grid (none "
               f"reaches {args.margin:g})")
    chosen = grid[-1] if chosen is None else chosen
    write_table(Path(args.out), ["plant", *[f"fold {k}: balanced / imbalanced" for k in range(args.folds_used)],
                                 "mean balanced - imbalanced"], rows,
                title="Female any-finding AUROC on validation patients (no test score), chest X-ray quick scale, planted",
                notes=[verdict, f"Rule fixed before the run: the smallest strength with a mean difference >= "
                                f"{args.margin:g} over folds 0-{args.folds_used - 1}. Each fold's validation patients "
                                f"are test patients of other folds (cross-fitting tests every patient once): no test "
                                f"score is used, but the patients are not held out from the later test."])
    write_json(Path(args.out).with_suffix(".json"), {"kind": args.kind, "grid": grid, "margin": args.margin,
                                                     "strengths": record, "chosen": chosen, "verdict": verdict})
    print(verdict)


if __name__ == "__main__":
    run(main, parse_args)
