"""The fairgen study's evaluation stage for one modality and split: fidelity and memorization of each method's
samples against the real training images (files in, json out, so that the study's `--dry-run` lists it).

FD: Frechet distance on the penultimate features of --fdnet (a CNN trained on the real training images, target the
disease; classify.train_classifier), overall (every image) and per subgroup at one common n, the smallest
subgroup's size over the real set and every method's samples (fairness/compare.py fd_equal_n), with KID at that n
and the inter-subgroup variance (1/G) of those equal-n FDs. Memorization: each method's samples against the training
images (fairness/memorization.py audit, seeded), with a figure of the closest pairs. Features are taken on
the CPU; every draw has its own fixed seed, so the stage needs no --seed.

    python -m diffusion.fairgen_eval --fdnet runs/results/fairgen/cxr-seed0/fdnet/ckpt.pt \
        --real runs/results/fairgen/cxr-seed0/real_train.npz \
        --samples base=runs/results/fairgen/cxr-seed0/base/samples_135pc_10steps.npz [--samples cbrs=...] \
        --name cxr --out-dir runs/results/fairgen/cxr-seed0/eval

Writes metrics.json ({"fd": ..., "memorization": {method: audit}}) and closest_pairs_<method>.png in --out-dir.
"""
import argparse

import numpy as np

from classify.nets import load_feature_extractor
from common.cli import ArgumentParser, key_values, run
from common.errors import DataError
from common.runs import prepare_out_dir, write_config, write_json
from fairness.compare import fd_equal_n, kid
from fairness.fid import extract, fid_from_features, subgroup_fids
from fairness.memorization import audit, closest_pairs_png


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fdnet", required=True, help="the feature network's ckpt.pt (classify.train_classifier)")
    p.add_argument("--real", required=True, help="the real training images as .npz (images, labels, groups; "
                                                 "common.modalities export)")
    p.add_argument("--samples", action="append", default=[], metavar="METHOD=PATH",
                   help="a method's samples .npz (diffusion.sample_ddpm), repeated per method")
    p.add_argument("--name", default="", help="the modality's name, for the figures' titles")
    p.add_argument("--phantom", action="store_true", help="the data are the skin phantom: the titles say so")
    p.add_argument("--out-dir", default="runs/fairgen/eval", help="run folder: config.json, metrics.json, PNGs")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    args = p.parse_args(argv)
    args.samples = key_values(args.samples, "--samples")
    if not args.samples:
        p.error("--samples: give at least one METHOD=PATH")
    return args


def read_npz(path, flag):
    """An .npz with images, labels and groups as a dict of arrays; anything else stops with the flag named."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{flag} {path}: cannot read it ({type(e).__name__})") from e
    missing = {"images", "labels", "groups"} - set(arrays)
    if missing:
        raise DataError(f"{flag} {path}: no {', '.join(sorted(missing))} in it (write samples with "
                        f"diffusion.sample_ddpm, real images with common.modalities)")
    return arrays


def fd_scores(net, label, real, synth):
    """FD of each method's samples to the real training images, overall (all images) and per subgroup at one
    common n, the smallest subgroup's size over the real set and every method's samples, with KID at that n."""
    f_real = extract(net, real["images"])
    feats = {m: extract(net, z["images"]) for m, z in synth.items()}
    groups = sorted(set(real["groups"].tolist()).intersection(*(set(z["groups"].tolist()) for z in synth.values())))
    n_eq = min([int(np.sum(real["groups"] == g)) for g in groups] +
               [int(np.sum(z["groups"] == g)) for z in synth.values() for g in groups] or [0])
    out = {"metric": label, "n_equal": n_eq}
    for m, z in synth.items():
        f = feats[m]
        per, var = subgroup_fids(f_real, f, real["groups"], z["groups"])
        eq, kids = {}, {}
        for g in groups if n_eq >= 2 else []:
            fr, ff = f_real[real["groups"] == g], f[z["groups"] == g]
            eq[g] = fd_equal_n(fr, ff, n=n_eq, seed=0)
            k = kid(fr, ff, n_subsets=100, subset_size=n_eq)
            kids[g] = {**k, "n": k["m"]}
        fds = np.array([v["fd"] for v in eq.values()])
        out[m] = {"fd": fid_from_features(f_real, f), "n_real": len(f_real), "n_fake": len(f),
                  "groups": {g: {"fd": v[0], "n_real": v[1], "n_fake": v[2]} for g, v in per.items()},
                  "subgroup_variance_unequal_n": var, "groups_equal_n": eq, "kid": kids,
                  "subgroup_variance": float(((fds - fds.mean()) ** 2).mean()) if len(fds) else float("nan")}
    return out


def memorization(real_images, synth, out_dir, name, phantom):
    """{method: audit numbers} of each method's samples against the training images, and closest_pairs_<method>.png
    in out_dir (its title names the modality, and says PHANTOM for phantom data)."""
    out = {}
    for m, z in synth.items():
        res, order, idx, d1 = audit(z["images"], real_images)
        closest_pairs_png(z["images"], real_images, order, idx, d1, out_dir / f"closest_pairs_{m}.png",
                          title=f"{name} {m}: closest synthetic | training pairs" + (" (PHANTOM)" if phantom else ""))
        out[m] = res
    return out


def main(args):
    real = read_npz(args.real, "--real")  # the inputs first: bad input leaves no folder behind
    synth = {m: read_npz(path, f"--samples {m}=") for m, path in args.samples.items()}
    net, label = load_feature_extractor(args.fdnet)
    out = prepare_out_dir(args.out_dir, args.force, flag="--out-dir")
    write_config(out, args, data=args.real, weights=f"feature network {args.fdnet}")
    write_json(out / "metrics.json", {"fd": fd_scores(net, label, real, synth), "memorization": memorization(
        real["images"], synth, out, args.name, args.phantom)})
    print(f"eval {args.name}: FD and memorization of {', '.join(synth)} -> {out / 'metrics.json'}")


if __name__ == "__main__":
    run(main, parse_args)
