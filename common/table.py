"""Your own data: one label table (a CSV, one row per image) read into the uniform table every study uses.

The table's columns (names given by flags; the common spellings are recognised):
    path         the image file, relative to the CSV's folder or absolute: PNG, JPEG, TIFF, .npy (one (H, W) or
                 (H, W, 3) array), DICOM (.dcm; needs pydicom). Greyscale or RGB.
    patient_id   who the image shows (splits keep a patient's images together)
    groups       the attribute(s) whose fairness is asked about (--group sex, --group site, --group sex,age):
                 categorical as they are; a continuous one (age) cut into bands (--bands age=40,60: <40, 40-60, 60+;
                 a patient's band is their age at their first image). Several group columns make intersections, each
                 a group of its own ("F & 60+").
    labels       binary 0/1 columns (blank: unknown; a row with a blank compared label is left out, a label with
                 blanks is not used as a secondary output).
                 Without --labels, every other column holding only 0, 1 and blanks is a label.
Every refusal is one line naming the column, the file or the flag, and the fix (common.errors.DataError).

    python -m common.table check data/my/table.csv --group sex,age --bands age=60 --minority "F & 60+" --folds 5
    python -m common.table example --out my_example      # the embedded NIH + COVID-19 images as such a table
"""
import argparse
import os
from difflib import get_close_matches
from pathlib import Path
import re
import warnings

import numpy as np
import pandas as pd

from common.cli import ArgumentParser, positive_int, run, unit_interval
from common.data import COLUMNS, PROJECT_DATA, label_columns, normalise_sex, read_covid, read_nih
from common.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".dcm", ".dicom"}
SPELLINGS = {"path": ["path", "image", "image_path", "imagepath", "file", "filename", "file_path", "image index",
                      "img", "img_path"],
             "patient_id": ["patient_id", "patientid", "patient", "patient id", "subject", "subject_id", "pid"]}
INTERSECTION = " & "
MAX_UNBANDED = 10  # a numeric group column with more distinct values than this needs --bands


def squash(name):
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def find_column(df, given, role, csv, flag):
    """The column named `given` (exactly, or by a squashed spelling), else the first common spelling of `role`."""
    found = {squash(c): c for c in df.columns}
    if given is not None:
        if given in df.columns:
            return given
        if squash(given) in found:
            return found[squash(given)]
        close = get_close_matches(str(given), [str(c) for c in df.columns], 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{csv}: no column {given!r} ({flag}){hint}; the table has {list(map(str, df.columns))}")
    for s in SPELLINGS[role]:
        if squash(s) in found:
            return found[squash(s)]
    raise DataError(f"{csv}: no {role} column (looked for {SPELLINGS[role][:4]}...); the table has "
                    f"{list(map(str, df.columns))}: name it with {flag}")


def parse_bands(items):
    """['age=40,60'] -> {'age': [40.0, 60.0]} (cut points, increasing)."""
    out = {}
    for item in items or []:
        col, _, cuts = item.partition("=")
        try:
            points = [float(c) for c in cuts.split(",") if c.strip()]
        except ValueError:
            points = []
        if not col.strip() or not points or sorted(set(points)) != points:
            raise DataError(f"--bands {item!r}: give COLUMN=CUT[,CUT...] with increasing cut points, e.g. age=40,60")
        out[col.strip()] = points
    return out


def band_names(cuts):
    g = lambda v: f"{v:g}"
    return [f"<{g(cuts[0])}"] + [f"{g(a)}-{g(b)}" for a, b in zip(cuts, cuts[1:])] + [f"{g(cuts[-1])}+"]


def binary_values(s):
    """A column as float 0/1/NaN if every non-blank value is 0 or 1 (as numbers, '0'/'1', True/False), else None."""
    v = pd.to_numeric(s.replace({True: 1, False: 0, "True": 1, "False": 0, "true": 1, "false": 0}), errors="coerce")
    if (v.isna() & s.notna()).any() or not v.dropna().isin([0, 1]).all():
        return None
    return v.astype(float)


def group_column(df, col, cuts, csv):
    """One group column as strings (NaN where blank): categorical as it is, continuous cut into bands."""
    s = df[col]
    numeric = pd.to_numeric(s, errors="coerce")
    if cuts is not None:
        bad = numeric.isna() & s.notna()
        if bad.any():
            raise DataError(f"{csv}: --bands {col}: column {col!r} has values that are not numbers, e.g. "
                            f"{s[bad].iloc[0]!r} (row {int(np.flatnonzero(bad)[0]) + 2}); fix them or leave them blank")
        first = numeric.groupby(df["patient_id"]).transform("min")  # the band at the patient's first image
        idx = np.searchsorted(cuts, first.to_numpy(), side="right")
        names = np.array(band_names(cuts), dtype=object)
        return pd.Series(np.where(first.isna(), None, names[np.minimum(idx, len(cuts))]), index=df.index)
    if (numeric.notna() == s.notna()).all() and numeric.nunique() > MAX_UNBANDED:
        raise DataError(f"{csv}: group column {col!r} is continuous ({numeric.nunique()} values from "
                        f"{numeric.min():g} to {numeric.max():g}); cut it into bands, e.g. --bands {col}=40,60")
    out = s.map(lambda v: None if pd.isna(v) else (f"{v:g}" if isinstance(v, float) else str(v).strip()))
    mixed = out.groupby(df["patient_id"]).nunique()
    if (mixed > 1).any():
        p = mixed[mixed > 1].index[0]
        vals = sorted(out[df["patient_id"] == p].dropna().unique())
        raise DataError(f"{csv}: patient {p} is listed under {col} = {' and '.join(vals)} ({int((mixed > 1).sum())} "
                        f"patients have two values); a patient needs one value of a group column: fix the table")
    return out


def read_table(csv, path_col=None, patient_col=None, groups=("sex",), bands=None, labels=None, max_missing=0.1):
    """The user's label table -> the uniform table (common.data's columns: image, patient_id, sex, age, skin_type,
    split, label:<name>) plus `group` (the intersection of the group columns, e.g. "F & 60+") and one
    `group:<column>` per group column. Rows with a blank group value or a missing image file are left out with a
    count (refused when more than max_missing of the rows); everything else that is wrong is refused."""
    csv = Path(csv)
    if not csv.is_file():
        raise DataError(f"label table not found: {csv} (give the CSV file, one row per image)")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:  # pandas raises many types; the file is what the user needs
        raise DataError(f"{csv}: cannot read it as a CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if df.empty:
        raise DataError(f"{csv}: the table has no rows (one row per image: path, patient_id, group, labels)")
    df.columns = [str(c).strip() for c in df.columns]
    path_c = find_column(df, path_col, "path", csv, "--path-col")
    patient_c = find_column(df, patient_col, "patient_id", csv, "--patient-col")
    group_cs = [find_column(df, g, None, csv, "--group") for g in groups or []]
    bands = bands or {}
    for b in bands:
        if b not in group_cs:
            raise DataError(f"--bands {b}: {b!r} is not one of the --group columns {group_cs}; add it to --group")
    if not group_cs:
        raise DataError(f"{csv}: no group column: name the attribute(s) with --group (e.g. --group sex)")

    dup = df.duplicated(subset=[path_c], keep=False) & df[path_c].notna()
    if dup.any():
        first = df.loc[dup, path_c].iloc[0]
        rows = (np.flatnonzero(df[path_c] == first) + 2).tolist()
        raise DataError(f"{csv}: image {first!r} is listed {len(rows)} times (rows {rows}; {int(dup.sum())} rows "
                        f"repeat an image); keep one row per image")
    df["patient_id"] = df[patient_c].str.strip()
    if df["patient_id"].isna().any():
        row = int(np.flatnonzero(df["patient_id"].isna())[0]) + 2
        raise DataError(f"{csv}: column {patient_c!r} is blank in {int(df['patient_id'].isna().sum())} rows (first: "
                        f"row {row}); every image needs its patient (splits keep a patient's images together)")

    taken = {path_c, patient_c, *group_cs}
    if labels:
        label_cs = [find_column(df, c, None, csv, "--labels") for c in labels]
        for c in label_cs:
            if binary_values(df[c]) is None:
                v = pd.to_numeric(df[c], errors="coerce")
                bad = df[c][df[c].notna() & ~v.isin([0, 1])].iloc[0]
                raise DataError(f"{csv}: label column {c!r} holds {bad!r}; labels are 0, 1 or blank (unknown): recode "
                                f"it (a multi-class column becomes one 0/1 column per class)")
    else:
        label_cs = [c for c in df.columns if c not in taken and binary_values(df[c]) is not None
                    and df[c].notna().any()]
        if not label_cs:
            raise DataError(f"{csv}: no label column (a column of 0, 1 and blanks besides {sorted(taken)}); the "
                            f"table has {list(df.columns)}: add one, or name them with --labels")
    reserved = [c for c in label_cs if squash(c) in ("no_finding", "any_finding")]
    if reserved:
        raise DataError(f"{csv}: label column {reserved[0]!r}: the chest X-ray task uses that name for its own "
                        f"outputs; rename the column (e.g. {squash(reserved[0])}_label) or leave it out with --labels")
    spelled = [c.replace(" ", "_") for c in label_cs]
    twins = [c for c, n in zip(label_cs, spelled) if spelled.count(n) > 1]
    if twins:
        raise DataError(f"{csv}: label columns {twins} are one name in preds.csv (spaces become _); rename one")
    clash = [c for c in label_cs if c in taken]
    if clash:
        raise DataError(f"--labels {clash[0]}: that column is already the path, patient or a group column")

    for c in group_cs:
        df[f"group:{c}"] = group_column(df, c, bands.get(c), csv)
    blank = df[[f"group:{c}" for c in group_cs]].isna().any(axis=1)
    df["group"] = [INTERSECTION.join(map(str, v)) for v in df[[f"group:{c}" for c in group_cs]].itertuples(False)]

    paths = [Path(p) if Path(p).is_absolute() else csv.absolute().parent / p for p in df[path_c].fillna("")]
    exists = np.array([p.is_file() for p in paths])
    df["image"] = [str(p) for p in paths]
    gone = ~exists | df[path_c].isna().to_numpy()
    if gone.any():
        share = gone.mean()
        what = f"{int(gone.sum())} of {len(df)} images in {csv} are not on disk, e.g. {df[path_c][gone].iloc[0]!r}"
        if share > max_missing:
            raise DataError(f"{what}; that is more than {max_missing:.0%} of the table: check that the paths are "
                            f"relative to the CSV's folder (or absolute), or raise --max-missing")
        warnings.warn(f"{what}; left out")
    suffixes = {Path(p).suffix.lower() for p in df["image"][~gone]}
    unknown = sorted(suffixes - IMAGE_SUFFIXES)
    if unknown:
        example = next(p for p in df["image"][~gone] if Path(p).suffix.lower() == unknown[0])
        raise DataError(f"{csv}: images with the suffix {unknown[0]!r} (e.g. {example}); fairsynth reads "
                        f"{sorted(IMAGE_SUFFIXES)}: convert them")
    if suffixes & {".dcm", ".dicom"}:
        try:
            import pydicom  # noqa: F401  (optional: only DICOM input needs it)
        except ImportError:
            raise DataError(f"{csv}: the table lists DICOM images and pydicom is not installed: pip install pydicom")
    if blank.any():
        warnings.warn(f"{csv}: {int(blank.sum())} rows have a blank group value ({', '.join(group_cs)}); left out")
    keep = ~gone & ~blank.to_numpy()
    if not keep.any():
        raise DataError(f"{csv}: no row is left once rows without an image or a group value are left out")
    df = df[keep].reset_index(drop=True)

    out = pd.DataFrame({c: df[c] if c in df.columns else None for c in COLUMNS})
    out["image"], out["patient_id"] = df["image"], df["patient_id"]
    for role in ("sex", "age"):  # kept as the uniform table's columns where the table has them
        src = next((k for k in df.columns if squash(k) == role), None)
        out[role] = df[src] if src is not None else None
    out["sex"] = normalise_sex(out["sex"]) if out["sex"].notna().any() else None
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype(float)
    out["skin_type"] = pd.array([pd.NA] * len(out), dtype="Int64")
    for c in label_cs:
        out[f"label:{c}"] = binary_values(df[c]).to_numpy()
    for c in group_cs:
        out[f"group:{c}"] = df[f"group:{c}"]
    out["group"] = df["group"]
    return out


def minority_rows(table, minority):
    """Boolean rows of the minority group (a value of `group`, e.g. "F" or "F & 60+"), checked."""
    values = sorted(table["group"].unique())
    if minority not in values:
        close = [v for v in values if v.casefold() == minority.casefold()] or get_close_matches(minority, values, 1)
        raise DataError(f"--minority {minority!r} is not a group of this table (did you mean {close[0]!r}?); its "
                        f"groups are {values}" if close else f"--minority {minority!r} is not a group of this table; "
                        f"its groups are {values}")
    return (table["group"] == minority).to_numpy()


def check_task(table, minority, folds, min_patients=None, labels=None):
    """Refuse, before any training, what a study of `minority` vs the rest with `folds` patient-level folds cannot
    use: a side with fewer patients than 2 per fold (each fold's test and training pool need some), a label without
    a positive or a negative on a side. Returns {side: {patients, images, label: positives}}."""
    is_min = minority_rows(table, minority)
    need = min_patients or 2 * folds
    summary = {}
    for side, rows in ((minority, is_min), ("rest", ~is_min)):
        t = table[rows]
        n_pat = t["patient_id"].nunique()
        if n_pat < need:
            raise DataError(f"group {side!r} has {n_pat} patients ({len(t)} images); {folds} folds need at least "
                            f"{need} (2 per fold): add patients, use fewer --folds, or merge groups")
        summary[side] = {"patients": int(n_pat), "images": int(len(t))}
        for c in [f"label:{l}" for l in labels] if labels else label_columns(table):
            y = t[c].dropna()
            pos, neg = int((y == 1).sum()), int((y == 0).sum())
            if pos == 0 or neg == 0:
                raise DataError(f"label {c[6:]!r} has {pos} positive and {neg} negative images in group {side!r}; "
                                f"every label needs both in every group: leave it out (--labels) or merge groups")
            summary[side][c[6:]] = pos
    return summary


def primary_label(table, primary=None):
    """The label the study compares on (--primary; default: the first label column), checked."""
    names = [c[6:] for c in label_columns(table)]
    if primary is None:
        return names[0]
    if primary not in names:
        raise DataError(f"--primary {primary!r} is not a label of the table; its labels are {names}")
    return primary


def check_file_names(t):
    """The split files name images by file name: two images of one name are refused."""
    names = t["image"].map(lambda p: Path(p).name)
    dup = names[names.duplicated()]
    if len(dup):
        raise DataError(f"two images share the file name {dup.iloc[0]!r} ({len(dup)} names repeat); the split files "
                        f"name images by file name, so rename them (e.g. prefix the site) and update the table")


def image_sizes(paths):
    """(height, width) of each image from its header (nothing decoded but .npy shapes); (0, 0) where unreadable."""
    from PIL import Image
    out = []
    for p in paths:
        try:
            s = Path(p).suffix.lower()
            if s == ".npy":
                shape = np.load(p, mmap_mode="r").shape
            elif s in (".dcm", ".dicom"):
                import pydicom
                d = pydicom.dcmread(p, stop_before_pixels=True)
                shape = (int(d.Rows), int(d.Columns))
            else:
                with Image.open(p) as im:
                    shape = im.size[::-1]
            out.append(tuple(shape[:2]))
        except Exception:  # decoding errors of every kind: the caller names the file
            out.append((0, 0))
    return out


def check_sizes(table, minimum, flag="--size", max_bad=None):
    """Refuse images whose shorter side is below `minimum` (what the network needs), naming the first and the
    minimum; images whose header does not read are counted, and refused above the share max_bad (None: the image
    cache names and leaves them out later)."""
    sizes = image_sizes(table["image"])
    bad = [p for p, s in zip(table["image"], sizes) if min(s) == 0]
    if bad and max_bad is not None:
        what = f"{len(bad)} of {len(sizes)} images do not read as images, e.g. {bad[0]}"
        if len(bad) > max_bad * len(sizes):
            raise DataError(f"{what}: more than {max_bad:.0%} (--max-missing); check the files")
        warnings.warn(f"{what}; a study leaves them out")
    small = [(p, s) for p, s in zip(table["image"], sizes) if 0 < min(s) < minimum]
    if small:
        p, s = small[0]
        raise DataError(f"{p}: {s[1]} x {s[0]} px, smaller than the {minimum} px the network takes ({flag}); "
                        f"{len(small)} images are that small: leave them out or use a smaller {flag}")
    return sizes


def write_example(out, n_nih=None):
    """The embedded NIH ChestX-ray14 sample and the COVID-19 collection's frontal images as one label table:
    path (relative to the table), patient_id, sex, age, source (nih / covid), finding (1: any finding; a COVID-19
    collection image is 1 unless it says No Finding), covid (1: COVID-19; 0 elsewhere)."""
    out = Path(out)
    nih = read_nih(PROJECT_DATA / "nih_cxr14")
    cov = read_covid(PROJECT_DATA / "covid_cxr")
    rows = pd.concat([  # the COVID-19 images first: a smoke run's first images of each sex include some
        pd.DataFrame({"path": cov["image"], "patient_id": "covid-" + cov["patient_id"], "sex": cov["sex"],
                      "age": cov["age"], "source": "covid",
                      "finding": (cov["finding"].fillna("") != "No Finding").astype(int),
                      "covid": cov["label:COVID-19"]}),
        pd.DataFrame({"path": nih["image"], "patient_id": "nih-" + nih["patient_id"], "sex": nih["sex"],
                      "age": nih["age"], "source": "nih", "finding": 1 - nih["label:No Finding"], "covid": 0})],
        ignore_index=True)
    rows = rows[rows["sex"].notna()]
    if n_nih:
        rows = pd.concat([rows[rows["source"] == "covid"], rows[rows["source"] == "nih"].head(n_nih)])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "table.csv"
    if path.exists():
        raise DataError(f"{path} exists; choose another --out (nothing was written)")
    rows["path"] = [os.path.relpath(p, out) for p in rows["path"]]
    rows["age"] = rows["age"].map(lambda a: "" if pd.isna(a) else f"{a:g}")
    rows.to_csv(path, index=False)
    return path, rows


def add_table_args(p):
    """The label-table flags every command that takes --table shares."""
    p.add_argument("--path-col", default=None, help="the image path column (default: path, image, file, ...)")
    p.add_argument("--patient-col", default=None, help="the patient column (default: patient_id, patient, ...)")
    p.add_argument("--group", default="sex",
                   help="comma-separated group column(s); several make intersections (sex,age: 'F & 60+')")
    p.add_argument("--bands", action="append", default=[], metavar="COLUMN=CUTS",
                   help="cut a continuous group column into bands, e.g. --bands age=40,60 (<40, 40-60, 60+)")
    p.add_argument("--labels", default=None,
                   help="comma-separated 0/1 label columns (default: every other column of 0, 1 and blanks)")
    p.add_argument("--max-missing", type=unit_interval, default=0.1,
                   help="largest share of rows whose image is missing that is left out with a warning (above: refused)")


def table_from_args(a):
    return read_table(a.table, a.path_col, a.patient_col, [g.strip() for g in a.group.split(",") if g.strip()],
                      parse_bands(a.bands), [c.strip() for c in a.labels.split(",")] if a.labels else None,
                      a.max_missing)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="read a label table and say what a study would use or refuse")
    c.add_argument("table", help="the CSV, one row per image")
    add_table_args(c)
    c.add_argument("--minority", default=None, help="the group asked about (a value of --group, e.g. F or 'F & 60+')")
    c.add_argument("--folds", type=positive_int, default=5, help="patient-level folds the study would use")
    c.add_argument("--primary", default=None, help="the label the study compares on (default: the first label)")
    c.add_argument("--min-size", type=positive_int, default=None,
                   help="refuse images whose shorter side is below this many pixels (the network's input)")
    e = sub.add_parser("example", help="write the embedded NIH + COVID-19 images as a label table (the worked example)")
    e.add_argument("--out", required=True, help="folder for table.csv (paths in it are relative to it)")
    e.add_argument("--nih", type=positive_int, default=None, help="only the first N NIH images (default: all 1,000)")
    return p.parse_args(argv)


def main(a):
    if a.command == "example":
        path, rows = write_example(a.out, a.nih)
        print(f"wrote {path}: {len(rows)} images of {rows['patient_id'].nunique()} patients; columns "
              f"{list(rows.columns)}")
        return
    t = table_from_args(a)
    labels = [c[6:] for c in label_columns(t)]
    print(f"{a.table}: {len(t)} images, {t['patient_id'].nunique()} patients; labels {labels}")
    counts = t.groupby("group").agg(images=("image", "size"), patients=("patient_id", "nunique"))
    for c in label_columns(t):
        counts[f"{c[6:]}=1"] = t.groupby("group")[c].sum().astype(int)
    print(counts.to_string())
    check_sizes(t, a.min_size or 1, "--min-size", a.max_missing)
    if a.minority:
        primary = primary_label(t, a.primary)
        check_task(t[t[f"label:{primary}"].notna()], a.minority, a.folds, labels=[primary])
        check_file_names(t)
        print(f"minority {a.minority!r} vs the rest, compared on {primary!r}: passes the table's checks for {a.folds} "
              f"folds (the study checks each fold's sets again when it splits them)")


if __name__ == "__main__":
    run(main, parse_args)
