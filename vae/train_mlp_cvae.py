"""Fully-connected conditional VAE for MedMNIST augmentation (Chaptoukaev 2023, "cVAE" column of Table 2).

Two hidden layers each side (widths ours, not published): encoder (D + K) -> 512 -> 256 -> mu, logvar (latent 32),
decoder (32 + K) -> 256 -> 512 -> D (sigmoid); the one-hot label is concatenated to both inputs.
ELBO: binary cross-entropy summed over pixels (in [0, 1]) + KL, mean over the batch. Adam 1e-3, batch 128,
300 epochs (FORMULAS.md). New images of class c: z ~ N(0, I) decoded with label c.

    python -m vae.train_mlp_cvae --npz data/medmnist/breastmnist.npz --out-dir runs/medmnist/cvae
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.data import medmnist_subset
from common.report import save_samples
from common.runs import add_common_args, device_from, prepare_out_dir, save_checkpoint, seed_everything, \
    write_config, write_json


class MLPCVAE(nn.Module):
    def __init__(self, dim, n_classes, latent=32, hidden=(512, 256)):
        super().__init__()
        self.k, self.latent = n_classes, latent
        self.enc = nn.Sequential(nn.Linear(dim + n_classes, hidden[0]), nn.ReLU(), nn.Linear(*hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden[1], latent), nn.Linear(hidden[1], latent)
        self.dec = nn.Sequential(nn.Linear(latent + n_classes, hidden[1]), nn.ReLU(), nn.Linear(hidden[1], hidden[0]),
                                 nn.ReLU(), nn.Linear(hidden[0], dim), nn.Sigmoid())

    def forward(self, x, y):
        c = F.one_hot(y, self.k).float()
        h = self.enc(torch.cat([x, c], 1))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.dec(torch.cat([z, c], 1)), mu, logvar

    def decode(self, z, y):
        return self.dec(torch.cat([z, F.one_hot(y, self.k).float()], 1))


def elbo_loss(x_hat, x, mu, logvar):
    rec = F.binary_cross_entropy(x_hat, x, reduction="sum") / len(x)
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)  # Kingma & Welling 2014, App. B
    return rec + kld


def fit(x, y, args, device, progress=True):
    """x: (N, D) in [0, 1], y: (N,) class indices. Returns (model, history)."""
    torch.manual_seed(args.seed)
    model = MLPCVAE(x.shape[1], int(y.max()) + 1, args.latent).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen, history = torch.Generator().manual_seed(args.seed), []
    for epoch in tqdm(range(args.epochs), desc="mlp-cvae", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            xb, yb = x[idx].to(device), y[idx].to(device)
            x_hat, mu, logvar = model(xb, yb)
            loss = elbo_loss(x_hat, xb, mu, logvar)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", required=True, help="official MedMNIST .npz")
    p.add_argument("--per-class", type=int, default=150, help="subset size per class (train:val 9:1)")
    p.add_argument("--latent", type=int, default=32, help="latent size")
    p.add_argument("--epochs", type=int, default=300, help="epochs")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--n-per-class", type=int, default=150, help="images to generate per class")
    add_common_args(p, "runs/medmnist/mlp_cvae")
    return p.parse_args(argv)


def main(args):
    device = device_from(args.device)
    out = prepare_out_dir(args.out_dir, args.force)
    seed_everything(args.seed)
    images, labels, _, _, names = medmnist_subset(args.npz, args.per_class, args.seed)
    x, y = torch.from_numpy(images).float().flatten(1) / 255, torch.from_numpy(labels).long()
    write_config(out, args, data=args.npz, weights="none (from scratch)")
    model, history = fit(x, y, args, device)
    gx, gy = generate(model, args.n_per_class, args.seed, device)
    save_checkpoint({"model": model.state_dict(), "args": {"dim": x.shape[1], "k": model.k, "latent": args.latent}},
                    out / "ckpt.pt")
    save_samples(out, (gx.view(-1, *images.shape[1:]) * 255).round().byte().numpy(), gy.numpy(), names,
                 "MLP-cVAE samples per class")
    write_json(out / "metrics.json", {"final_loss": history[-1], "n_train": len(x), "history": history})
    print(f"MLP-cVAE: final ELBO loss {history[-1]:.2f}; wrote {len(gx)} images to {out / 'samples.npz'}")


if __name__ == "__main__":
    main(parse_args())
