"""Skin-tone study: the residual VAE, its perceptual loss, and the representation effect on the phantom."""
import json
import subprocess
import sys

import torch

from conftest import ROOT
from vae.train_resvae import ResVAE, VGGPerceptual, vae_loss


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


def test_representation_effect_on_the_phantom(tmp_path):
    """Any working VAE: dark-test MSE is lower after training on C (dark) than on A (light); light the reverse.
    The VGG19 term is off to keep this short (its 16 layers are tested above); the whole study chain runs."""
    out = tmp_path / "sk"
    r = subprocess.run([sys.executable, "-m", "vae.skintone_study", "--no-pretrained", "--size", "16", "--epochs", "20",
                        "--n-test", "40", "--n-train", "200", "--repeats", "1", "--width", "16", "--latent-res", "4",
                        "--n-boot", "100", "--perceptual-weight", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    mse = s["mse_median"]
    assert mse["C"]["dark"] < mse["A"]["dark"] and mse["A"]["light"] < mse["C"]["light"]
    assert s["data"] == "phantom" and s["pretrained"] is False and set(s["p_value"]) == {"A", "B", "C"}
    for f in ("fig3_mse.png", "fig6_latent_std.png", "fig4_recon_light.png", "fig5_recon_dark.png", "medians.md",
              "std_vs_mse.md", "fig8_mse_by_diagnosis.png"):
        assert (out / f).is_file()
    assert "PHANTOM" in (out / "medians.md").read_text() and "random VGG19" in (out / "medians.md").read_text()
