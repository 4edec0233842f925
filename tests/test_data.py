"""Readers on the embedded real data, on the official downloads in $FAIRSYNTH_REAL_DATA when set, and on small
fixtures in each official format; plus the bad-input messages."""
import gzip
import os
from pathlib import Path
import warnings

import numpy as np
import pandas as pd
import pytest

from common.cache import load_images
from common.data import NIH_LABELS, PROJECT_DATA, label_matrix, label_names, read_chexpert, read_covid, read_fitzpatrick, read_ixi, read_medmnist, read_nih
from common.errors import DataError
from common.phantom import JOINT, is_phantom, make_phantom
from conftest import write_png

# the official downloads a user may hold (fitzpatrick17k/, chexpert/train.csv.gz, covid_cxr/ with its full table):
# FAIRSYNTH_REAL_DATA names their folder; without it the tests that read them skip
REAL = Path(os.environ.get("FAIRSYNTH_REAL_DATA", "")) if os.environ.get("FAIRSYNTH_REAL_DATA") else None
needs_downloads = pytest.mark.skipif(REAL is None or not REAL.is_dir(),
                                     reason="set FAIRSYNTH_REAL_DATA to a folder of the official downloads")


# ---- NIH ChestX-ray14 ------------------------------------------------------------------------------------------
def test_nih_embedded():
    t = read_nih()
    assert len(t) == 1000 and t["patient_id"].nunique() == 264
    assert (t["sex"] == "F").sum() == 509 and (t["sex"] == "M").sum() == 491
    assert label_names(t) == NIH_LABELS
    y = label_matrix(t)
    # 'No Finding' is exclusive of the 14 findings, and every image has at least one label
    assert ((y[:, 14] == 1) == (y[:, :14].sum(1) == 0)).all()
    first = t.iloc[0]
    assert first["image"].endswith("00000001_000.png") and first["age"] == 57 and first["label:Cardiomegaly"] == 1


def nih_fixture(root, header_underscore, nested=True):
    names = ["00000001_000.png", "00000002_000.png", "00000003_001.png"]
    for i, n in enumerate(names):
        write_png(root / ("images_001/images" if nested else "") / n, size=16, seed=i)
    sep = "_" if header_underscore else " "
    cols = [f"Image{sep}Index", f"Finding{sep}Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
            "View Position"]
    rows = [[names[0], "Cardiomegaly|Effusion", 0, 1, "058Y", "M", "PA"],
            [names[1], "No Finding", 0, 2, "081Y", "F", "AP"],
            [names[2], "Pleural_Thickening", 1, 3, "012M", "F", "PA"],
            ["99999999_000.png", "Mass", 0, 4, "040Y", "M", "PA"]]  # image not on disk
    csv = root / ("sample_labels.csv" if header_underscore else "Data_Entry_2017.csv")
    pd.DataFrame(rows, columns=cols).to_csv(csv, index=False)
    return csv


@pytest.mark.parametrize("underscore", [True, False])
def test_nih_both_header_spellings_and_nested_images(tmp_path, underscore):
    nih_fixture(tmp_path, underscore)
    with pytest.warns(UserWarning, match="1 of 4 images"):
        t = read_nih(tmp_path)
    assert len(t) == 3
    assert t["age"].tolist() == [58.0, 81.0, 1.0]
    assert t["sex"].tolist() == ["M", "F", "F"]
    y = label_matrix(t)
    assert y[0, NIH_LABELS.index("Cardiomegaly")] == 1 and y[0, NIH_LABELS.index("Effusion")] == 1
    assert y[1, 14] == 1 and y[2, NIH_LABELS.index("Pleural_Thickening")] == 1 and y.sum() == 4
    assert "images_001/images" in t["image"][0]


def test_nih_official_tables():
    """Both official NIH tables ship with the embedded data: the Kaggle sample's and the full Data_Entry."""
    s = read_nih(PROJECT_DATA / "nih_cxr14", csv=PROJECT_DATA / "nih_cxr14/sample_labels.csv", require_images=False)
    assert len(s) == 5606 and (s["sex"] == "F").sum() == 2472 and (s["sex"] == "M").sum() == 3134
    assert s["age"].dropna().between(0, 100).all() and s["age"].isna().sum() == 1  # one "411Y" typo
    full = read_nih(PROJECT_DATA / "nih_cxr14", csv=PROJECT_DATA / "nih_cxr14/Data_Entry_2017_v2020.csv.gz",
                    require_images=False)
    assert len(full) == 112120 and (full["sex"] == "F").sum() == 48780


def test_nih_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="common.download nih") as e:
        read_nih(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    pd.DataFrame({"Image Index": ["a.png"], "Labels": ["Mass"]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError) as e:
        read_nih(tmp_path)
    msg = str(e.value)
    assert "Finding Labels" in msg and "'Labels'" in msg and "labels.csv" in msg  # needed, found, which file
    nih_fixture(tmp_path / "x", False)
    bad = tmp_path / "x" / "Data_Entry_2017.csv"
    pd.read_csv(bad).assign(**{"Finding Labels": "Covid"}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="unknown finding labels"):
        read_nih(tmp_path / "x")
    empty = tmp_path / "y"
    nih_fixture(empty, False)
    for p in empty.rglob("*.png"):
        p.unlink()
    with pytest.raises(DataError, match="none of the 4 images"):
        read_nih(empty)


# ---- MedMNIST ---------------------------------------------------------------------------------------------------
def test_medmnist_embedded_breast():
    t = read_medmnist(PROJECT_DATA / "medmnist/breastmnist.npz")
    assert t["split"].value_counts().to_dict() == {"train": 546, "test": 156, "val": 78}
    assert t.attrs["task"] == "binary-class" and label_names(t) == ["malignant", "normal, benign"]
    z = np.load(PROJECT_DATA / "medmnist/breastmnist.npz")
    test = t[t["split"] == "test"]
    assert (test["target"].to_numpy() == z["test_labels"][:, 0]).all()
    x, ok = load_images(test["image"], 28)
    assert ok.all() and (x == z["test_images"]).all()


def test_medmnist_rgb_multilabel_and_size_variants(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in [("train", 6), ("val", 2), ("test", 3)]:
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 7, (n, 1)).astype(np.uint8)
    np.savez(tmp_path / "dermamnist_64.npz", **arrays)
    t = read_medmnist(tmp_path / "dermamnist_64.npz")
    assert t.attrs["flag"] == "derma" and len(label_names(t)) == 7 and len(t) == 11
    assert (label_matrix(t).argmax(1) == t["target"]).all()
    x, ok = load_images(t["image"], 64, "RGB")
    assert x.shape == (11, 64, 64, 3) and (x[:6] == arrays["train_images"]).all()
    small, _ = load_images(t["image"], 28, "RGB")
    assert small.shape == (11, 28, 28, 3)
    ml = {f"{s}_{k}": (rng.integers(0, 255, (4, 28, 28), dtype=np.uint8) if k == "images"
                       else rng.integers(0, 2, (4, 14)).astype(np.uint8))
          for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "chestmnist.npz", **ml)
    c = read_medmnist(tmp_path / "chestmnist.npz")
    assert c.attrs["task"] == "multi-label" and (label_matrix(c)[:4] == ml["train_labels"]).all()


def test_medmnist_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="common.download medmnist --root DIR --flags oct"):
        read_medmnist(tmp_path / "octmnist.npz")
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((1, 28, 28)))
    with pytest.raises(DataError, match="lacks the keys"):
        read_medmnist(tmp_path / "breastmnist.npz")
    (tmp_path / "pathmnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="fetch it again"):
        read_medmnist(tmp_path / "pathmnist.npz")


# ---- Fitzpatrick17k ---------------------------------------------------------------------------------------------
FITZ_ROWS = [  # md5hash, fitzpatrick_scale, label, nine, three
    ("a" * 32, 1, "psoriasis", "inflammatory", "non-neoplastic"),
    ("b" * 32, 6, "melanoma", "malignant melanoma", "malignant"),
    ("c" * 32, -1, "psoriasis", "inflammatory", "non-neoplastic"),
    ("d" * 32, 3, "milia", "benign epidermal", "benign"),
    ("e" * 32, 5, "kaposi sarcoma", "malignant dermal", "malignant"),
]


def fitz_fixture(root, with_images=True):
    df = pd.DataFrame(FITZ_ROWS, columns=["md5hash", "fitzpatrick_scale", "label", "nine_partition_label",
                                          "three_partition_label"])
    df["fitzpatrick_centaur"], df["qc"] = df["fitzpatrick_scale"], ""
    df["url"] = [f"https://example.org/img/{h[:4]}.jpg" for h in df["md5hash"]]
    df["url_alphanum"] = df["url"].str.replace(r"\W", "", regex=True)
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / "fitzpatrick17k.csv", index=False)
    if with_images:
        for i, h in enumerate(df["md5hash"]):
            write_png(root / "images" / f"{h}.jpg", size=40, rgb=True, seed=i)
    return df


def test_fitzpatrick_fixture(tmp_path):
    fitz_fixture(tmp_path)
    t = read_fitzpatrick(tmp_path, level="three")
    assert len(t) == 4  # the -1 row is dropped
    assert t["skin_group"].tolist() == ["light", "dark", "medium", "dark"]
    assert label_names(t) == ["benign", "malignant", "non-neoplastic"]
    assert t["diagnosis_nine"].tolist()[1] == "malignant melanoma" and t["diagnosis"].tolist()[2] == "milia"
    assert label_names(read_fitzpatrick(tmp_path, level="nine")) == sorted(
        {"inflammatory", "malignant melanoma", "benign epidermal", "malignant dermal"})
    x, ok = load_images(t["image"], 32, "RGB")
    assert ok.all() and x.shape == (4, 32, 32, 3)
    assert not is_phantom(t)


@needs_downloads
def test_fitzpatrick_real_table():
    t = read_fitzpatrick(REAL / "fitzpatrick17k", require_images=False, level="nine")
    assert len(t) == 16012 and len(label_names(t)) == 9
    counts = t.groupby(["diagnosis_nine", "skin_type"]).size().unstack().fillna(0).astype(int)
    assert {k: counts.loc[k].tolist() for k in JOINT} == JOINT  # the phantom's table is the real one


def test_fitzpatrick_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="common.download fitzpatrick17k"):
        read_fitzpatrick(tmp_path / "none")
    fitz_fixture(tmp_path, with_images=False)
    with pytest.raises(DataError, match="none of the 4 Fitzpatrick17k images"):
        read_fitzpatrick(tmp_path)
    pd.DataFrame({"md5hash": ["x"], "label": ["y"]}).to_csv(tmp_path / "fitzpatrick17k.csv", index=False)
    with pytest.raises(DataError, match="fitzpatrick_scale"):
        read_fitzpatrick(tmp_path)


def test_phantom_follows_real_frequencies(tmp_path):
    make_phantom(tmp_path, n=3000, size=32, seed=1)
    t = read_fitzpatrick(tmp_path, level="nine")
    assert is_phantom(t) and len(t) == 3000
    counts = np.array([JOINT[k] for k in JOINT], dtype=float)
    p_fst = counts.sum(0) / counts.sum()
    got = t["skin_type"].value_counts().reindex(range(1, 7), fill_value=0).to_numpy() / len(t)
    assert np.abs(got - p_fst).max() < 4 * np.sqrt(p_fst.max() / 3000)  # within ~4 standard errors
    x, _ = load_images(t["image"], 32, "RGB")
    light, dark = x[t["skin_type"].to_numpy() <= 2], x[t["skin_type"].to_numpy() >= 5]
    assert light.mean() > dark.mean() + 50  # tone follows the Fitzpatrick type
    make_phantom(tmp_path / "a", n=20, size=32, seed=1)
    make_phantom(tmp_path / "b", n=20, size=32, seed=1)
    assert (pd.read_csv(tmp_path / "a/fitzpatrick17k.csv")["md5hash"]
            == pd.read_csv(tmp_path / "b/fitzpatrick17k.csv")["md5hash"]).all()  # same seed, same images


# ---- CheXpert, COVID, IXI ---------------------------------------------------------------------------------------
def test_chexpert_fixture(tmp_path):
    from common.data import CHEXPERT_LABELS
    rows = []
    for i, (pid, sex) in enumerate([("patient00001", "Female"), ("patient00001", "Female"), ("patient00002", "Male")]):
        path = f"CheXpert-v1.0-small/train/{pid}/study{i}/view1_frontal.jpg"
        write_png(tmp_path / path, size=20, seed=i)
        row = {"Path": path, "Sex": sex, "Age": 60 + i, "Frontal/Lateral": "Frontal", "AP/PA": "AP"}
        row.update({c: np.nan for c in CHEXPERT_LABELS})
        row["Edema"], row["Cardiomegaly"] = (-1.0, 1.0) if i == 0 else (0.0, np.nan)
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    for root in (tmp_path, tmp_path / "CheXpert-v1.0-small"):  # the user may point at either folder
        t = read_chexpert(root, csv=tmp_path / "train.csv")
        assert t["patient_id"].tolist() == ["patient00001", "patient00001", "patient00002"]
        assert t["sex"].tolist() == ["F", "F", "M"] and t["label:Edema"].tolist() == [0, 0, 0]
    assert read_chexpert(tmp_path, uncertain="ones")["label:Edema"].tolist() == [1, 0, 0]


@needs_downloads
def test_chexpert_shared_table(tmp_path):
    with gzip.open(REAL / "chexpert/train.csv.gz") as f:
        (tmp_path / "train.csv").write_bytes(f.read())
    t = read_chexpert(tmp_path, require_images=False)
    assert len(t) > 200000 and t["patient_id"].notna().all() and set(t["sex"].dropna()) == {"F", "M"}


def test_covid_embedded_is_cc_by_only():
    t = read_covid()
    assert len(t) == 98 and set(t["license"]) <= {"CC BY 3.0", "CC BY 4.0"}
    assert t["label:COVID-19"].sum() == 90 and t["patient_id"].nunique() == 51
    x, ok = load_images(t["image"], 64)
    assert ok.all() and x.shape == (98, 64, 64)


@needs_downloads
def test_covid_shared_frontal_and_licence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = read_covid(REAL / "covid_cxr")
    assert set(t["view"]) <= {"PA", "AP", "AP Supine"} and "license" in t.columns and len(t) > 450


def test_ixi_embedded_and_misaligned(tmp_path):
    t = read_ixi()
    assert len(t) == 905 and t["patient_id"].nunique() == 181 and t["age"].between(19, 90).all()
    x, ok = load_images(t["image"][:5], 96)
    assert (x == np.load(PROJECT_DATA / "ixi_t1/t1_slices.npz")["images"][:5]).all()
    (tmp_path / "slices.csv").write_text("subject,age,sex\nIXI1,30,F\n")
    np.savez(tmp_path / "t1_slices.npz", images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="must align"):
        read_ixi(tmp_path)
