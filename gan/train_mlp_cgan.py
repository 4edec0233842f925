"""Fully-connected conditional GAN for MedMNIST augmentation (Chaptoukaev 2023, "cGAN" column of Table 2).

Three hidden layers each side, a learned label embedding (16-d) concatenated to the input of both (widths ours,
not published): G: (z 64 + emb) -> 256 -> 512 -> 1024 -> D (tanh); D: (x + emb) -> 1024 -> 512 -> 256 -> 1,
LeakyReLU 0.2, dropout 0.3 in D. Non-saturating BCE loss (Goodfellow et al. 2014; Mirza & Osindero 2014),
Adam 1e-4 (betas 0.5, 0.999), batch 128, 1000 epochs (docs/METHODS.md). --amp: both networks' forward passes
under bf16 autocast, the losses in fp32.

    python -m gan.train_mlp_cgan --npz data/medmnist/breastmnist.npz --out-dir runs/medmnist/cgan
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import mlp_generator
from common.cli import positive_int, run
from common.runs import check_finite

# bf16 under --amp auto on CPUs with bf16 instructions: bench/bf16_agreement.py --loop mlpcgan agreed (30 seeds,
# results/bench/bf16_mlpcgan)
BF16_CHECKED = True


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


def fit(x, y, device, *, z_dim, epochs, batch_size, lr, seed, progress=True, amp=False):
    """x: (N, D) in [0, 1] (scaled to [-1, 1] here), y: (N,) class indices. Returns (generator, history).
    amp: the networks' forward passes under bf16 autocast (their logits and the losses in fp32)."""
    torch.manual_seed(seed)
    k = int(y.max()) + 1
    G, D = Generator(x.shape[1], k, z_dim).to(device), Discriminator(x.shape[1], k).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    x = x * 2 - 1
    gen, history = torch.Generator().manual_seed(seed), []
    cast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp)
    for epoch in tqdm(range(epochs), desc="mlp-cgan", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            real, yb = x[idx].to(device), y[idx].to(device)
            with cast:
                fake = G(torch.randn(len(idx), z_dim, device=device), yb)
                # D: log D(x|y) + log(1 - D(G(z|y)|y))
                d_real, d_fake = D(real, yb).float(), D(fake.detach(), yb).float()
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + \
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            check_finite(loss_d, epoch)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # G: non-saturating, maximise log D(G(z|y)|y)
            with cast:
                d_gen = D(fake, yb).float()
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
    return mlp_generator.parse_args(__doc__, "runs/medmnist/mlp_cgan", 1000, 1e-4, lambda p: p.add_argument(
        "--z-dim", type=positive_int, default=64, help="noise size"), "mlpcgan", argv)


def main(args):
    amp = mlp_generator.amp_of(args.amp, args.device, BF16_CHECKED)
    out, device, x, y, shape, names = mlp_generator.start(args.npz, args.per_class, args.seed, args.device,
                                                          args.out_dir, args.force, vars(args))
    G, history = fit(x, y, device, z_dim=args.z_dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, amp=amp)
    gx, gy = generate(G, args.n_per_class, args.seed, device)
    mlp_generator.finish(out, G, {"dim": x.shape[1], "k": G.k, "z_dim": args.z_dim}, gx, gy, shape, names,
                         "MLP-cGAN samples per class (Adam, both networks)",
                         {"final_loss_d": history[-1][0], "final_loss_g": history[-1][1], "n_train": len(x),
                          "bf16_autocast": amp, "history": history})
    print(f"MLP-cGAN: final D loss {history[-1][0]:.3f}, G loss {history[-1][1]:.3f}; wrote {len(gx)} images")

if __name__ == "__main__":
    run(main, parse_args)
