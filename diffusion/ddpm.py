"""The DDPM core: noise schedules, the forward process, the eps-prediction loss with classifier-free guidance
dropout, and the two samplers (ancestral DDPM, DDIM). docs/METHODS.md, "DDPM core".

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                             (Ho et al. 2020, Eq. 4)
    L   = E ||eps - eps_theta(x_t, t, y)||^2, y -> null with p_uncond            (Ho & Salimans 2022)
    guided eps = (1 + w) eps(x, y) - w eps(x, null)
    DDIM (Song et al. 2021, Eq. 12): x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t'); eta = 1 with every step = DDPM.
Timesteps are 0-based here: t = 0 is the first noising step, t = T - 1 the last.
"""
import math

import torch


class Schedule:
    """beta_t and everything derived from it, as float64 on the CPU (indexed, then moved to the data's device)."""

    def __init__(self, kind="linear", T=1000):
        if T < 1:
            raise ValueError(f"T must be >= 1, not {T}")
        if kind == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', not {kind!r}")
        self.kind, self.T, self.betas = kind, T, betas
        self.alphas = 1 - betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        # posterior q(x_{t-1} | x_t, x_0): variance beta_tilde, mean c0 x_0 + ct x_t   (Ho et al. Eq. 6-7)
        self.post_var = betas * (1 - self.abar_prev) / (1 - self.abar)
        self.post_c0 = betas * self.abar_prev.sqrt() / (1 - self.abar)
        self.post_ct = (1 - self.abar_prev) * self.alphas.sqrt() / (1 - self.abar)

    def at(self, name, t, x):
        """getattr(self, name)[t] shaped (B, 1, 1, 1) in x's dtype and device."""
        return getattr(self, name).to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(s, x0, t, eps):
    return s.at("abar", t, x0).sqrt() * x0 + (1 - s.at("abar", t, x0)).sqrt() * eps


def drop_labels(y, p_uncond, null, generator=None):
    """Classifier-free guidance training: each label becomes the null class with probability p_uncond."""
    if y is None or p_uncond <= 0:
        return y
    drop = torch.rand(len(y), device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null), y)


def model_classes(model):
    m = model.module if hasattr(model, "module") else model
    return getattr(m, "num_classes", 0)


def guided_eps(model, x, t, y, w):
    """(1 + w) eps(x, y) - w eps(x, null), both in one batched call; w = 0: plain conditional."""
    if y is None or w == 0:
        return model(x, t, y)
    null = torch.full_like(y, model_classes(model))
    e = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    e_c, e_u = e.chunk(2)
    return (1 + w) * e_c - w * e_u


def predict_x0(s, x, t, eps, clip=True):
    x0 = (x - (1 - s.at("abar", t, x)).sqrt() * eps) / s.at("abar", t, x).sqrt()
    return x0.clamp(-1, 1) if clip else x0


@torch.no_grad()
def ddpm_sample(model, s, shape, y=None, w=0.0, generator=None, device="cpu", clip=True, progress=None):
    """Ancestral sampling over all T steps with the posterior variance beta_tilde."""
    x = torch.randn(shape, device=device, generator=generator)
    steps = range(s.T - 1, -1, -1)
    for i in (progress(steps) if progress else steps):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        eps = guided_eps(model, x, t, y, w)
        x0 = predict_x0(s, x, t, eps, clip)
        mean = s.at("post_c0", t, x) * x0 + s.at("post_ct", t, x) * x
        z = torch.randn(shape, device=device, generator=generator) if i > 0 else torch.zeros_like(x)
        x = mean + s.at("post_var", t, x).sqrt() * z
    return x


def ddim_timesteps(T, steps):
    """`steps` evenly spaced timesteps from T-1 down to 0 (the last is always 0)."""
    if steps < 1:  # zero steps would return the starting noise as if it were a sample
        raise ValueError(f"DDIM needs steps >= 1, not {steps}")
    return torch.linspace(T - 1, 0, steps).round().long().unique_consecutive().tolist()


def ddim_sigma(s, t, t_prev, eta):
    """sigma_t of DDIM (Song et al. Eq. 16) between t and t_prev (t_prev = -1 means x_0)."""
    a, a_prev = s.abar[t], (s.abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
    return eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()


@torch.no_grad()
def ddim_sample(model, s, shape, y=None, w=0.0, steps=50, eta=0.0, generator=None, device="cpu", clip=True,
                progress=None):
    """DDIM with `steps` steps; eta = 0 is deterministic, eta = 1 with steps = T is ancestral DDPM."""
    x = torch.randn(shape, device=device, generator=generator)
    ts = ddim_timesteps(s.T, steps)
    pairs = list(zip(ts, ts[1:] + [-1]))
    for i, (tc, tp) in enumerate(progress(pairs) if progress else pairs):
        t = torch.full((shape[0],), tc, device=device, dtype=torch.long)
        eps = guided_eps(model, x, t, y, w)
        x0 = predict_x0(s, x, t, eps, clip)
        a = s.abar[tc].to(device).float()
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the (clipped) x0
        a_prev = (s.abar[tp] if tp >= 0 else torch.tensor(1.0, dtype=torch.float64)).to(device).float()
        sigma = ddim_sigma(s, tc, tp, eta).to(device).float()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if tp >= 0 and eta > 0:
            x = x + sigma * torch.randn(shape, device=device, generator=generator)
    return x


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, parameter by parameter; buffers copied."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def fixed_noise_grid(model, sched, n_classes, channels, size, per_class, w, steps, eta, seed, device):
    """per_class DDIM samples of every class, class-major, from the noise of `seed` (the same every call), in
    [-1, 1]: (n_classes * per_class, C, S, S)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    y = torch.arange(n_classes, device=device).repeat_interleave(per_class)
    return ddim_sample(model, sched, (len(y), channels, size, size), y, w, steps, eta, gen, device)
