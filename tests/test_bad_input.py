"""Bad input through the user-facing commands (issue 17): each case runs `python -m ...` (or `make`) as a user would
and checks a non-zero exit (2), one `error:` line naming the flag or file, no traceback, and that every file that
existed before is byte-identical afterwards. The download cases are in test_bad_input_download.py, the diffusion and
FID scripts' in test_bad_input_diffusion.py; the reader contracts are also checked here at the library level."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from common.data import read_fitzpatrick, read_medmnist
from common.errors import DataError
from conftest import ROOT, write_png
from forkserver import SERVER_ENV, python_m

ENV = {**os.environ, **SERVER_ENV}


def snapshot(*folders):
    """{path: bytes} of every file under the folders (a file given directly counts too)."""
    out = {}
    for f in folders:
        paths = [f] if f.is_file() else sorted(p for p in f.rglob("*") if p.is_file()) if f.exists() else []
        out.update({str(p): p.read_bytes() for p in paths})
    return out


def run(args, tmp_path, cmd=None):
    env = {**ENV, "FAIRSYNTH_CACHE": str(tmp_path / "cache")}
    if cmd is None:  # `python -m module args`, through the tests' fork server (tests/forkserver.py)
        return python_m(args[0], args[1:], env=env, timeout=600)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def refused(args, tmp_path, names, watch=(), cmd=None, code=2):
    """Run a command that must refuse its input; returns the error line."""
    before = snapshot(*watch)
    r = run(args, tmp_path, cmd)
    text = r.stdout + r.stderr
    assert r.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    if cmd is None:  # a python entry point: the error is its last word
        assert r.stderr.strip().splitlines()[-1] == errors[0]
    for n in [names] if isinstance(names, str) else names:
        assert n in errors[0], errors[0]
    assert snapshot(*watch) == before, "a file that existed before was changed or deleted"
    return errors[0]


def ok(args, tmp_path):
    r = run(args, tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


# ---------------------------------------------------------------------------------------------------------------
# small inputs in the official formats
def medmnist_npz(path, n=40, size=28, images=None, labels=None, k=2, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for s in ("train", "val", "test"):
        y = rng.integers(0, k, (n, 1)).astype(np.uint8)
        x = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
        x[y[:, 0] == 1, : size // 2] = 255  # a planted signal: class 1 has a bright top half
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def nih_root(root, n_female=24, n_male=24, corrupt=()):
    """A NIH-layout root: PNGs under images_001/images and a Data_Entry table; one patient per image."""
    rows = []
    for i in range(n_female + n_male):
        name = f"{i + 1:08d}_000.png"
        write_png(root / "images_001/images" / name, size=64, seed=i)
        sex = "F" if i < n_female else "M"
        rows.append([name, "No Finding" if i % 2 else "Effusion", 0, i + 1, 40 + i % 30, sex, "PA"])
    for i in corrupt:
        (root / "images_001/images" / rows[i][0]).write_bytes(b"not a png")
    pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                "Patient Gender", "View Position"]).to_csv(root / "Data_Entry_2017.csv", index=False)
    return root


def finished_run(folder):
    """A folder as a finished run of ours leaves it (config.json + results)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"args": {"epochs": 3}, "argv": ["x"], "git_commit": "abc"}))
    (folder / "metrics.json").write_text('{"test_auc": 0.9}')
    (folder / "ckpt.pt").write_bytes(b"weights of a long run")
    return folder


def evil_pickle(path, marker):
    """A file that runs code when unpickled: it would create `marker`."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    path.write_bytes(pickle.dumps({"conv.weight": Evil()}))
    return path


# ---------------------------------------------------------------------------------------------------------------
# data loss: --force, --resume, outputs
def test_force_never_deletes_before_inputs_are_validated(tmp_path):
    """The issue's example: a misspelt --npz with --force onto a finished run used to delete the run first."""
    existing = finished_run(tmp_path / "EXISTING")
    refused(["classify.train_resnet18", "--npz", str(tmp_path / "breastmnist.nzp"), "--out-dir", str(existing),
             "--force"], tmp_path, "breastmnist.nzp", watch=[tmp_path / "EXISTING"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["EXISTING"]  # nothing left aside


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "thesis"
    (mine / "chapter1.tex").parent.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    npz = medmnist_npz(tmp_path / "breastmnist.npz")
    refused(["classify.train_resnet18", "--npz", str(npz), "--out-dir", str(mine), "--force"], tmp_path,
            ["--out-dir", "no run of ours"], watch=[mine])


def test_force_with_resume_is_refused(tmp_path):
    run_dir = finished_run(tmp_path / "cvae")
    refused(["vae.train_cvae", "--out-dir", str(run_dir), "--force", "--resume"], tmp_path, ["--force", "--resume"],
            watch=[run_dir])


def test_a_failing_forced_run_puts_the_old_run_back(tmp_path):
    """--force moves the old run aside; a later failure (here: a classifier target with one class) restores it."""
    root = tmp_path / "ixi"
    root.mkdir()
    np.savez(root / "t1_slices.npz", images=np.random.default_rng(0).integers(0, 255, (30, 16, 16), dtype=np.uint8))
    pd.DataFrame({"subject": [f"IXI{i:03d}" for i in range(30)], "age": 30.0 + np.arange(30), "sex": "M",
                  "slice_index": 0}).to_csv(root / "slices.csv", index=False)
    existing = finished_run(tmp_path / "judge")
    refused(["classify.train_classifier", "--data", "mri", "--data-root", str(root), "--size", "16", "--target",
             "attr", "--epochs", "1", "--out-dir", str(existing), "--force"], tmp_path, ["--target attr", "two classes"],
            watch=[existing])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["ixi", "judge"]


@pytest.fixture(scope="module")
def tiny_cvae(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cvae")
    root = nih_root(tmp / "nih", n_female=30, n_male=4, corrupt=range(6))
    r = ok(["vae.train_cvae", "--data-root", str(root), "--epochs", "1", "--batch-size", "8", "--out-dir",
            str(tmp / "run")], tmp)
    return tmp, root, r


def test_cvae_leaves_out_unreadable_images_and_draws_small_sets(tiny_cvae):
    """Fewer than 32 training images (the Kaggle sample hits this) and one corrupt PNG: the run finishes, names the
    file, and trains on the readable images only (it used to train on a black image)."""
    from common.data import read_nih
    from common.splits import patient_split
    tmp, root, r = tiny_cvae
    t = read_nih(root)
    split = patient_split(t, seed=0, stratify="sex")
    corrupt = t["image"].str.contains("|".join(f"{i + 1:08d}_000" for i in range(6))).to_numpy()
    n_bad = int((corrupt & (split != "test")).sum())
    assert n_bad and f"{n_bad} of" in r.stderr and "could not be read" in r.stderr
    readable = (t["sex"] == "F").to_numpy() & ~corrupt
    m = json.loads((tmp / "run/metrics.json").read_text())
    assert m["n_train"] == int((readable & (split == "train")).sum()) < 32
    assert m["n_val"] == int((readable & (split == "val")).sum())
    assert (tmp / "run/samples.png").stat().st_size > 0


def test_cvae_resume_with_another_architecture_is_refused(tiny_cvae, tmp_path):
    tmp, root, _ = tiny_cvae
    refused(["vae.train_cvae", "--data-root", str(root), "--epochs", "2", "--latent", "16", "--out-dir",
             str(tmp / "run"), "--resume"], tmp_path, ["--latent", "ckpt.pt"], watch=[tmp / "run"])


def test_sample_output_without_suffix_is_not_overwritten(tiny_cvae, tmp_path):
    tmp, _, _ = tiny_cvae
    args = ["vae.sample_cvae", "--ckpt", str(tmp / "run/ckpt.pt"), "--n", "4", "--out", str(tmp_path / "x")]
    ok(args, tmp_path)
    assert (tmp_path / "x.npz").is_file() and (tmp_path / "x.png").is_file()
    refused(args, tmp_path, ["--out", "x.npz", "already exist"], watch=[tmp_path / "x.npz", tmp_path / "x.png"])


def test_nih_root_without_women_names_the_cause(tmp_path):
    root = nih_root(tmp_path / "nih", n_female=0, n_male=12)
    refused(["vae.train_cvae", "--data-root", str(root), "--epochs", "1", "--out-dir", str(tmp_path / "o")],
            tmp_path, ["--data-root", "female"])


def test_make_smoke_with_a_missing_data_root(tmp_path):
    """Through make, as the README runs it: one error line, no traceback, the smoke outputs untouched."""
    smoke = ROOT / "smoke"
    refused([], tmp_path, ["NIH ChestX-ray14", "nowhere"], watch=[smoke], code=2,
            cmd=["make", "-s", "chestxray", "SMOKE=1", f"PYTHON={sys.executable}",
                 f"DATA_ROOT={tmp_path / 'nowhere'}"])


# ---------------------------------------------------------------------------------------------------------------
# flags: ranges and formats, refused at the edge
BAD_FLAGS = [
    ("classify.train_resnet18", "--batch-size", "0"),
    ("classify.train_resnet18", "--epochs", "0"),
    ("classify.train_classifier", "--size", "-32"),
    ("classify.train_chexnet", "--lr", "nan"),
    ("classify.chestxray_study", "--folds", "0"),
    ("classify.chestxray_study", "--female-fraction", "1.5"),
    ("classify.medmnist_study", "--seeds", "0"),
    ("vae.train_cvae", "--limit", "0"),
    ("vae.train_cvae", "--epochs", "ten"),
    ("vae.train_resvae", "--n-train", "0"),
    ("vae.skintone_study", "--repeats", "0"),
    ("vae.train_mlp_ae", "--n-per-class", "0"),
    ("gan.train_mlp_cgan", "--per-class", "-1"),
    ("vae.sample_cvae", "--n", "0"),
    ("common.phantom", "--n", "0"),
    ("diffusion.fairgen_study", "--modalities", "pet"),
]


@pytest.mark.parametrize("module,flag,value", BAD_FLAGS)
def test_out_of_range_flags(module, flag, value, tmp_path):
    need = {"classify.train_resnet18": ["--npz", "x.npz"], "vae.train_mlp_ae": ["--npz", "x.npz"],
            "gan.train_mlp_cgan": ["--npz", "x.npz"], "vae.sample_cvae": ["--ckpt", "c.pt", "--out", "s.npz"],
            "common.phantom": ["--out", str(tmp_path / "p")]}.get(module, [])
    refused([module, *need, flag, value], tmp_path, [flag, value])


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "gpu0"])
def test_unknown_device(device, tmp_path):
    refused(["classify.train_classifier", "--data", "toy:64", "--size", "16", "--epochs", "1", "--device", device,
             "--out-dir", str(tmp_path / "o")], tmp_path, ["--device", device])


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(["classify.train_classifier", "--data", "toy:64", "--size", "16", "--epochs", "1",
             "--out-dir", str(blocker / "run")], tmp_path, ["--out-dir", "a-file"], watch=[blocker])


# ---------------------------------------------------------------------------------------------------------------
# files: reader contracts
@pytest.mark.parametrize("case,expect", [
    ("count", "pair one to one"), ("negative", "-1"), ("flat", "(40, 784)"), ("range", "pixel values span"),
    ("object", "cannot read"),
])
def test_bad_medmnist_files(case, expect, tmp_path):
    rng = np.random.default_rng(1)
    override = {"count": {"train_labels": np.zeros((39, 1), np.uint8)},
                "negative": {"val_labels": np.full((40, 1), -1, np.int64)},
                "flat": {"train_images": rng.integers(0, 255, (40, 784)).astype(np.uint8)},
                "range": {"test_images": rng.uniform(0, 1000, (40, 28, 28))},
                "object": {"train_labels": np.array([[{"a": 1}]] * 40, dtype=object)}}[case]
    npz = medmnist_npz(tmp_path / "breastmnist.npz", **override)
    refused(["classify.train_resnet18", "--npz", str(npz), "--epochs", "1", "--width", "4", "--out-dir",
             str(tmp_path / "o")], tmp_path, ["breastmnist.npz", expect], watch=[npz])


def test_float_images_in_0_1_are_scaled_not_blackened(tmp_path):
    """[0, 1] floats used to be cast to uint8 (all black): they are scaled by 255, the stated rule."""
    from common.cache import load_images
    u8 = medmnist_npz(tmp_path / "u8mnist.npz")
    z = dict(np.load(u8))
    fl = tmp_path / "flmnist.npz"
    np.savez(fl, **{k: (v / 255.0 if k.endswith("images") else v) for k, v in z.items()})
    a, ok_a = load_images(read_medmnist(u8)["image"], 28)
    b, ok_b = load_images(read_medmnist(fl)["image"], 28)
    assert ok_a.all() and ok_b.all() and np.array_equal(a, b) and a.std() > 50


def test_corrupt_cache_is_decoded_again(tmp_path):
    from common.cache import load_images
    npz = medmnist_npz(tmp_path / "breastmnist.npz")
    src = read_medmnist(npz)["image"]
    a = np.array(load_images(src, 16, cache_dir=tmp_path / "c")[0])  # a copy: a map of the file below would break
    files = list((tmp_path / "c").glob("*.npy"))
    assert len(files) == 2  # the images and their ok flags
    for f in files:
        f.write_bytes(f.read_bytes()[:100])  # cut short, as a kill during the write of another tool would
    with pytest.warns(UserWarning, match="unreadable"):
        b, _ = load_images(src, 16, cache_dir=tmp_path / "c")
    assert np.array_equal(a, b)


def test_skin_types_roman_blank_and_bad(tmp_path):
    from test_data import fitz_fixture
    df = fitz_fixture(tmp_path / "f")
    df["fitzpatrick_scale"] = df["fitzpatrick_scale"].astype(object)
    df.loc[0, "fitzpatrick_scale"], df.loc[1, "fitzpatrick_scale"] = "V", None
    df.to_csv(tmp_path / "f/fitzpatrick17k.csv", index=False)
    with pytest.warns(UserWarning, match="unknown skin type"):
        t = read_fitzpatrick(tmp_path / "f")
    assert t.loc[t["md5hash"] == df.loc[0, "md5hash"], "skin_type"].item() == 5
    assert df.loc[1, "md5hash"] not in set(t["md5hash"])
    df.loc[2, "fitzpatrick_scale"] = "seven"
    df.to_csv(tmp_path / "f/fitzpatrick17k.csv", index=False)
    with pytest.raises(DataError, match="seven"):
        read_fitzpatrick(tmp_path / "f")


def test_skin_set_without_dark_images_and_evil_vgg_weights(tmp_path):
    from test_data import fitz_fixture
    df = fitz_fixture(tmp_path / "f")
    df["fitzpatrick_scale"] = 1
    df.to_csv(tmp_path / "f/fitzpatrick17k.csv", index=False)
    base = ["vae.train_resvae", "--data-root", str(tmp_path / "f"), "--no-pretrained", "--size", "16", "--epochs",
            "1", "--n-train", "8", "--width", "4"]
    refused([*base, "--train-set", "C", "--out-dir", str(tmp_path / "o")], tmp_path, ["set C", "dark"])
    evil = evil_pickle(tmp_path / "vgg19.pth", tmp_path / "PWNED")
    refused([*base, "--train-set", "A", "--vgg-weights", str(evil), "--out-dir", str(tmp_path / "o2")], tmp_path,
            ["--vgg-weights", "vgg19.pth"])
    assert not (tmp_path / "PWNED").exists()


def test_vgg_weights_file_loads_when_valid(tmp_path):
    """The other side of the pickle refusal: a plain state dict of the right network loads, one of another does
    not."""
    import torch
    import torchvision
    from vae.train_resvae import VGGPerceptual
    vgg = torchvision.models.vgg19(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg19.pth")
    p = VGGPerceptual(pretrained=False, weights_file=tmp_path / "vgg19.pth")
    assert torch.equal(p.features[0].weight, vgg.features[0].weight) and "imagenet" in p.source
    torch.save(torchvision.models.vgg11(weights=None).state_dict(), tmp_path / "vgg11.pth")
    with pytest.raises(DataError, match="do not fit"):
        VGGPerceptual(pretrained=False, weights_file=tmp_path / "vgg11.pth")


def test_nan_ages_are_left_out_not_young(tmp_path):
    from common.modalities import load_modality
    root = tmp_path / "ixi"
    root.mkdir()
    np.savez(root / "t1_slices.npz", images=np.zeros((6, 16, 16), np.uint8))
    pd.DataFrame({"subject": list("abcdef"), "age": [20, 60, None, 30, 70, None], "sex": list("FMFMFM"),
                  "slice_index": 0}).to_csv(root / "slices.csv", index=False)
    with pytest.warns(UserWarning, match="2 slices without an age"):
        m = load_modality("mri", 16, root)
    assert list(m.table["label"]) == ["age<50", "age>=50", "age<50", "age>=50"]


def test_medmnist_label_dtype_is_an_integer_class(tmp_path):
    npz = medmnist_npz(tmp_path / "breastmnist.npz", train_labels=np.ones((40, 1), np.float32))
    assert read_medmnist(npz).query("split == 'train'")["target"].eq(1).all()
    npz = medmnist_npz(tmp_path / "b2mnist.npz", train_labels=np.full((40, 1), 0.5))
    with pytest.raises(DataError, match="not whole numbers"):
        read_medmnist(npz)


def test_one_line_errors_keep_the_error_type(tmp_path):
    """argparse's own errors come out in the same one-line form (no usage block)."""
    r = run(["classify.train_classifier", "--epochs"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: argument --epochs")


# ---------------------------------------------------------------------------------------------------------------
# issue 33: where the readers still failed (a traceback, or a number from bad input)
def skin_root(folder, types):
    from test_data import fitz_fixture
    df = fitz_fixture(folder)
    df["fitzpatrick_scale"] = df["fitzpatrick_scale"].astype(object)
    df["fitzpatrick_scale"] = [types[i % len(types)] for i in range(len(df))]
    df.to_csv(folder / "fitzpatrick17k.csv", index=False)
    return folder


def ixi_root(folder, key="images"):
    folder.mkdir(parents=True)
    np.savez(folder / "t1_slices.npz", **{key: np.zeros((4, 16, 16), np.uint8)})
    pd.DataFrame({"subject": [1, 1, 2, 2], "age": [30, 30, 60, 60], "sex": ["F", "F", "M", "M"]}).to_csv(
        folder / "slices.csv", index=False)
    return folder


RESNET = ["classify.train_resnet18", "--epochs", "1", "--width", "4"]
READER_CASES = {  # name: (make the input in tmp_path -> (argv, words of the error line))
    "npz labels with a class missing": lambda p: (
        [*RESNET, "--npz", str(medmnist_npz(p / "mine.npz", train_labels=np.array([[0], [5]] * 20)))],
        ["mine.npz", "0 to K-1", "[0, 5]"]),
    "npz negative labels, unknown name": lambda p: (
        [*RESNET, "--npz", str(medmnist_npz(p / "mine.npz", train_labels=np.array([[0], [-1]] * 20)))],
        ["mine.npz", "negative"]),
    "training set of one class": lambda p: (
        [*RESNET, "--npz", str(medmnist_npz(p / "breastmnist.npz", train_labels=np.zeros((40, 1), np.uint8)))],
        ["breastmnist.npz", "one class"]),
    "empty image array": lambda p: (
        [*RESNET, "--npz", str(medmnist_npz(p / "mine.npz", train_images=np.zeros((0, 28, 28), np.uint8),
                                            train_labels=np.zeros((0, 1), np.uint8)))],
        ["mine.npz", "train_images is empty"]),
    "npz without its key (IXI)": lambda p: (
        ["classify.train_classifier", "--data", "mri", "--data-root", str(ixi_root(p / "ixi", key="slices")),
         "--size", "16", "--epochs", "1"], ["t1_slices.npz", "'images'"]),
    "cnn8 at 7 px": lambda p: (["classify.train_classifier", "--data", "toy:64", "--size", "7"],
                               ["--size 7", "cnn8", "at least 8 px"]),
    "chexnet densenet at 16 px": lambda p: (["classify.train_chexnet", "--arch", "densenet121", "--size", "16"],
                                            ["--size 16", "densenet121", "32 px"]),
    "vit at 30 px": lambda p: (["classify.train_classifier", "--data", "toy:64", "--arch", "vit", "--size", "30"],
                               ["--size 30", "multiple of 4"]),
    "skin study without dark images": lambda p: (
        ["vae.skintone_study", "--smoke", "--dry-run", "--n-test", "2", "--data-root",
         str(skin_root(p / "f", [1, 2]))],
        ["--data-root", "0 dark images", "--n-test"]),
}


@pytest.mark.parametrize("case", list(READER_CASES), ids=list(READER_CASES))
def test_readers_refuse_what_they_used_to_train_on(case, tmp_path):
    (tmp_path / "in").mkdir()
    argv, words = READER_CASES[case](tmp_path / "in")
    refused([*argv, "--out-dir" if argv[0].startswith("classify") else "--out", str(tmp_path / "out")], tmp_path,
            words, watch=[tmp_path / "in"])


def test_skin_types_read_as_missing_are_counted(tmp_path):
    """'NA', 'n/a', 'None' and blanks are unknown skin types like -1: left out, and counted in the warning."""
    root = skin_root(tmp_path / "f", [1, "NA", 5, "n/a", 3, "", 6, "None"])
    n = len(pd.read_csv(root / "fitzpatrick17k.csv"))
    with pytest.warns(UserWarning, match=rf"{n // 2} rows with an unknown skin type"):
        t = read_fitzpatrick(root)
    assert len(t) == n - n // 2
