"""FairDiffusion's Fair Bayesian Perturbation: the loss weights by hand, sigma in [0, 1], a search that narrows a
loss gap it is shown (and widens none it is not), and a resume that restores sigma and its record."""
import json

import numpy as np
import pytest
import torch

from common.runs import load_checkpoint
from diffusion.fairdiffusion import FairBayes, loss_gap, loss_weights, ucb_argmax
from test_ddpm import run_train


def test_loss_weights_are_one_plus_the_sum_of_sigma_times_xi():
    sigma = torch.tensor([0.2, 0.9, 0.5, 0.0, 1.0])  # attribute 1: slots 0-1; attribute 2: slots 2-4
    groups = torch.tensor([[0, 2], [1, 4], [1, 3], [0, 4]])
    xi = torch.tensor([1.5, -0.5, 2.0, -1.0])
    want = torch.tensor([1 + (0.2 + 0.5) * 1.5, 1 + (0.9 + 1.0) * -0.5, 1 + (0.9 + 0.0) * 2.0, 1 + (0.2 + 1.0) * -1.0])
    assert torch.allclose(loss_weights(sigma, groups, xi), want)
    fb = FairBayes(2)
    fb.sigma = np.array([0.3, 0.7])
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(6, generator=g)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(fb.weights(y[:, None], xi), 1 + torch.tensor([0.3, 0.7])[y] * xi)


def test_loss_gap_is_max_minus_min_group_mean_over_groups_present():
    per = np.array([1.0, 3.0, 2.0, 6.0, 4.0])
    assert loss_gap(per, np.array([[0], [0], [1], [1], [2]])) == pytest.approx(4.0 - 2.0)  # means 2, 4, 4
    assert loss_gap(per, np.array([[0]] * 5)) == 0.0  # one group present: no gap
    assert loss_gap(per, np.array([[0, 3], [0, 3], [1, 4], [1, 4], [1, 4]])) == pytest.approx(2.0 + 2.0)


def test_sigma_stays_in_the_unit_box():
    rng = np.random.default_rng(1)
    fb = FairBayes(3, window=7, seed=2)
    for step in range(1, 60):
        fb.observe(step, float(rng.exponential(2.0)))
        assert np.all((fb.sigma >= 0) & (fb.sigma <= 1))
    assert fb.updates == [7, 14, 21, 28, 35, 42, 49, 56]
    s = ucb_argmax(rng.uniform(-3, 4, (10, 2)), rng.normal(size=10), 0.1, rng)  # records outside the box too
    assert np.all((s >= 0) & (s <= 1))


def simulate(larger, steps=300, seed=0):
    """Group losses that fall as that group's sigma rises (base_g - sigma_g + noise), group `larger` 0.5 higher:
    the gap closes at sigma_larger - sigma_other = 0.5. Returns the trajectory's sigma_1 - sigma_0 and its gaps."""
    rng = np.random.default_rng(seed)
    fb = FairBayes(2, window=25, seed=seed)
    y = np.repeat([0, 1], 16)[:, None]
    base = np.where(np.arange(2) == larger, 1.5, 1.0)
    for step in range(1, steps + 1):
        per = base[y[:, 0]] - fb.sigma[y[:, 0]] + rng.normal(0, 0.05, len(y))
        fb.observe(step, loss_gap(per, y))
    tr = np.array(fb.trajectory)
    return tr[:, 2] - tr[:, 1], tr[:, -1]


@pytest.mark.parametrize("larger", [0, 1])
def test_the_search_moves_sigma_to_narrow_the_gap(larger):
    diff, gap = simulate(larger)
    half = len(diff) // 2
    sign = 1 if larger == 1 else -1  # the group with the larger loss needs the larger sigma
    assert sign * diff[half:].mean() > 0.2  # from 0 at the start (sigma = 1, 1)
    assert gap[half:].mean() < 0.6 * gap[:25].mean()  # the first window explores around sigma = 1, 1


def test_resume_restores_sigma_and_its_record(tmp_path):
    fb = ["--fair-bayes", "--fair-time-window", "7"]
    run_train(tmp_path / "straight", "--steps", "20", "--save-every", "10", *fb)
    run_train(tmp_path / "split", "--steps", "10", "--save-every", "10", *fb)
    mid = load_checkpoint(tmp_path / "split/ckpt.pt")["fair_bayes"]
    assert len(mid["trajectory"]) == 10 and len(mid["X"]) == 3 and mid["updates"] == [7]  # a window half full
    r = run_train(tmp_path / "split", "--steps", "20", "--save-every", "10", "--resume", *fb)
    assert "at step 10" in r.stdout
    a, b = load_checkpoint(tmp_path / "straight/ckpt.pt"), load_checkpoint(tmp_path / "split/ckpt.pt")
    assert a["fair_bayes"]["sigma"] == b["fair_bayes"]["sigma"]
    assert a["fair_bayes"]["trajectory"] == b["fair_bayes"]["trajectory"]
    assert a["fair_bayes"]["updates"] == b["fair_bayes"]["updates"] == [7, 14]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    m = json.loads((tmp_path / "split/metrics.json").read_text())["fair_bayes"]
    assert m["trajectory"] == a["fair_bayes"]["trajectory"] and m["groups"] == ["dark", "bright"]
    assert (tmp_path / "split/fair_bayes.png").stat().st_size > 10_000
    # a run trained without the flag is not continued with it (nor the reverse)
    r = run_train(tmp_path / "split", "--steps", "30", "--resume", check=False)
    assert r.returncode != 0 and "--fair-bayes" in r.stderr
