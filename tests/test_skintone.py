"""Skin-tone study: the residual VAE, its perceptual loss, and the representation effect on the phantom."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

from conftest import ROOT
from forkserver import python_m
from same_numbers import check_same_seed_same_numbers
from vae.skin import SETS
from vae.skintone_report import GROUPS, answers, compare_groups
from vae.train_resvae import ResVAE, VGGPerceptual, fit, vae_loss

KEYS = {"metric", "a", "b", "diff", "ci", "p", "p_holm", "mde", "n_units", "replicates", "method"}


def test_resvae_shapes_and_perceptual_layers():
    m = ResVAE(3, width=8, levels=2, latent_channels=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat, mu, logvar = m(x)
    assert x_hat.shape == x.shape and mu.shape == (2, 16, 8, 8)
    vgg = VGGPerceptual(pretrained=False)
    feats = vgg(x)
    assert len(feats) == 16 and (feats[0] < 0).any()  # 16 conv outputs, taken before the ReLU
    loss, mse, kl, perc = vae_loss(x_hat, x, mu, logvar, vgg)
    assert perc > 0 and torch.isclose(loss, mse + kl + perc)
    loss.backward()
    assert next(iter(vgg.parameters())).grad is None  # VGG19 is frozen
    assert vae_loss(x, x, torch.zeros_like(mu), torch.zeros_like(logvar), vgg)[3] == 0


def test_bf16_fit_tracks_fp32_and_keeps_the_loss_in_fp32(monkeypatch):
    """--amp bf16 (the default where the CPU has bf16, results/bench/bf16_resvae): from the same weights and batches
    the two arithmetics' losses stay within 0.2% of each other epoch by epoch (another seed moves them ~1%) without
    being equal, the loss is computed under autocast from fp32 tensors, and amp=False is the fp32 path (the same
    history twice)."""
    import vae.train_resvae as resvae
    seen = []

    def recording_loss(x_hat, x, mu, logvar, vgg, weight):
        seen.append((torch.is_autocast_enabled("cpu"), x_hat.dtype, mu.dtype, logvar.dtype))
        return vae_loss(x_hat, x, mu, logvar, vgg, weight)

    torch.manual_seed(0)
    x = torch.rand(24, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    vgg = VGGPerceptual(pretrained=False)
    kw = dict(width=8, latent_channels=8, latent_res=4, epochs=3, batch_size=8, lr=1e-3, perceptual_weight=1.0,
              seed=0, progress=False)
    device = torch.device("cpu")
    _, fp32 = fit(x, vgg, device, **kw)
    assert fit(x, vgg, device, **kw)[1] == fp32
    monkeypatch.setattr(resvae, "vae_loss", recording_loss)
    _, bf16 = fit(x, vgg, device, amp=True, **kw)
    assert bf16 != fp32 and seen and all(s == (True, torch.float32, torch.float32, torch.float32) for s in seen)
    for a, b in zip(fp32, bf16):
        assert abs(b["loss"] - a["loss"]) <= 0.002 * a["loss"], (a, b)  # another seed: ~1% away


def test_representation_effect_on_the_phantom(tmp_path):
    """Any working VAE: dark-test MSE is lower after training on C (dark) than on A (light); light the reverse.
    The VGG19 term is off to keep this short (its 16 layers are tested above); the whole study chain runs."""
    out = tmp_path / "sk"
    r = python_m("vae.skintone_study", ["--no-pretrained", "--size", "16", "--epochs", "20", "--n-test", "40",
                                        "--n-train", "200", "--repeats", "1", "--width", "16", "--latent-res", "4",
                                        "--n-boot", "100", "--perceptual-weight", "0", "--out", str(out), "--runs",
                                        str(tmp_path / "runs")], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    mse = s["mse_median"]
    assert mse["C"]["dark"] < mse["A"]["dark"] and mse["A"]["light"] < mse["C"]["light"]
    assert s["data"] == "phantom" and s["pretrained"] is False and len(s["comparisons"]) == 11
    from common.runs import cpu_has_bf16  # --amp auto: bf16 where the CPU has it (the check agreed), and said so
    assert s["arithmetic"] == ("bf16 autocast (the loss terms in fp32)" if cpu_has_bf16() else "fp32")
    for f in ("fig3_mse.png", "fig6_latent_std.png", "fig4_recon_light.png", "fig5_recon_dark.png", "medians.md",
              "std_vs_mse.md", "fig8_mse_by_diagnosis.png", "comparisons.md", "per_repeat.csv", "preds.csv"):
        assert (out / f).is_file()
    assert "PHANTOM" in (out / "medians.md").read_text() and "random VGG19" in (out / "medians.md").read_text()


def test_smoke_compares_at_the_level_of_repeats(smoke_study):
    """The smoke chain: summary.json's comparisons have every key, one replicate per repeat, Holm p >= p; preds.csv
    has one row per test image, model and repeat with its id; the answers and per-repeat medians are there."""
    out, runs, r = smoke_study("vae.skintone_study")
    s = json.loads((out / "summary.json").read_text())
    assert s["repeats"] == 2 and len(s["comparisons"]) == 11
    for c in s["comparisons"]:
        assert set(c) >= KEYS and c["replicates"] == s["repeats"] and "exact sign-flip" in c["method"]
        assert c["p_holm"] >= c["p"] and c["ci"][0] <= c["diff"] <= c["ci"][1]
        assert c["p"] in (0.5, 1.0) and c["mde"] == np.inf  # 2 repeats: 2 sign patterns of 4 at least; no Holm pass
    assert len(s["answers"]) == 2 and s["answers"][0].startswith("Does the VAE") and s["answers"][1] in r.stdout
    assert all(len(s["median_per_repeat"][t][g]) == 2 for t in SETS for g in GROUPS)
    preds = pd.read_csv(out / "preds.csv")
    assert {"repeat", "train_set", "image", "test_group", "skin_type", "diagnosis", "mse", "latent_std",
            "seed"} <= set(preds.columns)
    assert len(preds) == 2 * 3 * 2 * 8 and not preds.duplicated(["repeat", "train_set", "image"]).any()
    assert "exact sign-flip" in (out / "comparisons.md").read_text() and s["min_holm_p"] == 1
    assert "two-level bootstrap" in (out / "medians.md").read_text()


def planted(gap, shift_c=0.0, repeats=10, n=30, seed=0):
    """A synthetic preds table: per repeat its own test images and a repeat offset shared by all; dark MSE =
    light-like MSE + gap in every training set; set C's dark images reconstructed shift_c better than under A."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(repeats):
        offset = rng.normal(0, 0.005)
        for g in GROUPS:
            base = 0.03 + offset + rng.gamma(4, 0.005, n) + (gap if g == "dark" else 0)
            for t in SETS:
                mse = base + rng.normal(0, 0.002, n) + (shift_c if (t, g) == ("C", "dark") else 0)
                rows += [{"repeat": r, "train_set": t, "image": f"r{r}-{g}-{i}", "test_group": g, "mse": m}
                         for i, m in enumerate(mse)]
    return pd.DataFrame(rows)


def test_comparisons_find_a_planted_gap_and_no_gap_where_none():
    """Dark = light + 0.05 and C's dark 0.03 lower than A's (so C's gap is 0.02): found, with CIs excluding 0; no
    gap: CIs contain 0."""
    # 10 repeats (the quick scale's): 10 differences of one sign give the exact sign-flip p 2 / 1024, Holm p 0.008
    # over the 4 primary rows and 0.014 over the 7 exploratory ones
    c = {(x["metric"], x["a"][0], x["b"][0]): x for x in compare_groups(planted(0.05, -0.03))}
    for t, gap in (("A", 0.05), ("B", 0.05), ("C", 0.02)):
        d = c[(f"median MSE, training set {t} ({SETS[t]})", "d", "l")]
        assert abs(d["diff"] - gap) < 0.005 and d["ci"][0] > 0 and d["p_holm"] < 0.05 and d["replicates"] == 10
    d = c[("median MSE, dark test images", "C", "A")]
    assert abs(d["diff"] + 0.03) < 0.005 and d["ci"][1] < 0
    d = c[("median MSE, light test images", "C", "A")]
    assert d["ci"][0] <= 0 <= d["ci"][1]
    d = c[("median MSE gap dark - light", "C", "A")]  # the gap closes by 0.03 under C: a difference in differences
    assert abs(d["diff"] + 0.03) < 0.005 and d["ci"][1] < 0
    null = compare_groups(planted(0.0))
    for d in null[:3]:
        assert d["ci"][0] <= 0 <= d["ci"][1] and abs(d["diff"]) < 0.01
    said = answers(null)
    assert "cannot tell" in said[0] and "cannot tell" not in answers(compare_groups(planted(0.05)))[0]


def test_train_resvae_end_to_end_on_a_fitzpatrick_layout(tmp_path):
    """The stage script alone, on a Fitzpatrick17k-layout folder: it trains on set B (light and dark images), writes
    a checkpoint that rebuilds the VAE, and the same seed gives the same loss curve."""
    from test_data import fitz_fixture
    fitz_fixture(tmp_path / "f")
    common = [sys.executable, "-m", "vae.train_resvae", "--data-root", str(tmp_path / "f"), "--no-pretrained",
              "--size", "16", "--epochs", "2", "--n-train", "8", "--width", "4", "--train-set", "B", "--seed", "5"]
    for name in ("a", "b"):
        r = subprocess.run([*common, "--out-dir", str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "a/metrics.json").read_text())
    assert m["n_train"] == 8 and len(m["history"]) == 2 and m["vgg"].startswith("random")
    assert m["history"] == json.loads((tmp_path / "b/metrics.json").read_text())["history"]
    ck = torch.load(tmp_path / "a/ckpt.pt", map_location="cpu", weights_only=True)
    a = ck["args"]
    net = ResVAE(3, width=a["width"], levels=int(np.log2(a["size"] // a["latent_res"])),
                 latent_channels=a["latent_channels"])
    net.load_state_dict(ck["model"])
    assert net(torch.zeros(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)


def test_same_seed_same_numbers(smoke_study, tmp_path):
    """Every stage script of the smoke chain rerun writes the same file; the study rerun on its stages reuses them
    all and writes the same summary (tests/same_numbers.py)."""
    check_same_seed_same_numbers("skintone", smoke_study, tmp_path)
