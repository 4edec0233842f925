"""FairDiffusion's Fair Bayesian Perturbation (Luo et al., Science Advances 2025), from its public training code
(docs/METHODS.md, "FairDiffusion"); `train_ddpm.py --fair-bayes` uses it.

One noise scale sigma_g in [0, 1] per value g of each sensitive attribute, all starting at 1. Each step:
    w_i = 1 + sum_attributes sigma_{g(i)} xi_i,   xi_i ~ N(0, 1)         per-sample loss weights
    loss = mean_i w_i ||eps_i - eps_theta(x_t,i, t_i, c_i)||^2
    r = - sum_attributes (max_g mean loss_g - min_g mean loss_g)        over the batch; (sigma, r) recorded
    every `window` steps: sigma = argmax_[0,1]^G UCB(sigma) = mu(sigma) + sqrt(beta) std(sigma) of a Gaussian
                          process fitted to the window's records, which are then cleared
    sigma <- rho sigma + (1 - rho) U(0, 1)                              exploitation-rate mixing
The original fits BoTorch's SingleTaskGP (Matern 5/2, learned noise) and maximises UCB with optimize_acqf; ours is
scikit-learn's GaussianProcessRegressor with the same kernel family and scipy's L-BFGS-B over random starts in the
box, an equivalent, not the same code. Our modalities have one attribute each; `groups` may hold several columns.
"""
import warnings

import numpy as np
import torch

from common.report import pyplot


def loss_weights(sigma, groups, xi):
    """w_i = 1 + sum over attributes a of sigma[groups[i, a]] * xi_i.
    sigma: (G,) over every (attribute, value) slot; groups: (B, A) long, slot index per attribute; xi: (B,)."""
    return 1 + sigma[groups].sum(1) * xi  # (B,)


def loss_gap(per, groups):
    """sum over attributes of (max_g mean loss_g - min_g mean loss_g) over the groups present in the batch
    (0 for an attribute with one group present). per: (B,) per-sample losses; groups: (B, A)."""
    per, groups = np.asarray(per, float), np.asarray(groups)
    gap = 0.0
    for a in range(groups.shape[1]):
        means = [per[groups[:, a] == g].mean() for g in np.unique(groups[:, a])]
        gap += max(means) - min(means)
    return gap


SNAP = 1e-3  # the search's answer is rounded to this grid: see ucb_argmax


def ucb_argmax(X, r, beta, rng, starts=16):
    """argmax over [0, 1]^G of mean + sqrt(beta) std of a Gaussian process fitted to (X, r), rounded to a grid of
    SNAP. The GP's linear algebra runs in the BLAS library numpy and scikit-learn load, whose last bits depend on the
    CPU model (OpenBLAS picks its kernels at run time), and L-BFGS-B's finite-difference gradients magnify those
    bits: unrounded, sigma differed from the 5th digit between two machines of one kind. The best start is chosen
    on its UCB rounded to 1e-9 (ties to the first start), and the answer rounded to SNAP, so that noise below both
    never reaches sigma (tests/test_fairgen.py runs the search under several BLAS kernels and thread counts)."""
    from scipy.optimize import minimize
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
    X, r = np.asarray(X, float), np.asarray(r, float)
    G = X.shape[1]
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(np.full(G, 0.5), (1e-2, 1e2), nu=2.5) + \
        WhiteKernel(1e-2, (1e-6, 1e1))
    with warnings.catch_warnings():  # hyperparameters at a bound: the window's rewards are mostly noise, a flat GP
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(X, r)

    def neg_ucb(s):
        mu, sd = gp.predict(s[None], return_std=True)
        return -(mu[0] + np.sqrt(beta) * sd[0])
    x0 = np.vstack([X[np.argmax(r)], rng.uniform(0, 1, (starts - 1, G))])
    found = [minimize(neg_ucb, s, method="L-BFGS-B", bounds=[(0.0, 1.0)] * G) for s in x0]
    best = min(range(len(found)), key=lambda i: (round(float(found[i].fun), 9), i))
    return np.clip(np.round(found[best].x / SNAP) * SNAP, 0.0, 1.0)


class FairBayes:
    """The sigma search's state: sigma, the window's records, its random stream, and the trajectory
    ([step, *sigma, gap] per step; the GP updates' steps in `updates`) for metrics.json and the figure."""

    def __init__(self, n_slots, window=50, beta=0.1, rho=0.95, seed=0):
        self.sigma = np.ones(n_slots)
        self.window, self.beta, self.rho = window, beta, rho
        self.rng = np.random.default_rng(seed)
        self.X, self.r, self.trajectory, self.updates = [], [], [], []

    def weights(self, groups, xi):
        return loss_weights(torch.as_tensor(self.sigma, dtype=xi.dtype, device=xi.device), groups, xi)

    def observe(self, step, gap):
        """After training step `step` (1-based), whose batch loss gap (loss_gap) was gap: record, search, mix."""
        self.X.append(self.sigma.copy())
        self.r.append(-gap)
        self.trajectory.append([step, *self.sigma.tolist(), gap])
        if len(self.X) >= self.window:
            self.sigma = ucb_argmax(self.X, self.r, self.beta, self.rng)
            self.X, self.r = [], []
            self.updates.append(step)
        self.sigma = self.rho * self.sigma + (1 - self.rho) * self.rng.uniform(0, 1, len(self.sigma))

    def state_dict(self):
        return {"sigma": self.sigma.tolist(), "X": [x.tolist() for x in self.X], "r": list(self.r),
                "rng": self.rng.bit_generator.state, "trajectory": self.trajectory, "updates": self.updates,
                "window": self.window, "beta": self.beta, "rho": self.rho}

    def load_state_dict(self, s):
        self.sigma = np.array(s["sigma"], float)
        self.X, self.r = [np.array(x, float) for x in s["X"]], list(s["r"])
        self.rng.bit_generator.state = s["rng"]
        self.trajectory, self.updates = [list(t) for t in s["trajectory"]], list(s["updates"])


def plot_trajectory(fb, names, path, title):
    """sigma per group and the batch loss gap (raw and smoothed) against the step; GP updates as dotted lines."""
    plt = pyplot()
    tr = np.array(fb.trajectory, float)
    if not len(tr):
        return
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(5.5, 4.5), sharex=True)
    for j, name in enumerate(names):
        a1.plot(tr[:, 0], tr[:, 1 + j], label=f"sigma {name}")
    a1.set_ylim(-0.02, 1.02)
    a1.set_ylabel("sigma")
    a1.legend(fontsize=7)
    k = max(1, min(len(tr) // 10, 25))
    a2.plot(tr[:, 0], tr[:, -1], alpha=0.3, lw=0.6, label="batch")
    a2.plot(tr[k - 1:, 0], np.convolve(tr[:, -1], np.ones(k) / k, mode="valid"), label=f"mean of {k} steps")
    a2.set_ylabel("loss gap (max - min group)")
    a2.set_xlabel("step")
    a2.legend(fontsize=7)
    for s in fb.updates:
        for a in (a1, a2):
            a.axvline(s, ls=":", c="grey", lw=0.8)
    a1.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
