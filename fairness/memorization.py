"""Memorization audit: is any generated image a copy of a training patient's image?

    python -m fairness.memorization SYNTH TRAIN [--threshold 0.02] [--out DIR] [--force]
    python -m classify.domain_memorization SYNTH TRAIN --feature-ckpt CKPT [...]   # and in a classifier's features

SYNTH and TRAIN are folders of images or .npz files with a uint8 `images` array. For each synthetic image it
finds the nearest training image
- in pixel space: root-mean-square difference of the images scaled to [0, 1] (after resizing TRAIN to SYNTH's
  size if they differ), and
- in feature space (classify.domain_memorization, the same command with --feature-ckpt, a fairsynth classifier
  checkpoint; this package loads no classifier): cosine distance of its penultimate features.
It reports the fraction of synthetic images whose pixel RMSE to their nearest training image is below
--threshold (default 0.02, about 5 grey levels: an exact copy up to resampling noise), the fraction that are much
closer to their nearest training image than to the second nearest (d1 < d2 / 3, Carlini et al. 2023), and, as the
yardstick, the same nearest-neighbour distances within the training set itself. It writes a PNG of the closest
pairs (synthetic left, training right) and a JSON of the numbers; an earlier audit in --out is replaced only with
--force.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from common.cli import ArgumentParser, positive_float, run
from common.errors import DataError
from common.report import save_grid
from common.runs import write_json
from fairness.fid import load_input


def _flat(images, size=None):
    x = torch.as_tensor(np.asarray(images)).float().div(255)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if size is not None and x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear",
                                            align_corners=None if x.shape[-1] > size else False)
    return x


def nearest(query, ref, exclude_self=False, chunk=512, rows=None, same=None):
    """For each query row, (index of nearest ref row, its RMSE, RMSE of the second nearest); rows are flattened
    images in [0, 1]. exclude_self: query is ref, and query row i (rows[i] of ref, when rows is given) is not its own
    neighbour. same: (query ids, ref ids), e.g. patients: a ref row with the query row's id is not its neighbour."""
    q, r = query.flatten(1).double(), ref.flatten(1).double()
    d_dim = q.shape[1]
    idx, d1, d2 = [], [], []
    r2 = (r * r).sum(1)
    for i in range(0, len(q), chunk):
        qi = q[i:i + chunk]
        d = ((qi * qi).sum(1, keepdim=True) + r2[None] - 2 * qi @ r.T).clamp_min(0) / d_dim  # mean squared diff
        if exclude_self:
            self_col = torch.arange(i, i + len(qi)) if rows is None else torch.as_tensor(rows[i:i + len(qi)])
            d[torch.arange(len(qi)), self_col] = float("inf")
        if same is not None:
            d[torch.as_tensor(same[0][i:i + len(qi), None] == same[1][None])] = float("inf")
        top = d.topk(2, dim=1, largest=False)
        idx.append(top.indices[:, 0])
        d1.append(top.values[:, 0].sqrt())
        d2.append(top.values[:, 1].sqrt())
    return torch.cat(idx).numpy(), torch.cat(d1).numpy(), torch.cat(d2).numpy()


def audit(synth, train, threshold=0.02, feature_fn=None, max_train_queries=5000, seed=0, train_patients=None):
    """The audit's numbers and the closest pairs, from uint8 image arrays. The train-to-train reference (each
    training image's nearest other training image) is quadratic in the training set; above max_train_queries
    images it is taken for a seeded random sample of that many training images (each against all of them), which
    keeps it linear: 112k NIH images would be 1.3e10 pairs, 5,000 of them 5.6e8. train_patients: the training
    images' patient ids; the reference then leaves out images of the same patient (a follow-up scan is closer to
    its patient's other scans than a new patient's image can be, and would set the threshold too low)."""
    s = _flat(synth)
    t = _flat(train, size=s.shape[-1])
    if s.shape[1] != t.shape[1]:  # grey vs RGB: compare in grey
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    idx, d1, d2 = nearest(s, t)
    rows = None if len(t) <= max_train_queries else \
        np.sort(np.random.default_rng(seed).choice(len(t), max_train_queries, replace=False))
    same = None
    if train_patients is not None:
        ids = np.asarray(train_patients)
        same = (ids if rows is None else ids[rows], ids)
    _, t_d1, _ = nearest(t if rows is None else t[torch.from_numpy(rows)], t, exclude_self=True, rows=rows, same=same)
    out = {"n_synth": len(s), "n_train": len(t), "threshold_rmse": threshold,
           "n_train_queries": len(t_d1), "reference_excludes_same_patient": train_patients is not None,
           "pixel_nn_rmse": {"min": float(d1.min()), "median": float(np.median(d1))},
           "fraction_copies": float((d1 < threshold).mean()),
           "fraction_d1_below_d2_over_3": float((d1 < d2 / 3).mean()),
           "train_to_train_nn_rmse": {"min": float(t_d1.min()), "median": float(np.median(t_d1)),
                                      "p1": float(np.percentile(t_d1, 1))},
           "fraction_closer_than_train_p1": float((d1 < np.percentile(t_d1, 1)).mean())}
    if feature_fn is not None:
        fs, ft = feature_fn(synth), feature_fn(train)
        fs = fs / np.linalg.norm(fs, axis=1, keepdims=True).clip(1e-12)
        ft = ft / np.linalg.norm(ft, axis=1, keepdims=True).clip(1e-12)
        cos = fs @ ft.T
        out["feature_nn_cosine_distance"] = {"min": float((1 - cos.max(1)).min()),
                                             "median": float(np.median(1 - cos.max(1)))}
        out["feature_nn_agrees_with_pixel_nn"] = float((cos.argmax(1) == idx).mean())
    order = np.argsort(d1)
    return out, order, idx, d1


def closest_pairs_png(synth, train, order, idx, d1, path, k=8, title="closest synthetic / training pairs"):
    s = _flat(synth)
    t = _flat(train, size=s.shape[-1])
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    pick = order[:k]
    pairs = torch.stack([torch.stack([s[i], t[idx[i]]]) for i in pick]).flatten(0, 1) * 2 - 1
    labels = [f"rmse {d1[i]:.3f}" for i in pick]
    return save_grid(pairs, path, nrow=len(pick), title=title, row_labels=labels)


def read_inputs(synth, train):
    """The synthetic and the training images (uint8 arrays), read and checked."""
    synth_images, _, _ = load_input(synth)
    train_images, _, _ = load_input(train)
    if len(train_images) < 2:
        raise DataError(f"{train}: {len(train_images)} image; the audit compares each image with its two nearest "
                        f"training images, so it needs at least 2")
    return synth_images, train_images


def out_folder(out, force):
    """--out, checked: a folder (made here) whose earlier audit is replaced only with force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; --out names the folder to write into")
    existing = [str(out / f) for f in ("memorization.json", "closest_pairs.png") if (out / f).exists()]
    if existing and not force:
        raise DataError(f"--out {out}: {' and '.join(existing)} already exist; pass --force to replace them, or "
                        f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_audit(synth, train, out, threshold, title, feature_fn=None):
    """audit() of the image arrays, written into the folder out (memorization.json, closest_pairs.png titled
    title) and summed up in one printed line; returns the numbers."""
    result, order, idx, d1 = audit(synth, train, threshold, feature_fn)
    write_json(out / "memorization.json", result)
    closest_pairs_png(synth, train, order, idx, d1, out / "closest_pairs.png", title=title)
    print(f"{result['n_synth']} synthetic vs {result['n_train']} training images: "
          f"{100 * result['fraction_copies']:.2f}% within RMSE {threshold} of a training image "
          f"(nearest-neighbour RMSE median {result['pixel_nn_rmse']['median']:.3f}; training set's own "
          f"{result['train_to_train_nn_rmse']['median']:.3f}); {out / 'closest_pairs.png'}")
    return result


def main(args):
    # the inputs read and checked, and the output place, before anything is computed or written
    synth, train = read_inputs(args.synth, args.train)
    out = out_folder(args.out, args.force)
    return write_audit(synth, train, out, args.threshold, args.title)


def add_args(p):
    """The audit's flags (classify.domain_memorization adds --feature-ckpt)."""
    p.add_argument("synth", help="generated images: folder or .npz with `images`")
    p.add_argument("train", help="the generator's training images: folder or .npz with `images`")
    p.add_argument("--threshold", type=positive_float, default=0.02, help="pixel RMSE (images in [0,1]) below "
                   "which a synthetic image counts as a copy")
    p.add_argument("--out", default="memorization", help="folder for memorization.json and closest_pairs.png")
    p.add_argument("--title", default="closest synthetic (left) / training (right) pairs", help="PNG title")
    p.add_argument("--force", action="store_true", help="replace the memorization.json and closest_pairs.png of an "
                   "earlier audit in --out")
    return p


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m fairness.memorization", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_args(p).parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
