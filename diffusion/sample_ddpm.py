"""Sample a trained conditional DDPM: ancestral DDPM (all T steps) or DDIM (--steps, --eta), guidance scale w.

The model is rebuilt from the checkpoint's stored args alone; EMA weights unless --raw. Writes a uint8 .npz
(`images` (N, S, S) or (N, S, S, 3), `labels` class index, `groups` the class's attribute, `class_names`) and a
PNG grid beside it.

    python -m diffusion.sample_ddpm --ckpt runs/ddpm/nih32/ckpt.pt --n-per-class 250 --sampler ddim --steps 50 \
        --guidance 1.0 --out runs/ddpm/nih32/ddim50.npz
"""
import argparse
import json
from pathlib import Path
import time

import numpy as np
import torch
from tqdm import tqdm

from common.data import DataError
from common.report import save_grid, to_uint8
from common.runs import device_from, load_checkpoint, seed_everything
from diffusion.ddpm import Schedule, ddim_sample, ddpm_sample
from diffusion.unet import unet_from_args


def load_model(ckpt_path, device, raw=False):
    ck = load_checkpoint(ckpt_path)
    if "args" not in ck or "width" not in ck["args"]:
        raise DataError(f"{ckpt_path} is not a fairsynth DDPM checkpoint")
    model = unet_from_args(ck["args"])
    model.load_state_dict(ck["model"] if raw else ck["ema"])
    return model.to(device, memory_format=torch.channels_last).eval(), ck


def default_batch(device):
    """Images per sampling batch: 64 on a CPU, where the small U-Nets run ~1.5x faster per image than at 256 (the
    activations stay in cache: bench/sample_batch.py), 256 on a GPU."""
    return 256 if torch.device(device).type == "cuda" else 64


def generate(model, sched, classes, size, channels, sampler, steps, eta, w, batch_size, seed, device,
             progress=True):
    """uint8 images for the class indices in `classes` (one image per entry); batch_size None: default_batch."""
    batch_size = batch_size or default_batch(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for chunk in tqdm(torch.as_tensor(classes).split(batch_size), desc=f"{sampler} sampling", disable=not progress):
        y = chunk.to(device)
        shape = (len(y), channels, size, size)
        if sampler == "ddpm":
            x = ddpm_sample(model, sched, shape, y, w, gen, device)
        else:
            x = ddim_sample(model, sched, shape, y, w, steps, eta, gen, device)
        u = to_uint8(x)
        out.append(u[..., 0] if channels == 1 else u)
    return np.concatenate(out)


def main(args):
    device = device_from(args.device)
    seed_everything(args.seed)
    model, ck = load_model(args.ckpt, device, args.raw)
    a, names = ck["args"], ck["class_names"]
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"{out} exists; pass --force to replace it")
    which = [names.index(c) for c in args.classes.split(",")] if args.classes else list(range(len(names)))
    classes = np.repeat(which, args.n_per_class)
    sched = Schedule(a["schedule"], a["T"])
    t0 = time.time()
    images = generate(model, sched, classes, a["size"], a["channels"], args.sampler, args.steps, args.eta,
                      args.guidance, args.batch_size, args.seed, device)
    elapsed = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    groups = np.array([names[c].split("|")[0] for c in classes])
    meta = {"ckpt": str(args.ckpt), "step": ck["step"], "sampler": args.sampler,
            "steps": a["T"] if args.sampler == "ddpm" else args.steps, "eta": args.eta, "guidance": args.guidance,
            "weights": "raw" if args.raw else "ema", "seconds": elapsed, "data": ck.get("data")}
    np.savez_compressed(out, images=images, labels=classes, groups=groups, class_names=np.array(names),
                        meta=json.dumps(meta))
    k = min(8, args.n_per_class)
    pick = np.concatenate([np.nonzero(classes == c)[0][:k] for c in which])
    title = f"{meta['sampler'].upper()}-{meta['steps']}" + (f" eta={args.eta:g}" if args.sampler == "ddim" else "") + \
        f" w={args.guidance}, step {ck['step']}, {ck.get('data')}" + \
        (" (PHANTOM data)" if ck.get("data") == "phantom" else "")
    save_grid(images[pick], out.with_suffix(".png"), nrow=len(which), title=title,
              row_labels=[names[c] for c in which])
    print(f"wrote {len(images)} images to {out} ({elapsed:.1f} s, {elapsed / len(images) * 1000:.0f} ms/image)")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train_ddpm.py ckpt.pt")
    p.add_argument("--n-per-class", type=int, default=100, help="images per class")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: all), e.g. 'F|finding'")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (--steps) or ancestral DDPM (T)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM eta: 1 (default) adds DDPM-like noise each step, 0 is deterministic DDIM. With small, "
                        "briefly trained models eta=0 leaves some samples noisy (results/ddpm); eta=1 does not")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per sampling batch (default: 64 on a CPU, 256 on a GPU; it changes speed, not quality)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, help="output .npz (a .png grid is written beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
