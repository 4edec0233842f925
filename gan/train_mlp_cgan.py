"""Fully-connected conditional GAN for MedMNIST augmentation (Chaptoukaev 2023, "cGAN" column of Table 2).

Three hidden layers each side, a learned label embedding (16-d) concatenated to the input of both (widths ours,
not published): G: (z 64 + emb) -> 256 -> 512 -> 1024 -> D (tanh); D: (x + emb) -> 1024 -> 512 -> 256 -> 1,
LeakyReLU 0.2, dropout 0.3 in D. Non-saturating BCE loss (Goodfellow et al. 2014; Mirza & Osindero 2014),
Adam 1e-4 (betas 0.5, 0.999), batch 128, 1000 epochs (FORMULAS.md).

    python -m gan.train_mlp_cgan --npz data/medmnist/breastmnist.npz --out-dir runs/medmnist/cgan
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


class Generator(nn.Module):
    def __init__(self, dim, n_classes, z_dim=64, emb=16):
        super().__init__()
        self.k, self.z_dim = n_classes, z_dim
        self.emb = nn.Embedding(n_classes, emb)
        self.net = nn.Sequential(nn.Linear(z_dim + emb, 256), nn.LeakyReLU(0.2), nn.Linear(256, 512),
                                 nn.LeakyReLU(0.2), nn.Linear(512, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, dim),
                                 nn.Tanh())

    def forward(self, z, y):
        return self.net(torch.cat([z, self.emb(y)], 1))


class Discriminator(nn.Module):
    def __init__(self, dim, n_classes, emb=16):
        super().__init__()
        self.emb = nn.Embedding(n_classes, emb)
        self.net = nn.Sequential(nn.Linear(dim + emb, 1024), nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(1024, 512),
                                 nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(512, 256), nn.LeakyReLU(0.2),
                                 nn.Dropout(0.3), nn.Linear(256, 1))

    def forward(self, x, y):
        return self.net(torch.cat([x, self.emb(y)], 1)).squeeze(1)


def fit(x, y, args, device, progress=True):
    """x: (N, D) in [0, 1] (scaled to [-1, 1] here), y: (N,) class indices. Returns (generator, history)."""
    torch.manual_seed(args.seed)
    k = int(y.max()) + 1
    G, D = Generator(x.shape[1], k, args.z_dim).to(device), Discriminator(x.shape[1], k).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    x = x * 2 - 1
    gen, history = torch.Generator().manual_seed(args.seed), []
    for epoch in tqdm(range(args.epochs), desc="mlp-cgan", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            real, yb = x[idx].to(device), y[idx].to(device)
            fake = G(torch.randn(len(idx), args.z_dim, device=device), yb)
            # D: log D(x|y) + log(1 - D(G(z|y)|y))
            d_real, d_fake = D(real, yb), D(fake.detach(), yb)
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # G: non-saturating, maximise log D(G(z|y)|y)
            d_gen = D(fake, yb)
            loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
        history.append([loss_d.item(), loss_g.item()])
    return G.eval(), history


@torch.no_grad()
def generate(G, n_per_class, seed=0, device="cpu"):
    """((N, D) in [0, 1], labels)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(G.k).repeat_interleave(n_per_class)
    z = torch.randn(len(y), G.z_dim, generator=g)
    return (G(z.to(device), y.to(device)).cpu() + 1) / 2, y


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", required=True, help="official MedMNIST .npz")
    p.add_argument("--per-class", type=int, default=150, help="subset size per class (train:val 9:1)")
    p.add_argument("--z-dim", type=int, default=64, help="noise size")
    p.add_argument("--epochs", type=int, default=1000, help="epochs")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (both networks)")
    p.add_argument("--n-per-class", type=int, default=150, help="images to generate per class")
    add_common_args(p, "runs/medmnist/mlp_cgan")
    return p.parse_args(argv)


def main(args):
    device = device_from(args.device)
    out = prepare_out_dir(args.out_dir, args.force)
    seed_everything(args.seed)
    images, labels, _, _, names = medmnist_subset(args.npz, args.per_class, args.seed)
    x, y = torch.from_numpy(images).float().flatten(1) / 255, torch.from_numpy(labels).long()
    write_config(out, args, data=args.npz, weights="none (from scratch)")
    G, history = fit(x, y, args, device)
    gx, gy = generate(G, args.n_per_class, args.seed, device)
    save_checkpoint({"model": G.state_dict(), "args": {"dim": x.shape[1], "k": G.k, "z_dim": args.z_dim}},
                    out / "ckpt.pt")
    save_samples(out, (gx.view(-1, *images.shape[1:]) * 255).round().byte().numpy(), gy.numpy(), names,
                 "MLP-cGAN samples per class")
    write_json(out / "metrics.json", {"final_loss_d": history[-1][0], "final_loss_g": history[-1][1],
                                      "n_train": len(x), "history": history})
    print(f"MLP-cGAN: final D loss {history[-1][0]:.3f}, G loss {history[-1][1]:.3f}; wrote {len(gx)} images")


if __name__ == "__main__":
    main(parse_args())
