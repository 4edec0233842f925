"""What every class-conditional sampler shares (diffusion.sample_ddpm, gan.sample_dcgan, vae.sample_conv_ae): which
classes to draw, and the samples file a classifier stage (--synthetic), fairness.fid and fairness.memorization
read.

The file: `images` uint8 (N, S, S) or (N, S, S, 3), `labels` class index (N,), `groups` the class's attribute
value (N,), `class_names` ("<attribute>|<label>", e.g. "F|finding"), `meta` (JSON, with the command's argv: a
study reuses a stage whose file records the same command); and a PNG grid beside it, a row per class.
"""
import json

import numpy as np

from common.cli import positive_int
from common.errors import DataError
from common.report import save_grid
from common.runs import written_together


def add_sampler_args(p, ckpt_help):
    """A class-conditional sampler's flags: --ckpt, the class flags, --seed, --device, --out, --force."""
    p.add_argument("--ckpt", required=True, help=ckpt_help)
    add_class_args(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", required=True, help="output .npz (a .png grid is written beside it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (its .npz and .png)")
    return p


def add_class_args(p, n_per_class=100):
    """--n-per-class, --classes and --class-counts on a sampler's parser."""
    p.add_argument("--n-per-class", type=positive_int, default=n_per_class, help="images per class")
    p.add_argument("--classes", default=None, help="comma-separated class names (default: all), e.g. 'F|finding'")
    p.add_argument("--class-counts", default=None, metavar="NAME=N,...",
                   help="images per named class instead of --n-per-class/--classes, e.g. 'F|No Finding=120,"
                        "F|finding=180' (a study's female samples in the training pool's finding proportion)")
    return p


def class_indices(text, names):
    """Indices of the comma-separated class names of --classes (all classes when empty), in the order given."""
    if not text:
        return list(range(len(names)))
    asked = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in asked if c not in names]
    if unknown or not asked:
        raise DataError(f"--classes {text!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; this "
                        f"checkpoint's classes are {', '.join(names)}")
    return [names.index(c) for c in asked]


def requested(names, *, n_per_class, classes=None, class_counts=None):
    """(class indices in order, the class index of every image to draw) from --class-counts, or --classes and
    --n-per-class (the flags of add_class_args)."""
    if not class_counts:
        which = class_indices(classes, names)
        return which, np.repeat(which, n_per_class)
    counts = {}
    for item in class_counts.split(","):
        name, eq, n = item.rpartition("=")
        if not eq or not n.strip().isdigit() or name.strip() not in names:
            raise DataError(f"--class-counts {class_counts!r}: {item!r} is not NAME=N with NAME one of "
                            f"{', '.join(names)}")
        counts[names.index(name.strip())] = int(n)
    which = [c for c, n in counts.items() if n > 0]
    if not which:
        raise DataError(f"--class-counts {class_counts!r}: no images asked for")
    return which, np.repeat(which, [counts[c] for c in which])


def write_class_samples(out, images, classes, names, which, meta, title):
    """The samples file `out` and its grid (up to 8 images per class, a row each), written together."""
    groups = np.array([names[c].rpartition("|")[0] for c in classes])
    k = min(8, min(int((classes == c).sum()) for c in which))
    pick = np.concatenate([np.nonzero(classes == c)[0][:k] for c in which])
    with written_together(out, out.with_suffix(".png")) as (tmp_npz, tmp_png):  # a failure leaves the old files
        np.savez_compressed(tmp_npz, images=images, labels=np.asarray(classes), groups=groups,
                            class_names=np.array(names), meta=json.dumps(meta))
        save_grid(images[pick], tmp_png, nrow=len(which), title=title, row_labels=[names[c] for c in which])
    return out
