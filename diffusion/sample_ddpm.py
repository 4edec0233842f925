"""Sample a trained conditional DDPM: ancestral DDPM (all T steps) or DDIM (--steps, --eta), guidance scale w.

The model is rebuilt from the checkpoint's stored args alone; EMA weights unless --raw. Writes a uint8 .npz
(`images` (N, S, S) or (N, S, S, 3), `labels` class index, `groups` the class's attribute, `class_names`) and a
PNG grid beside it.

    python -m diffusion.sample_ddpm --ckpt runs/ddpm/nih32/ckpt.pt --n-per-class 250 --sampler ddim --steps 50 \
        --guidance 1.0 --out runs/ddpm/nih32/ddim50.npz
"""
import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common.cli import ArgumentParser, nonneg_float, positive_int, run
from common.errors import DataError
from common.report import to_uint8
from common.runs import device_from, load_checkpoint, load_weights, npz_out, seed_everything
from common.samples import add_class_args, requested, write_class_samples
from diffusion.ddpm import Schedule, ddim_sample, ddpm_sample
from diffusion.unet import shape_problems, unet_from_args

MODEL_KEYS = ("channels", "size", "width", "mults", "num_res", "attn_res", "num_classes", "schedule", "T")


def load_model(ckpt_path, device, raw=False):
    """(U-Net in eval mode with the EMA weights, or the raw ones with raw=True; the checkpoint) of a train_ddpm.py or
    train_dpo.py checkpoint. Any other file is bad input, reported naming it."""
    ck = load_checkpoint(ckpt_path)
    weights = "model" if raw else "ema"
    if not (isinstance(ck, dict) and isinstance(ck.get("args"), dict) and all(k in ck["args"] for k in MODEL_KEYS)
            and all(k in ck for k in (weights, "class_names", "step"))):
        raise DataError(f"{ckpt_path}: not a fairsynth DDPM checkpoint (train_ddpm.py and train_dpo.py write them)")
    problems = shape_problems(ck["args"])
    if any(p.startswith("--size") for p in problems):  # a U-Net that cannot run; an unused --attn-res can
        raise DataError(f"{ckpt_path}: its model args are inconsistent ({problems[0]})")
    model = load_weights(unet_from_args(ck["args"]), ck[weights], ckpt_path)
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
    which, classes = requested(names, n_per_class=args.n_per_class, classes=args.classes,
                                class_counts=args.class_counts)
    out = npz_out(args.out, args.force, beside=(".png",))
    sched = Schedule(a["schedule"], a["T"])
    t0 = time.time()
    images = generate(model, sched, classes, a["size"], a["channels"], args.sampler, args.steps, args.eta,
                      args.guidance, args.batch_size, args.seed, device)
    elapsed = time.time() - t0
    meta = {"ckpt": str(args.ckpt), "step": ck["step"], "sampler": args.sampler,
            "steps": a["T"] if args.sampler == "ddpm" else args.steps, "eta": args.eta, "guidance": args.guidance,
            "weights": "raw" if args.raw else "ema", "seconds": elapsed, "data": ck.get("data"),
            "argv": sys.argv[1:]}  # the command that made the file (a study skips a stage whose output records it)
    title = f"{meta['sampler'].upper()}-{meta['steps']}" + (f" eta={args.eta:g}" if args.sampler == "ddim" else "") + \
        f" w={args.guidance}, step {ck['step']}, {ck.get('data')}" + \
        (" (PHANTOM data)" if ck.get("data") == "phantom" else "")
    write_class_samples(out, images, classes, names, which, meta, title)
    print(f"wrote {len(images)} images to {out} ({elapsed:.1f} s, {elapsed / len(images) * 1000:.0f} ms/image)")
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train_ddpm.py ckpt.pt")
    add_class_args(p)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (--steps) or ancestral DDPM (T)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=nonneg_float, default=1.0,
                   help="DDIM eta: 1 (default) adds DDPM-like noise each step, 0 is deterministic DDIM. With small, "
                        "briefly trained models eta=0 leaves some samples noisy (results/ddpm); eta=1 does not")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="classifier-free guidance scale w")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per sampling batch (default: 64 on a CPU, 256 on a GPU; it changes speed, not quality)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, help="output .npz ('.npz' is appended to a name without it; a .png grid "
                   "is written beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (its .npz and .png)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
