"""FairGen's parts, as docs/METHODS.md gives them from the public FairGen and CBDM code: group-resampling weights,
the class-balancing loss, and the two DPO losses (pure functions of tensors, so tests check them by hand); and the
batch loss on real images that train_ddpm.py and train_dpo.py share, which puts them together (and FairDiffusion's
per-sample weights, diffusion/fairdiffusion.py).

A group g is one (attribute x disease) class; n_g its training count.
"""
import numpy as np
import torch
import torch.nn.functional as F

from diffusion.ddpm import drop_labels, q_sample

SAMPLER_Q = {"uniform": 0.0, "cbrs": 1.0, "sqrs": 0.5}  # batch sampling weight n_g^-q per group


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
    Pass only the rows that kept their label (eps_and_cb_loss): a label-dropped row has no class."""
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


def real_batch_loss(net, sched, x_all, cls_all, K, gen, dgen, batch_size, sampler="uniform", grad_means=None,
                    grad_alpha=0.0, hflip=False, p_uncond=0.1, cb=None, fb=None, n_labels=1, amp=False, part=None):
    """One batch of the (FairGen-variant) DDPM loss on real images: a batch drawn with the sampler's weights
    (times our gradient-aware factor with grad_alpha > 0), eps-MSE with label dropout p_uncond, plus the
    class-balancing loss when cb = (tau, gamma); with fb (a fairdiffusion.FairBayes) the eps-MSE weighted per sample
    by 1 + sigma_g xi (g = attribute value = class // n_labels). x_all: uint8 (N, C, S, S); cls_all: class (N,);
    K: the number of classes (K is also the null label of guidance dropout).
    Random draws: batch indices from gen (CPU); flips, t, eps, label dropout, y' and xi from dgen, in that order,
    all for the whole batch of batch_size. part: the slice of it this process trains on (under torchrun, with
    batch_size the global batch and the same generators on every rank, each rank's part is what one process would
    draw for those images; None: all of it). The class-balancing loss is then each rank's mean over its own
    labelled rows, which their gradient average does not exactly make the global batch's.
    Returns (loss, per-image MSE, y) of the part."""
    device = x_all.device
    w = torch.as_tensor(sample_weights(cls_all.cpu().numpy(), SAMPLER_Q[sampler], grad_means, grad_alpha))
    idx = torch.multinomial(w, batch_size, replacement=True, generator=gen).to(device)
    B = len(idx)
    flip = torch.rand(B, device=device, generator=dgen) < 0.5 if hflip else None
    y = cls_all[idx]
    t = torch.randint(0, sched.T, (B,), device=device, generator=dgen)
    eps = torch.randn((B,) + tuple(x_all.shape[1:]), device=device, generator=dgen)
    y_in = drop_labels(y, p_uncond, K, dgen)
    yp = torch.randint(0, K, (B,), device=device, generator=dgen) if cb is not None else None  # y' uniform over K
    xi = torch.randn(B, device=device, generator=dgen) if fb is not None else None
    if part is not None:
        idx, y, t, eps, y_in = idx[part], y[part], t[part], eps[part], y_in[part]
        flip, yp, xi = (None if v is None else v[part] for v in (flip, yp, xi))
    x0 = x_all[idx].float() / 127.5 - 1  # (B, C, S, S) in [-1, 1]
    if hflip:
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    xt = q_sample(sched, x0, t, eps).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        if cb is not None:
            e_y, l_cb = eps_and_cb_loss(net, xt, t, y_in, yp, K, sched.T, *cb)
        else:
            e_y = net(xt, t, y_in).float()
    per = (e_y - eps).pow(2).flatten(1).mean(1)  # ||eps - eps_theta(x_t, t, y)||^2 per image
    if fb is not None:  # FairDiffusion: mean_i (1 + sigma_g(i) xi_i) ||eps_i - eps_theta||^2
        loss = (fb.weights((y // n_labels)[:, None], xi) * per).mean()
    else:
        loss = per.mean()
    if cb is not None:
        loss = loss + l_cb
    return loss, per, y


def eps_and_cb_loss(net, xt, t, y_in, yp, null, T, tau, gamma):
    """eps_theta(x_t, t, y_in) for every row, and the class-balancing loss over the rows that kept their label.
    A label-dropped row (y_in == null) has no class to balance, so it gets no L_reg / L_com: CBDM's code adds the
    loss only to conditioned batches (`if self.cb and y_0 is not None`; its label dropout drops a whole batch), ours
    drops labels per row, so the loss skips those rows (mean over the labelled rows; 0 when there are none).
    eps(x_t, y) of every row and eps(x_t, y') of the labelled rows go through the network in one batch."""
    lab = y_in != null  # (B,)
    e = net(torch.cat([xt, xt[lab]]), torch.cat([t, t[lab]]), torch.cat([y_in, yp[lab]])).float()
    e_y, e_yp = e[:len(xt)], e[len(xt):]  # (B, C, S, S), (B_lab, C, S, S)
    if not lab.any():
        return e_y, e_y.sum() * 0.0
    return e_y, cb_loss(e_y[lab], e_yp, t[lab], T, tau, gamma)
