"""Chest X-ray chain: CVAE (resume, samples), CheXNet trainer, the study end to end on a handful of images."""
import json
from pathlib import Path
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from classify.train_chexnet import OUTPUTS, class_weights, epoch_order, targets
from common.data import NIH_LABELS
from common.runs import cpu_has_bf16, load_checkpoint
from fairness.metrics import auroc
from forkserver import python_m
from same_numbers import check_same_seed_same_numbers


def run(module, *args, timeout=600):
    r = python_m(module, args, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_targets_turn_no_finding_into_any_finding():
    y = np.zeros((2, 15), np.uint8)
    y[0, 14] = 1  # No Finding
    y[1, [0, 4]] = 1  # Atelectasis, Effusion
    t = targets(y)
    assert t.shape == (2, 15) and OUTPUTS[-1] == "any finding"
    assert t[0].tolist() == [0] * 15 and t[1, 14] == 1 and t[1, [0, 4]].tolist() == [1, 1]


def test_class_weights_chexnet_and_pos_weight():
    # 4 images, 3 outputs: 1 positive, 2 positives, none
    y = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float)
    w_pos, w_neg = class_weights(y, "chexnet")  # w+ = N / (P + N), w- = P / (P + N)
    assert w_pos.tolist() == [0.75, 0.5, 1.0] and w_neg.tolist() == [0.25, 0.5, 1.0]
    w_pos, w_neg = class_weights(y, "pos_weight")  # w+ = N / P, w- = 1
    assert w_pos.tolist() == [3.0, 1.0, 1.0] and w_neg.tolist() == [1.0, 1.0, 1.0]
    # the per-element weights reproduce torch's pos_weight loss exactly
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4], [-0.7, 0.9, 0.2], [0.0, -2.0, 1.1]])
    ours = F.binary_cross_entropy_with_logits(logits, y, weight=y * w_pos + (1 - y) * w_neg)
    ref = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor([3.0, 1.0, 1.0]))
    assert torch.allclose(ours, ref)


def test_epoch_order_gives_small_sets_the_same_number_of_updates():
    gen = torch.Generator().manual_seed(0)
    order = epoch_order(5, 12, None, gen)  # passes over 5 images: 5 + 5 + 2
    assert len(order) == 12
    assert sorted(order[:5].tolist()) == sorted(order[5:10].tolist()) == list(range(5))
    assert len(set(order[10:].tolist())) == 2
    w = np.array([0.0, 0.0, 1.0])  # weights: only index 2 can be drawn
    assert epoch_order(3, 7, w, gen).tolist() == [2] * 7


def test_cvae_resume_equals_an_unbroken_run_and_samples(tmp_path):
    common = ["--limit", "48", "--batch-size", "16", "--patience", "50", "--device", "cpu"]
    run("vae.train_cvae", *common, "--epochs", "3", "--out-dir", str(tmp_path / "a"))
    run("vae.train_cvae", *common, "--epochs", "1", "--out-dir", str(tmp_path / "b"))
    r = run("vae.train_cvae", *common, "--epochs", "3", "--out-dir", str(tmp_path / "b"), "--resume")
    assert "at epoch 1" in r.stdout
    a, b = load_checkpoint(tmp_path / "a/ckpt.pt"), load_checkpoint(tmp_path / "b/ckpt.pt")
    assert all(torch.allclose(a["last"][k].float(), b["last"][k].float()) for k in a["last"])
    assert [h["val_loss"] for h in a["history"]] == pytest.approx([h["val_loss"] for h in b["history"]])
    # --amp auto: bf16 on a CPU with bf16 instructions (its check agreed, results/bench/bf16_cvae30), else fp32
    assert json.loads((tmp_path / "a/metrics.json").read_text())["bf16_autocast"] == cpu_has_bf16() == a["bf16"]
    for f in ("samples.png", "recon.png", "loss_curve.png", "metrics.json", "config.json"):
        assert (tmp_path / "a" / f).stat().st_size > 0
    run("vae.sample_cvae", "--ckpt", str(tmp_path / "a/ckpt.pt"), "--n", "20", "--out", str(tmp_path / "s.npz"))
    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (20, 64, 64) and z["images"].dtype == np.uint8
    pool = a["train_labels"].numpy()  # labels come from the CVAE's own (female, training-split) images
    assert all((row == pool).all(1).any() for row in z["labels"]) and list(z["label_names"]) == NIH_LABELS


def test_cvae_resume_refuses_a_checkpoint_of_the_other_arithmetic(tmp_path):
    """A run trained in fp32 is not continued in bf16 (nor the reverse): the refusal names both and the fix."""
    common = ["--limit", "16", "--batch-size", "8", "--device", "cpu", "--out-dir", str(tmp_path / "a")]
    run("vae.train_cvae", *common, "--epochs", "1", "--amp", "off")
    r = python_m("vae.train_cvae", [*common, "--epochs", "2", "--amp", "bf16", "--resume"], timeout=600)
    if cpu_has_bf16():
        assert r.returncode != 0 and "was trained in fp32, this run would continue in bf16" in r.stderr
        assert "--amp off" in r.stderr
    else:  # --amp bf16 itself is refused here, before the checkpoint is read
        assert r.returncode != 0 and "this CPU has no bf16 instructions" in r.stderr
    assert len(json.loads((tmp_path / "a/metrics.json").read_text())["history"]) == 1  # nothing overwritten
    ck = load_checkpoint(tmp_path / "a/ckpt.pt")
    del ck["bf16"]  # a checkpoint of an older train_cvae.py: its arithmetic is unknown, so it is not continued
    torch.save(ck, tmp_path / "a/ckpt.pt")
    r = python_m("vae.train_cvae", [*common, "--epochs", "2", "--amp", "off", "--resume"], timeout=600)
    assert r.returncode != 0 and "does not record whether it trained in bf16 or fp32" in r.stderr


def test_chestxray_study_smoke_chain(smoke_study):
    out, runs, _ = smoke_study("classify.chestxray_study")  # --size 32: the CVAE's 64 px samples are resized
    s = json.loads((out / "summary.json").read_text())
    assert s["scale"] == "smoke" and set(s["conditions"]) == {"balanced_real", "imbalanced_real",
                                                               "imbalanced_synth", "imbalanced_reweight"}
    c = s["conditions"]
    assert c["imbalanced_synth"]["n_synthetic"] > 0 and c["imbalanced_real"]["n_synthetic"] == 0
    assert c["balanced_real"]["n_train_female"] == c["balanced_real"]["n_train_male"]
    assert c["imbalanced_real"]["n_train_female"] < c["imbalanced_real"]["n_train_male"] / 5
    for k in ("any_auroc", "any_auroc_ci", "any_auroc_female", "any_auroc_male", "mean_auroc", "mean_auroc_ci"):
        assert k in c["balanced_real"]
    for f in ("fairness.md", "table_balanced_real.md", "auroc_by_sex.png", "cvae_samples.png", "comparisons.md"):
        assert (out / f).is_file()
    # every comparison is recomputable from preds.csv.gz: one row per test image and condition, each image once
    preds = pd.read_csv(out / "preds.csv.gz")
    assert len(preds) == 4 * s["n_images"] and preds.groupby("condition")["image"].nunique().eq(s["n_images"]).all()
    assert {"image", "patient_id", "sex", "fold", "seed", "condition", "y_any_finding", "p_any_finding",
            "thr_any_finding"} <= set(preds.columns)
    rows = s["comparisons"]
    assert len(rows) == 20 and all({"metric", "a", "b", "diff", "ci", "p", "p_holm", "mde", "n_units",
                                    "replicates"} <= set(r) for r in rows)
    assert all(r["p_holm"] >= r["p"] for r in rows) and rows[0]["n_units"] == s["n_patients"]
    times = s["stage_times"]  # where the time went: every stage's own seconds, summed by kind
    assert len(times["per_stage"]) == len(json.loads((out / "stages.json").read_text())["stages"])
    assert times["by_kind"]["not recorded"] == 0 and all(t["run_s"] > 0 for t in times["per_stage"])
    assert times["by_kind"]["generator training"] > 0 and times["by_kind"]["classifier training"] > 0
    # the four declared questions are the primary family (Holm over them alone); the other 16 rows are exploratory
    assert sum(r["primary"] for r in rows) == 4 == len(s["answers"]) and s["primary_family_size"] == 4
    assert s["min_holm_p"] == pytest.approx(8 / 51) and s["n_boot"] == 50  # smoke: 50 resamples cannot reject
    assert {r["metric"] for r in rows if r["primary"]} == {"female AUROC", "AUROC gap (M - F)"}
    # the female-AUROC difference of synth vs imbalanced, recomputed from the file by hand
    f = preds[(preds.sex == "F")]
    by = {c: d.sort_values("image") for c, d in f.groupby("condition")}
    hand = (auroc(by["imbalanced_synth"].y_any_finding, by["imbalanced_synth"].p_any_finding)
            - auroc(by["imbalanced_real"].y_any_finding, by["imbalanced_real"].p_any_finding))
    row = next(r for r in rows if r["metric"] == "female AUROC" and r["a"] == "imbalanced_synth"
               and r["b"] == "imbalanced_real")
    assert row["diff"] == pytest.approx(hand)
    assert s["answers"] and all("95% CI" in a for a in s["answers"])
    # the study is its stage commands: a CVAE, its samples and 4 classifiers per fold, each a folder of files
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert len(stages) == 2 * 6 and sum("-m classify.train_chexnet" in c for c in stages) == 8
    assert all((runs / f"fold{k}" / c / "preds.csv").is_file() for k in range(2) for c in s["conditions"])
    # no CVAE saw its fold's test or validation patients
    for k in range(2):
        sets = pd.read_csv(runs / f"fold{k}" / "sets.csv")
        pid = dict(zip(preds.image, preds.patient_id))
        held_out = {pid[i] for i in sets[sets.set.isin(["test", "val"])].image}
        assert held_out and not held_out & {pid[i] for i in sets[sets.set == "cvae_train"].image}


def test_chestxray_report_only_rebuilds_the_report_from_the_files(smoke_study, tmp_path):
    out, _, _ = smoke_study("classify.chestxray_study")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run("classify.chestxray_report", "--n-boot", "30", "--out", str(copy))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, copy))
    assert [r["diff"] for r in a["comparisons"]] == [r["diff"] for r in b["comparisons"]]  # same preds, same points
    assert "30 resamples" in (copy / "comparisons.md").read_text() and a["scale"] == b["scale"] == "smoke"


def test_chestxray_dry_run_prints_the_stages_and_writes_nothing(tmp_path):
    r = python_m("classify.chestxray_study", ["--smoke", "--dry-run", "--out",
                                              str(tmp_path / "out"), "--runs", str(tmp_path / "runs")])
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("python -m")]
    assert len(lines) == 12 and lines[0].startswith("python -m vae.train_cvae") and "--epochs 2" in lines[2]
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
    # a flag the user passes reaches every classifier stage
    r = python_m("classify.chestxray_study", ["--smoke", "--dry-run", "--epochs", "5",
                                              "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")])
    assert sum("--epochs 5 " in l for l in r.stdout.splitlines() if "train_chexnet" in l) == 8


def test_chestxray_study_runs_a_subset_of_conditions_without_the_cvae_and_replicates(tmp_path):
    """Two conditions, no CVAE, 2 training seeds per condition and fold: every replicate's predictions are in
    preds.csv.gz, the comparisons resample them (the two-level bootstrap), and the point is the mean over replicates
    of the per-replicate difference, recomputed here from the file."""
    out, runs = tmp_path / "sub", tmp_path / "runs"
    run("classify.chestxray_study", "--smoke", "--size", "32", "--conditions", "balanced_real,imbalanced_real",
        "--replicates", "2", "--out", str(out), "--runs", str(runs))
    s = json.loads((out / "summary.json").read_text())
    assert list(s["conditions"]) == ["balanced_real", "imbalanced_real"] and s["replicates"] == 2
    assert not (out / "cvae_samples.png").exists() and not (runs / "fold0" / "cvae").exists()  # no CVAE trained
    preds = pd.read_csv(out / "preds.csv.gz")
    assert len(preds) == 2 * 2 * s["n_images"] and sorted(preds.replicate.unique()) == [0, 1]
    seeds = preds.groupby(["fold", "replicate"])["seed"].unique()
    assert all(len(v) == 1 for v in seeds) and seeds.map(lambda v: v[0]).nunique() == 4  # a seed per fold and run
    assert (runs / "fold1" / "balanced_real_rep1" / "preds.csv").is_file()
    row = next(r for r in s["comparisons"] if r["metric"] == "female AUROC")
    assert row["replicates"] == 2 and "two-level bootstrap" in row["method"] and row["n_units"] == s["n_patients"]
    f = preds[preds.sex == "F"]
    hand = np.mean([auroc(d[d.condition == "balanced_real"].sort_values("image").y_any_finding,
                          d[d.condition == "balanced_real"].sort_values("image").p_any_finding)
                    - auroc(d[d.condition == "imbalanced_real"].sort_values("image").y_any_finding,
                            d[d.condition == "imbalanced_real"].sort_values("image").p_any_finding)
                    for _, d in f.groupby("replicate")])
    assert row["diff"] == pytest.approx(hand)
    assert "2 training runs (seeds) per condition and fold" in (out / "comparisons.md").read_text()
    r = python_m("classify.chestxray_study", ["--conditions", "balanced,real"])
    assert r.returncode == 2 and "unknown balanced, real" in r.stderr


def test_train_chexnet_end_to_end_writes_what_reloads_and_recomputes(tmp_path):
    """The stage script alone: its checkpoint rebuilds the net and gives the saved test predictions again, and its
    metrics.json AUROC is recomputed from preds.csv; the same seed gives the same file."""
    from classify.nets import load_classifier
    common = ["--arch", "cnn8", "--width", "4", "--size", "32", "--epochs", "1", "--batch-size", "64", "--seed", "3"]
    run("classify.train_chexnet", *common, "--out-dir", str(tmp_path / "a"))
    run("classify.train_chexnet", *common, "--out-dir", str(tmp_path / "b"))
    preds = pd.read_csv(tmp_path / "a/preds.csv")
    m = json.loads((tmp_path / "a/metrics.json").read_text())
    assert preds["y_any_finding"].sum() == m["test"][-1]["positives"] and len(preds) > 100
    assert set(preds["split"]) == {"test"} and set(preds["seed"]) == {3} and preds["image"].is_unique
    assert m["test"][-1]["auroc"] == pytest.approx(auroc(preds.y_any_finding, preds.p_any_finding))
    assert (tmp_path / "b/preds.csv").read_text() == (tmp_path / "a/preds.csv").read_text()
    net, ckpt = load_classifier(tmp_path / "a/ckpt.pt")
    from common.cache import load_images
    from common.data import PROJECT_DATA, read_nih
    names = set(preds["image"])
    t = read_nih(PROJECT_DATA / "nih_cxr14")
    t = t[[Path(i).name in names for i in t["image"]]].sort_values("image")
    x = torch.from_numpy(load_images(t["image"], 32, "L")[0]).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        again = torch.sigmoid(net.eval()(x))[:, -1].numpy()
    saved = preds.sort_values("image")["p_any_finding"].to_numpy()
    assert np.allclose(again, saved, atol=1e-5)


def test_chestxray_report_rebuilds_from_a_plain_preds_file(smoke_study, tmp_path):
    """The study writes its predictions gzipped (preds.csv.gz, the same bytes each run); a run committed before that
    holds them as text (preds.csv), from which the report rebuilds the same comparisons; a folder with neither file
    is refused in one line."""
    import gzip
    out, _, _ = smoke_study("classify.chestxray_study")
    assert (out / "preds.csv.gz").read_bytes()[4:8] == bytes(4)  # gzip's mtime field: 0, not the time of the run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with gzip.open(copy / "preds.csv.gz", "rb") as f, open(copy / "preds.csv", "wb") as g:
        g.write(f.read())
    (copy / "preds.csv.gz").unlink()
    r = python_m("classify.chestxray_report", ["--out", str(copy)], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((copy / "summary.json").read_text())["comparisons"] == \
        json.loads((out / "summary.json").read_text())["comparisons"]
    (copy / "preds.csv").unlink()
    r = python_m("classify.chestxray_report", ["--out", str(copy)], timeout=600)
    assert r.returncode != 0 and "no preds.csv.gz or preds.csv here" in r.stderr and "Traceback" not in r.stderr


def test_same_seed_same_numbers(smoke_study, tmp_path):
    """Every stage script of the smoke chain rerun writes the same file; the study rerun on its stages reuses them
    all and writes the same summary (tests/same_numbers.py)."""
    check_same_seed_same_numbers("chestxray", smoke_study, tmp_path)
