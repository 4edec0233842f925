"""Synthetic female chest X-rays from a trained CVAE: z ~ N(0, I) decoded with label vectors drawn (with
replacement) from the CVAE's own training split, so finding co-occurrence is real and no test label leaks in
(the original study drew them from its test split).

    python -m vae.sample_cvae --ckpt runs/chestxray/cvae/ckpt.pt --n 500 --out runs/chestxray/cvae/synth.npz

Writes `images` (N, 64, 64) uint8, `labels` (N, 15) multi-hot (docs/METHODS.md label order) and `meta` (JSON: the
checkpoint, n, seed and the command's argv), and a PNG grid.
"""
import argparse
import json
import sys
import time

import numpy as np
import torch

from common.cli import ArgumentParser, positive_int, run
from common.data import NIH_LABELS
from common.errors import DataError
from common.report import save_grid, to_uint8
from common.runs import device_from, load_checkpoint, load_weights, npz_out, written_together
from vae.train_cvae import CVAE


def load_cvae(path, device="cpu"):
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not {"train_labels", "model", "args"} <= set(ck):
        raise DataError(f"{path} is not a train_cvae.py checkpoint")
    model = CVAE(ck["args"]["channels"], ck["args"]["latent"], ck["args"].get("n_cond", len(NIH_LABELS)))
    load_weights(model, ck["model"], path)
    return model.to(device).eval(), ck


@torch.no_grad()
def sample(model, label_pool, n, seed=0, device="cpu", batch_size=256):
    """(uint8 images (n, 64, 64), multi-hot labels (n, 15)) with labels drawn from label_pool with replacement."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(label_pool).float()
    y = pool[torch.randint(0, len(pool), (n,), generator=g)]
    z = torch.randn(n, model.latent, generator=g)
    x = torch.cat([model.decode(z[i:i + batch_size].to(device), y[i:i + batch_size].to(device)).cpu()
                   for i in range(0, n, batch_size)])
    return to_uint8(x)[..., 0], y.to(torch.uint8).numpy()


def main(args):
    out = npz_out(args.out, args.force, beside=(".png",))  # the file numpy writes, checked before any work
    model, ck = load_cvae(args.ckpt, device_from(args.device))
    t0 = time.time()
    images, labels = sample(model, ck["train_labels"], args.n, args.seed, device_from(args.device))
    with written_together(out, out.with_suffix(".png")) as (tmp_npz, tmp_png):
        meta = {"ckpt": str(args.ckpt), "n": args.n, "seed": args.seed, "seconds": time.time() - t0,
                "argv": sys.argv[1:]}  # argv: stage reuse
        np.savez_compressed(tmp_npz, images=images, labels=labels, label_names=np.array(ck["args"].get("label_names", NIH_LABELS)),
                            meta=json.dumps(meta))
        save_grid(images[:32], tmp_png, nrow=4, title="synthetic female X-rays (CVAE)")
    print(f"wrote {len(images)} synthetic images to {out}")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="train_cvae.py ckpt.pt (holds its training label vectors)")
    p.add_argument("--n", type=positive_int, default=500, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, help="output .npz (PNG grid beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
