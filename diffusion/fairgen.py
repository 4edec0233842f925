"""FairGen's parts, as FORMULAS.md gives them from the public FairGen and CBDM code: group-resampling weights,
the class-balancing loss, and the two DPO losses. Pure functions of tensors, so tests check them by hand.

A group g is one (attribute x disease) class; n_g its training count.
"""
import numpy as np
import torch.nn.functional as F


def sample_weights(cls, q, grad_norms=None, alpha=0.0):
    """Per-sample weight w_i = n_g(i)^-q * (G_g / mean G)^alpha.
    q = 0: uniform; q = 1: CBRS (1/n_g); q = 0.5: SQRS (1/sqrt(n_g)). alpha = 0 (default) is the public code's
    behaviour; alpha > 0 is our gradient-aware factor (FairGen's paper names one, its code has none): G_g is the
    mean gradient norm of group g's loss over the last K steps."""
    cls = np.asarray(cls)
    counts = np.bincount(cls)
    w_g = np.where(counts > 0, counts.astype(float), np.inf) ** -q
    if alpha and grad_norms is not None:
        g = np.asarray(grad_norms, float)
        seen = np.isfinite(g) & (g > 0)  # groups not drawn yet have no norm: factor 1
        if seen.any():
            w_g = w_g * np.where(seen, g / g[seen].mean(), 1.0) ** alpha
    return w_g[cls]


def cb_loss(eps_y, eps_yp, t, T, tau=1.0, gamma=0.25):
    """Class-balancing loss (CBDM, Qin et al. 2023; identical in FairGen), y' drawn uniformly from the classes:
    w(t) = tau t / T (t 0-based, as the CBDM code);
    L_reg = mean w(t) ||eps(x_t, y) - sg[eps(x_t, y')]||^2,  L_com = mean w(t) ||sg[eps(x_t, y)] - eps(x_t, y')||^2;
    returns L_reg + gamma L_com (the DDPM loss is added by the caller). Squared norms are means over pixels.
    Pass only the rows that kept their label (train_ddpm.eps_and_cb_loss): a label-dropped row has no class."""
    w = tau * t.float() / T
    reg = (w * (eps_y - eps_yp.detach()).pow(2).flatten(1).mean(1)).mean()
    com = (w * (eps_y.detach() - eps_yp).pow(2).flatten(1).mean(1)).mean()
    return reg + gamma * com


def dpo_fairgen(err_w, err_l, lam=0.5):
    """FairGen code's DPO: L_pref = -mean log sigmoid(lambda (L_l - L_w)); L_DPO = L_pref + mean L_w.
    err_w, err_l: per-pair ||eps_theta(x_t) - eps||^2 (means over pixels) of the preferred / rejected sample."""
    return -F.logsigmoid(lam * (err_l - err_w)).mean() + err_w.mean()


def dpo_diffusion(err_w, err_l, ref_w, ref_l, beta=2500.0):
    """Diffusion-DPO (Wallace et al. 2023) with a frozen reference model's errors ref_w, ref_l:
    L = -mean log sigmoid(-beta/2 [(err_w - ref_w) - (err_l - ref_l)])."""
    return -F.logsigmoid(-beta / 2 * ((err_w - ref_w) - (err_l - ref_l))).mean()


