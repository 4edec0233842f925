"""Your own data (common/table.py): a label table read into the uniform table, every refusal one line through the
user-facing command (non-zero exit, the column, file or flag named, no traceback, nothing changed), and the image
formats a table may list (PNG, JPEG, TIFF, .npy, DICOM)."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.cache import load_images
from common.table import check_task, read_table
from conftest import write_png
from test_bad_input import ok, refused


def user_table(folder, n_patients=12, images_each=2, size=32, rows=None):
    """A table of n_patients (half F) with images_each PNGs each: path, patient_id, sex, age, site, finding."""
    out = []
    for p in range(n_patients):
        for i in range(images_each):
            name = f"img/p{p}_{i}.png"
            write_png(folder / name, size=size, seed=p * 10 + i)
            out.append({"path": name, "patient_id": f"P{p}", "sex": "F" if p % 2 else "M", "age": 29 + 3 * p + i,
                        "site": "A" if p % 3 else "B", "finding": (p + i) % 2})
    df = pd.DataFrame(out)
    if rows is not None:
        df = rows(df)
    df.to_csv(folder / "table.csv", index=False)
    return folder / "table.csv"


def check(table, *flags):
    return ["common.table", "check", str(table), *flags]


def test_a_table_reads_into_groups_intersections_and_bands(tmp_path):
    csv = user_table(tmp_path)
    t = read_table(csv, groups=["sex", "age"], bands={"age": [60]})
    assert sorted(t["group"].unique()) == ["F & 60+", "F & <60", "M & <60"]  # the oldest man, P10, is 59 first
    # a patient's band is their age at their first image: P10 is 59 then 60
    assert set(t.loc[t["patient_id"] == "P10", "group"]) == {"M & <60"}
    assert list(t.filter(like="label:").columns) == ["label:finding"]  # age and site are not 0/1: not labels
    assert (t["image"].map(lambda p: p.startswith(str(tmp_path)))).all()  # relative paths resolved to the CSV's folder
    s = check_task(t, "F & <60", folds=2)
    assert s["F & <60"]["patients"] == 5 and s["rest"]["patients"] == 7


def test_the_worked_example_is_written_and_checked(tmp_path):
    r = ok(["common.table", "example", "--out", str(tmp_path / "ex"), "--nih", "200"], tmp_path)
    assert "table.csv" in r.stdout
    t = pd.read_csv(tmp_path / "ex" / "table.csv")
    assert list(t.columns) == ["path", "patient_id", "sex", "age", "source", "finding", "covid"]
    assert not t["path"].map(lambda p: p.startswith("/")).any()  # relative: the folder can move
    r = ok(check(tmp_path / "ex" / "table.csv", "--group", "sex", "--minority", "F", "--folds", "3",
                 "--labels", "finding"), tmp_path)
    assert "minority 'F' vs the rest, compared on 'finding': passes the table's checks for 3 folds" in r.stdout
    refused(["common.table", "example", "--out", str(tmp_path / "ex")], tmp_path, "exists",
            watch=[tmp_path / "ex"])


def test_image_formats(tmp_path):
    """PNG, JPEG, TIFF, .npy (float in [0, 1] scaled, RGB) and DICOM decode to the same kind of array."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    a = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(a).save(tmp_path / "a.tif")
    np.save(tmp_path / "a.npy", a / 255.0)
    np.save(tmp_path / "rgb.npy", np.stack([a] * 3, -1))
    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, generate_uid()
    meta.MediaStorageSOPInstanceUID = generate_uid()
    d = FileDataset(str(tmp_path / "a.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    d.Rows, d.Columns, d.SamplesPerPixel, d.BitsAllocated, d.BitsStored, d.HighBit = 32, 32, 1, 16, 12, 11
    d.PixelRepresentation, d.PhotometricInterpretation = 0, "MONOCHROME2"
    d.PixelData = (a.astype(np.uint16) * 16).tobytes()  # 12-bit values
    d.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    files = ["a.jpg", "a.tif", "a.npy", "rgb.npy", "a.dcm"]
    x, good = load_images([tmp_path / f for f in files], 32, "L", cache_dir=tmp_path / "cache")
    assert good.all()
    for f, img in zip(files, x):  # the same ramp, left dark and right bright (DICOM windowed to its own range)
        assert abs(img[:, :4].mean() - a[:, :4].mean()) < 12 and abs(img[:, -4:].mean() - a[:, -4:].mean()) < 12, f


def drop_column(df):
    return df.drop(columns=["patient_id"]).assign(subj=df["patient_id"])


CASES = {  # name: (table edit, flags, words the error line must hold)
    "misspelt group column": (None, ["--group", "sexx"], ["'sexx'", "did you mean 'sex'", "'finding'"]),
    "missing patient column": (drop_column, [], ["no patient_id column", "--patient-col", "subj"]),
    "label not 0/1": (lambda d: d.assign(finding=d["finding"].replace({1: 2})), ["--labels", "finding"],
                      ["'finding'", "'2'", "0, 1 or blank"]),
    "patient under two groups": (lambda d: d.assign(sex=np.where(d.index == 1, "F", d["sex"])), [],
                                 ["patient P0", "F and M"]),
    "duplicated rows": (lambda d: pd.concat([d, d.iloc[[3]]]), [], ["img/p1_1.png", "2 times"]),
    "empty table": (lambda d: d.iloc[:0], [], ["no rows"]),
    "continuous group without bands": (None, ["--group", "age"], ["continuous", "--bands age="]),
    "bands of a column not grouped": (None, ["--bands", "age=50"], ["--bands age", "--group"]),
    "bad bands": (None, ["--group", "age", "--bands", "age=60,40"], ["--bands", "increasing"]),
    "most images missing": (lambda d: d.assign(path=np.where(d.index < 10, "gone/x" + d.index.astype(str) + ".png",
                                                                d["path"])), [], ["10 of 24 images", "not on disk",
                                                                                  "--max-missing"]),
    "unknown suffix": (lambda d: d.assign(path=np.where(d.index == 0, "table.csv", d["path"])), [],
                       ["'.csv'", "convert"]),
    "minority not a group": (None, ["--minority", "female"], ["--minority 'female'", "['F', 'M']"]),
    "too few patients for the folds": (None, ["--group", "sex,site", "--minority", "F & B", "--folds", "3"],
                                       ["'F & B'", "2 patients", "6 (2 per fold)"]),
    "label without positives in a group": (lambda d: d.assign(finding=np.where(d["sex"] == "F", 0, d["finding"])),
                                           ["--minority", "F", "--folds", "2"], ["'finding'", "0 positive", "'F'"]),
    "image too small": (None, ["--min-size", "64"], ["32 x 32 px", "64 px", "--min-size"]),
    "no label column": (lambda d: d.drop(columns=["finding"]), [], ["no label column", "--labels"]),
    "most images do not read": ("garble", [], ["14 of 24 images do not read", "more than 10%"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_tables_get_one_line_and_change_nothing(case, tmp_path):
    edit, flags, words = CASES[case]
    csv = user_table(tmp_path / "data", rows=None if edit == "garble" else edit)
    if edit == "garble":
        for p in sorted((tmp_path / "data" / "img").glob("p1*.png")):  # p1_*, p10_* and p11_*: 6 of 24 ...
            p.write_bytes(b"not an image")
        for p in sorted((tmp_path / "data" / "img").glob("p[2-5]_*.png")):  # ... and 8 more
            p.write_bytes(b"not an image")
    refused(check(csv, *flags), tmp_path, words, watch=[tmp_path / "data"])


def test_missing_table_and_dicom_without_pydicom(tmp_path):
    refused(check(tmp_path / "nope.csv"), tmp_path, ["label table not found", "nope.csv"])
    csv = user_table(tmp_path / "data", rows=lambda d: d.assign(path=np.where(d.index == 0, "scan.dcm", d["path"])))
    (tmp_path / "data" / "scan.dcm").write_bytes(b"not read")
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "pydicom.py").write_text("raise ImportError('hidden for this test')\n")
    import os
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, "-m", *check(csv)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "pip install pydicom" in r.stderr


def test_a_few_missing_images_are_left_out_with_a_count(tmp_path):
    csv = user_table(tmp_path, rows=lambda d: d.assign(path=np.where(d.index == 0, "gone.png", d["path"])))
    with pytest.warns(UserWarning, match="1 of 24 images .* not on disk"):
        t = read_table(csv)
    assert len(t) == 23


def test_the_task_table_codes_the_group_asked_about_as_the_studied_side(tmp_path):
    """GROUP=site MINORITY=B: the chest task's side F is site B (whatever the patients' sex), its compared label is
    the primary (stored negated as 'No Finding', last), the other labels come first; read back by --data-root."""
    from common.task_file import TASK_FILE, read_cxr, task_table, write_task_file
    csv = user_table(tmp_path, rows=lambda d: d.assign(effusion=(d.index % 3 == 0).astype(int)))
    t = read_table(csv, groups=["site"], labels=["finding", "effusion"])
    task = task_table(t, "B", "finding")
    assert ((task["sex"] == "F") == (t["group:site"] == "B")).all() and set(task["group"]) == {"A", "B"}
    assert [c for c in task.columns if c.startswith("label:")] == ["label:effusion", "label:No Finding"]
    assert (task["label:No Finding"] == 1 - t["label:finding"]).all()
    assert write_task_file(task, tmp_path / "runs" / TASK_FILE) and not write_task_file(task, tmp_path / "runs" / TASK_FILE)
    back = read_cxr(tmp_path / "runs" / TASK_FILE)
    assert list(back["sex"]) == list(task["sex"]) and list(back["patient_id"]) == list(task["patient_id"])
    assert read_cxr(tmp_path / "runs" / TASK_FILE).filter(like="label:").columns.tolist()[-1] == "label:No Finding"


STUDY = ["classify.chestxray_study", "--smoke", "--dry-run"]
STUDY_CASES = {  # the study refuses, before anything is written: (table edit, flags, words)
    "several labels, none named": (lambda d: d.assign(effusion=d["finding"]), [], ["['finding', 'effusion']",
                                                                               "--labels", "--primary"]),
    "a label called No Finding": (lambda d: d.assign(**{"No Finding": 1 - d["finding"]}), ["--labels",
                                  "finding,No Finding"], ["'No Finding'", "rename"]),
    "two images of one file name": (lambda d: d.assign(path=np.where(d.index == 1, "other/p0_0.png", d["path"])),
                                    [], ["p0_0.png", "file name"]),
    "a table with --plant": (None, ["--plant", "invert:0.5"], ["--table with --plant"]),
    "unknown primary": (None, ["--primary", "effusion"], ["--primary 'effusion'", "['finding']"]),
    "most images do not decode": (None, [], ["do not decode", "more than 10%"]),
}


@pytest.mark.parametrize("case", list(STUDY_CASES), ids=list(STUDY_CASES))
def test_the_study_refuses_a_table_it_cannot_use(case, tmp_path):
    edit, flags, words = STUDY_CASES[case]
    csv = user_table(tmp_path / "data", n_patients=16, rows=edit)
    if case == "two images of one file name":
        write_png(tmp_path / "data" / "other" / "p0_0.png", seed=99)
    if case == "most images do not decode":
        for p in sorted((tmp_path / "data" / "img").glob("p1*.png")):  # p1_*, p10_* ... p15_*: 14 of 32
            p.write_bytes(b"not an image")
    refused([*STUDY, "--table", str(csv), *flags, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")],
            tmp_path, words, watch=[tmp_path / "data"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
