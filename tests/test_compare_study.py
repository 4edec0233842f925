"""`make compare` (classify/compare_study.py): the DCGAN and the conv AE (end to end, same seed, resume, planted
signal), the classifier's new rows (class-conditional samples, sex loss weights, classic augmentation), and the
study's smoke chain: every row, the summary's fields, no generator trained on its fold's test or validation
patients."""
import json
from pathlib import Path
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from classify.train_chexnet import OUTPUTS, classic_jitter, jitter, read_synthetic, sex_loss_weights
from common.runs import cpu_has_bf16, load_checkpoint, seed_everything
from common.stages import run_in_process
from common.splits import read_sets
from conftest import ROOT
from forkserver import python_m


def run(module, *args, timeout=600):
    r = python_m(module, args, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def call(module, *args):
    """`python -m module args` in this process (no interpreter start: the scripts' tests are many short runs)."""
    run_in_process(module, [str(a) for a in args], module)


def brightness_by_attr(path):
    """{attribute: mean of each sample's brightest 10% of pixels} of a toy samples file (bright vs dark shapes)."""
    z = np.load(path)
    top = np.sort(z["images"].reshape(len(z["images"]), -1), 1)[:, -z["images"][0].size // 10:].mean(1)
    return {g: float(top[z["groups"] == g].mean()) for g in set(z["groups"].tolist())}


DCGAN = ["--data", "toy:400", "--size", "16", "--width", "32", "--batch-size", "32"]


def test_dcgan_end_to_end_same_seed_resume_and_planted_signal(tmp_path, capsys):
    """Toy shapes whose attribute is their brightness (230 vs 140 on 20): after 300 steps the generator draws the
    bright classes brighter, from the class it is given alone; the same seed gives the same images; a run resumed
    at step 10 equals an unbroken one; the samples file and grid are what the classifier and the audit read."""
    call("gan.train_dcgan", *DCGAN, "--steps", "300", "--out-dir", tmp_path / "a")
    for f in ("samples.png", "loss_curve.png"):
        assert (tmp_path / "a" / f).stat().st_size > 5000
    m = json.loads((tmp_path / "a/metrics.json").read_text())
    assert m["steps"] == 300 and np.isfinite([m["final_d_loss_mean_last_100"], m["final_g_loss_mean_last_100"]]).all()
    for out in ("s1.npz", "s2.npz"):
        call("gan.sample_dcgan", "--ckpt", tmp_path / "a/ckpt.pt", "--n-per-class", "40", "--seed", "3", "--out",
             tmp_path / out)
    z1, z2 = np.load(tmp_path / "s1.npz"), np.load(tmp_path / "s2.npz")
    assert np.array_equal(z1["images"], z2["images"])  # same seed, same images
    assert z1["images"].shape == (160, 16, 16) and z1["images"].dtype == np.uint8
    assert list(z1["class_names"]) == ["dark|disc", "dark|square", "bright|disc", "bright|square"]
    b = brightness_by_attr(tmp_path / "s1.npz")
    assert b["bright"] > b["dark"] + 40, b  # the planted signal: 230 vs 140 in the data
    call("gan.train_dcgan", *DCGAN, "--steps", "20", "--out-dir", tmp_path / "b")
    call("gan.train_dcgan", *DCGAN, "--steps", "10", "--out-dir", tmp_path / "c")
    capsys.readouterr()
    call("gan.train_dcgan", *DCGAN, "--steps", "20", "--out-dir", tmp_path / "c", "--resume")
    assert "at step 10" in capsys.readouterr().out
    a, b = load_checkpoint(tmp_path / "b/ckpt.pt"), load_checkpoint(tmp_path / "c/ckpt.pt")
    assert all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"]) and a["history"] == b["history"]


def test_dcgan_under_bf16_autocast_resumes_only_in_its_own_arithmetic(tmp_path, capsys, monkeypatch):
    """--amp bf16 (bench/bf16_agreement.py --loop dcgan runs it against fp32; emulated where the CPU lacks bf16): the
    same seed's first steps move G's fp32 weights near fp32's steps but not identically, losses finite; --resume
    refuses a checkpoint trained in the other arithmetic, naming the difference, and reads a checkpoint from before
    --amp (no "bf16" recorded) as fp32; --amp bf16 is refused in one line on a CPU without bf16."""
    import common.runs
    from common.errors import DataError
    from gan.train_dcgan import build
    monkeypatch.setattr(common.runs, "cpu_has_bf16", lambda: True)
    for amp in ("off", "bf16"):
        call("gan.train_dcgan", *DCGAN, "--steps", "5", "--amp", amp, "--out-dir", tmp_path / amp)
    a, b = load_checkpoint(tmp_path / "off/ckpt.pt"), load_checkpoint(tmp_path / "bf16/ckpt.pt")
    assert json.loads((tmp_path / "bf16/metrics.json").read_text())["bf16_autocast"] is True
    assert np.isfinite(b["history"]).all()
    seed_everything(0)  # the runs' seed: their initial weights
    w0 = build(a["model_args"])[0].state_dict()
    keys = [k for k in w0 if w0[k].is_floating_point() and "running" not in k]
    step32 = torch.cat([(a["G"][k] - w0[k]).flatten() for k in keys])
    step16 = torch.cat([(b["G"][k] - w0[k]).flatten() for k in keys])
    assert 0 < (step16 - step32).norm() < 0.2 * step32.norm()
    capsys.readouterr()
    with pytest.raises(DataError, match="stage failed"):
        call("gan.train_dcgan", *DCGAN, "--steps", "10", "--amp", "off", "--out-dir", tmp_path / "bf16", "--resume")
    assert "bf16: checkpoint True, this run False" in capsys.readouterr().err
    old = {**a, "data_args": {k: v for k, v in a["data_args"].items() if k != "bf16"}}  # saved before --amp existed
    torch.save(old, tmp_path / "off/ckpt.pt")
    call("gan.train_dcgan", *DCGAN, "--steps", "10", "--amp", "off", "--out-dir", tmp_path / "off", "--resume")
    assert "at step 5" in capsys.readouterr().out
    monkeypatch.setattr(common.runs, "cpu_has_bf16", lambda: False)
    import gan.train_dcgan

    def no_data(*a, **k):
        raise AssertionError("data read before --amp was checked")
    monkeypatch.setattr(gan.train_dcgan, "training_images", no_data)
    with pytest.raises(DataError, match="stage failed"):
        call("gan.train_dcgan", *DCGAN, "--steps", "5", "--amp", "bf16", "--out-dir", tmp_path / "c")
    assert "--amp bf16: this CPU has no bf16 instructions" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_bf16_check_dcgan_distance_sees_a_worse_generator(monkeypatch):
    """bench/bf16_agreement.py --loop dcgan's validation measure: a "generator" that returns NIH1000 training images
    of the class asked for is far closer to the split's validation images than one that returns their mean image
    (80 vs 518 measured; training images of the other sex are not reliably farther: within the spread of draws);
    the validation images themselves are at ~0."""
    import gan.sample_dcgan
    import gan.train_dcgan
    from common.modalities import training_images
    sys.path.insert(0, str(ROOT / "bench"))
    from bf16_agreement import dcgan_fd
    _, tr, tr_cls = training_images("nih", 64, None, "train")
    _, va, va_cls = training_images("nih", 64, None, "val")
    rng = np.random.default_rng(0)
    monkeypatch.setattr(gan.sample_dcgan, "load_generator", lambda path: (None, {"history": [[1, 0.5, 0.5, 0, 0]]}))

    def fd(draw):
        monkeypatch.setattr(gan.train_dcgan, "generate",
                            lambda G, classes, seed=0: torch.from_numpy(draw(np.asarray(classes))).float() / 127.5 - 1)
        return dcgan_fd(Path("unused"))["val_fd"]
    real = fd(lambda c: tr[[rng.choice(np.flatnonzero(tr_cls == k)) for k in c]])
    assert fd(lambda c: va[np.repeat(np.arange(len(va)), 4)]) < 1e-3 * real  # not 0: each image 4 times (ddof)
    assert fd(lambda c: np.repeat(tr.mean(0, keepdims=True), len(c), 0).round().astype(np.uint8)) > 2 * real


def test_conv_ae_end_to_end_same_seed_resume_and_planted_signal(tmp_path, capsys):
    """The AE's interpolations of same-class codes keep the class's brightness; --class-counts draws exactly the
    counts asked; the same seed gives the same images; a run resumed after epoch 1 equals an unbroken one."""
    common = ["--data", "toy:120", "--batch-size", "32", "--patience", "0"]
    call("vae.train_conv_ae", *common, "--epochs", "2", "--out-dir", tmp_path / "b")
    call("vae.train_conv_ae", *common, "--epochs", "1", "--out-dir", tmp_path / "c")
    capsys.readouterr()
    call("vae.train_conv_ae", *common, "--epochs", "2", "--out-dir", tmp_path / "c", "--resume")
    assert "at epoch 1" in capsys.readouterr().out
    b, c = load_checkpoint(tmp_path / "b/ckpt.pt"), load_checkpoint(tmp_path / "c/ckpt.pt")
    assert all(torch.allclose(b["model"][k].float(), c["model"][k].float()) for k in b["model"])
    call("vae.train_conv_ae", *common, "--epochs", "12", "--out-dir", tmp_path / "a")
    a = load_checkpoint(tmp_path / "a/ckpt.pt")
    assert a["codes"].shape == (84, 128) and len(a["classes"]) == 84  # the 70% training split of 120 images
    assert (tmp_path / "a/recon.png").stat().st_size > 5000
    counts = "dark|disc=7,bright|square=13"
    for out in ("s1.npz", "s2.npz"):
        call("vae.sample_conv_ae", "--ckpt", tmp_path / "a/ckpt.pt", "--class-counts", counts, "--out", tmp_path / out)
    z1, z2 = np.load(tmp_path / "s1.npz"), np.load(tmp_path / "s2.npz")
    assert np.array_equal(z1["images"], z2["images"])
    assert np.bincount(z1["labels"], minlength=4).tolist() == [7, 0, 0, 13]
    b = brightness_by_attr(tmp_path / "s1.npz")
    assert b["bright"] > b["dark"] + 25, b
    metrics = json.loads((tmp_path / "a/metrics.json").read_text())
    assert len(metrics["history"]) == 12 and metrics["bf16_autocast"] == cpu_has_bf16()  # its bf16 check agreed


def test_conv_ae_trains_under_bf16_autocast_where_asked(tmp_path, capsys, monkeypatch):
    """--amp bf16 (bench/bf16_agreement.py --loop convae runs it against fp32): the training steps in bf16, the loss
    and the validation MSE in fp32, finite; refused in one line on a CPU without bf16 instructions."""
    import common.runs
    from common.errors import DataError
    args = ["--data", "toy:120", "--batch-size", "32", "--epochs", "2", "--amp", "bf16", "--out-dir", tmp_path / "a"]
    if common.runs.cpu_has_bf16():
        call("vae.train_conv_ae", *args)
        m = json.loads((tmp_path / "a/metrics.json").read_text())
        assert m["bf16_autocast"] is True and all(np.isfinite([h["loss"], h["val_mse"]]).all() for h in m["history"])
    monkeypatch.setattr(common.runs, "cpu_has_bf16", lambda: False)
    with pytest.raises(DataError, match="stage failed"):
        call("vae.train_conv_ae", *args[:-1], tmp_path / "b")
    assert "--amp bf16: this CPU has no bf16 instructions" in capsys.readouterr().err


def test_class_samples_train_the_any_finding_output_only(tmp_path):
    """A class-conditional samples file ('F|finding' ...) becomes NIH label vectors whose 14 findings carry no loss;
    a class name that is not an NIH any-finding class is refused."""
    names = np.array(["F|No Finding", "F|finding", "M|No Finding", "M|finding"])
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 1, 3]),
             groups=np.array(["F", "F", "F", "M"]), class_names=names)
    x, y, known = read_synthetic(tmp_path / "s.npz")
    assert x.shape == (4, 1, 8, 8) and y[:, -1].tolist() == [1, 0, 0, 0] and y[:, :14].sum() == 0
    assert known.shape == (4, len(OUTPUTS)) and known[:, -1].all() and not known[:, :14].any()
    np.savez(tmp_path / "bad.npz", images=np.zeros((1, 8, 8), np.uint8), labels=np.array([0]),
             class_names=np.array(["dark|disc"]))
    from common.errors import DataError
    with pytest.raises(DataError, match="any-finding"):
        read_synthetic(tmp_path / "bad.npz")


def test_sex_loss_weights_give_each_sex_half_and_classic_jitter_flips():
    w = sex_loss_weights(np.array(["M"] * 9 + ["F"]))
    assert w[:9].sum() == pytest.approx(w[9]) and w.mean() == pytest.approx(1.0)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    theta, _, _ = classic_jitter(4000, g1)
    flipped = (theta[:, 0, 0] < 0).float().mean().item()  # the x axis reversed: about half
    assert 0.45 < flipped < 0.55
    light, _, _ = jitter(4000, g2)
    assert (light[:, 0, 0] > 0).all()  # the default never flips (the heart is on the left)


def chexpert_root(root, n=24):
    """A CheXpert-layout folder (train.csv, CheXpert-v1.0-small/train/patientN/studyM/view1_frontal.jpg) of NIH
    images, for --ood-root: half women, half without a finding, one lateral view (left out)."""
    from PIL import Image
    from common.data import CHEXPERT_LABELS
    nih = sorted((ROOT / "data" / "nih_cxr14").rglob("*.png"))[:n + 1]
    rows = []
    for i, src in enumerate(nih):
        path = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study{i}/view1_{'lateral' if i == n else 'frontal'}.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("L").resize((64, 64)).save(root / path)
        row = {"Path": path, "Sex": "Female" if i // 2 % 2 else "Male", "Age": 50,
               "Frontal/Lateral": "Lateral" if i == n else "Frontal", "AP/PA": "PA"}
        row.update({c: np.nan for c in CHEXPERT_LABELS})
        row["No Finding"] = 1.0 if i % 3 == 0 else np.nan
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


@pytest.fixture(scope="module")
def compare_smoke(tmp_path_factory):
    """The compare study's smoke chain on your own data, as `make compare DATA=... SMOKE=1` runs it: the worked
    example's label table (the embedded NIH + COVID-19 images, written by `python -m common.table example`), the
    chest X-ray study on it (--table), then compare on that run (its plan.json, split files and cells, read as
    files), with a CheXpert-layout --ood-root. (test_chestxray.py runs chestxray's smoke chain on NIH's folder.)"""
    base = tmp_path_factory.mktemp("compare")
    run("common.table", "example", "--out", str(base / "example"))
    run("classify.chestxray_study", "--smoke", "--table", str(base / "example" / "table.csv"), "--labels",
        "finding,covid", "--out", str(base / "cx"), "--runs", str(base / "runs,finding,covid"), timeout=1800)
    r = run("classify.compare_study", "--smoke", "--chestxray", str(base / "cx"), "--ood-root",
            str(chexpert_root(base / "chexpert")), "--out", str(base / "out"), timeout=1800)
    return base / "out", base / "runs,finding,covid", r  # a comma, as in make's folders for your labels


def test_compare_smoke_has_every_row_and_field(compare_smoke):
    from classify.compare_study import ROWS
    out, runs, r = compare_smoke
    stages = json.loads((out / "stages.json").read_text())["stages"]  # chestxray's cells are read, never rerun
    assert stages and not any(f"condition={c}" in line for line in stages for c in
                              ("balanced_real", "imbalanced_real", "imbalanced_reweight", "imbalanced_synth"))
    s = json.loads((out / "summary.json").read_text())
    family = s["sweep"]["family"]
    assert family in ("ae", "vae", "gan", "ddpm")
    assert set(s["rows"]) == set(ROWS) | {f"{family}_x{r:g}" for r in s["sweep"]["ratios"] if r != 1}
    assert len(s["sweep"]["ratios"]) >= 3
    for row, d in s["rows"].items():
        for m in ("any-finding AUROC", "female AUROC", "male AUROC"):
            assert 0 <= d["utility"][m]["value"] <= 1
        assert set(d["fairness"]) == {"AUROC gap (M - F)", "|AUROC gap|", "DP (any finding)", "EO (any finding)"}
        if row != "imbalanced_real":
            c = d["vs_imbalanced_real"]["female AUROC"]
            assert c["b"] == "imbalanced_real" and 0 <= c["p_holm"] <= 1 and c["mde"] > 0
    for row in ("ae", "gan", "ddpm"):  # class-conditional: fidelity and privacy for both sexes
        f = s["rows"][row]
        assert set(f["fidelity"]) == {"F", "M"} and all(np.isfinite(f["fidelity"][x]["kid"]) for x in "FM")
        assert 0 <= f["privacy"]["F"]["fraction_closer_than_pool_p1"] <= 1 and f["cost"]["train_s_per_fold"] > 0
    assert set(s["rows"]["vae"]["fidelity"]) == {"F"}  # the CVAE draws women only
    import gan.train_dcgan
    import vae.train_conv_ae
    import vae.train_cvae
    word = lambda checked: "bf16 autocast" if checked and cpu_has_bf16() else "fp32"  # the DDPM: fp32 on CPUs
    if not torch.cuda.is_available():  # the smoke study runs on --device auto
        assert (f"arithmetic (generator seed 0): ae {word(vae.train_conv_ae.BF16_CHECKED)}, vae "
                f"{word(vae.train_cvae.BF16_CHECKED)}, gan {word(gan.train_dcgan.BF16_CHECKED)}, ddpm fp32"
                ) in (out / "table.md").read_text()
    metrics = {c["metric"] for c in s["comparisons"]}
    nih = {"any-finding AUROC", "female AUROC", "male AUROC", "AUROC gap (M - F)", "|AUROC gap|"}
    assert metrics == nih | {"DP (any finding)", "EO (any finding)"} | {f"OOD {m}" for m in nih}
    assert any(c["a"] == "ddpm" and c["b"] == "ddpm_finding_only" for c in s["comparisons"])
    p_holm = [c["p_holm"] for c in s["comparisons"]]  # Holm within each family: adjusted p never below raw p
    assert all(h >= c["p"] - 1e-12 for h, c in zip(p_holm, s["comparisons"]) if np.isfinite(h))
    primary = {(c["metric"], c["a"]) for c in s["comparisons"] if c["primary"]}  # declared: 4 families x 2 outcomes
    assert primary == {(m, f) for f in ("ae", "vae", "gan", "ddpm") for m in ("female AUROC", "AUROC gap (M - F)")}
    assert s["primary_family_size"] == 8 and s["min_holm_p"] == pytest.approx(2 * 8 / 51)
    assert "no balanced_real row" not in str(s["recovery"])  # a share per row, or why there is none
    assert "reason" in s["recovery"] or set(s["recovery"]["rows"]) == set(s["rows"]) - {"balanced_real",
                                                                                        "imbalanced_real"}
    assert "The baseline (imbalanced_real) scores women" in s["answers"][0]
    ood = pd.read_csv(out / "ood_preds.csv")  # the frontal views only, every row's score, recomputable
    assert len(ood) == 24 and ood["image"].is_unique and {f"p_{r}" for r in s["rows"]} <= set(ood.columns)
    assert s["finding_only"] == "same" and len(s["fidelity_n_per_fold"]) == 2
    table = pd.read_csv(out / "table.csv")
    assert list(table["row"]) == list(s["rows"])
    preds = pd.read_csv(out / "preds.csv.gz")  # every row scored the same test images, each once per row
    sizes = preds.groupby("condition")["image"].nunique()
    assert set(sizes) == {len(preds) // len(s["rows"])}
    for png in ["gain_vs_fidelity.png", "gap_vs_auroc.png", "samples_gan.png", "samples_ae.png", "samples_ddpm.png",
                "closest_pairs_gan.png"]:
        assert (out / png).stat().st_size > 5000


def test_a_label_table_run_names_its_data_and_keeps_its_groups(compare_smoke):
    """On your own data the report says what 'female' and 'any finding' stand for, plan and summary record the
    table, and preds.csv carries each image's group beside the side it was compared on."""
    out, runs, _ = compare_smoke
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Your data (F vs the rest of sex): ")
    assert "'female', 'women' and F stand for the group 'F'" in readme and "'any finding' is the label 'finding'" in readme
    plan = json.loads((out / "plan.json").read_text())
    assert plan["table"]["primary"] == "finding" and plan["table"]["labels"][-1] == "finding"
    preds = pd.read_csv(out / "preds.csv.gz")
    assert {"group", "y_covid", "y_any_finding"} <= set(preds.columns)
    assert (preds["group"] == preds["sex"]).all()  # group sex, minority F: the side is the group


def test_make_passes_your_table_to_the_study(tmp_path):
    r = subprocess.run(["make", "chestxray", "DATA=path/to/mytable.csv", "GROUP=sex,age", "BANDS=age=60",
                        "MINORITY=F & 60+", "SMOKE=1", "DRY=1", "PYTHON=true"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "chestxray_study" in line)  # (make -w prints folders)
    assert "--out yourdata/mytable/sex,age-F___60+/smoke/chestxray" in line  # one folder per question asked
    flags = shlex.split(line)
    assert flags[flags.index("--group") + 1] == "sex,age" and flags[flags.index("--minority") + 1] == "F & 60+"
    assert flags[flags.index("--bands") + 1] == "age=60" and "--dry-run" in flags


def test_no_generator_saw_its_folds_test_or_validation_patients(compare_smoke):
    """Each generator stage's recorded command names its training set; that set's patients are disjoint from the
    fold's test and validation patients, and the images it trained on are that set's."""
    from common.task_file import TASK_FILE, read_cxr
    out, runs, _ = compare_smoke
    t = read_cxr(runs / TASK_FILE)
    names = [Path(i).name for i in t["image"]]
    pid = t["patient_id"].to_numpy()
    checked = 0
    for fold in sorted(runs.glob("fold*")):
        held = read_sets(fold / "sets.csv", names, ["test", "val"])
        held_pid = set(pid[held["test"]]) | set(pid[held["val"]])
        for gen in ("ae", "gan", "ddpm", "cvae"):  # (ddpm_finding_only samples the ddpm's model at smoke scale)
            cfg = json.loads((fold / gen / "config.json").read_text())
            argv = cfg["argv"]
            sets, train_set = argv[argv.index("--sets") + 1], argv[argv.index("--train-set") + 1]
            assert Path(sets).parent == fold and train_set in ("pool", "cvae_train")
            idx = read_sets(sets, names, [train_set])[train_set]
            assert not set(pid[idx]) & held_pid, (fold, gen)
            n = json.loads((fold / gen / "metrics.json").read_text())["n_train"]
            assert n == len(idx), (fold, gen)
            checked += 1
    assert checked == 8


def test_train_ddpm_on_a_split_files_set_with_finding_only_classes(tmp_path):
    """--sets/--train-set trains on exactly that set; --condition label makes the classes the finding alone."""
    from common.data import read_nih
    from common.splits import write_sets
    t = read_nih(ROOT / "data" / "nih_cxr14")
    names = [Path(i).name for i in t["image"]]
    write_sets(tmp_path / "sets.csv", {"pool": names[:40], "val": names[40:50]})
    call("diffusion.train_ddpm", "--data", "nih", "--sets", tmp_path / "sets.csv", "--train-set", "pool",
         "--condition", "label", "--size", "16", "--width", "8", "--mults", "1,2", "--num-res", "1", "--attn-res", "8",
         "--steps", "2", "--batch-size", "4", "--sample-every", "0", "--out-dir", tmp_path / "d")
    m = json.loads((tmp_path / "d/metrics.json").read_text())
    assert m["n_train"] == 40 and m["classes"] == ["any|No Finding", "any|finding"]
    assert sum(m["class_counts"]) == 40


def test_memorization_reference_leaves_out_the_same_patients_images():
    """A patient's two near-identical scans set the pool's own 1st percentile near 0 unless same-patient pairs are
    left out; with patient ids they are, and a copy of a training image is then flagged."""
    from fairness.memorization import audit
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (40, 8, 8)).astype(np.uint8)
    pool[1::2] = np.clip(pool[0::2].astype(int) + 1, 0, 255)  # patients of two almost identical scans
    ids = np.repeat(np.arange(20), 2)
    copy = np.clip(pool[:5].astype(int) + 2, 0, 255).astype(np.uint8)  # near copies of training images
    plain, *_ = audit(copy, pool)
    by_patient, *_ = audit(copy, pool, train_patients=ids)
    assert plain["fraction_closer_than_train_p1"] == 0  # the follow-ups hide the copies
    assert by_patient["fraction_closer_than_train_p1"] == 1 and by_patient["reference_excludes_same_patient"]


def test_bad_class_requests_and_sizes_are_refused_naming_the_flag():
    from common.errors import DataError
    from common.samples import requested
    from gan.train_dcgan import levels
    names = ["F|No Finding", "F|finding"]
    ask = lambda counts: requested(names, class_counts=counts, n_per_class=3)
    assert ask("F|finding=2,F|No Finding=1")[1].tolist() == [1, 1, 0]
    for bad in ("F|findings=2", "F|finding=two", "F|finding=0"):
        with pytest.raises(DataError, match="--class-counts"):
            ask(bad)
    with pytest.raises(DataError, match="--classes"):
        requested(names, classes="M|finding", n_per_class=3)
    with pytest.raises(DataError, match="--size 20"):
        levels(20)


def test_compare_replicates_train_on_their_generator_seed_and_enter_the_comparisons(smoke_study, tmp_path):
    """2 classifiers per row and fold on a chestxray run of one: compare adds chestxray's missing replicate with
    chestxray's own command, trains a second generator per family and fold (the CVAE too, as synth_vae's), and
    classifier replicate 1 trains on generator seed 1's samples; each comparison's point is the mean over replicates
    of the per-replicate difference, recomputed here from preds.csv.gz."""
    from fairness.metrics import auroc
    cx_out, runs, _ = smoke_study("classify.chestxray_study")
    out = tmp_path / "out"
    run("classify.compare_study", "--smoke", "--chestxray", str(cx_out), "--rows", "imbalanced_real,balanced_real,vae,gan",
        "--ratios", "", "--replicates", "2", "--generator-seeds", "2", "--out", str(out), timeout=1800)
    s = json.loads((out / "summary.json").read_text())
    assert s["replicates"] == 2 and s["generator_seeds"] == 2 and "resample replicates, then patients" in s["training_noise"]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    cx_planned = [line for line in stages if "condition=balanced_real" in line or "condition=imbalanced_real" in line]
    assert cx_planned and all("--seed 1000" in line for line in cx_planned)  # replicate 1 only: chestxray has 0
    runs = Path(runs)
    for k in (0, 1):
        fold = runs / f"fold{k}"
        argv = lambda cell: json.loads((fold / cell / "config.json").read_text())["argv"]
        synth = lambda cell: Path(argv(cell)[argv(cell).index("--synthetic") + 1])
        assert synth("synth_gan").parent.name == "gan" and synth("synth_gan_rep1").parent.name == "gan_seed1"
        assert synth("imbalanced_synth").parent.name == "cvae" and synth("synth_vae_rep1").parent.name == "cvae_seed1"
        seed = lambda argv: int(argv[argv.index("--seed") + 1])
        assert seed(argv("synth_vae_rep1")) == seed(argv("imbalanced_synth")) + 10000  # replicate 1's classifier seed
        assert seed(argv("cvae_seed1")) == seed(argv("cvae")) + 10000  # generator seed 1: chestxray's CVAE reseeded
        a0, a1 = argv("cvae"), argv("cvae_seed1")  # chestxray's CVAE command, only its seed and folder changed
        assert len(a0) == len(a1) and {a0[i - 1] for i in range(1, len(a0)) if a0[i] != a1[i]} == {"--seed",
                                                                                                    "--out-dir"}
    preds = pd.read_csv(out / "preds.csv.gz")
    assert sorted(preds.replicate.unique()) == [0, 1] and set(preds.condition) == {"imbalanced_real", "balanced_real",
                                                                                   "vae", "gan"}
    row = next(c for c in s["comparisons"] if c["metric"] == "female AUROC" and c["a"] == "gan")
    assert row["replicates"] == 2 and "two-level bootstrap" in row["method"] and row["primary"]
    f = preds[preds.sex == "F"]
    on = lambda d, c: d[d.condition == c].sort_values("image")
    hand = np.mean([auroc(on(d, "gan").y_any_finding, on(d, "gan").p_any_finding)
                    - auroc(on(d, "imbalanced_real").y_any_finding, on(d, "imbalanced_real").p_any_finding)
                    for _, d in f.groupby("replicate")])
    assert row["diff"] == pytest.approx(hand)


def test_recovery_share_is_the_ratio_of_mean_gains_and_its_ci_resamples_replicates():
    """compare's recovery fraction with replicates: the point is (mean gain of the row) / (mean gain of
    balanced_real) over replicates, and its CI draws replicates before patients, so replicates that disagree widen
    it beyond the CI of the same means resampled over patients alone."""
    from classify.compare_report import paired, recovery, utility_stats
    rng = np.random.default_rng(0)
    n = 600
    pid = np.arange(n) // 2
    sex, y = np.where(pid % 2, "F", "M"), rng.integers(0, 2, n)
    Y = np.zeros((n, 15))
    Y[:, 14] = y

    def replicate(signal):
        p = np.repeat((y * signal + rng.normal(0, 1, n))[:, None], 15, 1)
        return utility_stats(Y, p, p >= 0, sex)
    stats = {"imbalanced_real": [replicate(0.3) for _ in range(3)], "balanced_real": [replicate(1.5) for _ in range(3)],
             "gan": [replicate(s) for s in (0.2, 0.9, 1.6)]}  # a generator whose seeds disagree
    find = {("female AUROC", "balanced_real", "imbalanced_real"):
            paired("female AUROC", "balanced_real", "imbalanced_real", stats, pid, 300, 0)}
    rec = recovery(stats, list(stats), pid, {"n_boot": 300, "seed": 0}, find)["rows"]["gan"]
    female = {row: [s["female AUROC"] for s in reps] for row, reps in stats.items()}
    mean = {row: (lambda fs: lambda idx: np.mean([f(idx) for f in fs]))(fs) for row, fs in female.items()}
    everyone = np.arange(n)
    hand = (mean["gan"](everyone) - mean["imbalanced_real"](everyone)) / (mean["balanced_real"](everyone)
                                                                        - mean["imbalanced_real"](everyone))
    assert rec["value"] == pytest.approx(hand) and rec["ci"][0] < hand < rec["ci"][1]
    patients_only = recovery({row: [{"female AUROC": f}] for row, f in mean.items()}, list(stats), pid,
                             {"n_boot": 300, "seed": 0}, find)["rows"]["gan"]
    assert patients_only["value"] == pytest.approx(hand)
    assert rec["ci"][1] - rec["ci"][0] > 1.3 * (patients_only["ci"][1] - patients_only["ci"][0])


def test_rows_without_a_generator_weight_their_replicates_alike():
    """3 classifier replicates on 2 generator seeds (replicate r on seed r mod 2): a generator row is the mean over
    its seeds (seed 0's two replicates share a half), a row trained on real data the plain mean of its replicates
    (each a third, as in chestxray), whichever row it is compared with; so each paired difference is the difference
    of the two rows' table values, and the recovery share's denominator is balanced_real's plain gain."""
    from classify.compare_report import generator_groups, mean_stats, paired, recovery
    pid = np.arange(40)
    const = lambda v: {"female AUROC": lambda idx: v}  # a replicate whose statistic does not depend on the patients
    values = {"imbalanced_real": [0.60, 0.62, 0.57], "balanced_real": [0.70, 0.70, 0.69],
              "gan": [0.70, 0.60, 0.72], "ddpm": [0.66, 0.64, 0.62]}
    stats = {row: [const(v) for v in vs] for row, vs in values.items()}
    plain = lambda row: np.mean(values[row])
    by_seed = lambda row: np.mean([np.mean(values[row][0::2]), values[row][1]])
    table = {"imbalanced_real": plain("imbalanced_real"), "balanced_real": plain("balanced_real"),
             "gan": by_seed("gan"), "ddpm": by_seed("ddpm")}
    groups = generator_groups({"replicates": 3, "generator_seeds": 2})
    comp = {(a, b): paired("female AUROC", a, b, stats, pid, 300, 0, groups)
            for a, b in [("balanced_real", "imbalanced_real"), ("gan", "imbalanced_real"), ("ddpm", "gan")]}
    for (a, b), c in comp.items():
        assert c["diff"] == pytest.approx(table[a] - table[b])
    assert "two-level" in comp["balanced_real", "imbalanced_real"]["method"]  # no generator seed to draw
    method = comp["gan", "imbalanced_real"]["method"]
    assert "three-level" in method and "weights its replicates alike" in method
    find = {("female AUROC", "balanced_real", "imbalanced_real"): comp["balanced_real", "imbalanced_real"]}
    rec = recovery(stats, list(stats), pid, {"n_boot": 300, "seed": 0, "replicates": 3, "generator_seeds": 2}, find)
    gain = table["balanced_real"] - table["imbalanced_real"]
    assert rec["rows"]["gan"]["value"] == pytest.approx((table["gan"] - table["imbalanced_real"]) / gain)
    from classify.compare_report import row_levels  # the table's own values: the same weights
    levels = [np.array([0, 2]), np.array([1])]
    assert {row: mean_stats(stats[row], row_levels(row, levels))(pid)["female AUROC"] for row in stats} == \
        pytest.approx(table)
