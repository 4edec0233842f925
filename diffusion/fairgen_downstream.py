"""The fairgen study's downstream stage for one modality and split: classifiers trained on real + synthetic images,
tested on the real test patients (classify/downstream.py). One command per modality and split, since a quick ViT fit
takes seconds and a process start about three; with --table-only a second one for further generators, which the
study runs beside the first (every fit is seeded on its own, so the split changes no number).

Table 1's cells: a ViT on the real training images only and on real + each method's samples (ratio 1.0: as many
synthetic as real images), each without and with adaptive reweighting, for each of --down-seeds downstream seeds
(seed 1000 d + --seed: the ViT's initialisation, batch order and shifts; the training images are the same for
every d) and, for a method, each of its generators (--samples METHOD@G=PATH: generator G's samples; METHOD=PATH is
generator 0). The ViT seeds are the same for every generator, so generators differ only in their images. One row
per test image, cell, generator and downstream seed in preds.csv (generator: its number g, not its seed; -1 for
real only, which has none); a replicate is the pair (generator, down_seed), never down_seed alone. The ratio sweep
(--kinds, one seed, generator 0): test accuracy against the synthetic ratio {0, .25, .5, 1} for the
--sweep-methods, in metrics.json.

    python -m diffusion.fairgen_downstream --data cxr --size 32 --split-seed 0 --seed 0 \
        --samples base=runs/results/fairgen/cxr-seed0/base/samples_135pc_10steps.npz [--samples cbrs=...] \
        --out-dir runs/results/fairgen/cxr-seed0/downstream
"""
import argparse
import time

import numpy as np
import pandas as pd
import torch

from classify.downstream import KINDS, fit_predict
from common.cli import ArgumentParser, key_values, positive_int, run
from common.data import to_signed
from common.errors import DataError
from common.modalities import load_modality, modality_name
from common.runs import add_common_args, device_from, prepare_out_dir, seed_everything, write_config, write_json
from common.splits import patient_split

# each method's fixed stream for drawing its synthetic subset (a new method leaves the others' draws unchanged)
DRAW = {"base": 0, "cbrs": 1, "sqrs": 2, "cbdm": 3, "fairgen": 4, "fairdiffusion": 5}
RATIOS = [0.0, 0.25, 0.5, 1.0]


def number_values(text, flag="--vit"):
    """'patch=8,dim=64,dropout=0.0' -> {'patch': 8, 'dim': 64, 'dropout': 0.0} (the ViT's size)."""
    out = {}
    for item in [i for i in text.split(",") if i]:
        key, _, value = item.partition("=")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise DataError(f"{flag} {text!r}: {item!r} is not KEY=NUMBER (e.g. {flag} patch=8,dim=64)")
    return out


def sample_key(key):
    """--samples' key -> (method, generator): 'base' -> ('base', 0), 'base@1' -> ('base', 1); None if not one."""
    method, at, g = key.partition("@")
    if method not in DRAW or (at and not g.isdigit()):
        return None
    return method, int(g) if at else 0


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=modality_name, help="modality (common/modalities.py)")
    p.add_argument("--data-root", default=None,
                   help="Fitzpatrick17k folder for --data skin (default: the phantom); the label table for --data csv")
    p.add_argument("--size", type=positive_int, default=32, help="image side")
    p.add_argument("--split-seed", type=int, default=0, help="the patient-level split (70/10/20, by attribute)")
    p.add_argument("--samples", action="append", default=[], metavar="METHOD[@G]=PATH",
                   help="a method's samples .npz (diffusion.sample_ddpm), repeated per method and generator "
                        f"(METHOD@G: generator G, default 0); methods of {', '.join(DRAW)}")
    p.add_argument("--down-seeds", type=positive_int, default=3, help="downstream ViT seeds per Table-1 cell")
    p.add_argument("--epochs", type=positive_int, default=16, help="downstream training epochs")
    p.add_argument("--vit", default="patch=8,dim=64,mlp=128,dropout=0.0", help="the ViT's size (classify/nets.py)")
    p.add_argument("--kinds", default="vit,gb,knn", help=f"classifiers of the ratio sweep, of {','.join(KINDS)}")
    p.add_argument("--sweep-methods", default="base,fairgen", help="methods whose samples get the ratio sweep")
    p.add_argument("--table-only", action="store_true",
                   help="only Table 1's cells of the given --samples: no real-only fits, no ratio sweep (the study's "
                        "second downstream stage, for generators 1 and up, runs beside the first: each fit is seeded "
                        "on its own, so the two stages' rows are those one stage would write)")
    add_common_args(p, "runs/fairgen/downstream")
    args = p.parse_args(argv)
    args.samples = key_values(args.samples, "--samples")
    bad = sorted(k for k in args.samples if sample_key(k) is None)
    if bad:
        p.error(f"--samples: unknown method {', '.join(bad)}; choose from {', '.join(DRAW)}, each optionally @G "
                f"(a generator number, e.g. base@1)")
    args.kinds = ",".join(k.strip() for k in args.kinds.split(",") if k.strip())
    args.sweep_methods = ",".join(m.strip() for m in args.sweep_methods.split(",") if m.strip())
    if set(args.kinds.split(",")) - set(KINDS):
        p.error(f"--kinds {args.kinds}: choose from {', '.join(KINDS)}")
    missing = [m for m in args.sweep_methods.split(",") if m and m not in args.samples]  # generator 0's
    if missing and not args.table_only:
        p.error(f"--sweep-methods: no --samples for {', '.join(missing)}")
    return args


def main(args):
    device = device_from(args.device)
    vit = number_values(args.vit)
    out = prepare_out_dir(args.out_dir, args.force)
    seed_everything(args.seed)
    mod = load_modality(args.data, args.size, args.data_root)
    split = patient_split(mod.table, seed=args.split_seed, stratify="attr")
    synth = {}  # (method, generator) -> samples
    for key, path in args.samples.items():
        try:
            synth[sample_key(key)] = dict(np.load(path))
        except (OSError, ValueError) as e:
            raise DataError(f"--samples {key}={path}: cannot read it ({type(e).__name__}); write it with "
                            f"diffusion.sample_ddpm")
    write_config(out, vars(args), data=mod.data, weights="none (from scratch)")
    L = len(mod.labels)
    y_all = mod.table["cls"].to_numpy() % L
    g_all = mod.table["attr"].to_numpy().astype(str)
    pid = mod.table["patient_id"].fillna(mod.table.index.to_series().astype(str)).to_numpy()
    x_all = to_signed(mod.images)
    sel = {s: split == s for s in ("train", "val", "test")}
    real_tr = (x_all[sel["train"]], y_all[sel["train"]], g_all[sel["train"]])
    val = (x_all[sel["val"]], y_all[sel["val"]], g_all[sel["val"]])
    x_te, y_te = x_all[sel["test"]], y_all[sel["test"]]
    n_train = len(real_tr[1])

    def train_set(method, ratio, gen=0):
        if method is None or ratio == 0:
            return real_tr
        z = synth[method, gen]  # a fixed draw per cell (generator 0's as with one generator)
        rng = np.random.default_rng([args.seed, DRAW[method], int(round(100 * ratio))] + ([gen] if gen else []))
        take = rng.permutation(len(z["labels"]))[:int(round(ratio * n_train))]
        ys = z["labels"][take] % L
        return (torch.cat([real_tr[0], to_signed(z["images"][take])]), np.r_[real_tr[1], ys],
                np.r_[real_tr[2], z["groups"][take].astype(str)])

    seconds, t0 = {}, time.time()
    test_rows = {"image": np.nonzero(sel["test"])[0], "patient_id": pid[sel["test"]].astype(str),
                 "group": g_all[sel["test"]], "label": y_te}
    preds = []
    for method, gen in ([] if args.table_only else [(None, -1)]) + list(synth):
        for rw in (False, True):
            for d in range(args.down_seeds):
                probs = fit_predict("vit", train_set(method, 1.0, max(gen, 0)), val, x_te, L, rw,
                                    1000 * d + args.seed, device, args.epochs, vit=vit).astype(float)  # (N_test, L)
                preds.append(pd.DataFrame({**test_rows, "pred": probs.argmax(1),
                                           **{f"p_{k}": probs[:, k] for k in range(L)},
                                           "method": method or "real only", "reweight": rw, "generator": gen,
                                           "down_seed": d, "split_seed": args.split_seed}))
                print(f"  table 1: {method or 'real only'}{' + reweighting' if rw else ''}"
                      f"{f', generator {gen}' if gen >= 0 else ''}, down seed {d}: "
                      f"accuracy {np.mean(probs.argmax(1) == y_te):.3f}", flush=True)
    preds = pd.concat(preds, ignore_index=True)
    preds.to_csv(out / "preds.csv", index=False, float_format="%.9g")  # 9 digits: rounding makes AUROC ties
    seconds["table1"] = time.time() - t0

    def acc_of(method):  # Table 1's fit at ratio 1.0 (ratio 0: real only), down seed 0, generator 0
        d = preds[(preds["method"] == method) & ~preds["reweight"] & (preds["down_seed"] == 0) &
                  (preds["generator"] <= 0)]
        return float(np.mean(d["pred"] == d["label"]))
    sweep = {}
    for kind in [k for k in args.kinds.split(",") if k and not args.table_only]:
        t1, sweep[kind] = time.time(), {}
        # ratio 0 is one fit shared by the methods; for the ViT it and ratio 1 are Table 1's (down seed 0)
        real_acc = acc_of("real only") if kind == "vit" else None
        for method in [m for m in args.sweep_methods.split(",") if m]:
            sweep[kind][method] = {}
            for ratio in RATIOS:
                if ratio == 0 and real_acc is not None:
                    acc = real_acc
                elif kind == "vit" and ratio == 1.0:
                    acc = acc_of(method)
                else:
                    acc = float(np.mean(fit_predict(kind, train_set(method, ratio), val, x_te, L, False, args.seed,
                                                    device, args.epochs, vit=vit).argmax(1) == y_te))
                    real_acc = acc if ratio == 0 else real_acc
                sweep[kind][method][ratio] = acc
        seconds[f"sweep_{kind}"] = time.time() - t1
    write_json(out / "metrics.json", {"sweep": sweep, "seconds": seconds, "n_test": int(sel["test"].sum()),
                                      "methods": list(dict.fromkeys(m for m, _ in synth)),
                                      "generators": {m: sorted(g for k, g in synth if k == m) for m, _ in synth}})
    print(f"downstream {mod.data}: {len(preds)} predictions, sweep {list(sweep)} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run(main, parse_args)
