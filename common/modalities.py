"""Conditioning classes for the generative studies: class = (sensitive attribute x label), built from the readers.

Every generator, downstream classifier and fairness table of `make fairgen` (and the DDPM) agrees on these:

    nih    NIH1000 chest X-rays; attribute sex (F/M); label: No Finding vs any finding           -> 4 classes
    cxr    NIH1000 + the embedded CC-BY COVID-19 X-rays; sex x {No Finding, finding, COVID-19}  -> 6 classes
           (patient ids prefixed with their source, "nih:123" / "covid:123": the two number patients alike)
           WARNING: COVID-19 images come from another source (other hospitals, 128 px crops, other processing),
           so "COVID-19" is confounded with the source: a classifier can learn the source, not the disease.
    mri    IXI T1 slices; attribute sex; label age group (< 50 / >= 50 years)                   -> 4 classes
    skin   Fitzpatrick17k under --data-root, else the procedural phantom (labelled); attribute light (FST 1-2) /
           medium (3-4) / dark (5-6); label: the five most frequent nine-partition diagnoses -> 15 classes
    toy    procedural discs vs squares with a bright/dark attribute (tests and demos)         -> 4 classes
    csv    your label table (docs/your-data.md) under --data-root: attribute its `group` column, label its one 0/1
           column (with / without; diffusion/fairgen_study.py --table writes such a table from any label table,
           intersections and bands included)                                                -> 2 x groups classes
"""
import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import ArgumentParser, positive_int, run
from common.cache import load_images
from common.runs import npz_out
from common.splits import patient_split, read_sets
from common.data import PROJECT_DATA, label_columns, read_covid, read_fitzpatrick, read_ixi
from common.errors import DataError
from common.table import read_table
from common.task_file import read_cxr

SKIN_DIAGNOSES = ["inflammatory", "malignant epidermal", "genodermatoses", "benign dermal", "benign epidermal"]
PHANTOM_DIR = PROJECT_DATA.parent / ".cache" / "skin_phantom"


@dataclass
class Modality:
    name: str
    images: np.ndarray  # uint8 (N, S, S) or (N, S, S, 3)
    table: pd.DataFrame  # one row per image: patient_id, attr, label, cls (+ the reader's columns)
    attrs: list  # sensitive attribute values, in order
    labels: list  # diagnostic labels, in order
    data: str  # what data it is, for every output ("nih1000", "phantom", ...)
    notes: list = field(default_factory=list)  # warnings every report must carry

    @property
    def class_names(self):
        return [f"{a}|{l}" for a in self.attrs for l in self.labels]

    @property
    def channels(self):
        return 1 if self.images.ndim == 3 else 3


def _finish(name, table, images, attrs, labels, data, notes=()):
    table = table.reset_index(drop=True)
    a = table["attr"].map({v: i for i, v in enumerate(attrs)})
    l = table["label"].map({v: i for i, v in enumerate(labels)})
    keep = (a.notna() & l.notna()).to_numpy()
    table = table[keep].reset_index(drop=True)
    table["cls"] = (a[keep].astype(int) * len(labels) + l[keep].astype(int)).to_numpy()
    return Modality(name, images[keep], table, list(attrs), list(labels), data, list(notes))


def toy_images(n, size=16, seed=0):
    """Discs (label 0) and squares (label 1) of random position and size; attribute: bright or dark foreground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    imgs, labels, attrs = np.zeros((n, size, size), np.uint8), rng.integers(0, 2, n), rng.integers(0, 2, n)
    for i in range(n):
        r = rng.uniform(size * 0.18, size * 0.3)
        cy, cx = rng.uniform(r + 1, size - r - 1, 2)
        shape = (np.hypot(yy - cy, xx - cx) <= r) if labels[i] == 0 else \
            (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
        imgs[i] = np.where(shape, 230 if attrs[i] else 140, 20)
    return imgs, labels, attrs


MODALITIES = ["toy", "nih", "cxr", "mri", "skin", "csv"]
MIN_GROUP_PATIENTS = 10  # per group: the 70/10/20 patient split leaves 2 of them to the test part


def modality_name(name):
    """argparse type of a --data flag: one of MODALITIES, or toy:N (a toy set of N images, for tests)."""
    if name in MODALITIES or (name.startswith("toy:") and name[4:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"unknown modality {name!r}; choose from {', '.join(MODALITIES)} or toy:N")


def load_modality(name, size, data_root=None, n_toy=2000, phantom_n=1200):
    """One modality as a Modality (table with attr / label / cls, uint8 images, class names, data tag, notes).
    The skin phantom has 1,200 images (about the size of the chest X-ray modality) so that the CPU quick scale fits;
    with --data-root, the real Fitzpatrick17k is read instead."""
    if name.startswith("toy"):  # "toy" (n_toy images) or "toy:N" (N images: tests and smoke runs)
        x, lab, att = toy_images(int(name.split(":")[1]) if ":" in name else n_toy, size)
        t = pd.DataFrame({"patient_id": None, "attr": np.where(att == 1, "bright", "dark"),
                          "label": np.where(lab == 0, "disc", "square")})
        return _finish("toy", t, x, ["dark", "bright"], ["disc", "square"], "toy")
    if name in ("nih", "cxr"):
        t = read_cxr(data_root or PROJECT_DATA / "nih_cxr14")  # or a label table's task file (common/task_file.py)
        t["attr"] = t["sex"]
        t["label"] = np.where(t["label:No Finding"] == 1, "No Finding", "finding")
        t["source"] = "NIH ChestX-ray14" if "group" not in t.columns else "label table"
        labels, notes = ["No Finding", "finding"], []
        data = "nih1000" if data_root is None else f"{'table' if 'group' in t.columns else 'nih'} ({data_root})"
        if name == "cxr":
            c = read_covid()
            c = c[c["label:COVID-19"] == 1].assign(attr=lambda d: d["sex"], label="COVID-19",
                                                   source="COVID-19 image data collection")
            # both sources number their patients from 1: bare ids collide (33 shared), which would merge different
            # people in a patient split and in the patient bootstrap, so each id carries its source
            t["patient_id"] = "nih:" + t["patient_id"].astype(str)
            c["patient_id"] = "covid:" + c["patient_id"].astype(str)
            t = pd.concat([t, c], ignore_index=True)
            labels = labels + ["COVID-19"]
            data += " + covid-cc-by"
            notes.append("COVID-19 images come from another source than the NIH images (other hospitals, other "
                         "processing): the COVID-19 class is confounded with its source, a shortcut a classifier "
                         "can learn.")
        x, ok = load_images(t["image"], size, "L")
        return _finish(name, t[ok], x[ok], ["F", "M"], labels, data, notes)
    if name == "mri":
        t = read_ixi(data_root or PROJECT_DATA / "ixi_t1")
        t["attr"] = t["sex"]
        t["label"] = np.where(t["age"] >= 50, "age>=50", "age<50")
        t.loc[t["age"].isna(), "label"] = None  # no age, no age group: left out (counted below), never "age<50"
        if t["age"].isna().any():
            warnings.warn(f"IXI: {int(t['age'].isna().sum())} slices without an age are left out")
        x, ok = load_images(t["image"], size, "L")
        return _finish(name, t[ok], x[ok], ["F", "M"], ["age<50", "age>=50"], "ixi")
    if name == "skin":
        if data_root is not None:
            t, data = read_fitzpatrick(data_root, level="nine"), "fitzpatrick17k"
        else:
            from common.phantom import make_phantom
            folder = PHANTOM_DIR / f"n{phantom_n}"
            if not (folder / "fitzpatrick17k.csv").is_file():
                make_phantom(folder, n=phantom_n, size=max(64, size), seed=0)
            t, data = read_fitzpatrick(folder, level="nine"), "phantom"
        t["attr"] = t["skin_group"]
        t["label"] = t["diagnosis_nine"]
        x, ok = load_images(t["image"], size, "RGB")
        notes = ["Procedural skin phantom, not real skin images." if data == "phantom" else ""]
        return _finish(name, t[ok], x[ok], ["light", "medium", "dark"], SKIN_DIAGNOSES, data, [n for n in notes if n])
    if name == "csv":
        return read_csv_modality(data_root, size)
    raise DataError(f"unknown modality {name!r}; choose from {', '.join(MODALITIES)}")


def read_csv_modality(path, size):
    """--data csv --data-root TABLE: a label table whose `group` column is the attribute and whose one 0/1 column the
    label; images as they are (greyscale when every image's channels agree, else RGB)."""
    if path is None:
        raise DataError("--data csv needs --data-root TABLE.csv: a label table with a 'group' column and one 0/1 label "
                        "column (diffusion.fairgen_study --table writes one from any label table)")
    t = read_table(path, groups=("group",))
    names = [c[6:] for c in label_columns(t)]
    if len(names) != 1:
        raise DataError(f"--data-root {path}: the csv modality takes one 0/1 label column and the table has {names}; "
                        f"keep one, or give the table to diffusion.fairgen_study --table with --primary")
    y = t[f"label:{names[0]}"]
    if y.isna().any():
        warnings.warn(f"{path}: {int(y.isna().sum())} rows with a blank {names[0]!r} are left out")
    t = t.assign(attr=t["group"], label=np.where(y == 1, names[0], f"no {names[0]}"))[y.notna()]
    x, ok = load_images(t["image"], size, "RGB")
    if (x == x[..., :1]).all():
        x = x[..., 0]
    # groups from the most patients to the fewest (ties by name): a report's gap, first minus last group, is the
    # largest group minus the smallest
    n = t.groupby("group")["patient_id"].nunique()
    attrs = sorted(n.index, key=lambda g: (-n[g], g))
    return _finish("csv", t[ok], x[ok], attrs, [f"no {names[0]}", names[0]],
                   f"label table ({path})")


def csv_modality_table(table, primary, group_flag):
    """The uniform table of a label table (common.table.read_table) as the csv modality reads it: path, patient_id,
    group and the compared label alone (rows where it is blank left out), after refusing what the generative study
    cannot use: one group only, a group named with the class names' separators ('|', '__'), a group with fewer than
    MIN_GROUP_PATIENTS patients, or without a positive or a negative image of the label."""
    t = table[table[f"label:{primary}"].notna()]
    if t.empty or primary in ("path", "patient_id", "group"):
        raise DataError(f"label {primary!r}: " + ("blank in every row; choose another (--primary, --labels)" if t.empty
                        else "the csv modality's table has a column of that name; rename the label column"))
    patients = t.groupby("group")["patient_id"].nunique()
    if len(patients) < 2:
        raise DataError(f"--group {group_flag}: every image is in the group {patients.index[0]!r}; the study compares "
                        f"groups: choose a column (or --bands) with two values or more")
    for g, n in patients.items():
        if "|" in str(g) or "__" in str(g) or str(g).endswith("_"):
            raise DataError(f"group {g!r} ({group_flag}): '|' and '__' join a group to its label in the study's class "
                            f"and folder names (a final '_' would run into them); rename that value in the table")
        y = t.loc[t["group"] == g, f"label:{primary}"]
        if n < MIN_GROUP_PATIENTS:
            raise DataError(f"group {g!r} ({group_flag}) has {n} patients; the 70/10/20 patient split needs at least "
                            f"{MIN_GROUP_PATIENTS} per group: add patients or merge groups (other --bands or --group)")
        if (y == 1).sum() == 0 or (y == 0).sum() == 0:
            raise DataError(f"label {primary!r} has {int((y == 1).sum())} positive and {int((y == 0).sum())} negative "
                            f"images in group {g!r}; the study needs both in every group: choose another --primary "
                            f"or merge groups")
    return pd.DataFrame({"path": t["image"], "patient_id": t["patient_id"], "group": t["group"],
                         primary: t[f"label:{primary}"].astype(int)})


def add_set_args(p):
    """A generator's data flags: --data, --data-root, --split-seed, --sets, --train-set (training_images)."""
    p.add_argument("--data", default="nih", type=modality_name,
                   help="modality (common/modalities.py), e.g. nih, toy:N, csv (your label table as --data-root)")
    p.add_argument("--data-root", default=None, help="your copy of the data set (default: the embedded data); "
                                                     "--data csv: the label table")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split (without --sets)")
    p.add_argument("--sets", default=None, help="a study's split file: train on its set --train-set (e.g. a fold's "
                                                "training pool) instead of the 70%% training split")
    p.add_argument("--train-set", default="train", help="--sets: the set to train on")
    return p


def training_images(data, size, root=None, subset="train", split_seed=0, sets=None, set_name=None, attribute=True):
    """(modality, uint8 images (N, C, S, S), class index (N,)) of a part of the patient-level split (subset
    "train", "val" or "test", seed split_seed, stratified by the attribute), of every image ("all"), or of the set
    `set_name` of a study's split file `sets` (common.splits.write_sets): what a generator trains on.
    attribute=False: classes are the labels alone (attribute "any": e.g. a DDPM conditioned on the finding but not
    on sex)."""
    mod = load_modality(data, size, root)
    keep = np.ones(len(mod.table), bool)
    if sets:
        keep[:] = False
        keep[read_sets(sets, [Path(i).name for i in mod.table["image"]], [set_name])[set_name]] = True
    elif subset != "all":  # train, val or test of the 70/10/20 patient split
        keep = patient_split(mod.table, seed=split_seed, stratify="attr") == subset
    if not attribute:
        table = mod.table.assign(attr="any", cls=mod.table["cls"] % len(mod.labels))
        mod = Modality(mod.name, mod.images, table, ["any"], mod.labels, mod.data, mod.notes)
    x = mod.images[keep]
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return mod, np.ascontiguousarray(x), mod.table["cls"].to_numpy()[keep]


def export(mod, path, subset=None):
    """Write a modality's images as the .npz our FID / memorization tools read (images, labels, groups)."""
    keep = np.ones(len(mod.table), bool) if subset is None else subset
    np.savez_compressed(path, images=mod.images[keep], labels=mod.table["cls"].to_numpy()[keep],
                        groups=mod.table["attr"].to_numpy().astype(str)[keep], class_names=np.array(mod.class_names))
    return path


def parse_args(argv=None):
    p = ArgumentParser(description="Export a modality's real images to .npz (for fairness.fid and "
                                   "fairness.memorization).")
    p.add_argument("modality", type=modality_name, help=f"{', '.join(MODALITIES)} or toy:N")
    p.add_argument("--size", type=positive_int, default=32, help="image side")
    p.add_argument("--data-root", default=None, help="your copy of the data (default: embedded / phantom)")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="patient-level split (70/10/20, stratified by the attribute)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split")
    p.add_argument("--out", required=True, help="output .npz (an existing file is refused unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(a):
    out = npz_out(a.out, a.force)
    m = load_modality(a.modality, a.size, a.data_root)
    sel = None if a.split == "all" else patient_split(m.table, seed=a.split_seed, stratify="attr") == a.split
    export(m, out, sel)
    print(f"wrote {int(len(m.table) if sel is None else sel.sum())} {m.data} images to {out}")


if __name__ == "__main__":
    run(main, parse_args)
