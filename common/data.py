"""Readers for the real data formats. Each returns one uniform table (a pandas DataFrame, one row per image).

Columns of every table:
    image        where the pixels are: a file path, or "<file.npz>::<key>::<row>" for images stored in arrays
    patient_id   str; None where the data set has none (MedMNIST), so splits fall back to one group per image
    sex          "F" / "M" / None
    age          years (float) / NaN
    skin_type    Fitzpatrick type 1-6 / <NA>
    split        the data set's own split where it is safe to use (MedMNIST), else None
    label:<name> one 0/1 column per label: multi-hot for multi-label sets, one-hot for multi-class sets
Data sets add their own columns after these (view, finding, license, diagnosis levels, ...).

Pixels are read by `common.cache.load_images(table.image, size, mode)`, decoded once and cached.
Bad input raises DataError (a SystemExit: the script stops with the message, no traceback): the message names
the file and what would fix it.
"""
from pathlib import Path
import re
import warnings

import numpy as np
import pandas as pd
import torch

from common.errors import DataError
from common.splits import per_class_subset

# docs/METHODS.md, chest X-ray CVAE: the 15-label order (14 findings + No Finding).
NIH_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
              "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
              "No Finding"]
NIH_FINDINGS = NIH_LABELS[:14]
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices"]
COLUMNS = ["image", "patient_id", "sex", "age", "skin_type", "split"]
PROJECT_DATA = Path(__file__).resolve().parent.parent / "data"
DOWNLOAD_HINT = {
    "nih": "python -m common.download nih --root DIR",
    "medmnist": "python -m common.download medmnist --root DIR",
    "fitzpatrick17k": "python -m common.download fitzpatrick17k --root DIR",
}


def label_columns(table):
    return [c for c in table.columns if c.startswith("label:")]


def label_names(table):
    return [c[len("label:"):] for c in label_columns(table)]


def label_matrix(table):
    """(N, L) uint8 label matrix in the table's label order."""
    return table[label_columns(table)].to_numpy(dtype=np.uint8)


def require_dir(path, what, dataset=None):
    path = Path(path)
    if not path.is_dir():
        hint = f" Download it with `{DOWNLOAD_HINT[dataset]}`, or point --data-root at your copy." if dataset else ""
        raise DataError(f"{what} folder not found: {path}.{hint}")
    return path


def read_csv_checked(path, required, aliases=None, **kw):
    """Read a CSV and check its columns. `aliases` maps other spellings (e.g. 'Image_Index') to the required ones."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV not found: {path}")
    try:
        df = pd.read_csv(path, **kw)
    except Exception as e:  # pandas raises many types; the path is what the user needs
        raise DataError(f"cannot read CSV {path}: {e}") from e
    df = df.rename(columns={a: c for a, c in (aliases or {}).items() if a in df.columns and c not in df.columns})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the columns {missing}. It needs {list(required)}; "
                        f"it has {list(df.columns)}.")
    return df


def index_files(root, suffixes):
    """{file name: path} for every file under root (any depth) with one of the suffixes."""
    found = {}
    for p in Path(root).rglob("*"):
        if p.suffix.lower() in suffixes and p.is_file():
            found.setdefault(p.name, p)
    return found


def finish(df, labels, extra=()):
    """Put a reader's frame into the uniform column order; labels is a (N, L) array and its names."""
    mat, names = labels
    out = pd.DataFrame({c: df[c] if c in df.columns else None for c in COLUMNS}, index=df.index)
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype(float)
    out["skin_type"] = pd.array(pd.to_numeric(out["skin_type"], errors="coerce"), dtype="Int64")
    for j, name in enumerate(names):
        out[f"label:{name}"] = np.asarray(mat)[:, j].astype(np.uint8)
    for c in extra:
        out[c] = df[c].to_numpy()
    return out.reset_index(drop=True)


def normalise_sex(values):
    m = {"F": "F", "M": "M", "FEMALE": "F", "MALE": "M"}
    return [m.get(str(v).strip().upper()) for v in values]


# ----------------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14
NIH_CSV_NAMES = ["Data_Entry_2017_v2020.csv", "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv",
                 "Data_Entry_2017.csv.gz", "sample_labels.csv", "labels.csv"]


def find_nih_csv(root, files):
    """The label table under root; where there are several, the one that lists the most of the images found."""
    hits = [p for name in NIH_CSV_NAMES for p in sorted(Path(root).rglob(name))]
    if len(hits) == 1 or (hits and not files):
        return hits[0]
    if hits:
        def covered(p):
            col = pd.read_csv(p, nrows=0).columns[0]  # 'Image Index' or 'Image_Index'
            names = pd.read_csv(p, usecols=[col])[col]
            return names.isin(files.keys()).sum(), -len(names)  # most images found, then fewest missing
        return max(hits, key=covered)
    raise DataError(f"no NIH label table under {root}: expected one of {NIH_CSV_NAMES} (give it with --csv). "
                    f"Download with `{DOWNLOAD_HINT['nih']}`.")


def parse_age(v):
    """NIH ages are integers in Data_Entry ('57') and strings like '060Y' in the Kaggle sample."""
    m = re.match(r"\s*(\d+(?:\.\d+)?)\s*([YMD]?)", str(v))
    if not m:
        return np.nan
    age = float(m.group(1))
    return {"Y": age, "M": age / 12, "D": age / 365}.get(m.group(2), age)


def read_nih(data_root=PROJECT_DATA / "nih_cxr14", csv=None, require_images=True):
    """NIH ChestX-ray14: Data_Entry_2017*.csv or Kaggle sample_labels.csv (either header spelling); images are
    found anywhere under data_root (the official archives unpack to images_001/images/*.png). Rows whose image is
    not on disk are dropped with a count; 15 labels in docs/METHODS.md order."""
    root = require_dir(data_root, "NIH ChestX-ray14", "nih")
    files = index_files(root, {".png"}) if require_images else {}
    csv = Path(csv) if csv else find_nih_csv(root, files)
    need = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender"]
    df = read_csv_checked(csv, need, aliases={"Image_Index": "Image Index", "Finding_Labels": "Finding Labels",
                                              "Patient_ID": "Patient ID", "Patient_Age": "Patient Age",
                                              "Patient_Gender": "Patient Gender", "View_Position": "View Position"})
    tokens = df["Finding Labels"].fillna("No Finding").astype(str).str.split("|")
    unknown = sorted(set(t.strip() for ts in tokens for t in ts) - set(NIH_LABELS))
    if unknown:
        raise DataError(f"{csv}: unknown finding labels {unknown}; expected some of {NIH_LABELS}")
    mat = np.array([[name in {t.strip() for t in ts} for name in NIH_LABELS] for ts in tokens], dtype=np.uint8)
    df["patient_id"] = df["Patient ID"].astype(str)
    df["age"] = df["Patient Age"].map(parse_age)
    if (df["age"] > 120).any():  # known typos in the older tables (e.g. '411Y' in the Kaggle sample)
        warnings.warn(f"{csv.name}: {int((df['age'] > 120).sum())} ages over 120 set to NaN")
        df.loc[df["age"] > 120, "age"] = np.nan
    df["sex"] = normalise_sex(df["Patient Gender"])
    df["view"] = df["View Position"] if "View Position" in df.columns else None
    if require_images:
        df["image"] = [str(files[n]) if n in files else None for n in df["Image Index"]]
    else:
        df["image"] = [str(root / n) for n in df["Image Index"]]
    keep = df["image"].notna().to_numpy()
    if require_images and not keep.any():
        raise DataError(f"none of the {len(df)} images listed in {csv} is under {root}. "
                        f"Download them with `{DOWNLOAD_HINT['nih']}`, or pass --data-root where they are.")
    if not keep.all():
        warnings.warn(f"NIH: {int((~keep).sum())} of {len(df)} images listed in {csv.name} are not under {root}; "
                      f"using the {int(keep.sum())} found")
    df, mat = df[keep], mat[keep]
    return finish(df, (mat, NIH_LABELS), extra=["view", "Finding Labels"])


# ----------------------------------------------------------------------------------------------------------------
# MedMNIST (official .npz)
# name: (task, channels, class names); MD5s and URLs live in common/download.py
MEDMNIST = {
    "path": ("multi-class", 3, ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                "normal colon mucosa", "cancer-associated stroma",
                                "colorectal adenocarcinoma epithelium"]),
    "derma": ("multi-class", 3, ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                 "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                                 "vascular lesions"]),
    "oct": ("multi-class", 1, ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "pneumonia": ("binary-class", 1, ["normal", "pneumonia"]),
    "breast": ("binary-class", 1, ["malignant", "normal, benign"]),
    "organa": ("multi-class", 1, ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                                  "liver", "lung-left", "lung-right", "pancreas", "spleen"]),
    "chest": ("multi-label", 1, ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                 "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                                 "pleural", "hernia"]),
    "blood": ("multi-class", 3, ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                                 "monocyte", "neutrophil", "platelet"]),
    "retina": ("ordinal-regression", 3, ["0", "1", "2", "3", "4"]),
    "tissue": ("multi-class", 1, ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                  "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                                  "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
}
MEDMNIST["organc"] = MEDMNIST["organs"] = MEDMNIST["organa"]
MEDMNIST_SPLITS = ["train", "val", "test"]


def medmnist_file(root, flag, size=28):
    return Path(root) / (f"{flag}mnist.npz" if size == 28 else f"{flag}mnist_{size}.npz")


def as_uint8(arr, where):
    """An image array as uint8 by the rule in common/cache.py's docstring; DataError names `where` otherwise."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{where}: images of dtype {a.dtype} (expected uint8 pixels 0-255, or floats in [0, 1])")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise DataError(f"{where}: pixel values span [{lo:g}, {hi:g}]; expected 0-255, or floats in [0, 1] "
                        f"(rescale the array and save it again)")
    if np.issubdtype(a.dtype, np.floating) and hi <= 1:
        a = a * 255.0
    return np.rint(a).astype(np.uint8)


def medmnist_labels(path, z, split):
    """The checked (N, L) integer labels of one split: as many as its images, whose shape must be an image array."""
    images, y = z[f"{split}_images"], z[f"{split}_labels"]
    if images.ndim not in (3, 4) or images.shape[1] != images.shape[2] or \
            (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{path}: {split}_images has shape {images.shape}; MedMNIST images are (N, H, H) or "
                        f"(N, H, H, 3) (reshape flat arrays before saving)")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or len(y) != len(images):
        raise DataError(f"{path}: {len(images)} {split} images but {split}_labels has shape {y.shape}; they must "
                        f"pair one to one")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if not (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{path}: {split}_labels are {y.dtype} values that are not whole numbers")
    return y.astype(np.int64)


def read_medmnist(path):
    """An official MedMNIST .npz (keys train_images, train_labels, val_*, test_*; 28 px or the _64/_128/_224
    variants; grey (N,H,W) or RGB (N,H,W,3)). The official split is kept in `split`; `target` is the class index
    (multi-class/binary sets)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MedMNIST file not found: {path}. Download it with "
                        f"`{DOWNLOAD_HINT['medmnist']} --flags {path.name.split('mnist')[0]}`.")
    try:
        z = np.load(path)
        keys = set(z.files)
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz archive ({type(e).__name__}); give an official MedMNIST file "
                        f"(a damaged download: fetch it again)") from e
    need = [f"{s}_{k}" for s in MEDMNIST_SPLITS for k in ("images", "labels")]
    if not set(need) <= keys:
        raise DataError(f"{path} lacks the keys {sorted(set(need) - keys)}; a MedMNIST file has {need}")
    flag = re.sub(r"mnist(_\d+)?\.npz$", "", path.name)
    try:
        labels = {s: medmnist_labels(path, z, s) for s in MEDMNIST_SPLITS}
    except (ValueError, OSError) as e:  # object arrays (refused: no pickles), a truncated member, ...
        raise DataError(f"{path}: cannot read its arrays ({e}); use an official MedMNIST file") from e
    for s in MEDMNIST_SPLITS:
        if not len(labels[s]):
            raise DataError(f"{path}: {s}_images is empty; every split (train, val, test) needs images")
    if flag in MEDMNIST:
        task, _, names = MEDMNIST[flag]
    else:  # an unknown flag: infer the task from the label shape; classes are 0..K-1, each with training images
        l = labels["train"]
        task = "multi-label" if l.shape[1] > 1 else "multi-class"
        if task == "multi-class":
            low = min(int(y.min()) for y in labels.values())
            seen = np.unique(l[:, 0])
            if low < 0 or len(seen) < 2 or seen[-1] != len(seen) - 1:
                raise DataError(
                    f"{path}: the name does not say which MedMNIST set this is, so its classes are the train_labels "
                    f"found, which must be 0 to K-1 (K >= 2) each with training images; found {seen[:10].tolist()}"
                    f"{' and negative labels' if low < 0 else ''} (renumber the classes, or name the file "
                    f"<set>mnist.npz after its MedMNIST set)")
        names = [str(i) for i in range(l.shape[1] if l.shape[1] > 1 else int(l.max()) + 1)]
    for s in MEDMNIST_SPLITS:  # the label contract: one column of class indices, or one 0/1 column per label
        y = labels[s]
        width = len(names) if task == "multi-label" else 1
        if y.shape[1] != width:
            raise DataError(f"{path}: {s}_labels has {y.shape[1]} columns; {flag or 'this'} set needs {width}")
        top = 1 if task == "multi-label" else len(names) - 1
        if len(y) and (y.min() < 0 or y.max() > top):
            raise DataError(f"{path}: {s}_labels run from {y.min()} to {y.max()}; this {task} set needs 0-{top}")
    parts = []
    for s in MEDMNIST_SPLITS:
        y = labels[s]
        n = len(y)
        if task == "multi-label":
            mat = y.astype(np.uint8)
            target = np.full(n, -1)
        else:
            target = y[:, 0].astype(int)
            mat = np.eye(len(names), dtype=np.uint8)[target]
        part = pd.DataFrame({"image": [f"{path}::{s}_images::{i}" for i in range(n)], "split": s,
                             "target": target})
        parts.append(finish(part, (mat, names), extra=["target"]))
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(task=task, flag=flag)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fitzpatrick17k
FITZ_COLUMNS = ["md5hash", "fitzpatrick_scale", "label", "nine_partition_label", "three_partition_label"]
FITZ_LEVELS = {"label": "label", "nine": "nine_partition_label", "three": "three_partition_label"}


def skin_group(fst):
    """Fitzpatrick type -> light (1-2), medium (3-4), dark (5-6); missing (-1) -> None."""
    return {1: "light", 2: "light", 3: "medium", 4: "medium", 5: "dark", 6: "dark"}.get(int(fst))


ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}


def skin_types(values, csv):
    """Fitzpatrick types as numbers: 1-6 (or I-VI); -1 and blanks mean unknown (NaN, dropped by the reader with a
    count). Anything else is an error naming the file and the values."""
    text = values.astype("string").str.strip().str.upper()
    fst = pd.to_numeric(text.map(lambda v: ROMAN.get(v, v) if isinstance(v, str) else v), errors="coerce")
    bad = fst.isna() & text.notna() & (text != "")
    bad |= fst.notna() & ~fst.isin([-1, 1, 2, 3, 4, 5, 6])
    if bad.any():
        raise DataError(f"{csv}: fitzpatrick_scale has values {sorted(set(values[bad].astype(str)))[:5]}; it takes "
                        f"1-6 (or I-VI), and -1 or blank for unknown")
    unknown = int((~fst.between(1, 6).fillna(False).astype(bool)).sum())  # NaN (blank, 'NA', 'n/a') counts too
    if unknown:
        warnings.warn(f"{csv}: {unknown} rows with an unknown skin type (-1, blank or missing) left out")
    return fst


def read_fitzpatrick(data_root, csv=None, level="three", require_images=True):
    """Fitzpatrick17k: fitzpatrick17k.csv + images named <md5hash>.jpg anywhere under data_root. Rows with
    skin type -1 are dropped; `skin_group` is light (FST 1-2) / medium (3-4) / dark (5-6); the diagnosis is kept
    at its three levels (`diagnosis`, `diagnosis_nine`, `diagnosis_three`) and one-hot at `level`."""
    root = require_dir(data_root, "Fitzpatrick17k", "fitzpatrick17k")
    csv = Path(csv) if csv else root / "fitzpatrick17k.csv"
    df = read_csv_checked(csv, FITZ_COLUMNS, dtype={"md5hash": str})
    fst = skin_types(df["fitzpatrick_scale"], csv)
    df = df[fst.between(1, 6)].copy()
    df["skin_type"] = fst[fst.between(1, 6)].astype(int)
    df["skin_group"] = df["skin_type"].map(skin_group)
    df["diagnosis"], df["diagnosis_nine"], df["diagnosis_three"] = (
        df["label"], df["nine_partition_label"], df["three_partition_label"])
    if require_images:
        files = index_files(root, {".jpg", ".jpeg", ".png"})
        by_stem = {Path(n).stem: p for n, p in files.items()}
        df["image"] = [str(by_stem[h]) if h in by_stem else None for h in df["md5hash"]]
        keep = df["image"].notna()
        if not keep.any():
            raise DataError(f"none of the {len(df)} Fitzpatrick17k images (<md5hash>.jpg) is under {root}. "
                            f"Download them with `{DOWNLOAD_HINT['fitzpatrick17k']}`.")
        if not keep.all():
            warnings.warn(f"Fitzpatrick17k: {int((~keep).sum())} of {len(df)} images are not under {root}; "
                          f"using the {int(keep.sum())} found")
        df = df[keep]
    else:
        df["image"] = [str(root / "images" / f"{h}.jpg") for h in df["md5hash"]]
    df["patient_id"] = df["md5hash"]  # no patient ids are published: one group per image
    classes = sorted(df[FITZ_LEVELS[level]].unique())
    mat = (df[FITZ_LEVELS[level]].to_numpy()[:, None] == np.array(classes)[None]).astype(np.uint8)
    extra = ["skin_group", "diagnosis", "diagnosis_nine", "diagnosis_three", "md5hash"]
    if "url" in df.columns:
        extra.append("url")
    return finish(df, (mat, classes), extra=extra)


# ----------------------------------------------------------------------------------------------------------------
# CheXpert
def read_chexpert(data_root, csv=None, uncertain="zeros", require_images=True):
    """CheXpert train.csv / valid.csv (the 'small' or full release). Uncertain labels (-1) become 0 ('zeros', U-Zeros)
    or 1 ('ones', U-Ones); blanks are 0. Patient ids come from the path (patientNNNNN)."""
    root = require_dir(data_root, "CheXpert")
    csv = Path(csv) if csv else root / "train.csv"
    df = read_csv_checked(csv, ["Path", "Sex", "Age"] + CHEXPERT_LABELS)
    vals = df[CHEXPERT_LABELS].fillna(0).to_numpy()
    mat = np.where(vals == -1, 1 if uncertain == "ones" else 0, vals).astype(np.uint8)
    df["patient_id"] = df["Path"].str.extract(r"(patient\d+)", expand=False)
    df["sex"] = normalise_sex(df["Sex"])
    df["age"] = df["Age"]
    df["view"] = df["Frontal/Lateral"] if "Frontal/Lateral" in df.columns else None

    def locate(p):  # Path starts with 'CheXpert-v1.0-small/...'; the user's root may be that folder or its parent
        for cand in (root / p, root / Path(*Path(p).parts[1:]), root.parent / p):
            if cand.is_file():
                return str(cand)
        return None
    inner = df["Path"].str.split("/", n=1).str[1]
    df["image"] = [locate(p) for p in df["Path"]] if require_images else [str(root / p) for p in inner]
    keep = df["image"].notna().to_numpy()
    if require_images and not keep.any():
        raise DataError(f"none of the {len(df)} CheXpert images listed in {csv} is under {root}")
    if not keep.all():
        warnings.warn(f"CheXpert: {int((~keep).sum())} of {len(df)} images not found under {root}")
    return finish(df[keep], (mat[keep], CHEXPERT_LABELS), extra=["view"])


# ----------------------------------------------------------------------------------------------------------------
# COVID-19 image data collection
COVID_FRONTAL = {"PA", "AP", "AP Supine", "AP semi erect"}


def read_covid(data_root=PROJECT_DATA / "covid_cxr"):
    """The COVID-19 image data collection: metadata.csv + images/; frontal views only; the per-image `license` is
    kept (check it before redistributing). Label: COVID-19 (any finding naming it) vs not."""
    root = require_dir(data_root, "COVID-19 image data collection")
    df = read_csv_checked(root / "metadata.csv", ["patientid", "sex", "age", "finding", "view", "filename",
                                                  "license"], dtype={"license": str})
    df = df[df["view"].isin(COVID_FRONTAL)].drop_duplicates("filename").copy()
    df["image"] = [str(root / "images" / f) for f in df["filename"]]
    on_disk = np.array([Path(p).is_file() for p in df["image"]])
    if not on_disk.any():
        raise DataError(f"none of the images named in {root / 'metadata.csv'} is in {root / 'images'}")
    if not on_disk.all():
        warnings.warn(f"COVID: {int((~on_disk).sum())} images named in metadata.csv are missing; using the rest")
    df = df[on_disk]
    df["patient_id"] = df["patientid"].astype(str)
    df["sex"] = normalise_sex(df["sex"])
    df["license"] = df["license"].fillna("").str.strip()
    covid = df["finding"].str.contains("COVID-19").to_numpy()
    mat = np.stack([covid, ~covid], 1).astype(np.uint8)
    return finish(df, (mat, ["COVID-19", "other"]), extra=["finding", "view", "license"])


# ----------------------------------------------------------------------------------------------------------------
# IXI T1 slices
def read_ixi(data_root=PROJECT_DATA / "ixi_t1"):
    """IXI T1 brain slices: t1_slices.npz (key `images`, (N, H, W) uint8) with slices.csv rows aligned to it
    (subject, age, sex, slice_index). No diagnostic labels: a study defines its task (e.g. an age group)."""
    root = require_dir(data_root, "IXI slices")
    df = read_csv_checked(root / "slices.csv", ["subject", "age", "sex"])
    npz = root / "t1_slices.npz"
    if not npz.is_file():
        raise DataError(f"{npz} not found next to {root / 'slices.csv'}")
    try:
        n = len(np.load(npz, mmap_mode="r")["images"])
    except Exception as e:  # numpy raises many types for a bad file; the file and the key are what the user needs
        raise DataError(f"{npz}: cannot read its array 'images' ({type(e).__name__}: {e}); it needs 'images', "
                        f"(N, H, W) uint8 slices aligned with slices.csv") from e
    if n != len(df):
        raise DataError(f"{npz} holds {n} slices but {root / 'slices.csv'} has {len(df)} rows; they must align")
    df["image"] = [f"{npz}::images::{i}" for i in range(n)]
    df["patient_id"] = df["subject"].astype(str)
    df["sex"] = normalise_sex(df["sex"])
    extra = ["slice_index"] if "slice_index" in df.columns else []
    return finish(df, (np.zeros((n, 0)), []), extra=extra)


def medmnist_arrays(path):
    """The arrays of an official MedMNIST .npz: (images uint8 (N, H, W) or (N, H, W, 3), labels (N,) class indices
    or (N, L) multi-hot, split (N,) 'train'/'val'/'test', task, class names)."""
    t = read_medmnist(path)
    z = np.load(path)
    images = np.concatenate([as_uint8(z[f"{s}_images"], f"{path} {s}_images") for s in MEDMNIST_SPLITS])
    multilabel = t.attrs["task"] == "multi-label"
    labels = label_matrix(t) if multilabel else t["target"].to_numpy()
    return images, labels, t["split"].to_numpy(), t.attrs["task"], label_names(t)


def medmnist_subset(path, per_class=150, seed=0, val_fraction=0.1):
    """Chaptoukaev's subset of an official MedMNIST file: about `per_class` images of each class from the official
    train split, divided train:val 9:1 within each class. Returns (images, labels, images_val, labels_val, names);
    multi-label sets are refused (the generators are class-conditional)."""
    images, labels, split, task, names = medmnist_arrays(path)
    if task == "multi-label":
        raise DataError(f"{path}: multi-label sets (ChestMNIST) do not fit the class-conditional protocol")
    train = np.nonzero(split == "train")[0]
    tr, va = per_class_subset(labels[train], per_class, val_fraction, seed)
    return images[train[tr]], labels[train[tr]], images[train[va]], labels[train[va]], names


def to_signed(images, device=None):
    """uint8 images (N, H, W) or (N, H, W, C), numpy or torch -> float (N, C, H, W) in [-1, 1] (x / 127.5 - 1, the
    input of every network here; MedMNIST's Normalize(mean=.5, std=.5)); the inverse is common.report.to_uint8."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, device=device).float()
    x = x / 127.5 - 1
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


def read_samples(path, writers, flag="--synthetic"):
    """A generator's samples .npz as (images uint8, labels): what a classifier stage appends to its training set.
    writers: the scripts that write such a file, named in the error for a file that is not one."""
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{flag} {path}: not a samples file with images and labels ({type(e).__name__}: {e}); "
                        f"write one with {writers}")
    if len(labels) != len(images):
        raise DataError(f"{flag} {path}: {len(images)} images but {len(labels)} labels")
    return images, labels
