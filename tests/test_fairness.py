"""fairness/: metrics against scikit-learn and fairlearn, ESSP/NAR by hand, FID against pytorch-fid, the FID CLI,
the memorization audit, and the two on a classifier's features (classify.domain_fd, classify.domain_memorization)."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fairness import metrics as M
from fairness.fid import extract, fid_from_features, frechet_distance, inception, stats
from fairness.memorization import audit
from conftest import ROOT, write_png
from forkserver import python_m

fairlearn = pytest.importorskip("fairlearn.metrics", reason="fairlearn is installed by requirements-dev.txt")


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 200)
        s = np.round(rng.normal(y * 0.7, 1), 1)  # rounded: many ties
        assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(M.auroc(np.ones(5), np.arange(5)))
    y = rng.integers(0, 4, 300)
    p = rng.dirichlet(np.ones(4), 300) + np.eye(4)[y] * 0.3
    p /= p.sum(1, keepdims=True)
    assert M.auroc_ovr(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    with warnings.catch_warnings():  # a bootstrap resample of a small group: numpy's "Mean of empty slice" before
        warnings.simplefilter("error")
        assert np.isnan(M.auroc_ovr(np.zeros(6, int), p[:6]))  # one class: no one-vs-rest AUROC is defined
        kept = y != 3  # a class absent: the mean over the classes present
        assert M.auroc_ovr(y[kept], p[kept]) == np.mean([M.auroc(y[kept] == k, p[kept, k]) for k in range(3)])


def test_resampled_auroc_is_auroc_bit_for_bit_on_resamples():
    """The bootstraps' O(n) AUROC of a resample (repeated rows as integer weights, scores sorted once) equals auroc
    on the resampled rows exactly (==, not approx: the reports' CIs and p-values stay what they were), with and
    without ties, within one group (keep), with a class absent (NaN) and with a NaN score."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        s = np.round(rng.normal(size=n), trial % 3) if trial % 2 else rng.normal(size=n).astype(np.float32)
        keep = rng.random(n) < 0.3
        f = M.resampled_auroc(y, s)
        for idx in [rng.integers(0, n, n) for _ in range(10)] + [np.arange(n), np.nonzero(y == 1)[0]]:
            for got, rows in ((f(idx), idx), (f(idx, keep), idx[keep[idx]])):
                want = M.auroc(y[rows], s[rows])
                assert got == want or (np.isnan(got) and np.isnan(want))
    f = M.resampled_auroc([0, 1, 1, 0], [0.1, np.nan, 0.3, 0.2])  # a NaN score counts only where it is drawn
    assert np.isnan(f(np.arange(4))) and f(np.array([0, 2, 3, 3])) == M.auroc([0, 1, 0, 0], [0.1, 0.3, 0.2, 0.2])
    with pytest.raises(IndexError):
        f(np.array([0, 4]))


def test_thresholds_come_from_the_roc_curve():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = rng.normal(y, 1)
    fpr, tpr, thr = roc_curve(y, s)
    assert M.youden_threshold(y, s) == pytest.approx(thr[np.argmax(tpr - fpr)])
    t = M.sensitivity_threshold(y, s, 0.9)
    assert (s[y == 1] >= t).mean() >= 0.9
    assert (s[y == 1] >= np.nextafter(t, np.inf)).mean() < 0.9  # the highest such threshold
    stats_ = M.binary_stats(y, s >= t)
    assert stats_["sensitivity"] >= 0.9 and 0 < stats_["specificity"] < 1


def test_binary_dp_eo_and_accuracy_gap_match_fairlearn():
    rng = np.random.default_rng(2)
    for _ in range(10):
        y, yhat = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
        g = rng.choice(["F", "M", "X"], 400)
        assert M.demographic_parity(yhat, g, y) == pytest.approx(
            fairlearn.demographic_parity_difference(y, yhat, sensitive_features=g))
        assert M.equal_opportunity(y, yhat, g) == pytest.approx(
            fairlearn.equal_opportunity_difference(y, yhat, sensitive_features=g))
        acc = M.group_accuracy(y, yhat, g)
        assert max(acc.values()) - min(acc.values()) == pytest.approx(
            fairlearn.MetricFrame(metrics=lambda a, b: np.mean(a == b), y_true=y, y_pred=yhat,
                                  sensitive_features=g).difference())


def test_binary_eo_counts_a_group_without_positives_as_fairlearn_does():
    y = np.array([1, 1, 0, 0, 0, 0, 1, 0])
    yhat = np.array([1, 0, 1, 0, 0, 1, 1, 0])
    g = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 2)  # b has no positives: fairlearn's TPR_b = 0
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fairlearn.equal_opportunity_difference(y, yhat, sensitive_features=g)
    assert M.equal_opportunity(y, yhat, g) == pytest.approx(ref) == pytest.approx(1.0)


def test_a_resample_lacking_a_class_stays_multiclass():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])  # a three-class task whose resample has no class 2
    yhat = np.array([0, 1, 2, 1, 0, 0, 0, 1])
    g = np.array(["a"] * 4 + ["b"] * 4)
    # classes 0..2: P(yhat=2 | a) = .25, b 0; P(yhat=0): a .25, b .75 -> DP .5; TPR_0: a .5, b 1; TPR_1: a 1, b .5
    assert M.demographic_parity(yhat, g, y, classes=range(3)) == pytest.approx(0.5)
    assert M.equal_opportunity(y, yhat, g, classes=range(3)) == pytest.approx(0.5)
    probs = np.eye(3)[yhat]
    s = M.fairness_summary(y, yhat, g, probs=probs)
    assert s["dp"] == pytest.approx(0.5)
    # a resample where neither labels nor decisions hold class 2 read as binary (class 1 only) before
    y2, yhat2 = np.array([0, 1, 0, 1, 0, 1, 0, 0]), np.array([1, 1, 1, 1, 0, 1, 0, 0])
    assert M.equal_opportunity(y2, yhat2, g) == pytest.approx(0.0)  # class 1 only: TPR a 1, b 1
    assert M.equal_opportunity(y2, yhat2, g, classes=range(3)) == pytest.approx(1.0)  # class 0: TPR a 0, b 1


def test_multiclass_dp_eo_essp_nar_by_hand():
    # group a: 4 samples, group b: 4 samples, classes 0..2
    y = np.array([0, 1, 2, 2, 0, 1, 2, 2])
    yhat = np.array([0, 1, 2, 0, 0, 0, 2, 2])
    g = np.array(["a"] * 4 + ["b"] * 4)
    # P(yhat=k|a) = [.5,.25,.25], P(yhat=k|b) = [.5,0,.5] -> DP = max(0, .25, .25) = .25
    assert M.demographic_parity(yhat, g, y) == pytest.approx(0.25)
    # TPR_k: a: [1, 1, .5], b: [1, 0, 1] -> EO = max(0, 1, .5) = 1
    assert M.equal_opportunity(y, yhat, g) == pytest.approx(1.0)
    acc = M.group_accuracy(y, yhat, g)  # a .75, b .75... b: [0,0,2,2] vs [0,1,2,2] -> .75
    assert acc == {"a": 0.75, "b": 0.75}
    assert M.essp(0.8, [0.9, 0.6]) == pytest.approx(0.8 / (1 + 0.1 + 0.2))
    assert M.nar([0.9, 0.6]) == pytest.approx(0.3 / 0.75)
    s = M.fairness_summary(y, yhat, g)
    assert s["essp_acc"] == pytest.approx(0.75) and s["nar"] == 0


def test_group_table_worst_and_gap():
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    s = np.array([.9, .1, .8, .2, .4, .6, .7, .3])
    g = np.array(["F", "F", "F", "F", "M", "M", "M", "M"])
    t = M.group_table(y, s, g, threshold=0.5)
    f, m = t.set_index("group").loc["F"], t.set_index("group").loc["M"]
    assert f["auroc"] == 1 and m["auroc"] == 0.75 and f["sensitivity"] == 1 and m["sensitivity"] == 0.5
    assert M.worst_and_gap(t, "auroc") == (0.75, 0.25)


def test_bootstrap_resamples_patients_not_rows():
    rng = np.random.default_rng(3)
    vals = np.repeat(rng.normal(size=50), 10)  # 50 patients, 10 identical images each
    pid = np.repeat(np.arange(50), 10)
    stat = lambda idx: float(vals[idx].mean())
    lo_c, hi_c = M.bootstrap(stat, len(vals), clusters=pid, n_boot=400)["value"]
    lo_r, hi_r = M.bootstrap(stat, len(vals), n_boot=400)["value"]
    assert lo_c < vals.mean() < hi_c
    assert (hi_c - lo_c) > 2 * (hi_r - lo_r)  # row resampling would pretend 500 independent images
    res = M.with_ci(lambda idx: {"mean": float(vals[idx].mean())}, len(vals), pid, n_boot=50)
    assert res["mean"]["value"] == pytest.approx(vals.mean()) and len(res["mean"]["ci"]) == 2


# ---- FID ----------------------------------------------------------------------------------------------------------
def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(600, 64)), rng.normal(0.3, 1.2, size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3
    ref = calculate_frechet_distance(*stats(a), *stats(b))
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid_from_features(a, b, "scipy") == pytest.approx(ref, rel=1e-6)
    mu1, mu2, s = rng.normal(size=8), rng.normal(size=8), np.cov(rng.normal(size=(50, 8)), rowvar=False)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9)  # equal covs
    assert abs(fid_from_features(a, a)) < 1e-8
    few = rng.normal(size=(30, 64))  # fewer samples than dimensions: singular covariance, PSD-root path
    s1, s2 = np.cov(few, rowvar=False), np.cov(rng.normal(size=(40, 64)), rowvar=False)
    direct = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    from fairness.fid import trace_sqrt_product
    assert trace_sqrt_product(s1, s2) == pytest.approx(direct, rel=1e-6)


def test_inception_features_match_pytorch_fid(tmp_path, monkeypatch):
    """Same (random) weights in our hand-written pool3 forward and in pytorch-fid's InceptionV3: same features."""
    import pytorch_fid.inception as pfi
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    sd = inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1008).state_dict()
    torch.save(sd, tmp_path / "pt_inception.pth")
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
    theirs = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    ours, label = inception(tmp_path / "pt_inception.pth")
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 40), dtype=np.uint8)
    with torch.no_grad():
        ref = theirs(torch.as_tensor(x).float().div(255)[:, None].expand(-1, 3, -1, -1))[0].flatten(1).double()
    got = extract(ours, x)
    assert np.allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5 * np.abs(ref.numpy()).max())
    assert "pytorch-fid" in label


def test_fid_cli_on_png_folders_with_groups(tmp_path):
    for folder, shift in (("real", 0), ("fake", 60)):
        for i in range(8):
            write_png(tmp_path / folder / f"{folder}{i}.png", size=24, value=(i * 20 + shift) % 256)
    pd.DataFrame({"file": [f"{f}{i}.png" for f in ("real", "fake") for i in range(8)],
                  "group": [("F" if i % 2 else "M") for _ in range(2) for i in range(8)]}).to_csv(
        tmp_path / "groups.csv", index=False)
    r = python_m("fairness.fid", [str(tmp_path / "real"), str(tmp_path / "fake"),
                                  "--no-pretrained", "--groups", str(tmp_path / "groups.csv"), "--json",
                                  str(tmp_path / "fid.json"), "--device", "cpu"], timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "fid.json").read_text())
    assert out["n_real"] == 8 and set(out["groups"]) == {"F", "M"} and out["fid"] > 0
    assert "n=8 < 2048" in r.stderr and "smoke test only" in r.stdout and "variance (1/G)" in r.stdout
    fids = [g["fid"] for g in out["groups"].values()]
    assert out["subgroup_variance"] == pytest.approx(np.var(fids))


def test_memorization_audit_finds_a_planted_copy(tmp_path):
    rng = np.random.default_rng(5)
    train = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    synth = rng.integers(0, 256, (25, 16, 16), dtype=np.uint8)
    synth[7] = train[13]  # a generated image that is a training patient's image
    res, order, idx, d1 = audit(synth, train, threshold=0.02)
    assert res["fraction_copies"] == pytest.approx(1 / 25) and order[0] == 7 and idx[7] == 13 and d1[7] < 1e-6
    np.savez(tmp_path / "synth.npz", images=synth)
    np.savez(tmp_path / "train.npz", images=train)
    r = python_m("fairness.memorization", [str(tmp_path / "synth.npz"),
                                           str(tmp_path / "train.npz"), "--out", str(tmp_path / "audit")], timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "audit/memorization.json").read_text())["fraction_copies"] == pytest.approx(0.04)


def test_fd_and_audit_on_a_classifiers_features_run_from_classify(tmp_path):
    """FD-<network> and the feature-space audit load the classifier in classify/ (classify.domain_fd,
    classify.domain_memorization) and compute with fairness/, which imports nothing from classify/."""
    import ast
    from classify.nets import arch_spec, build
    for f in (ROOT / "fairness").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "classify" for n in names), f"{f.name} imports {names}"
    spec = arch_spec("cnn8", 1, 2, 16, width=4)
    torch.manual_seed(0)
    torch.save({"arch": spec, "model": build(**spec).state_dict()}, tmp_path / "ckpt.pt")
    rng = np.random.default_rng(7)
    train = rng.integers(0, 256, (12, 16, 16), dtype=np.uint8)
    synth = rng.integers(0, 256, (10, 16, 16), dtype=np.uint8)
    synth[4] = train[9]
    np.savez(tmp_path / "train.npz", images=train, groups=np.array(["F", "M"] * 6))
    np.savez(tmp_path / "synth.npz", images=synth, groups=np.array(["F", "M"] * 5))
    r = python_m("classify.domain_fd", [str(tmp_path / "train.npz"), str(tmp_path / "synth.npz"), "--domain-ckpt",
                                        str(tmp_path / "ckpt.pt"), "--json", str(tmp_path / "fd.json"), "--device",
                                        "cpu"], timeout=300)
    assert r.returncode == 0, r.stderr
    fd = json.loads((tmp_path / "fd.json").read_text())
    assert fd["metric"].startswith("FD-cnn8") and fd["fid"] > 0 and set(fd["groups"]) == {"F", "M"}
    r = python_m("classify.domain_memorization", [str(tmp_path / "synth.npz"), str(tmp_path / "train.npz"),
                                                  "--feature-ckpt", str(tmp_path / "ckpt.pt"), "--out",
                                                  str(tmp_path / "audit")], timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "audit/memorization.json").read_text())
    assert res["fraction_copies"] == pytest.approx(0.1) and res["feature_nn_cosine_distance"]["min"] < 1e-6
    r = python_m("fairness.fid", [str(tmp_path / "train.npz"), str(tmp_path / "synth.npz"),
                                  "--domain-ckpt", str(tmp_path / "ckpt.pt")], timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1  # not fairness.fid's flag: one line


def test_memorization_reference_on_a_sample_of_training_queries_is_the_full_one_there():
    """Above max_train_queries training images the train-to-train reference is computed for a sample of them
    (linear, not quadratic, in the training set): each sampled image gets exactly its full-search distance."""
    from fairness.memorization import _flat, nearest
    rng = np.random.default_rng(6)
    train = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    train[41] = train[3]  # a duplicate pair: distance 0, whichever of the two is sampled
    t = _flat(train)
    _, full, _ = nearest(t, t, exclude_self=True)
    rows = np.array([3, 10, 41, 59])
    idx, part, _ = nearest(t[torch.from_numpy(rows)], t, exclude_self=True, rows=rows)
    np.testing.assert_array_equal(part, full[rows])
    assert part[0] == 0 and idx[0] == 41 and idx[2] == 3  # the duplicate found, the image itself excluded
    synth = rng.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    all_rows, _, _, _ = audit(synth, train)
    sampled, _, _, _ = audit(synth, train, max_train_queries=20)
    assert all_rows["n_train_queries"] == 60 and sampled["n_train_queries"] == 20
    assert sampled["pixel_nn_rmse"] == all_rows["pixel_nn_rmse"]  # the synthetic side is never sampled


def test_figures_draw(tmp_path):
    from PIL import Image
    from fairness.figures import bars, boxplots, lines, radar
    rng = np.random.default_rng(0)
    paths = [boxplots({"A": {"light": rng.random(20), "dark": rng.random(20)}, "B": {"light": rng.random(20)}},
                      tmp_path / "b.png", "t", "MSE"),
             radar({"base": {"F": .7, "M": .8, "X": .75}, "fair": {"F": .78, "M": .79, "X": .8}}, tmp_path / "r.png",
                   "AUC"),
             bars({"base": {"DP": (0.2, (0.1, 0.3))}, "fair": {"DP": (0.1, (0.05, 0.2))}}, tmp_path / "c.png", "t",
                  "DP"),
             lines({"vit": {0: .7, .5: .72}}, tmp_path / "l.png", "t", "ratio", "acc")]
    for p in paths:
        img = np.asarray(Image.open(p).convert("L"), dtype=float)
        assert img.shape[1] > 200 and img.std() > 10  # drawn, not a blank canvas


def test_average_ranks_equal_scipy_rankdata_with_and_without_ties():
    from scipy.stats import rankdata
    from fairness.metrics import average_ranks
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300):
        for x in (rng.normal(size=n), rng.integers(0, max(2, n // 4), n).astype(float), np.zeros(n)):
            assert np.array_equal(average_ranks(x), rankdata(x))
    assert np.isnan(M.auroc([0, 1, 1], [0.2, np.nan, 0.9]))  # a NaN score has no rank: no AUROC
