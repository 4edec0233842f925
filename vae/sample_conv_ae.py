"""New images from a trained convolutional AE (vae/train_conv_ae.py): for each image of class c, the decoded code
lam z_a + (1 - lam) z_b + 0.1 x std x N(0, 1) of two training images of class c (the MedMNIST AE's rule,
vae.train_mlp_ae.interpolate_codes), lam ~ U(0, 1). A class without training images cannot be drawn.

Writes the samples file of every class-conditional sampler here (common/samples.py) and a PNG grid beside it.

    python -m vae.sample_conv_ae --ckpt runs/conv_ae/nih64/ckpt.pt --n-per-class 100 --out samples.npz
    python -m vae.sample_conv_ae --ckpt ... --class-counts 'F|No Finding=120,F|finding=180' --out female.npz
"""
import argparse
import sys
import time

import numpy as np
import torch

from common.cli import ArgumentParser, nonneg_float, run
from common.errors import DataError
from common.report import to_uint8
from common.runs import device_from, load_checkpoint, load_weights, npz_out
from common.samples import add_sampler_args, requested, write_class_samples
from vae.train_conv_ae import ConvAE
from vae.train_mlp_ae import interpolate_codes


@torch.no_grad()
def generate(model, z, cls, classes, seed=0, device="cpu", noise=0.1):
    """Images (N, C, 64, 64) in [-1, 1] for the class indices `classes` (in that order), from training codes z of
    classes cls."""
    g = torch.Generator().manual_seed(seed)
    classes = np.asarray(classes)
    out = torch.empty((len(classes), model.decoder[-2].out_channels, 64, 64))
    for c in dict.fromkeys(classes.tolist()):
        rows = np.nonzero(classes == c)[0]
        zc = interpolate_codes(z[cls == c], len(rows), g, noise)
        out[torch.from_numpy(rows)] = torch.cat([model.dec(zc[i:i + 256].to(device)).cpu()
                                                 for i in range(0, len(zc), 256)])
    return out


def main(args):
    device = device_from(args.device)
    ck = load_checkpoint(args.ckpt)
    if not isinstance(ck, dict) or not {"model", "model_args", "codes", "classes", "class_names"} <= set(ck):
        raise DataError(f"{args.ckpt}: not a finished train_conv_ae.py checkpoint (one with the training codes)")
    model = load_weights(ConvAE(**ck["model_args"]), ck["model"], args.ckpt).to(device).eval()
    names, cls = ck["class_names"], ck["classes"].numpy()
    which, classes = requested(names, n_per_class=args.n_per_class, classes=args.classes,
                                class_counts=args.class_counts)
    empty = [names[c] for c in which if not (cls == c).any()]
    if empty:
        raise DataError(f"{args.ckpt}: no training image of class {', '.join(empty)}, so the AE has no code to "
                        f"interpolate for it; leave it out of --classes / --class-counts")
    out = npz_out(args.out, args.force, beside=(".png",))
    t0 = time.time()
    u = to_uint8(generate(model, ck["codes"], cls, classes, args.seed, device, args.noise))
    images = u[..., 0] if u.shape[-1] == 1 else u
    meta = {"ckpt": str(args.ckpt), "seed": args.seed, "noise": args.noise, "data": ck.get("data"),
            "seconds": time.time() - t0,
            "argv": sys.argv[1:]}  # argv: a study reuses a stage whose file records it
    write_class_samples(out, images, classes, names, which, meta,
                        f"conv AE, decoded interpolations of same-class codes, {ck.get('data')}")
    print(f"wrote {len(images)} images to {out}")
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampler_args(p, "a train_conv_ae.py ckpt.pt")
    p.add_argument("--noise", type=nonneg_float, default=0.1, help="code noise, x the class's per-dimension code std")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
