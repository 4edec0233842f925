"""FairDiffusion's Fair Bayesian Perturbation: the loss weights by hand, sigma in [0, 1], a search that narrows a
loss gap it is shown (and widens none it is not), a resume that restores sigma and its record, and a search
whose bytes do not depend on the BLAS kernels or threads."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.runs import load_checkpoint
from diffusion import fairdiffusion
from diffusion.ddpm import Schedule
from diffusion.fairdiffusion import FairBayes, loss_gap, loss_weights, ucb_argmax
from diffusion.fairgen import real_batch_loss
from conftest import ROOT
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


def test_each_window_fits_then_clears_and_every_step_mixes(monkeypatch):
    seen = []
    monkeypatch.setattr(fairdiffusion, "ucb_argmax", lambda X, r, beta, rng: seen.append((np.array(X), r, beta))
                        or np.array([0.2, 0.6]))
    fb = FairBayes(2, window=3, beta=0.4, rho=0.9, seed=5)
    u = np.random.default_rng(5).uniform(0, 1, (4, 2))  # the mixing draws, in order
    want = np.ones(2)
    for step in (1, 2, 3, 4):
        fb.observe(step, gap=float(step))
        want = 0.9 * (np.array([0.2, 0.6]) if step == 3 else want) + 0.1 * u[step - 1]
        assert np.allclose(fb.sigma, want)
    (X, r, beta), = seen  # one fit, at step 3, on that window's three records, then the record cleared
    assert X.shape == (3, 2) and r == [-1.0, -2.0, -3.0] and beta == 0.4 and np.allclose(X[0], 1.0)
    assert fb.updates == [3] and len(fb.X) == 1 and fb.r == [-4.0]


def test_batch_loss_weights_each_image_by_its_attribute_value():
    """class = attribute x label (common/modalities.py): with 2 labels, classes 0, 1 are attribute 0 and 2, 3
    attribute 1; sigma = (0, 1) perturbs only attribute 1's images (a label index in its place would fail)."""
    x = torch.randint(0, 256, (40, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cls = torch.arange(40) % 4
    net = lambda xt, t, y: xt * 0.5 + y[:, None, None, None] * 0.01  # any deterministic eps_theta
    fb = FairBayes(2)
    fb.sigma = np.array([0.0, 1.0])
    streams = lambda: (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    gen, dgen = streams()
    plain, per, y = real_batch_loss(net, Schedule(), x, cls, 4, gen, dgen, 32)
    xi = torch.randn(32, generator=dgen)  # the draw the weighted loss takes next from the same stream
    gen, dgen = streams()
    loss, per2, y2 = real_batch_loss(net, Schedule(), x, cls, 4, gen, dgen, 32, fb=fb, n_labels=2)
    assert torch.equal(per, per2) and torch.equal(y, y2) and {0, 1, 2, 3} <= set(y.tolist())
    assert torch.allclose(plain, per.mean())
    assert torch.allclose(loss, ((1 + (y // 2 == 1).float() * xi) * per).mean())


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
    # a run trained with the flag is not continued without it, nor the reverse, nor with another search
    r = run_train(tmp_path / "split", "--steps", "30", "--resume", check=False)
    assert r.returncode != 0 and "--fair-bayes" in r.stderr
    r = run_train(tmp_path / "split", "--steps", "30", "--resume", "--fair-bayes", "--fair-time-window", "9",
                  check=False)
    assert r.returncode != 0 and "--fair-time-window 9 (checkpoint: 7)" in r.stderr
    r = run_train(tmp_path / "plain", "--steps", "10", "--save-every", "10")
    r = run_train(tmp_path / "plain", "--steps", "20", "--resume", *fb, check=False)
    assert r.returncode != 0 and "without --fair-bayes" in r.stderr


SEARCH = """
import numpy as np
from diffusion.fairdiffusion import FairBayes
out = []
for G in (2, 3):
    for seed in range(3):
        fb = FairBayes(G, window=20, seed=777 + seed)
        rng = np.random.default_rng(seed)
        for step in range(1, 81):
            fb.observe(step, float(abs(rng.normal(0.02 + 0.01 * fb.sigma[0], 0.01))))
        out.append(fb.sigma)
print(" ".join(x.hex() for s in out for x in s))
"""


def test_sigma_search_is_byte_identical_under_other_blas_kernels_and_threads():
    """The same seeds give the same sigma bytes whichever kernels OpenBLAS picks for the CPU (OPENBLAS_CORETYPE
    stands in for another machine) and however many threads it uses: 24 GP updates, in separate processes (three
    kernels, one and two threads). Before the search rounded its answer, Sandybridge's and Prescott's kernels changed
    sigma from the 6th digit."""
    import os
    outs = set()
    for coretype, threads in (("Haswell", "1"), ("Sandybridge", "2"), ("Prescott", "1")):
        env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        r = subprocess.run([sys.executable, "-c", SEARCH], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.add(r.stdout)
    assert len(outs) == 1 and len(next(iter(outs)).split()) == 15  # 3 x 2 + 3 x 3 sigmas
