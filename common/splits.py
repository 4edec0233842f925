"""Patient-level splits: no patient is ever in two splits. Seeded; optionally stratified by a sensitive attribute.

A patient's stratum is its most frequent value of the attribute. Within each stratum the patients are shuffled
and cut by the fractions, so each split keeps the attribute's patient mix. Rows without a patient id (MedMNIST,
Fitzpatrick17k) are each their own group.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError


def patient_groups(table):
    pid = table["patient_id"]
    return np.where(pid.isna(), "row:" + pd.Series(np.arange(len(table)), index=table.index).astype(str),
                    pid.astype(str))


def _strata(table, groups, stratify):
    """{stratum: sorted list of patient ids}"""
    if stratify is None:
        return {"all": sorted(set(groups))}
    attr = table[stratify].astype(str).to_numpy()
    per_patient = pd.Series(attr).groupby(groups).agg(lambda s: s.value_counts().index[0])
    return {k: sorted(v.index) for k, v in per_patient.groupby(per_patient)}


def patient_split(table, fractions=(0.7, 0.1, 0.2), names=("train", "val", "test"), seed=0, stratify=None):
    """A split name per row. Fractions are of patients (within each stratum when stratified)."""
    if len(fractions) != len(names) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions {fractions} must sum to 1 and match names {names}")
    groups = patient_groups(table)
    rng = np.random.default_rng(seed)
    assign = {}
    for stratum, patients in sorted(_strata(table, groups, stratify).items()):
        patients = list(rng.permutation(patients))
        cuts = np.round(np.cumsum(fractions) * len(patients)).astype(int)
        for i, p in enumerate(patients):
            assign[p] = names[int(np.searchsorted(cuts, i, side="right"))]
    return np.array([assign[g] for g in groups])


def patient_kfold(table, k=5, seed=0, stratify=None):
    """Fold index (0..k-1) per row: every row is tested exactly once over the k folds, patients never split."""
    groups = patient_groups(table)
    rng = np.random.default_rng(seed)
    fold = {}
    offset = 0
    for stratum, patients in sorted(_strata(table, groups, stratify).items()):
        for i, p in enumerate(rng.permutation(patients)):
            fold[p] = (i + offset) % k
        offset += len(patients)  # keeps fold sizes even across strata
    return np.array([fold[g] for g in groups])


def assert_disjoint(table, split):
    """Raise if any patient is in two splits."""
    groups = patient_groups(table)
    per = pd.Series(np.asarray(split)).groupby(groups).nunique()
    leaks = per[per > 1]
    if len(leaks):
        raise AssertionError(f"{len(leaks)} patients are in more than one split, e.g. {list(leaks.index[:5])}")


def per_class_subset(y, per_class, val_fraction=0.1, seed=0):
    """Chaptoukaev's protocol: about `per_class` images of each class (all where a class has fewer), split
    train:val (1 - val_fraction):val_fraction within each class. y: class indices. Returns (train_idx, val_idx)."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])[:per_class]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def write_sets(path, sets, dry=False):
    """A split file: one row per (set, image name), each set's images in their order ({name: [image names]}). A
    study writes one per fold or repeat and its stage scripts read it (--sets); the file is rewritten only when its
    content changes, so an unchanged split keeps its time stamp and the stages that read it stay done. Returns
    whether the content changed (with dry=True: whether it would; nothing is written)."""
    empty = [s for s, images in sets.items() if len(images) == 0]
    if empty:
        raise DataError(f"{path}: the sets {', '.join(empty)} would be empty (too few images or patients of a "
                        f"group in this fold or repeat: use more data, fewer folds, or other fractions)")
    rows = [(s, str(img)) for s, images in sets.items() for img in images]
    return write_if_changed(path, pd.DataFrame(rows, columns=["set", "image"]).to_csv(index=False), dry)


def write_if_changed(path, text, dry=False):
    """Write text to path only when it differs from what is there (the file then keeps its time stamp, and the
    stages that read it stay done); returns whether it differs (dry=True: nothing is written)."""
    path = Path(path)
    changed = not path.is_file() or path.read_text() != text
    if changed and not dry:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return changed


def read_sets(path, names, wanted, flag="--sets"):
    """{set: row indices into a table whose image names are `names`} for the sets in `wanted`, in the file's
    order; a missing set or an image the table lacks stops with the file named."""
    try:
        df = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as e:
        raise DataError(f"{flag} {path}: cannot read it as a split file ({e}); write it with common.splits.write_sets")
    if list(df.columns) != ["set", "image"]:
        raise DataError(f"{flag} {path}: columns {list(df.columns)}, expected set,image (common.splits.write_sets)")
    row = {n: i for i, n in enumerate(names)}
    if len(row) != len(names):
        raise DataError(f"{flag} {path}: the data's image names are not unique, so a split file cannot name them "
                        f"(rename the duplicates)")
    out = {}
    for s in wanted:
        images = df.loc[df["set"] == s, "image"]
        if images.empty:
            raise DataError(f"{flag} {path}: no set named {s!r} (sets here: {', '.join(df['set'].unique())})")
        missing = [i for i in images if i not in row]
        if missing:
            raise DataError(f"{flag} {path}: {len(missing)} images of set {s!r} are not in the data, e.g. "
                            f"{missing[0]} (the split file belongs to another --data-root?)")
        out[s] = np.array([row[i] for i in images], dtype=int)
    return out
