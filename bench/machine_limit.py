"""How near the machine's limit the quick studies' training loops run (issue #21, part 1): the fp32
matrix-multiply rate of this machine (a 2048 x 2048 sgemm at the current thread count) and, per loop, the
achieved GFLOP/s of a training step (forward, loss, backward, optimiser step; FLOPs of the matrix multiplies and
convolutions counted by torch.utils.flop_counter, so elementwise work is time without FLOPs), in contiguous and in
channels_last memory format.

    python bench/machine_limit.py [--steps 10] [--rounds 3] [--loops cnn8,resnet18,cvae,resvae,unet,vit,...]

Each loop and format is timed --rounds times in turn and its fastest round kept (a burst of other work on the
machine does not decide it). The models are untrained: speed does not depend on the weights. Measured: README,
Benchmarks.
"""
import argparse
from pathlib import Path
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from classify.downstream import adamw  # noqa: E402
from classify.nets import ViT, build  # noqa: E402
from diffusion.ddpm import Schedule, q_sample  # noqa: E402
from diffusion.unet import UNet  # noqa: E402
from gan.train_dcgan import Z_DIM, build as build_dcgan  # noqa: E402
from gan.train_mlp_cgan import Discriminator, Generator  # noqa: E402
from vae.train_conv_ae import ConvAE  # noqa: E402
from vae.train_cvae import CVAE, cvae_loss  # noqa: E402
from vae.train_mlp_ae import AE  # noqa: E402
from vae.train_mlp_cvae import MLPCVAE, elbo_loss  # noqa: E402
from vae.train_resvae import ResVAE, VGGPerceptual, vae_loss  # noqa: E402

LOOPS = ["cnn8", "resnet18", "cvae", "resvae", "unet", "vit", "mlpcgan", "dcgan", "convae", "ddpm32", "mlpae",
         "mlpcvae"]  # every quick study's training loop
FULL_LOOPS = ["densenet121", "unet64"]  # the full-scale nets, for bench/fullscale.py's GPU-hour estimates
# earlier versions of a loop, to measure a speed-up in the same run: vit_module, fairgen's ViT as it was at
# 461d1dc (blocks through nn.TransformerEncoder's forward, AdamW without its fused kernel); vit_unfused, today's
# blocks with that AdamW (what the optimizer's fused kernel adds)
OLD_LOOPS = ["vit_module", "vit_unfused"]


class ModuleViT(ViT):
    """The ViT with its blocks run by nn.TransformerEncoder's own forward (the loop before encoder_layer)."""

    def features(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.norm(self.blocks(t)[:, 0])


def sgemm_gflops(n=2048, reps=10):
    """The fp32 matrix-multiply rate: best of 3 rounds of reps n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * reps / best / 1e9


def loop(name, channels_last, bf16=False, compile=False):
    """(one training step as a function, images per step) of a study's main loop; bf16: under CPU bf16 autocast
    (the loss in fp32); compile: the network(s) through torch.compile (its compilation happens at the first step)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    wrap = torch.compile if compile else (lambda m: m)
    if name in ("mlpcgan", "dcgan"):  # a D step and a G step. MedMNIST's MLP cGAN: gan/train_mlp_cgan.py (784-d,
        # batch 128); compare's DCGAN: gan/train_dcgan.py at quick scale (64 px, width 16, batch 64, sex x finding)
        if name == "mlpcgan":
            G, D, z_dim = Generator(784, 2), Discriminator(784, 2), 64
            x, y = torch.rand(128, 784) * 2 - 1, torch.randint(0, 2, (128,))
        else:
            (G, D), z_dim = build_dcgan({"n_classes": 4, "channels": 1, "size": 64, "width": 16}), Z_DIM
            x, y = (torch.rand(64, 1, 64, 64) * 2 - 1).contiguous(memory_format=fmt), torch.randint(0, 4, (64,))
            G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)
        opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-4), torch.optim.Adam(D.parameters(), lr=1e-4)
        Gc, Dc = wrap(G), wrap(D)

        def gan_step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fake = Gc(torch.randn(len(x), z_dim), y)
                d_real, d_fake = Dc(x, y).float(), Dc(fake.detach(), y).float()
            loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones(len(x))) + \
                F.binary_cross_entropy_with_logits(d_fake, torch.zeros(len(x)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                d_gen = Dc(fake, y).float()
            loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones(len(x)))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
        return gan_step, len(x)
    if name == "cnn8":  # chest X-ray classifier: classify/train_chexnet.py at quick scale (64 px, width 16, batch 32)
        net, x, y = build("cnn8", 1, 15, 64, width=16), torch.rand(32, 1, 64, 64) * 2 - 1, torch.rand(32, 15).round()
        loss_fn = lambda m, xb: F.binary_cross_entropy_with_logits(m(xb).float(), y)
    elif name == "resnet18":  # MedMNIST classifier: classify/train_resnet18.py at quick scale (28 px, width 16, batch 32)
        net, x, y = build("resnet18_28", 1, 2, 28, width=16), torch.rand(32, 1, 28, 28) * 2 - 1, torch.randint(0, 2, (32,))
        loss_fn = lambda m, xb: F.cross_entropy(m(xb).float(), y)
    elif name == "cvae":  # chest X-ray CVAE: vae/train_cvae.py (64 px, batch 64)
        net, x, y = CVAE(), torch.rand(64, 1, 64, 64) * 2 - 1, (torch.rand(64, 15) > 0.8).float()

        def loss_fn(m, xb):
            x_hat, mu, logvar = m(xb, y)
            return cvae_loss(x_hat.float(), xb, mu.float(), logvar.float())[0]
    elif name == "resvae":  # skin-tone VAE: vae/train_resvae.py at quick scale (32 px, width 32, latent 64 x 8 x 8,
        # batch 64, the random VGG19 perceptual term included)
        net, x = ResVAE(3, 32, 2, 64), torch.rand(64, 3, 32, 32) * 2 - 1
        vgg = VGGPerceptual(pretrained=False).to(memory_format=fmt)

        def loss_fn(m, xb):
            x_hat, mu, logvar = m(xb)
            return vae_loss(x_hat, xb, mu, logvar, vgg)[0]
    elif name == "convae":  # compare's conv AE: vae/train_conv_ae.py (64 px, code 128, batch 64, MSE)
        net, x = ConvAE(1, 128), torch.rand(64, 1, 64, 64) * 2 - 1
        loss_fn = lambda m, xb: F.mse_loss(m(xb).float(), xb)
    elif name in ("mlpae", "mlpcvae"):  # MedMNIST's MLP AE and cVAE: vae/train_mlp_ae.py, train_mlp_cvae.py (784-d,
        # code 32, batch 128)
        net, x, y = (AE(784, 32) if name == "mlpae" else MLPCVAE(784, 2, 32)), torch.rand(128, 784), \
            torch.randint(0, 2, (128,))
        if name == "mlpae":
            loss_fn = lambda m, xb: F.mse_loss(m(xb).float(), xb)
        else:
            def loss_fn(m, xb):
                x_hat, mu, logvar = m(xb, y)
                return elbo_loss(x_hat.float(), xb, mu.float(), logvar.float())
    elif name in ("unet", "unet64", "ddpm32"):  # the DDPM U-Net: diffusion/train_ddpm.py. fairgen quick: 32 px,
        # 16-32-32, attention at 8, batch 32; compare quick (ddpm32): the same at width 32; fairgen's full preset:
        # 64 px, 64-128-128-128, 2 blocks per level, attention at 16 (batch 8 here)
        size, batch = (64, 8) if name == "unet64" else (32, 32)
        net = UNet(1, 64, 64, (1, 2, 2, 2), 2, (16,), num_classes=4) if name == "unet64" else \
            UNet(1, 32, 16 if name == "unet" else 32, (1, 2, 2), 1, (8,), num_classes=4)
        sched, x, y = Schedule(), torch.rand(batch, 1, size, size) * 2 - 1, torch.randint(0, 4, (batch,))

        def loss_fn(m, xb):
            t, eps = torch.randint(0, sched.T, (len(xb),)), torch.randn_like(xb)
            return F.mse_loss(m(q_sample(sched, xb, t, eps).contiguous(memory_format=fmt), t, y).float(), eps)
    elif name in ("vit", "vit_module", "vit_unfused"):  # fairgen's downstream ViT at quick scale (32 px, 8 x 8
        # patches, width 64, batch 64, AdamW as classify/downstream.py)
        net = build("vit", 1, 2, 32, vit=dict(patch=8, dim=64, mlp=128, dropout=0.0))
        if name == "vit_module":
            net.features = lambda x, net=net: ModuleViT.features(net, x)
        x, y = torch.rand(64, 1, 32, 32) * 2 - 1, torch.randint(0, 2, (64,))
        loss_fn = lambda m, xb: F.cross_entropy(m(xb).float(), y)
    elif name == "densenet121":  # the full-scale chest X-ray classifier: train_chexnet.py (224 px; batch 8 here)
        net, x, y = build("densenet121", 1, 15, 224), torch.rand(8, 1, 224, 224) * 2 - 1, torch.rand(8, 15).round()
        loss_fn = lambda m, xb: F.binary_cross_entropy_with_logits(m(xb).float(), y)
    else:
        raise SystemExit(f"--loops: unknown loop {name!r} ({', '.join(LOOPS + FULL_LOOPS + OLD_LOOPS)})")
    net = net.to(memory_format=fmt)
    opt = adamw(net.parameters(), 1e-3, 0.05, fused=name == "vit") if name.startswith("vit") else \
        torch.optim.Adam(net.parameters(), lr=1e-4)
    m, xb = wrap(net), x.contiguous(memory_format=fmt) if x.dim() == 4 else x  # MLPs: one format
    return training_step(loss_fn, m, xb, opt, "cpu", bf16), len(x)


def training_step(loss_fn, net, xb, opt, device_type, bf16):
    """One optimiser step on loss_fn(net, xb) as a function; bf16: the forward under bf16 autocast."""
    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(name, channels_last, steps, rounds, bf16=False, compile=False):
    """A loop's FLOPs per image-step, images/s and GFLOP/s (the fastest of `rounds` rounds of `steps` steps), and
    with compile the seconds its first step took beyond an ordinary one (the compilation)."""
    step, batch = loop(name, channels_last, bf16, compile)
    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    first = time.perf_counter() - t0
    if not compile:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    else:
        flops = measure(name, channels_last, 1, 1)["gflop_per_image"] * batch * 1e9  # counted without compile
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - t0)
    return {"gflop_per_image": flops / batch / 1e9, "images_per_s": steps * batch / best,
            "gflops": flops * steps / best / 1e9, "compile_s": first - best / steps if compile else None}


def interleaved(steps_of, steps, rounds):
    """Images/s of several loops ({name: (step, batch)}), their rounds taken in turn so that the machine's changing
    state falls on each alike; the fastest round of each."""
    for step, _ in steps_of.values():
        step()
    best = dict.fromkeys(steps_of, float("inf"))
    for r in range(rounds):
        for name, (step, _) in list(steps_of.items())[::1 if r % 2 else -1]:  # each order in turn
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: steps * steps_of[name][1] / best[name] for name in steps_of}


def profile(name, steps=3):
    """The operators that take a loop's time (channels_last), by self CPU time: what holds a loop back."""
    step, _ = loop(name, True)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\n{name}, channels_last, {steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per loop and format (the fastest is kept)")
    p.add_argument("--loops", default=",".join(LOOPS),
                   help=f"comma-separated, of {', '.join(LOOPS)} (quick scale), {', '.join(FULL_LOOPS)} (full) and "
                        f"{', '.join(OLD_LOOPS)} (earlier versions)")
    p.add_argument("--profile", action="store_true", help="also print each loop's most expensive operators")
    p.add_argument("--variants", default="",
                   help="comma-separated, in channels_last: bf16 (CPU bf16 autocast), compile (torch.compile): "
                        "each loop's speed against fp32 eager, and compile's one-off seconds")
    args = p.parse_args()
    peak = sgemm_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: sgemm 2048 x 2048 {peak:.0f} GFLOP/s")
    print("| loop | format | GFLOP per image-step | images/s | GFLOP/s | of sgemm |")
    print("|---|---|---|---|---|---|")
    base = {}
    for name in args.loops.split(","):
        for channels_last in (False, True):
            r = measure(name, channels_last, args.steps, args.rounds)
            base[name] = r
            print(f"| {name} | {'channels_last' if channels_last else 'contiguous'} | {r['gflop_per_image']:.3f} | "
                  f"{r['images_per_s']:.0f} | {r['gflops']:.0f} | {r['gflops'] / peak:.0%} |", flush=True)
    for old in OLD_LOOPS:  # a loop against its earlier version, timed in alternating rounds
        new = old.split("_")[0]
        if old in base and new in base:
            ips = interleaved({name: loop(name, True) for name in (new, old)}, args.steps, 3 * args.rounds)
            ref = "vit_module" if "vit_module" in base else old  # the module's count: no explicit attention products
            flops = base[ref]["gflop_per_image"]
            print(f"\n{new} against {old} (channels_last, {3 * args.rounds} alternating rounds of {args.steps} steps, "
                  f"fastest of each): {ips[new]:.0f} against {ips[old]:.0f} images/s, {ips[new] / ips[old]:.2f}x; "
                  f"of sgemm at one FLOP count for both, {ref}'s (the counter has no formula for the fused "
                  f"attention kernel, so it counts the explicit products of {new} only): "
                  f"{ips[new] * flops / peak:.0%} against {ips[old] * flops / peak:.0%}")
    variants = [v for v in args.variants.split(",") if v]
    if variants:
        print("\n| loop | variant (channels_last) | images/s | GFLOP/s (fp32's count) | of sgemm | x fp32 eager | "
              "compile s | compile pays back after |")
        print("|---|---|---|---|---|---|---|---|")
    for name in args.loops.split(",") if variants else []:
        for v in variants:
            r = measure(name, True, args.steps, args.rounds, bf16=v == "bf16", compile=v == "compile")
            gain = r["images_per_s"] / base[name]["images_per_s"]
            saved = 1 / base[name]["images_per_s"] - 1 / r["images_per_s"]  # seconds per image
            payback = f"{r['compile_s'] / saved:.0f} images" if v == "compile" and saved > 0 else \
                ("never" if v == "compile" else "")
            compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
            print(f"| {name} | {v} | {r['images_per_s']:.0f} | {r['gflops']:.0f} | {r['gflops'] / peak:.0%} | "
                  f"{gain:.2f} | {compile_s} | {payback} |", flush=True)
    for name in args.loops.split(",") if args.profile else []:
        profile(name)


if __name__ == "__main__":
    main()
