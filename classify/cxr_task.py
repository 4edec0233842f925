"""The chest X-ray task that the chestxray and compare studies share: the fold's training sets, the classifier
cell's stage command, and the any-finding statistics their reports compare. Not a study: both studies import it,
neither imports the other (compare reads chestxray's split files and cells as files).

Per patient-level fold k (every image tested once), the split file runs/.../fold<k>/sets.csv names: test; val (a
share of the fold's other patients); balanced (n_male real male + n_male real female images of the remaining pool);
imbalanced (the same men + n_f = round(n_male f / (1 - f)) of those women, f the female fraction); and, where a CVAE
is trained, its female training and validation images. A classifier cell is one `classify.train_chexnet` stage
trained on one of these sets, tested on the fold's test patients, 2 n_male samples per epoch in every cell. A cell
can be trained R times with different seeds (replicates: runs/.../fold<k>/<cell> is replicate 0,
<cell>_rep<r> replicate r), so that the comparisons' CIs carry training noise.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from classify.train_chexnet import OUTPUTS, col
from common.cache import load_images
from common.task_file import read_cxr
from common.errors import DataError
from common.splits import patient_split
from fairness.metrics import resampled_auroc

FEMALE, MALE = "F", "M"
MAX_UNREADABLE = 0.1  # the largest share of images that do not decode which a study leaves out (with a warning)
ANY = -1  # the any-finding output: the last one (NIH: index 14; a label table's task: its compared label)


def fold_sets(k, fold, t, seed, val_fraction, female_fraction, cvae_female=None, data_flag="--data-root"):
    """Fold k's sets {name: image names} (male images first, then female), n_male and the female deficit
    n_male - n_f. cvae_female ('train_pool' or 'imbalanced'; None: no CVAE) adds the CVAE's training and validation
    sets."""
    rng = np.random.default_rng(seed * 100 + k)
    test = fold == k
    rest = np.nonzero(~test)[0]
    inner = patient_split(t.iloc[rest], fractions=(1 - val_fraction, val_fraction), names=("pool", "val"),
                          seed=seed * 100 + k, stratify="sex")
    pool, val = rest[inner == "pool"], rest[inner == "val"]
    sex = t["sex"].to_numpy()
    males, females = pool[sex[pool] == MALE], pool[sex[pool] == FEMALE]
    if len(males) == 0 or len(females) == 0:
        raise DataError(f"{data_flag}: fold {k}'s training pool has {len(females)} female and {len(males)} male "
                        f"images; the study compares the sexes, so the data need both (or use fewer --folds)")
    n_male = min(len(males), len(females))
    male_set = rng.choice(males, n_male, replace=False)
    female_bal = rng.choice(females, n_male, replace=False)
    n_f = int(round(n_male * female_fraction / (1 - female_fraction)))
    female_imb = female_bal[:n_f]
    idx = {"test": np.nonzero(test)[0], "val": val, "balanced": np.r_[male_set, female_bal],
           "imbalanced": np.r_[male_set, female_imb]}
    if cvae_female:
        idx.update(cvae_val=val[sex[val] == FEMALE], cvae_train=females if cvae_female == "train_pool" else female_imb)
    names = np.array([Path(i).name for i in t["image"]])
    return {name: names[i] for name, i in idx.items()}, n_male, n_male - n_f


def read_data(data_root, csv, images_per_sex, size, folds, table=None):
    """The NIH table or a label table's task file (or that task table itself: table), the first images_per_sex of
    each sex if given, images that decode only, checked for folds."""
    t = read_cxr(data_root, csv) if table is None else table  # inputs first: a bad --data-root stops before anything is written
    if images_per_sex:
        t = t.groupby("sex", group_keys=False).head(images_per_sex).reset_index(drop=True)
    _, ok = load_images(t["image"], size, "L")  # an unreadable image is named in a warning and left out ...
    if (~ok).mean() > MAX_UNREADABLE:  # ... unless so many are that the data is not what the user meant
        raise DataError(f"{data_root}: {int((~ok).sum())} of {len(ok)} images do not decode (e.g. "
                        f"{t['image'][~ok].iloc[0]}), more than {MAX_UNREADABLE:.0%}: check the files")
    t = t[ok].reset_index(drop=True)
    n_patients = t["patient_id"].nunique()
    if folds < 2 or folds > n_patients:
        raise DataError(f"--folds {folds}: cross-validation needs 2 to {n_patients} folds here (one per patient at "
                        f"most)")
    return t


@dataclass(frozen=True)
class Task:
    """What every classifier cell of one run shares: the data flags, the seed of the folds (replicate r of fold k's
    models gets seed * 100 + k + 10000 r: distinct within a run of fewer than 100 folds; runs whose --seed differs
    by 100 share seeds across replicates), the device, the classifier's flags, and the run tree
    (runs/fold<k>/<cell>)."""
    data_argv: tuple
    seed: int
    device: str
    classifier_argv: tuple
    runs: Path

    def folder(self, k):
        return Path(self.runs) / f"fold{k}"

    def model_seed(self, k, replicate=0):
        return self.seed * 100 + k + 10000 * replicate


def replicate_cell(cell, replicate):
    """The folder name of a cell's replicate: the cell itself for replicate 0 (so a run without replicates and the
    first replicate of one are the same files), <cell>_rep<r> otherwise."""
    return cell if replicate == 0 else f"{cell}_rep{replicate}"


# chestxray's conditions: (training set of the split file, stage flags; "--synthetic" is followed by the CVAE's
# samples file). The compare study trains a replicate chestxray lacks with the same command.
CONDITION_FLAGS = {"balanced_real": ("balanced", []), "imbalanced_real": ("imbalanced", []),
                   "imbalanced_synth": ("imbalanced", ["--synthetic"]),
                   "imbalanced_reweight": ("imbalanced", ["--balance-sex"])}


def classifier_stage(stages, task, k, cell, train_set, extra, n_male, deps=(), test_set="test", replicate=0):
    """Fold k's classifier cell `cell` (runs/fold<k>/<cell>, replicate r: replicate_cell): trained on the split
    file's set train_set with the stage flags `extra`, validated on the fold's val set and scoring its test_set (a
    choice made on validation data scores "val"), 2 n_male samples per epoch."""
    r = task.folder(k)
    sets_file = r / "sets.csv"
    folder = r / replicate_cell(cell, replicate)
    stages.script("classify.train_chexnet", [
        *task.data_argv, "--sets", sets_file, "--seed", task.model_seed(k, replicate), "--device", task.device,
        "--train-set", train_set, "--val-set", "val", "--test-set", test_set, *extra, "--epoch-size", 2 * n_male,
        "--tag", f"fold={k}", "--tag", f"condition={cell}", *task.classifier_argv, "--out-dir", folder], folder,
        deps=[sets_file, *deps])


def auroc_stat(Y, p, sex, key):
    """f(idx) -> the any-finding AUROC named by key (overall, female, male, the M - F gap or its size) on rows idx."""
    f, group = resampled_auroc(Y[:, ANY], p[:, ANY]), {FEMALE: sex == FEMALE, MALE: sex == MALE}

    def on(idx, who=None):  # = auroc(Y[idx, ANY][mask], p[idx, ANY][mask]) bit for bit, sorted once
        return f(idx) if who is None else f(idx, group[who])
    return {"any_auroc": on, "any_auroc_female": lambda idx: on(idx, FEMALE),
            "any_auroc_male": lambda idx: on(idx, MALE),
            "any_auroc_gap": lambda idx: on(idx, MALE) - on(idx, FEMALE),
            "any_auroc_abs_gap": lambda idx: abs(on(idx, MALE) - on(idx, FEMALE))}[key]


def output_names(preds):
    """The outputs a preds table scores, in order (any finding last), by name (NIH's as OUTPUTS spells them)."""
    spelled = {col(o): o for o in OUTPUTS}
    return [spelled.get(c[2:], c[2:]) for c in preds.columns if c.startswith("y_")]


def read_preds(path, conditions):
    """preds.csv -> (per-image table in one order, {condition: [(Y, scores, thresholds, fold) per replicate]}); every
    condition and replicate must score the same images (the pairing of every comparison). A file without a
    `replicate` column holds one replicate."""
    df = pd.read_csv(path)
    if "replicate" not in df.columns:
        df["replicate"] = 0
    outputs = [c[2:] for c in df.columns if c.startswith("y_")]  # the run's outputs, any finding last
    first = None
    arrays = {}
    for c in conditions:
        arrays[c] = []
        for rep, d in sorted(df[df["condition"] == c].groupby("replicate")):
            d = d.sort_values("image").reset_index(drop=True)
            if first is None:
                first = d
            if not d["image"].equals(first["image"]):
                raise DataError(f"{path}: condition {c} (replicate {rep}) scores other images than "
                                f"{conditions[0]}; a paired comparison needs the same test images (rerun the study)")
            arrays[c].append(tuple(d[[f"{k}_{o}" for o in outputs]].to_numpy(float) for k in ("y", "p", "thr"))
                             + (d["fold"].to_numpy(),))
        if not arrays[c]:
            raise DataError(f"{path}: no predictions of condition {c}; rerun the study")
    counts = {len(v) for v in arrays.values()}
    if len(counts) > 1:
        raise DataError(f"{path}: the conditions have different numbers of replicates "
                        f"({ {c: len(v) for c, v in arrays.items()} }); rerun the study")
    return first, arrays
