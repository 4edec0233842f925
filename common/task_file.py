"""The chest X-ray task (classify/cxr_task.py) on your label table (common/table.py). A study checks the table once
and writes it into its run folder as a task file, which every stage reads by --data-root <task file> (read_cxr) as
it reads an NIH folder. The task compares two sides coded as NIH's sexes are: F, the group asked about (--minority),
and M, everyone else; `group` keeps the table's own value. Its label columns end with the compared label's negation
under NIH's name, "No Finding", so that the compared label is the task's "any finding" output and every other
label one of its finding outputs.
"""
from pathlib import Path
import warnings

import numpy as np
import pandas as pd

from common.data import PROJECT_DATA, finish, label_columns, read_nih
from common.errors import DataError
from common.splits import write_if_changed
from common.table import (add_table_args, check_file_names, check_task, minority_rows, primary_label,
                          table_from_args)

TASK_FILE = "task_table.csv"


def task_table(table, minority, primary):
    """The uniform table as the chest task reads it: sex = F (the minority group) / M (the rest), labels = the other
    labels without blanks, then "No Finding" = 1 - primary (rows with a blank primary: left out before)."""
    t = table.reset_index(drop=True)
    out = t[["image", "patient_id", "age", "group"]].copy()
    out["sex"] = np.where(minority_rows(t, minority), "F", "M")
    for c in label_columns(t):
        if c == f"label:{primary}":
            continue
        if t[c].isna().any():
            warnings.warn(f"label {c[6:]!r} is blank for {int(t[c].isna().sum())} images: it is left out of the "
                          f"task's outputs (a 0 there would be a guess)")
            continue
        out[c] = t[c].astype(np.uint8)
    out["label:No Finding"] = (1 - t[f"label:{primary}"]).astype(np.uint8)
    return out


def write_task_file(t, path, dry=False):
    """Write a task table (task_table) to path only when its content changes (so that the stages that read it stay
    done); returns whether it changed (dry: whether it would; nothing written)."""
    check_file_names(t)
    return write_if_changed(path, t.to_csv(index=False), dry)


def read_task_file(path):
    """A task file (write_task_file) as the uniform table common.data's readers return."""
    df = pd.read_csv(path, dtype={"patient_id": str, "group": str}, keep_default_na=False, na_values=[""])
    need = ["image", "patient_id", "sex", "label:No Finding"]
    if any(c not in df.columns for c in need):
        raise DataError(f"--data-root {path}: not a task file written by a study (it needs the columns {need}); "
                        f"give your label table to the study with --table instead")
    labels = [c for c in df.columns if c.startswith("label:")]
    return finish(df, (df[labels].to_numpy(np.uint8), [c[6:] for c in labels]), extra=["group"])


def reading_key(facts):
    """The line a report on a label table opens its notes with: what its words stand for (None: not a table run)."""
    if not facts:
        return None
    others = [l for l in facts["labels"] if l != facts["primary"]]
    groups = ", ".join(f"{g} {n}" for g, n in facts["groups"].items())
    return (f"Your data: label table {facts['table']}, group column(s) {facts['group']}"
            f"{' (bands ' + ', '.join(facts['bands']) + ')' if facts['bands'] else ''}; patients per group: {groups}. "
            f"In every table of this report 'female', 'women' and F stand for the group {facts['minority']!r} and "
            f"'male', 'men' and M for everyone else; 'sex' is that split; 'any finding' is the label "
            f"{facts['primary']!r}" + (f" (the other outputs: {', '.join(others)})" if others else "") + ".")


def read_cxr(data_root=PROJECT_DATA / "nih_cxr14", csv=None):
    """The chest X-ray task's table: NIH ChestX-ray14 under a folder (common.data.read_nih), or a task file a study
    wrote from the user's label table (the group asked about as sex F, the primary label as 'any finding')."""
    if Path(data_root).suffix.lower() == ".csv" and Path(data_root).is_file():
        if csv:
            raise DataError(f"--csv {csv}: --data-root {data_root} is a task file already (drop --csv)")
        return read_task_file(data_root)
    return read_nih(data_root, csv)


def add_task_args(p):
    """The flags of a study that takes a label table for the chest X-ray task (chestxray, compare)."""
    p.add_argument("--table", default=None,
                   help="your label table (a CSV, one row per image; docs/your-data.md) instead of NIH's")
    add_table_args(p)
    p.add_argument("--minority", default="F",
                   help="--table: the group asked about (a value of --group, e.g. F or 'F & 60+'), compared with "
                        "everyone else; in the reports and preds.csv it takes the place of the women (sex F)")
    p.add_argument("--primary", default=None,
                   help="--table: the label the study compares on, the task's 'any finding' (default: the first label)")


def task_from_args(a, folds):
    """--table: the table checked for a study of --minority vs the rest with `folds` folds, as a task table, and what
    plan.json records of it."""
    t = table_from_args(a)
    found = [c[6:] for c in label_columns(t)]
    if a.labels is None and a.primary is None and len(found) > 1:
        raise DataError(f"--table {a.table}: the 0/1 columns {found} were taken as labels; say which are labels with "
                        f"--labels (the first is the one compared) or name the compared one with --primary")
    primary = primary_label(t, a.primary)
    blank = t[f"label:{primary}"].isna()
    if blank.any():
        warnings.warn(f"{a.table}: {int(blank.sum())} rows with a blank {primary!r} are left out")
    t = t[~blank]
    check_task(t, a.minority, folds, labels=[primary])
    task = task_table(t, a.minority, primary)
    facts = {"table": str(a.table), "group": a.group, "bands": a.bands, "minority": a.minority, "primary": primary,
             "labels": [c[6:] for c in task.columns if c.startswith("label:") and c != "label:No Finding"] + [primary],
             "groups": {g: int(n) for g, n in t.groupby("group")["patient_id"].nunique().items()}}
    return task, facts
