"""Sample a trained conditional DCGAN (gan/train_dcgan.py): z ~ N(0, I) per image, the class given.

Writes the samples file of every class-conditional sampler here (common/samples.py: `images` uint8, `labels` class
index, `groups`, `class_names`, `meta`) and a PNG grid beside it.

    python -m gan.sample_dcgan --ckpt runs/dcgan/nih64/ckpt.pt --n-per-class 100 --out runs/dcgan/nih64/samples.npz
    python -m gan.sample_dcgan --ckpt ... --class-counts 'F|No Finding=120,F|finding=180' --out female.npz
"""
import argparse
import sys
import time

from common.cli import ArgumentParser, run
from common.errors import DataError
from common.report import to_uint8
from common.runs import device_from, load_checkpoint, load_weights, npz_out
from common.samples import add_sampler_args, requested, write_class_samples
from gan.train_dcgan import Generator, generate


def load_generator(path, device="cpu"):
    """(G in eval mode, the checkpoint) of a train_dcgan.py ckpt.pt; any other file is bad input, named."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not {"G", "model_args", "class_names", "step"} <= set(ck):
        raise DataError(f"{path}: not a train_dcgan.py checkpoint")
    return load_weights(Generator(**ck["model_args"]), ck["G"], path).to(device).eval(), ck


def main(args):
    device = device_from(args.device)
    G, ck = load_generator(args.ckpt, device)
    names = ck["class_names"]
    which, classes = requested(names, n_per_class=args.n_per_class, classes=args.classes,
                                class_counts=args.class_counts)
    out = npz_out(args.out, args.force, beside=(".png",))
    t0 = time.time()
    u = to_uint8(generate(G, classes, args.seed, device))
    images = u[..., 0] if u.shape[-1] == 1 else u
    meta = {"ckpt": str(args.ckpt), "step": ck["step"], "seed": args.seed, "seconds": time.time() - t0,
            "data": ck.get("data"), "argv": sys.argv[1:]}  # argv: a study reuses a stage whose file records it
    write_class_samples(out, images, classes, names, which, meta,
                        f"conditional DCGAN, step {ck['step']}, {ck.get('data')}")
    print(f"wrote {len(images)} images to {out}")
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampler_args(p, "a train_dcgan.py ckpt.pt")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
