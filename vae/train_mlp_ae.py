"""Fully-connected autoencoder for MedMNIST augmentation (Chaptoukaev 2023, "AE" column of Table 2).

Widths are not published; ours: encoder D -> 512 -> 256 -> 128 -> 64 -> latent 32 (4 hidden layers, ReLU),
decoder mirrored (32 -> 64 -> 128 -> 256 -> 512 -> D, sigmoid). MSE on pixels in [0, 1], Adam 1e-3, batch 128,
300 epochs (docs/METHODS.md). An AE is not a sampler; new images of class c are decoded INTERPOLATED codes:
z = lam z_a + (1 - lam) z_b + noise, with a, b two training images of class c, lam ~ U(0, 1) and Gaussian
noise of 0.1 x the per-dimension std of the class's codes. --amp: the layers under bf16 autocast, the output
sigmoid and the loss in fp32.

    python -m vae.train_mlp_ae --npz data/medmnist/breastmnist.npz --out-dir runs/medmnist/ae
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import mlp_generator
from common.cli import positive_int, run
from common.runs import check_finite

# bench/bf16_agreement.py --loop mlpae agreed (20 seeds, results/bench/bf16_mlpae), but its runs were no faster in
# bf16 (1.01x): fp32 under --amp auto
BF16_CHECKED = False


def mlp(sizes, last=None):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers = layers[:-1] + ([last] if last is not None else [])
    return nn.Sequential(*layers)


class AE(nn.Module):
    def __init__(self, dim, latent=32, hidden=(512, 256, 128, 64)):
        super().__init__()
        self.enc = mlp([dim, *hidden, latent])
        self.dec = mlp([latent, *hidden[::-1], dim])  # logits; decode() applies the sigmoid in fp32

    def decode(self, z):
        return torch.sigmoid(self.dec(z).float())

    def forward(self, x):
        return self.decode(self.enc(x))


def fit(x, device, *, latent, epochs, batch_size, lr, seed, progress=True, amp=False):
    """x: (N, D) in [0, 1]. Returns (model, history). amp: the layers under bf16 autocast (sigmoid, loss in fp32)."""
    torch.manual_seed(seed)
    model = AE(x.shape[1], latent).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen, history = torch.Generator().manual_seed(seed), []
    cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)
    for epoch in tqdm(range(epochs), desc="mlp-ae", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb = x[idx].to(device)
            with cast:
                x_hat = model(xb)
            loss = F.mse_loss(x_hat, xb)
            check_finite(loss, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(loss.item())
    return model.eval(), history


def interpolate_codes(z, n, g, noise=0.1):
    """n new codes from the codes z (M, d) of one class: lam z_a + (1 - lam) z_b + noise x the per-dimension std of
    z x N(0, 1), a and b random rows, lam ~ U(0, 1) (generator g)."""
    a, b = torch.randint(0, len(z), (2, n), generator=g)
    lam = torch.rand(n, 1, generator=g)
    return lam * z[a] + (1 - lam) * z[b] + noise * z.std(0, unbiased=False) * torch.randn(n, z.shape[1], generator=g)


@torch.no_grad()
def generate(model, x, y, n_per_class, seed=0, device="cpu", noise=0.1):
    """n_per_class decoded interpolations of same-class training codes per class -> ((N, D) in [0, 1], labels)."""
    g = torch.Generator().manual_seed(seed)
    z_all = model.enc(x.to(device)).cpu()
    out, labels = [], []
    for c in np.unique(y.numpy()):
        zc = interpolate_codes(z_all[y == c], n_per_class, g, noise)
        out.append(model.decode(zc.to(device)).cpu())
        labels.append(torch.full((n_per_class,), int(c)))
    return torch.cat(out), torch.cat(labels)


def parse_args(argv=None):
    return mlp_generator.parse_args(__doc__, "runs/medmnist/mlp_ae", 300, 1e-3, lambda p: p.add_argument(
        "--latent", type=positive_int, default=32, help="code size"), "mlpae", argv)


def main(args):
    amp = mlp_generator.amp_of(args.amp, args.device, BF16_CHECKED)
    out, device, x, y, shape, names = mlp_generator.start(args.npz, args.per_class, args.seed, args.device,
                                                          args.out_dir, args.force, vars(args))
    model, history = fit(x, device, latent=args.latent, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, amp=amp)
    gx, gy = generate(model, x, y, args.n_per_class, args.seed, device)
    mlp_generator.finish(out, model, {"dim": x.shape[1], "latent": args.latent}, gx, gy, shape, names,
                         "MLP-AE: decoded interpolations of same-class codes",
                         {"final_mse": history[-1], "n_train": len(x), "bf16_autocast": amp,
                          "history": history})
    print(f"MLP-AE: final MSE {history[-1]:.4f}; wrote {len(gx)} images to {out / 'samples.npz'}")

if __name__ == "__main__":
    run(main, parse_args)
