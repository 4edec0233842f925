"""Fully-connected conditional VAE for MedMNIST augmentation (Chaptoukaev 2023, "cVAE" column of Table 2).

Two hidden layers each side (widths ours, not published): encoder (D + K) -> 512 -> 256 -> mu, logvar (latent 32),
decoder (32 + K) -> 256 -> 512 -> D (sigmoid); the one-hot label is concatenated to both inputs. ELBO: binary
cross-entropy summed over pixels (in [0, 1]) + KL, mean over the batch. Adam 1e-3, batch 128, 300 epochs
(docs/METHODS.md). New images of class c: z ~ N(0, I) decoded with label c. --amp: the layers under bf16 autocast; mu
and log-variance cast to fp32, the sampling of z, the KL, the output sigmoid and the loss in fp32.

    python -m vae.train_mlp_cvae --npz data/medmnist/breastmnist.npz --out-dir runs/medmnist/cvae
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import mlp_generator
from common.cli import positive_int, run
from common.runs import check_finite

# bench/bf16_agreement.py --loop mlpcvae agreed (20 seeds, results/bench/bf16_mlpcvae), but its runs were no faster
# in bf16 (1.00x): fp32 under --amp auto
BF16_CHECKED = False


class MLPCVAE(nn.Module):
    def __init__(self, dim, n_classes, latent=32, hidden=(512, 256)):
        super().__init__()
        self.k, self.latent = n_classes, latent
        self.enc = nn.Sequential(nn.Linear(dim + n_classes, hidden[0]), nn.ReLU(), nn.Linear(*hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden[1], latent), nn.Linear(hidden[1], latent)
        self.dec = nn.Sequential(nn.Linear(latent + n_classes, hidden[1]), nn.ReLU(), nn.Linear(hidden[1], hidden[0]),
                                 nn.ReLU(), nn.Linear(hidden[0], dim))  # logits: decode() applies the sigmoid

    def forward(self, x, y):
        c = F.one_hot(y, self.k).float()
        h = self.enc(torch.cat([x, c], 1))
        mu, logvar = self.mu(h).float(), self.logvar(h).float()  # cast to fp32 under autocast
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z, y), mu, logvar

    def decode(self, z, y):
        return torch.sigmoid(self.dec(torch.cat([z, F.one_hot(y, self.k).float()], 1)).float())


def elbo_loss(x_hat, x, mu, logvar):
    rec = F.binary_cross_entropy(x_hat, x, reduction="sum") / len(x)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)  # Kingma & Welling 2014, App. B
    return rec + kld


def fit(x, y, device, *, latent, epochs, batch_size, lr, seed, progress=True, amp=False):
    """x: (N, D) in [0, 1], y: (N,) class indices. Returns (model, history). amp: the layers under bf16 autocast
    (mu and log-variance cast to fp32; sampling z, KL, sigmoid and loss in fp32)."""
    torch.manual_seed(seed)
    model = MLPCVAE(x.shape[1], int(y.max()) + 1, latent).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen, history = torch.Generator().manual_seed(seed), []
    cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)
    for epoch in tqdm(range(epochs), desc="mlp-cvae", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb, yb = x[idx].to(device), y[idx].to(device)
            with cast:
                x_hat, mu, logvar = model(xb, yb)
            loss = elbo_loss(x_hat, xb, mu, logvar)
            check_finite(loss, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(loss.item())
    return model.eval(), history


@torch.no_grad()
def generate(model, n_per_class, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(model.k).repeat_interleave(n_per_class)
    z = torch.randn(len(y), model.latent, generator=g)
    return model.decode(z.to(device), y.to(device)).cpu(), y


def parse_args(argv=None):
    return mlp_generator.parse_args(__doc__, "runs/medmnist/mlp_cvae", 300, 1e-3, lambda p: p.add_argument(
        "--latent", type=positive_int, default=32, help="latent size"), "mlpcvae", argv)


def main(args):
    amp = mlp_generator.amp_of(args.amp, args.device, BF16_CHECKED)
    out, device, x, y, shape, names = mlp_generator.start(args.npz, args.per_class, args.seed, args.device,
                                                          args.out_dir, args.force, vars(args))
    model, history = fit(x, y, device, latent=args.latent, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, amp=amp)
    gx, gy = generate(model, args.n_per_class, args.seed, device)
    mlp_generator.finish(out, model, {"dim": x.shape[1], "k": model.k, "latent": args.latent}, gx, gy, shape, names,
                         "MLP-cVAE samples per class", {"final_loss": history[-1], "n_train": len(x),
                                                         "bf16_autocast": amp, "history": history})
    print(f"MLP-cVAE: final ELBO loss {history[-1]:.2f}; wrote {len(gx)} images to {out / 'samples.npz'}")

if __name__ == "__main__":
    run(main, parse_args)
