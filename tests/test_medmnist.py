"""MedMNIST chain: the generators learn a planted class signal; the ResNet-18 trainer and the study run."""
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from common.data import PROJECT_DATA, medmnist_subset
from conftest import ROOT
from forkserver import python_m
from same_numbers import check_same_seed_same_numbers
from fairness.metrics import auroc
from gan import train_mlp_cgan as cgan
from vae import train_mlp_ae as ae, train_mlp_cvae as cvae


def bands(n, seed):
    """A planted class signal an MLP generator can learn from 300 images: a bright horizontal band in the upper
    (class 0) or lower (class 1) half, of random height, row and extent, on a noisy background. (N, 784) in [0, 1]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.15, (n, 28, 28))
    for i in range(n):
        h = rng.integers(3, 7)
        r = rng.integers(1, 14 - h) + (14 if y[i] else 0)
        x[i, r:r + h, rng.integers(0, 8):rng.integers(20, 28)] = rng.uniform(0.7, 1.0)
    return torch.from_numpy(x).float().flatten(1), torch.from_numpy(y).long()


@pytest.fixture(scope="module")
def judge():
    """A classifier trained on real (planted) images: logistic regression on the pixels."""
    from sklearn.linear_model import LogisticRegression
    xj, yj = bands(1000, 4)
    clf = LogisticRegression(max_iter=2000).fit(xj.numpy(), yj.numpy())
    xv, yv = bands(500, 5)
    assert clf.score(xv.numpy(), yv.numpy()) > 0.97
    return clf


def judged_accuracy(judge, gx, gy):
    return float((judge.predict(gx.numpy()) == gy.numpy()).mean())


@pytest.mark.parametrize("name", ["ae", "cvae", "cgan"])
def test_generator_samples_are_recognised_as_their_class(name, judge):
    """Class-conditional samples, judged by a classifier trained on real images: well above chance (0.5)."""
    x, y = bands(300, 3)  # 150 per class, like the study's subsets
    kw = dict(seed=0, batch_size=64, progress=False)
    if name == "ae":
        m, hist = ae.fit(x, "cpu", epochs=100, lr=1e-3, latent=32, **kw)
        gx, gy = ae.generate(m, x, y, 50)
    elif name == "cvae":
        m, hist = cvae.fit(x, y, "cpu", epochs=100, lr=1e-3, latent=32, **kw)
        gx, gy = cvae.generate(m, 50)
    else:
        m, hist = cgan.fit(x, y, "cpu", epochs=60, lr=2e-4, z_dim=64, **kw)  # judged 0.98, 1.0, 0.97 at 40, 60, 80
        gx, gy = cgan.generate(m, 50)
    assert gx.shape == (100, 784) and 0 <= gx.min() and gx.max() <= 1
    assert judged_accuracy(judge, gx, gy) >= 0.85


FIRST_LAYER = {"ae": lambda m: m.enc[0].weight, "cvae": lambda m: m.enc[0].weight, "cgan": lambda m: m.net[0].weight}


@pytest.mark.parametrize("name", ["ae", "cvae", "cgan"])
def test_mlp_generator_under_bf16_autocast_takes_nearby_fp32_steps(name):
    """--amp bf16 (emulated on a CPU without bf16): the same seed's first steps in bf16 move the first layer's fp32
    weights almost as fp32 does, but not identically (the autocast is on); losses finite. Whether whole runs agree
    is bench/bf16_agreement.py's question (--loop mlpae, mlpcvae, mlpcgan)."""
    x, y = bands(300, 3)
    mod = {"ae": ae, "cvae": cvae, "cgan": cgan}[name]
    kw = dict(seed=0, batch_size=64, epochs=3, lr=2e-4, progress=False, **({"z_dim": 64} if name == "cgan" else
                                                                            {"latent": 8}))
    data = (x,) if name == "ae" else (x, y)
    w0 = FIRST_LAYER[name](mod.fit(*data, "cpu", **{**kw, "epochs": 0})[0])
    (m32, h32), (m16, h16) = (mod.fit(*data, "cpu", amp=amp, **kw) for amp in (False, True))
    step32, step16 = FIRST_LAYER[name](m32) - w0, FIRST_LAYER[name](m16) - w0
    assert FIRST_LAYER[name](m16).dtype == torch.float32 and np.isfinite(h16).all()
    assert 0 < (step16 - step32).norm() < 0.2 * step32.norm()  # cGAN 0.05 on a CPU with AVX512-BF16 and AMX


def test_mlp_generators_keep_their_outputs_fp32_under_autocast():
    """The AE's and the cVAE's sigmoid (and the cVAE's mu and log-variance, its KL) in fp32 under bf16 autocast: a
    bf16 sigmoid rounds 0.999 to 1.0, where the cVAE's binary cross-entropy of a pixel below 1 would jump."""
    x, y = bands(8, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [ae.AE(x.shape[1], 8)(x), *cvae.MLPCVAE(x.shape[1], 2, 8)(x, y)]
        hidden = ae.AE(x.shape[1], 8).enc(x)
    assert hidden.dtype == torch.bfloat16 and [o.dtype for o in outs] == [torch.float32] * 4


def test_untrained_generator_is_at_chance(judge):
    """The same judge on an untrained cGAN: near chance, so the test above can fail."""
    x, y = bands(300, 3)
    m, _ = cgan.fit(x, y, "cpu", seed=0, batch_size=64, epochs=0, lr=1e-4, z_dim=64, progress=False)
    assert judged_accuracy(judge, *cgan.generate(m, 50)) < 0.7


def test_subset_protocol():
    xi, yi, xv, yv, names = medmnist_subset(PROJECT_DATA / "medmnist/breastmnist.npz", 150, seed=0)
    assert names == ["malignant", "normal, benign"]
    # malignant has only 147 training images: all are taken, 9:1 within each class
    assert np.bincount(yi).tolist() == [132, 135] and np.bincount(yv).tolist() == [15, 15]
    xi2, *_ = medmnist_subset(PROJECT_DATA / "medmnist/breastmnist.npz", 150, seed=0)
    assert (xi == xi2).all()


def run(module, *args):
    r = python_m(module, args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("module", ["vae.train_mlp_ae", "vae.train_mlp_cvae", "gan.train_mlp_cgan"])
def test_generator_scripts_run(module, tmp_path):
    run(module, "--npz", str(PROJECT_DATA / "medmnist/breastmnist.npz"), "--per-class", "20", "--epochs", "2",
        "--n-per-class", "5", "--device", "cpu", "--out-dir", str(tmp_path))
    z = np.load(tmp_path / "samples.npz")
    assert z["images"].shape == (10, 28, 28) and np.bincount(z["labels"]).tolist() == [5, 5]
    from common.runs import cpu_has_bf16  # --amp auto: bf16 only where its check agreed (BF16_CHECKED) on such a CPU
    checked = {"vae.train_mlp_ae": ae, "vae.train_mlp_cvae": cvae, "gan.train_mlp_cgan": cgan}[module].BF16_CHECKED
    assert json.loads((tmp_path / "metrics.json").read_text())["bf16_autocast"] == (checked and cpu_has_bf16())


def test_cgan_bf16_is_refused_in_one_line_on_a_cpu_without_it(tmp_path, monkeypatch):
    """--amp bf16 where bf16 is slow (no AVX512-BF16 or AMX): refused before the run folder is written."""
    import common.runs
    from common.errors import DataError
    monkeypatch.setattr(common.runs, "cpu_has_bf16", lambda: False)
    with pytest.raises(DataError, match="--amp bf16: this CPU has no bf16 instructions"):
        cgan.main(cgan.parse_args(["--npz", str(PROJECT_DATA / "medmnist/breastmnist.npz"), "--amp", "bf16",
                                   "--device", "cpu", "--out-dir", str(tmp_path / "c")]))
    assert not (tmp_path / "c").exists()


def test_bf16_check_distance_sees_a_worse_generator(tmp_path):
    """bench/bf16_agreement.py --loop mlpcgan's validation measure: PneumoniaMNIST's own training images of each
    class are far closer to its validation images than the same images with the classes swapped or all replaced by
    their mean image, and the distance is 0 for the validation images themselves."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bf16_agreement import MEDMNIST_NPZ, medmnist_fd
    with np.load(ROOT / MEDMNIST_NPZ) as z:
        tr, ty, va, vy = z["train_images"], z["train_labels"].ravel(), z["val_images"], z["val_labels"].ravel()
    rng = np.random.default_rng(0)
    pick = np.concatenate([rng.choice(np.flatnonzero(ty == c), 150, replace=False) for c in (0, 1)])

    def fd(images, labels):
        np.savez(tmp_path / "samples.npz", images=images, labels=labels)
        return medmnist_fd(MEDMNIST_NPZ, tmp_path)
    real = fd(tr[pick], ty[pick])
    assert fd(va, vy)["val_fd"] < 1e-6 * real["val_fd"]
    assert set(real["val_fd_per_class"]) == {0, 1}
    assert fd(tr[pick], 1 - ty[pick])["val_fd"] > 2 * real["val_fd"]
    flat = np.repeat(tr[pick].mean(0, keepdims=True), len(pick), 0).round().astype(np.uint8)
    assert fd(flat, ty[pick])["val_fd"] > 2 * real["val_fd"]


NARROW_RESNET = """
import torch, torch.nn.functional as F
from classify.nets import build
for width in (4, 8, 16):
    grads = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        net = build("resnet18_28", 1, 2, 28, width=width).to(memory_format=fmt)
        x = torch.randn(7, 1, 28, 28).contiguous(memory_format=fmt)  # an odd batch: where the heap was corrupted
        for _ in range(2):
            net.zero_grad()
            F.cross_entropy(net(x), torch.arange(7) % 2).backward()
        grads[fmt] = [p.grad for p in net.parameters()]
    print(width, max(float((a - b).norm() / a.norm()) for a, b in zip(*grads.values())))
"""


def test_subsampled_pointwise_is_the_strided_1x1_convolution():
    from classify.nets import SubsampledPointwise
    for h, w in [(7, 7), (14, 14), (5, 8), (1, 3)]:
        conv = torch.nn.Conv2d(3, 5, 1, 2, bias=False).double()
        x = torch.randn(3, 3, h, w, dtype=torch.float64)
        ref = conv(x)
        conv.__class__ = SubsampledPointwise
        assert torch.allclose(conv(x), ref, rtol=0, atol=1e-12)


def test_narrow_resnet18_trains_in_channels_last_with_the_contiguous_gradients():
    """Below 16 input channels oneDNN's strided 1x1 weight gradient in channels_last corrupted the heap (width 8,
    odd batches: the process died) or could give wrong gradients; the shortcut avoids that path. In a child process,
    so that a crash fails this test, not the session. Compared per parameter as the relative error of its whole
    gradient (L2), not entry by entry: the two formats sum in other orders, so a ReLU input within float32 rounding of
    zero can switch sides (seen on a 2-core AMD EPYC with AVX2 only, width 16: one of 21,952 activations, 4e-6 in
    float64), which moves single entries by a few percent but no parameter's gradient by more than 0.004 (0.0064 at
    width 32; 1e-5 without a flip); a wrong kernel moves its parameter's whole gradient."""
    out = subprocess.run([sys.executable, "-c", NARROW_RESNET], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    rel = {int(w): float(d) for w, d in (line.split() for line in out.stdout.splitlines())}
    assert sorted(rel) == [4, 8, 16] and max(rel.values()) < 5e-2, rel


def test_resnet18_script_end_to_end(tmp_path):
    """Whole official splits; and Chaptoukaev's subset with a generator's samples appended, scored in preds.csv."""
    run("classify.train_resnet18", "--npz", str(PROJECT_DATA / "medmnist/breastmnist.npz"), "--epochs", "1", "--width", "16",
            "--out-dir", str(tmp_path / "r18"))
    m = json.loads((tmp_path / "r18/metrics.json").read_text())
    assert 0 <= m["test_auc"] <= 1 and m["n"] == {"train": 546, "val": 78, "test": 156}
    preds = pd.read_csv(tmp_path / "r18/preds.csv")
    assert len(preds) == 156 and m["test_auc"] == pytest.approx(auroc(preds.label, preds.p_1))
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=images, labels=np.r_[np.zeros(5), np.ones(5)].astype(int))
    run("classify.train_resnet18", "--npz", str(PROJECT_DATA / "medmnist/breastmnist.npz"), "--per-class", "20",
        "--synthetic", str(tmp_path / "g.npz"), "--tag", "method=AE", "--epochs", "1", "--width", "8",
        "--out-dir", str(tmp_path / "sub"))
    m = json.loads((tmp_path / "sub/metrics.json").read_text())
    assert m["n"] == {"train": 36, "val": 4, "test": 156, "synthetic": 10}
    assert set(pd.read_csv(tmp_path / "sub/preds.csv")["method"]) == {"AE"}


def test_medmnist_study_smoke(smoke_study):
    out, runs, _ = smoke_study("classify.medmnist_study")
    s = json.loads((out / "summary.json").read_text())
    assert set(s["auc"]) == {"breast"} and set(s["auc"]["breast"]) == {"None", "AE", "cVAE", "cGAN"}
    assert s["datasets_missing"] == ["path"]
    table = (out / "table2.md").read_text()
    assert "0.872" in table and "not run" in table and "**" in table
    from common.runs import cpu_has_bf16  # each generator's arithmetic, from its runs' metrics.json
    words = {m: "bf16 autocast" if mod.BF16_CHECKED and cpu_has_bf16() else "fp32"
             for m, mod in (("AE", ae), ("cVAE", cvae), ("cGAN", cgan))}
    if not torch.cuda.is_available():  # the smoke study runs on --device auto
        assert f"arithmetic: AE {words['AE']}, cVAE {words['cVAE']}, cGAN {words['cGAN']} (bf16" in table
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert len(stages) == 2 * 7 and sum("-m classify.train_resnet18" in c for c in stages) == 8
    # one preds row per official test image, method and seed; the table's AUC recomputed from the file
    preds = pd.read_csv(out / "preds.csv", dtype={"method": str}, keep_default_na=False)
    assert len(preds) == s["seeds"] * 4 * 156 and s["seeds"] == 2
    b = preds[(preds.dataset == "breast") & (preds.method == "cGAN") & (preds.seed == 1)]
    assert auroc(b.label, b.p_1) == pytest.approx(s["auc_runs"]["breast"]["cGAN"][1])
    rows = s["comparisons"]
    assert len(rows) == 3 * 2 and all(r["b"] == "None" and r["replicates"] == 2 for r in rows)
    assert all(r["p_holm"] >= r["p"] and r["n_units"] == 156 for r in rows)
    cmp = next(r for r in rows if r["metric"] == "breastmnist AUC" and r["a"] == "cGAN")
    assert cmp["diff"] == pytest.approx(np.mean(s["auc_runs"]["breast"]["cGAN"]) - np.mean(s["auc_runs"]["breast"]["None"]))


def test_medmnist_flags_take_effect_at_the_quick_scale():
    from classify.medmnist_study import SCALES, parse_args
    quick = SCALES["quick"]
    a = parse_args(["--epochs", "7", "--width", "8", "--batch-size", "16"])
    assert (a.epochs, a.width, a.batch_size, a.select) == (7, 8, 16, quick["select"])  # given flags win
    q = parse_args([])
    assert (q.epochs, q.width, q.recipe, q.cgan_epochs) == (quick["epochs"], quick["width"], quick["recipe"], 1000)
    f = parse_args(["--scale", "full"])
    assert (f.epochs, f.width, f.recipe) == (100, 64, "paper")


def test_same_seed_same_numbers(smoke_study, tmp_path):
    """Every stage script of the smoke chain rerun writes the same file; the study rerun on its stages reuses them
    all and writes the same summary (tests/same_numbers.py)."""
    check_same_seed_same_numbers("medmnist", smoke_study, tmp_path)


def test_bf16_check_resumes_only_the_same_run(tmp_path, monkeypatch):
    """bench/bf16_agreement.py --resume reads a finished run (same command, same commit) instead of training it
    again; without --resume, after a flag changed, at another commit or a dirty one, it trains."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bf16_agreement
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"history": [[1.0, 2.0]]}))
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(bf16_agreement.subprocess, "run", fake_run)
    monkeypatch.setattr(bf16_agreement, "git_commit", lambda: "abc")
    loop = {"module": "gan.train_mlp_cgan", "settings": ["--epochs", "3"]}
    first = bf16_agreement.train(loop, 0, "off", tmp_path, resume=True)
    assert len(calls) == 1 and first["history"] == [[1.0, 2.0]]
    again = bf16_agreement.train(loop, 0, "off", tmp_path, resume=True)
    assert len(calls) == 1 and again["resumed"] and again["seconds"] == first["seconds"]
    bf16_agreement.train(loop, 0, "off", tmp_path)
    bf16_agreement.train({**loop, "settings": ["--epochs", "4"]}, 0, "off", tmp_path, resume=True)
    assert len(calls) == 3
    monkeypatch.setattr(bf16_agreement, "git_commit", lambda: "def")  # another commit's run is not reused
    bf16_agreement.train({**loop, "settings": ["--epochs", "4"]}, 0, "off", tmp_path, resume=True)
    assert len(calls) == 4
    monkeypatch.setattr(bf16_agreement, "git_commit", lambda: "def-dirty")  # uncommitted code: never reused
    for _ in range(2):
        assert not bf16_agreement.train(loop, 0, "off", tmp_path, resume=True)["resumed"]
    assert len(calls) == 6


def test_bf16_check_side_by_side_keeps_each_seed_its_own(tmp_path, monkeypatch):
    """--jobs 2: two seeds train at once, each run on one torch thread, seeds finish out of order, and every seed's
    numbers stay its own (summary.json's runs and rule as one seed at a time gives them); a failed run stops the
    check in one line naming it."""
    import threading
    import time
    sys.path.insert(0, str(ROOT / "bench"))
    import bf16_agreement
    envs, together = [], threading.Barrier(2, timeout=20)

    def fake_run(cmd, env=None, **kw):
        envs.append((env or {}).get("OMP_NUM_THREADS"))
        seed, amp = int(cmd[cmd.index("--seed") + 1]), cmd[cmd.index("--amp") + 1]
        out = Path(cmd[cmd.index("--out-dir") + 1])
        if env is not None and "fail" not in str(out):  # side by side: both workers in a run, lower seeds later
            together.wait()
            time.sleep(0.05 * (4 - seed))
        out.mkdir(parents=True, exist_ok=True)
        loss = 1.0 + seed + (0.5 if amp == "bf16" else 0.0)
        (out / "metrics.json").write_text(json.dumps({"history": [[loss, 2.0 * loss]]}))
        (out / "config.json").write_text(json.dumps({"cpu_threads": 1 if env else 2}))
        return subprocess.CompletedProcess(cmd, 3 if "fail" in str(out) and seed == 2 else 0, "", "boom")
    monkeypatch.setattr(bf16_agreement.subprocess, "run", fake_run)
    monkeypatch.setattr(bf16_agreement, "git_commit", lambda: "abc")
    loop = {"module": "fake", "settings": [], "rule": "equivalence", "title": "fake",
            "measures": [("loss", lambda r: r["history"][-1][0], True)], "curves": [(0, "d"), (1, "g")]}
    monkeypatch.setitem(bf16_agreement.LOOPS, "mlpcgan", loop)
    summaries = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        monkeypatch.setattr(sys, "argv", ["bf16_agreement.py", "--loop", "mlpcgan", "--seeds", "4", "--jobs",
                                          str(jobs), "--out", str(out), "--runs", str(tmp_path / f"runs{jobs}")])
        bf16_agreement.main()
        summaries[jobs] = json.loads((out / "summary.json").read_text())
    assert envs[:8] == [None] * 8 and envs[8:] == ["1"] * 8
    one, two = summaries[1], summaries[2]
    assert (one["jobs"], one["threads_per_run"], two["jobs"], two["threads_per_run"]) == (1, [2], 2, [1])
    bf16 = two["runs"]["bf16"]  # in seed order, each seed's numbers its own
    assert list(bf16) == ["0", "1", "2", "3"] and [bf16[k]["history"] for k in bf16] == \
        [[[1.5 + s, 3.0 + 2 * s]] for s in range(4)]
    assert two["rule"] == one["rule"] and two["rule"]["loss"]["diff_mean"] == pytest.approx(0.5)
    monkeypatch.setattr(sys, "argv", ["bf16_agreement.py", "--loop", "mlpcgan", "--seeds", "4", "--jobs", "2",
                                      "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "fail")])
    with pytest.raises(SystemExit, match="fake --amp off --seed 2 failed"):
        bf16_agreement.main()
