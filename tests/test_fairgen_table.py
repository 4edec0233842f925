"""Your own data in FairGen's study (`diffusion.fairgen_study --table`, `make fairgen DATA=`): the label table becomes
the csv modality (class = group x label), checked before anything is written, and every stage reads it."""
import json

import numpy as np
import pandas as pd
import pytest

from common.modalities import load_modality
from forkserver import python_m
from test_bad_input import refused
from test_table import user_table

STUDY = ["diffusion.fairgen_study", "--smoke", "--dry-run"]


def twenty(folder, rows=None):
    """20 patients (10 F, 10 M), 2 PNGs each, labels finding and effusion."""
    return user_table(folder, n_patients=20, rows=lambda d: (rows or (lambda x: x))(
        d.assign(effusion=(d.index % 3 == 0).astype(int))))


def test_the_csv_modality_reads_a_table_with_a_group_column(tmp_path):
    csv = user_table(tmp_path, rows=lambda d: d.rename(columns={"site": "group"}).drop(columns=["age"]))
    mod = load_modality("csv", 16, csv)
    assert mod.attrs == ["A", "B"] and mod.labels == ["no finding", "finding"]
    assert mod.class_names == ["A|no finding", "A|finding", "B|no finding", "B|finding"]
    assert mod.images.shape == (24, 16, 16)  # the PNGs are greyscale: one channel
    t = pd.read_csv(csv)
    assert list(mod.table["cls"]) == list((t["group"] == "B") * 2 + t["finding"])
    # groups from the most patients to the fewest: the report's gap (first minus last) is largest minus smallest
    csv = user_table(tmp_path / "b", rows=lambda d: d.assign(group=np.where(d["site"] == "A", "Z", "B")))
    assert load_modality("csv", 16, csv).attrs == ["Z", "B"]


CASES = {  # flags (and a table edit) -> words of the one error line
    "one group only": ([], lambda d: d.assign(sex="F"), ["--group sex", "'F'", "two values"]),
    "a group of too few patients": (["--group", "site"], None, ["'B'", "7 patients", "at least 10"]),
    "a label without positives in a group": (["--primary", "effusion"],
                                             lambda d: d.assign(effusion=np.where(d["sex"] == "F", 0, d["effusion"])),
                                             ["'effusion'", "0 positive", "group 'F'"]),
    "a label blank in every row": (["--primary", "effusion"], lambda d: d.assign(effusion=""),
                                   ["'effusion'", "blank in every row"]),
    "a group named with a separator": ([], lambda d: d.assign(sex=d["sex"].replace("F", "F|pregnant")),
                                       ["'F|pregnant'", "rename"]),
    "a group ending in '_'": ([], lambda d: d.assign(sex=d["sex"].replace("F", "F_")), ["'F_'", "rename"]),
    "csv without --table": (["--modalities", "csv"], None, ["--modalities csv", "--table"]),
    "--table without csv": (["--modalities", "cxr"], None, ["--modalities cxr", "add csv"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_study_refuses_a_table_it_cannot_use(case, tmp_path):
    flags, edit, words = CASES[case]
    csv = twenty(tmp_path / "data", edit)
    table = [] if case == "csv without --table" else ["--table", str(csv)]
    refused([*STUDY, *table, "--labels", "finding,effusion", *flags, "--out", str(tmp_path / "out"), "--runs",
             str(tmp_path / "runs")], tmp_path, words, watch=[tmp_path / "data"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_the_csv_modality_takes_one_label(tmp_path):
    csv = twenty(tmp_path, lambda d: d.rename(columns={"sex": "group"}))
    refused(["classify.train_classifier", "--data", "csv", "--data-root", str(csv), "--out-dir",
             str(tmp_path / "clf")], tmp_path, ["['finding', 'effusion']", "keep one"])
    refused(["classify.train_classifier", "--data", "csv", "--out-dir", str(tmp_path / "clf")], tmp_path,
            ["--data csv needs --data-root"])


def test_fairgen_on_a_label_table_end_to_end(tmp_path):
    """The smoke chain on 40 images: every stage reads the run folder's csv table, Table 1 has the table's groups,
    the report says which table, column and label its classes come from; a second dry run reuses every stage. One
    generator per method (the smoke chain test in test_fairgen.py runs two)."""
    csv = twenty(tmp_path / "data")
    argv = ["--smoke", "--table", str(csv), "--group", "sex", "--labels", "effusion,finding", "--kinds", "knn",
            "--gen-seeds", "1", "--n-boot", "20", "--n-boot-compare", "40", "--out", str(tmp_path / "out"), "--runs",
            str(tmp_path / "runs")]
    r = python_m("diffusion.fairgen_study", argv, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    written = pd.read_csv(tmp_path / "runs" / "csv_table.csv")
    assert list(written.columns) == ["path", "patient_id", "group", "effusion"]  # the first label is the one used
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())["stages"]
    assert all(f"--data-root {tmp_path}/runs/csv_table.csv" in s for s in stages if "--data " in s)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())["modalities"]["csv"]["seed0"]
    assert plan["attrs"] == ["F", "M"] and plan["labels"] == ["no effusion", "effusion"]
    assert plan["notes"][0].startswith(f"Your data: label table {csv}; attribute: group column(s) sex")
    preds = pd.read_csv(tmp_path / "out" / "preds_csv.csv")
    assert set(preds["group"]) == {"F", "M"}
    assert "Your data: label table" in (tmp_path / "out" / "table1.md").read_text()
    again = python_m("diffusion.fairgen_study", [*argv, "--dry-run"], timeout=300)
    assert again.returncode == 0 and all(line.startswith("# ") for line in again.stdout.splitlines() if line)


def test_a_batch_norm_network_skips_a_last_batch_of_one_image():
    """65 training images in batches of 64 leave one: ResNet-50's batch norm cannot train on it (it used to stop the
    downstream stage of a table of that size); the batch is skipped and the network trains on the rest."""
    import torch
    from classify.downstream import fit_predict
    g = torch.Generator().manual_seed(0)
    x = torch.rand(65, 1, 16, 16, generator=g) * 2 - 1
    y, groups = np.arange(65) % 2, np.array(["a", "b"] * 32 + ["a"])
    p = fit_predict("resnet50", (x, y, groups), (x[:8], y[:8], groups[:8]), x[:4], 2, epochs=1)
    assert p.shape == (4, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
