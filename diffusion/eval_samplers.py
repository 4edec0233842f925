"""DDIM-50 against ancestral DDPM-1000 for a trained conditional DDPM: time, and the domain feature distance
(FD-<network>, fairness/fid.py) of each sampler's images to the real images the model was trained on, overall and
per attribute group, with KID on the same features (fairness/compare.py: mean and std over 100 subsets) and a
sentence saying whether the samplers' KID intervals (mean +- 2 std) separate at this n. Writes summary.json (with
this command under "argv") and one grid per sampler into --out; the ddpm study's report (diffusion/ddpm_report.py)
makes the table from them.

    python -m diffusion.eval_samplers --ckpt runs/ddpm/nih32/ckpt.pt --fd-ckpt runs/ddpm/fdnet/ckpt.pt \
        --n-per-class 100 --out results/ddpm
"""
import argparse
import shutil
import sys
from pathlib import Path
import time

import numpy as np

from classify.nets import load_feature_extractor
from common.cli import ArgumentParser, nonneg_float, positive_int, run
from common.errors import DataError
from common.modalities import load_modality
from common.report import save_grid
from common.runs import device_from, prepare_out_dir, seed_everything, write_json
from common.splits import patient_split
from diffusion.ddpm import Schedule
from diffusion.sample_ddpm import generate, load_model
from fairness.compare import kid
from fairness.fid import extract, fid_from_features, subgroup_fids


def kid_separation(kids):
    """A sentence: do the KID intervals (mean +- 2 std over subsets) of the samplers overlap? kids: {name: kid()}."""
    names = list(kids)
    iv = {n: (kids[n]["mean"] - 2 * kids[n]["std"], kids[n]["mean"] + 2 * kids[n]["std"]) for n in names}
    overlap = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
               if iv[a][0] <= iv[b][1] and iv[b][0] <= iv[a][1]]
    m = sorted({k["m"] for k in kids.values()})
    head = f"KID intervals (mean +- 2 std over subsets of m = {', '.join(map(str, m))})"
    caveat = (" The std is that of the subsets drawn; where m is a whole set (here the samples when there are fewer "
              "than the real images) that set is not resampled, so the intervals leave out its sampling noise and "
              "separation is necessary, not sufficient, for a real difference.")
    if not overlap:
        return f"{head}: no two samplers' intervals overlap, so at this n the samplers separate." + caveat
    pairs = "; ".join(f"{a} and {b}" for a, b in overlap)
    return (f"{head} overlap for {pairs}: at this n those samplers cannot be told apart by KID"
            + (", the other pairs separate." if len(overlap) < len(names) * (len(names) - 1) // 2 else ".") + caveat)


def main(args):
    device = device_from(args.device)
    seed_everything(args.seed)
    # the inputs read and checked first: bad input stops the command before --out is made or replaced
    model, ck = load_model(args.ckpt, device)
    a, names = ck["args"], ck["class_names"]
    net, label = load_feature_extractor(args.fd_ckpt)
    mod = load_modality(a.get("data", ck.get("data")), a["size"], a.get("data_root"))
    keep = np.ones(len(mod.table), bool) if a.get("subset") == "all" else \
        patient_split(mod.table, seed=a.get("split_seed", 0), stratify="attr") == "train"
    real, real_groups = mod.images[keep], mod.table["attr"].to_numpy()[keep].astype(str)
    if len(real) < 2:
        raise DataError(f"--ckpt {args.ckpt}: its training data ({a.get('data')}, subset {a.get('subset')}) has "
                        f"{len(real)} images here; the feature distance needs at least 2")
    out = prepare_out_dir(args.out, args.force, flag="--out")
    f_real = extract(net, real)
    sched = Schedule(a["schedule"], a["T"])
    classes = np.repeat(np.arange(len(names)), args.n_per_class)
    groups = np.array([names[c].split("|")[0] for c in classes])
    summary = {"argv": ["diffusion.eval_samplers", *sys.argv[1:]], "ckpt": str(args.ckpt), "step": ck["step"], "data": ck.get("data"),
               "size": a["size"], "metric": label, "n_real": len(real), "guidance": args.guidance, "samplers": {}}
    for sampler, steps, eta in (("ddim", 50, 0.0), ("ddim", 50, 1.0), ("ddpm", a["T"], 1.0)):
        t0 = time.time()
        imgs = generate(model, sched, classes, a["size"], a["channels"], sampler, steps, eta, args.guidance,
                        args.batch_size, args.seed, device)
        secs = time.time() - t0
        f = extract(net, imgs)
        fd = fid_from_features(f_real, f)
        k = kid(f_real, f, n_subsets=100, subset_size=1000)  # m = min(1000, n_real, n_fake)
        per, var = subgroup_fids(f_real, f, real_groups, groups)
        name = f"{sampler.upper()}-{steps}" + (f" eta={eta:g}" if sampler == "ddim" else "")
        summary["samplers"][name] = {"fd": fd, "kid": k, "n_fake": len(imgs), "seconds": secs,
                                     "subgroup_variance": var,
                                     "groups": {g: {"fd": v[0], "n_real": v[1], "n_fake": v[2]} for g, v in per.items()}}
        pick = np.concatenate([np.nonzero(classes == c)[0][:8] for c in range(len(names))])
        fname = f"samples_{sampler}{steps}" + (f"_eta{eta:g}" if sampler == "ddim" else "") + ".png"
        save_grid(imgs[pick], out / fname, nrow=len(names), row_labels=names,
                  title=f"{name}, w={args.guidance}, {ck.get('data')}, step {ck['step']}")
    for f in ("loss_curve.png", "samples.png"):
        src = Path(args.ckpt).parent / f
        if src.is_file():
            shutil.copy(src, out / f"train_{f}")
    summary["kid_separation"] = kid_separation({n: v["kid"] for n, v in summary["samplers"].items()})
    write_json(out / "summary.json", summary)
    print(summary["kid_separation"])


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="train_ddpm.py checkpoint")
    p.add_argument("--fd-ckpt", required=True, help="classifier checkpoint for FD-<network> features")
    p.add_argument("--n-per-class", type=positive_int, default=100, help="samples per class and sampler")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="guidance scale w")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sampling batch (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", default="results/ddpm", help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
