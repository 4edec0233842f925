"""FairGen ("Preference-Aligned Diffusion for Demographically Equitable Medical Image Synthesis") with our own
from-scratch DDPM in place of Stable Diffusion, and its downstream fairness evaluation.

Per modality (common/modalities.py; class = attribute x disease), with one patient-level split (70/10/20):
  judge, fdnet   two classifiers on the real training images: the DPO judge (target: class) and, separately
                 seeded, the network behind FD-cnn8 (target: disease), so that the judge never grades itself
  pretrain       a plain conditional DDPM (the shared starting point, as FairGen starts from a pretrained SD)
  base / cbrs / sqrs / cbdm   fine-tuned from it for --finetune steps with the variant's sampler / loss
  fairdiffusion  the same fine-tune with FairDiffusion's Fair Bayesian Perturbation (diffusion/fairdiffusion.py;
                 GP-UCB search of per-group loss-weight noise every `fair_window` steps: the preset's)
  fairgen        SQRS + class-balancing loss for (finetune - dpo) steps, then DPO for --dpo-steps with pairs
                 from the judge (judge: classifier, never physicians; FairGen-code DPO form)
  samples        per method, the same number per class (ratio 1.0 = as many synthetic as real training images)
  FD, KID       FD-cnn8 of each method's samples to the real training images; per subgroup FD and KID
                 (fairness/compare.py) at one common n per modality (the smallest subgroup's), and the
                 inter-subgroup variance (1/G) of those equal-n FDs; n beside every value
  memorization   each method's samples against the DDPM's training images (fairness/memorization.py)
  downstream     (a stage, diffusion/fairgen_downstream.py) ViT on real + synthetic (ratio 1.0), with and without
                 adaptive reweighting, for each of `down_seeds` downstream seeds on the same test patients:
                 per-image predictions in its preds.csv; from
                 that file, accuracy, per-group AUROC, DP, EO, ESSP, NAR (Table 1, the mean over the seeds) and the
                 paired comparisons of every method with base (comparisons_from_preds: two-level bootstrap over
                 seeds and test patients, Holm per modality); and accuracy vs synthetic ratio {0, .25, .5, 1} for
                 the four classifiers (ViT, ResNet-50, GB, KNN), one downstream seed

    python -m diffusion.fairgen_study                     # quick: 32 px, small models, one seed (CPU)
    python -m diffusion.fairgen_study --scale full --out results/fairgen-full   # GPU: 64 px, 3 seeds
    python -m diffusion.fairgen_study --smoke --out smoke/fairgen               # seconds
"""
import argparse
import json
import math
from pathlib import Path
import time
import warnings

import numpy as np
import pandas as pd

from classify.downstream import KINDS
from common.cli import ArgumentParser, positive_int, run
from common.modalities import MODALITIES, export, load_modality, modality_name
from common.report import save_grid, write_table
from common.runs import default_runs, device_from, prepare_out_dir, seed_everything, write_config, write_json
from common.splits import patient_split
from common.stages import Stages, planned
from diffusion.annotate import blinded_pairs, write_pair_set
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, fd_equal_n, gap_permutation,
                              group_gap, kid, paired_difference_replicates, with_holm)
from fairness.figures import bars, lines, radar
from fairness.metrics import bootstrap, essp, fairness_summary, group_accuracy

METHODS = ["base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "fairgen"]  # the paper's order
VARIANT_FLAGS = {"base": [], "cbrs": ["--sampler", "cbrs"], "sqrs": ["--sampler", "sqrs"], "cbdm": ["--cb-loss"],
                 "fairdiffusion": ["--fair-bayes"], "sqrs_cb": ["--sampler", "sqrs", "--cb-loss"]}
# FairGen Table 1 (ViT, Fitzpatrick-17k; docs/METHODS.md, labels as the paper's): their Stable-Diffusion-based numbers,
# never mixed with ours. "Base (ViT)" is the ViT on real data only; "Stable Diffusion" the plain generator's data.
PUBLISHED = {("Fitzpatrick-17k", m): dict(zip(("ESSP", "DP", "EO", "NAR"), v)) for m, v in [
    ("Base (ViT)", (5.11, 18.22, 7.56, 0.36)), ("Stable Diffusion", (3.76, 25.04, 8.19, 0.41)),
    ("CBRS", (5.85, 15.28, 6.72, 0.30)), ("SQRS", (5.08, 18.03, 7.29, 0.35)), ("CBDM", (6.11, 13.13, 6.56, 0.28)),
    ("FairDiffusion", (11.16, 8.13, 4.52, 0.25)), ("FairGen", (15.47, 4.51, 2.70, 0.21))]}
# the comparisons of Table 1's cells, (method, reweighting) a vs b: every method vs base, without and with
# reweighting on both sides, FairGen with reweighting (the paper's FairGen includes it) vs base without, and FairGen
# vs FairDiffusion (the paper's strongest earlier fair generator) without and with reweighting
PAIRS = [((m, rw), ("base", rw)) for rw in (False, True) for m in METHODS[1:]] + \
    [(("fairgen", True), ("base", False))] + [(("fairgen", rw), ("fairdiffusion", rw)) for rw in (False, True)]
PRESETS = {
    # quick: the three modalities in under 60 min on a 2-core CPU (README has the measured time): a small U-Net
    # (16-32-32 channels), few steps (700 pretraining steps and DDIM-15 took 51.5 min), a ViT with 8x8 patches and
    # no dropout (~12x cheaper than 4x4 patches with dropout at 32 px, about as accurate: bench/vit_sizes.py) and
    # no ResNet-50 in the ratio sweep (~10 min per modality from scratch on 2 cores; add it with --kinds): a chain
    # check more than a generator worth judging. down_seeds: downstream ViT seeds per Table-1 cell (a quick ViT fit
    # takes ~10 s; 3 seeds add ~5 min per modality). full: a GPU.
    # fair_window: FairDiffusion's steps per GP update, the public code's 50 at full scale; 25 at quick scale, so
    # that its 100 fine-tuning steps see 4 updates rather than 2
    "quick": dict(size=32, width=16, mults="1,2,2", num_res=1, attn_res="8", pretrain=400, finetune=100, dpo=40,
                  fair_window=25,
                  batch=32, sample_steps=10, clf_epochs=10, down_epochs=16, seeds=1, down_seeds=3, pairs_per_class=8,
                  vit=dict(patch=8, dim=64, mlp=128, dropout=0.0), kinds="vit,gb,knn", blinded_per_condition=1),
    "full": dict(size=64, width=64, mults="1,2,2,2", num_res=2, attn_res="16", pretrain=20000, finetune=2000,
                 fair_window=50,
                 dpo=500, batch=64, sample_steps=50, clf_epochs=40, down_epochs=40, seeds=3, down_seeds=3,
                 pairs_per_class=64,
                 vit=dict(patch=4, dim=128, mlp=256), kinds=",".join(KINDS), blinded_per_condition=4),
    "smoke": dict(size=16, width=8, mults="1,2", num_res=1, attn_res="8", pretrain=4, finetune=4, dpo=2,
                  fair_window=2, batch=8,
                  sample_steps=3, clf_epochs=1, down_epochs=1, seeds=1, down_seeds=2, pairs_per_class=2,
                  vit=dict(patch=4, dim=16, mlp=32, heads=2, depth=1), kinds=",".join(KINDS),
                  blinded_per_condition=1),
}


def modality_list(text):
    """argparse type of --modalities: comma-separated modalities (common.modalities.modality_name, toy:N too)."""
    names = [modality_name(m.strip()) for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no modality in {text!r}; choose from {', '.join(MODALITIES)}")
    return ",".join(names)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modalities", default="cxr,mri,skin", type=modality_list,
                   help="comma-separated: cxr, nih, mri, skin, toy")
    p.add_argument("--skin-root", default=None, help="Fitzpatrick17k folder (default: the skin phantom)")
    p.add_argument("--scale", default="quick", choices=["quick", "full"], help="presets (see PRESETS)")
    p.add_argument("--smoke", action="store_true", help="tiny run of the whole chain")
    p.add_argument("--kinds", default=None,
                   help=f"downstream classifiers for the ratio sweep, of {','.join(KINDS)} (default: the preset's)")
    p.add_argument("--sweep-methods", default="base,fairgen", help="methods whose synthetic data get the ratio sweep")
    p.add_argument("--dpo", default="fairgen", choices=["fairgen", "diffusion"], help="DPO form of the fairgen run")
    p.add_argument("--n-boot", type=positive_int, default=500, help="bootstrap resamples (patients) for Table 1's CIs")
    p.add_argument("--n-boot-compare", type=positive_int, default=2000,
                   help="resamples of the paired comparisons (and permutations of the gap nulls): p is floored at "
                        "1 / (n + 1), so Holm over a modality's 27 comparisons needs n >> 27 / 0.05")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", default="results/fairgen", help="tables, figures, summary.json")
    p.add_argument("--runs", default=None, help="run folders (default: runs/<--out>, e.g. runs/results/fairgen); reused when "
                   "present")
    p.add_argument("--force", action="store_true", help="replace an existing --out (run folders are reused)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stage commands of this run (each a script of its own), those it would reuse "
                        "from --runs marked '# reuse: ', and exit without running or writing anything")
    p.add_argument("--makefile", default=None,
                   help="write the training and sampling stages as a makefile here and exit: `make -j N -f FILE` runs "
                        "them, and the study run afterwards reuses them, evaluates and writes the report")
    args = p.parse_args(argv)
    args.preset = PRESETS["smoke" if args.smoke else args.scale]
    args.kinds = ",".join(k.strip() for k in (args.kinds or args.preset["kinds"]).split(",") if k.strip())
    args.sweep_methods = ",".join(m.strip() for m in args.sweep_methods.split(",") if m.strip())
    if set(args.kinds.split(",")) - set(KINDS):
        p.error(f"--kinds {args.kinds}: choose from {', '.join(KINDS)}")
    if set(args.sweep_methods.split(",")) - set(METHODS):
        p.error(f"--sweep-methods {args.sweep_methods}: choose from {', '.join(METHODS)}")
    return args


def stopwatch():
    """lap() -> seconds since the previous lap() (the first: since stopwatch())."""
    last = [time.time()]

    def lap():
        now = time.time()
        dt, last[0] = now - last[0], now
        return dt
    return lap


def modality(name, args, seed, runs, device, stages):
    """Train, sample and evaluate every method on one modality; returns its part of summary.json (None with
    stages.dry: the stage commands are then only listed in stages.commands)."""
    P = args.preset
    seconds, lap = {}, stopwatch()
    root = args.skin_root if name == "skin" else None
    mod = load_modality(name, P["size"], root)
    K = len(mod.class_names)
    split = patient_split(mod.table, seed=seed, stratify="attr")
    train = split == "train"
    n_train = int(train.sum())
    per_class = math.ceil(n_train / K)  # ratio 1.0: as many synthetic images as real training images
    r = runs / f"{name}-seed{seed}"
    base = ["--data", name, "--size", str(P["size"]), "--split-seed", str(seed), "--seed", str(seed)] + \
        (["--data-root", root] if root else [])
    hflip = ["--hflip"] if name == "skin" else []
    clf = ["--epochs", str(P["clf_epochs"]), "--arch", "cnn8"] + hflip
    stages.script("classify.train_classifier", base + clf + ["--target", "cls", "--out-dir", str(r / "judge")],
                  r / "judge")
    fd_argv = ["--data", name, "--size", str(P["size"]), "--split-seed", str(seed), "--seed", str(seed + 1)] + \
        (["--data-root", root] if root else []) + clf + ["--target", "label", "--out-dir", str(r / "fdnet")]
    stages.script("classify.train_classifier", fd_argv, r / "fdnet")
    ddpm = base + ["--width", str(P["width"]), "--mults", P["mults"], "--num-res", str(P["num_res"]), "--attn-res",
                   P["attn_res"], "--batch-size", str(P["batch"]), "--sample-every", "0", "--save-every", "100000",
                   "--grid-steps", str(P["sample_steps"])] + hflip
    stages.script("diffusion.train_ddpm", ddpm + ["--steps", str(P["pretrain"]), "--lr", "5e-4", "--warmup", "100",
                                                  "--ema", "0.995", "--out-dir", str(r / "pretrain")], r / "pretrain")
    ft = ["--init", str(r / "pretrain/ckpt.pt"), "--lr", "2e-4", "--warmup", "10", "--ema", "0.99"]
    for v in ["base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "sqrs_cb"]:
        steps = P["finetune"] - (P["dpo"] if v == "sqrs_cb" else 0)
        fair = ["--fair-time-window", str(P["fair_window"])] if v == "fairdiffusion" else []
        stages.script("diffusion.train_ddpm", ddpm + ft + VARIANT_FLAGS[v] + fair +
                      ["--steps", str(steps), "--out-dir", str(r / v)], r / v, deps=[r / "pretrain/metrics.json"])
    stages.script("diffusion.train_dpo", base + hflip + [
        "--init", str(r / "sqrs_cb/ckpt.pt"), "--judge", str(r / "judge/ckpt.pt"), "--sampler", "sqrs", "--cb-loss",
        "--dpo", args.dpo, "--steps", str(P["dpo"]), "--batch-size", str(P["batch"]), "--pairs-per-class",
        str(P["pairs_per_class"]), "--pair-steps", str(P["sample_steps"]), "--grid-steps", str(P["sample_steps"]),
        "--out-dir", str(r / "fairgen")], r / "fairgen", deps=[r / "sqrs_cb/metrics.json", r / "judge/metrics.json"])
    seconds["generators"] = lap()  # this invocation's time per phase (reused steps take ~0)
    samples_file = f"samples_{per_class}pc_{P['sample_steps']}steps.npz"  # the name holds what makes them differ
    for m in METHODS:
        out = r / m / samples_file
        stages.samples("diffusion.sample_ddpm", ["--ckpt", str(r / m / "ckpt.pt"), "--n-per-class", str(per_class),
                                                 "--steps", str(P["sample_steps"]), "--seed", str(seed), "--out",
                                                 str(out), "--device", str(device)], out, [r / m / "metrics.json"])
    seconds["sampling"] = lap()
    vit = ",".join(f"{k}={v}" for k, v in P["vit"].items())
    stages.script("diffusion.fairgen_downstream", [
        "--data", name, "--size", str(P["size"]), "--split-seed", str(seed), "--seed", str(seed)] +
        (["--data-root", root] if root else []) +
        [a for m in METHODS for a in ("--samples", f"{m}={r / m / samples_file}")] +
        ["--down-seeds", str(P["down_seeds"]), "--epochs", str(P["down_epochs"]), "--vit", vit, "--kinds", args.kinds,
         "--sweep-methods", args.sweep_methods, "--device", str(device), "--out-dir", str(r / "downstream")],
        r / "downstream", deps=[r / m / samples_file for m in METHODS])
    seconds["downstream"] = lap()
    if stages.dry:
        return None
    export(mod, r / "real_train.npz", train)
    synth = {m: np.load(r / m / samples_file) for m in METHODS}
    res = {"data": mod.data, "classes": mod.class_names, "attrs": mod.attrs, "labels": mod.labels,
           "notes": mod.notes, "n_train": n_train, "n_test": int((split == "test").sum()),
           "synthetic_per_class": per_class, "samples_file": samples_file, "judge": f"classifier ({r / 'judge/ckpt.pt'})"}
    res["fd"] = fd_scores(r, synth, mod)
    res["memorization"] = memorization(r, synth, mod)
    seconds["fd_memorization"] = lap()
    done = json.loads((r / "downstream" / "metrics.json").read_text())  # the downstream stage's files
    res["downstream"] = {"sweep": {k: {m: {float(q): a for q, a in v.items()} for m, v in d.items()}
                                   for k, d in done["sweep"].items()}, "seconds": done["seconds"]}
    res["preds"] = str(r / "downstream" / "preds.csv")
    res["downstream"]["table1"] = table1_from_preds(read_preds(res["preds"]), args.n_boot, seed)  # from the file
    total = sum(seconds.values()) + lap()  # the last lap: Table 1 from the preds file
    # per phase: this invocation's (a reused stage takes ~0); downstream_*: the downstream stage's own, when it ran
    res["seconds"] = {**seconds, **{f"downstream_{k}": v for k, v in res["downstream"].pop("seconds").items()},
                      "total": total}
    print(f"  {name}: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["seconds"].items()), flush=True)
    return res


def fd_scores(r, synth, mod):
    """FD-cnn8 of each method's samples to the real training images, overall (all images) and per subgroup at one
    common n, the smallest subgroup's size over the real set and every method's samples, with KID at that n."""
    from classify.nets import load_feature_extractor
    from fairness.fid import extract, fid_from_features, subgroup_fids
    net, label = load_feature_extractor(r / "fdnet/ckpt.pt")
    real = np.load(r / "real_train.npz")
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


def memorization(r, synth, mod):
    from fairness.memorization import audit, closest_pairs_png
    real = np.load(r / "real_train.npz")["images"]
    out = {}
    for m, z in synth.items():
        res, order, idx, d1 = audit(z["images"], real)
        closest_pairs_png(z["images"], real, order, idx, d1, r / m / "closest_pairs.png",
                          title=f"{mod.name} {m}: closest synthetic | training pairs" +
                          (" (PHANTOM)" if mod.data == "phantom" else ""))
        out[m] = res
    return out


def cell_name(method, reweight):
    """Table 1's row name of a cell: 'real only', 'base', 'fairgen + reweighting', ..."""
    return method + (" + reweighting" if reweight else "")


# ---- from preds.csv: Table 1 and the comparisons ------------------------------------------------------------------
def read_preds(path):
    """preds.csv(.gz) as written by the study: one row per test image, cell and downstream seed."""
    return pd.read_csv(path, dtype={"patient_id": str, "group": str, "method": str})


class RowsAUROC:
    """auroc_ovr(y[rows], probs[rows]) for any rows, repeats included, in microseconds: the AUROC (Mann-Whitney) of
    a multiset is sum_ij w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (W_pos W_neg) over positives i and negatives j,
    w_i the number of times row i occurs, so each class's comparison matrix is built once. Binary (2 columns): the
    AUROC of class 1; more: the mean over the classes present of one-vs-rest AUROCs (tests: equal to auroc_ovr)."""

    def __init__(self, y, probs):
        self.n, self.parts = len(y), []
        for k in [1] if probs.shape[1] == 2 else range(probs.shape[1]):
            pos, neg = np.nonzero(y == k)[0], np.nonzero(y != k)[0]
            s_pos, s_neg = probs[pos, k][:, None], probs[neg, k][None, :]
            self.parts.append((pos, neg, (s_pos > s_neg) + 0.5 * (s_pos == s_neg)))  # (P_k, N_k)

    def __call__(self, rows):
        w = np.bincount(rows, minlength=self.n).astype(float)
        vals = [w[pos] @ c @ w[neg] / (w[pos].sum() * w[neg].sum()) for pos, neg, c in self.parts
                if w[pos].sum() > 0 and w[neg].sum() > 0]
        return float(np.mean(vals)) if vals else float("nan")


def _cell_arrays(df, method, reweight, split_seed):
    """One cell of one split, rows in image order, per downstream seed: (y, groups, patients, [(pred, probs, auc)])
    with auc a RowsAUROC of that seed's probabilities."""
    d = df[(df["method"] == method) & (df["reweight"] == reweight) & (df["split_seed"] == split_seed)]
    seeds = sorted(d["down_seed"].unique())
    parts = [d[d["down_seed"] == s].sort_values("image") for s in seeds]
    first = parts[0]
    assert all(np.array_equal(p["image"].to_numpy(), first["image"].to_numpy()) for p in parts), \
        "every downstream seed must predict the same test images"
    pcols = sorted((c for c in df.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    y = first["label"].to_numpy()
    return (y, first["group"].to_numpy().astype(str), first["patient_id"].to_numpy(),
            [(p["pred"].to_numpy(), p[pcols].to_numpy(float), RowsAUROC(y, p[pcols].to_numpy(float))) for p in parts])


def _binary_or_probs(probs):
    return probs[:, 1] if probs.shape[1] == 2 else probs


def table1_from_preds(df, n_boot, seed=0):
    """Table 1 of one split from its preds rows: for each cell, every metric of fairness_summary as the mean over
    the downstream seeds ({value, ci, seeds}); CI: percentile bootstrap over test patients of that mean (the seeds
    held fixed; the comparisons resample them too)."""
    out = {}
    split_seed = sorted(df["split_seed"].unique())[0]
    for (method, rw), _ in df.groupby(["method", "reweight"], sort=False):
        y, g, pid, runs = _cell_arrays(df, method, rw, split_seed)

        def stat(idx):
            per = [fairness_summary(y[idx], pred[idx], g[idx], _binary_or_probs(probs)[idx]) for pred, probs, _ in runs]
            return {k: float(np.mean([p[k] for p in per])) for k in per[0]}
        every = np.arange(len(y))
        point = stat(every)
        seeds = [fairness_summary(y, pred, g, _binary_or_probs(probs)) for pred, probs, _ in runs]
        ci = bootstrap(stat, len(y), clusters=pid, n_boot=n_boot, seed=seed)
        out[cell_name(method, rw)] = {k: {"value": v, "ci": list(ci.get(k, (np.nan, np.nan))),
                                          "seeds": [float(s[k]) for s in seeds]} for k, v in point.items()}
    return out


def metric_functions(attrs):
    """{name: f(y, groups, run, idx) -> float} of the comparisons, run = (pred, probs, auc): accuracy, ESSP on
    accuracy, and the gap in AUROC (binary: of class 1; more classes: one-vs-rest mean) between groups (signed
    first - second for two groups; max - min for more, see gap_tables)."""
    def acc(y, g, run, i):
        return float(np.mean(y[i] == run[0][i]))

    def es(y, g, run, i):
        return essp(acc(y, g, run, i), group_accuracy(y[i], run[0][i], g[i]).values())

    def gap(y, g, run, i):
        if len(attrs) == 2:
            a, b = (i[g[i] == s] for s in attrs)
            return run[2](a) - run[2](b) if len(a) and len(b) else float("nan")
        return group_gap(run[2], g, i, attrs)
    gap_name = f"AUROC gap {attrs[0]} - {attrs[1]}" if len(attrs) == 2 else "AUROC gap max - min"
    return {"accuracy": acc, "ESSP (accuracy)": es, gap_name: gap}


def comparisons_from_preds(df, attrs, n_boot=2000, seed=0):
    """The paired comparisons of one modality, from its preds DataFrame alone (every split seed in it): each PAIR
    of cells on accuracy, ESSP and the AUROC gap, a - b, with compare.paired_difference_replicates (units: test
    patients). One split: the replicates are the downstream seeds on its test set (one draw of patients serves
    them all); several splits: the replicates are the splits, each statistic the mean over its downstream seeds.
    Holm over the modality's rows. Each row also has value_a / value_b (the mean over replicates)."""
    attrs = [a for a in attrs if a in set(df["group"].astype(str))]
    splits = sorted(df["split_seed"].unique())
    rows, cells = [], {}

    def cell(m, r, s):  # (y, groups, patients, runs) and the image ids of one cell, built once for every metric
        if (m, r, s) not in cells:
            images = df[(df.method == m) & (df.reweight == r) & (df.split_seed == s) & (df.down_seed == 0)]
            cells[m, r, s] = _cell_arrays(df, m, r, s), images.sort_values("image")["image"].to_numpy()
        return cells[m, r, s]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a resample without a class: NaN, left out
        for metric, f in metric_functions(attrs).items():
            for (ma, ra), (mb, rb) in PAIRS:
                reps = []  # (stat_a, stat_b, patients) per replicate
                for s in splits:
                    (y, g, pid, runs_a), img_a = cell(ma, ra, s)
                    (y_b, _, _, runs_b), img_b = cell(mb, rb, s)
                    assert np.array_equal(y, y_b) and np.array_equal(img_a, img_b), \
                        "a and b must be evaluated on the same test images"
                    if len(splits) == 1:  # replicates: the downstream seeds
                        reps += [(_seed_mean(f, y, g, [a]), _seed_mean(f, y, g, [b]), pid)
                                 for a, b in zip(runs_a, runs_b)]
                    else:  # replicates: the splits
                        reps.append((_seed_mean(f, y, g, runs_a), _seed_mean(f, y, g, runs_b), pid))
                res = paired_difference_replicates(reps, n_boot=n_boot, seed=seed)
                if len(splits) > 1:
                    res["method"] += "; each replicate a split (its own test patients), its statistic the mean " \
                                     "over its downstream seeds"
                every = [np.arange(len(pid)) for _, _, pid in reps]
                rows.append({**comparison(metric, cell_name(ma, ra), cell_name(mb, rb), res),
                             "value_a": float(np.nanmean([a(i) for (a, _, _), i in zip(reps, every)])),
                             "value_b": float(np.nanmean([b(i) for (_, b, _), i in zip(reps, every)]))})
    return with_holm(rows)


def _seed_mean(f, y, g, runs):
    """idx -> the mean over downstream seeds (runs: [(pred, probs, auc)]) of the metric f on the rows idx."""
    if len(runs) == 1:
        return lambda idx: f(y, g, runs[0], idx)
    return lambda idx: float(np.mean([f(y, g, run, idx) for run in runs]))


def gap_tables(df, attrs, n_perm=2000, seed=0):
    """For more than two groups: each cell's max - min AUROC gap against its permutation null (group labels
    shuffled across patients; compare.gap_permutation) on split seed 0, the AUROC the mean over downstream seeds:
    {cell: {gap, p, null_median, excess, n_units, method}}. Empty for two groups (their signed gap has a CI)."""
    attrs = [a for a in attrs if a in set(df["group"].astype(str))]
    if len(attrs) <= 2:
        return {}
    out = {}
    split_seed = sorted(df["split_seed"].unique())[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (method, rw), _ in df.groupby(["method", "reweight"], sort=False):
            y, g, pid, runs = _cell_arrays(df, method, rw, split_seed)
            stat = _seed_mean(lambda y_, g_, run, rows: run[2](rows), y, g, runs)
            try:
                out[cell_name(method, rw)] = gap_permutation(stat, g, pid, n_perm=n_perm, seed=seed)
            except ValueError as e:  # a patient in two groups: no permutation across patients
                out[cell_name(method, rw)] = {"gap": float("nan"), "p": float("nan"), "excess": float("nan"),
                                              "method": str(e)}
    return out


def main(args):
    t0 = time.time()
    device = device_from(args.device)
    runs = Path(args.runs or default_runs(args.out))  # each --out (and so each scale) has its own tree
    names = [m.strip() for m in args.modalities.split(",") if m.strip()]
    stages = Stages(dry=args.dry_run or bool(args.makefile))
    if stages.dry:  # the stage commands, in order; then the in-process steps
        for name in names:
            for seed in range(args.preset["seeds"]):
                modality(name, args, seed, runs, device, stages)
        planned(stages, args.dry_run, args.makefile, "per modality and seed: FD / KID / memorization of the samples; Table 1 and the "
                              f"comparisons from the downstream stages' preds.csv, and the tables in {args.out}")
        return
    out = prepare_out_dir(args.out, args.force)
    scale = "smoke" if args.smoke else args.scale
    write_config(out, args, data=args.modalities, weights="none (from scratch)", preset=args.preset,
                 judge="classifier (automatic; no physician preferences)")
    summary = {"scale": scale, "judge": "classifier (automatic, trained on real images; not physicians)",
               "preset": args.preset, "dpo": args.dpo, "modalities": {}}
    for name in names:
        for seed in range(args.preset["seeds"]):
            print(f"== {name}, seed {seed} ({(time.time() - t0) / 60:.1f} min)", flush=True)
            seed_everything(seed)
            summary["modalities"].setdefault(name, {})[f"seed{seed}"] = modality(name, args, seed, runs, device,
                                                                                 stages)
    summary["seconds"] = time.time() - t0  # this invocation only: steps listed under "reused" were not recomputed
    summary["reused"] = stages.reused
    summary["stages"] = stages.commands  # what ran (or was reused), in order: `--dry-run` prints the same
    report(summary, out, runs, args)


def fmt(entry, scale=100.0, digits=2):
    """'value [lo, hi]', with a dagger where the value lies outside its percentile CI (see GAP_NOTE)."""
    v, (lo, hi) = entry["value"], entry["ci"]
    mark = "†" if not lo <= v <= hi else ""
    return f"{v * scale:.{digits}f}{mark} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


GAP_NOTE = ("DP, EO and NAR are max - min gaps between groups (never below 0), and resampling inflates a gap (two "
            "groups that happen to score alike in the test set rarely do in a resample), so their percentile CI "
            "cannot contain 0 and can sit above the value (marked †): read it as the range the gap takes under "
            "test-set noise, not as a confidence interval or a test. Whether a method changes a gap: comparisons.md "
            "(signed AUROC gap, paired) and gaps.md (permutation nulls).")


def blinded_set(name, res, grid, runs, out, args):
    """The blinded expert evaluation's pair set for one modality (diffusion/annotate.py serves it): per condition,
    real vs each method and each method vs each other, sides and order shuffled, sources hidden from the page."""
    real = np.load(runs / f"{name}-seed0" / "real_train.npz")
    n = args.preset["blinded_per_condition"]
    classes = res["classes"]
    pairs = blinded_pairs((real["images"], [classes[c] for c in real["labels"]]),
                          {m: (z["images"], [classes[c] for c in z["labels"]]) for m, z in zip(METHODS, grid)}, n,
                          seed=0)
    folder = out / "blinded_pairs" / name
    write_pair_set(folder, "blinded", pairs, {"study": "fairgen", "modality": name, "data": res["data"],
                                              "samples": res["samples_file"], "per_condition": n,
                                              "real": "training split (real_train.npz)"})
    res["blinded_pairs"] = {"folder": str(folder), "n_pairs": len(pairs),
                            "serve": f"python -m diffusion.annotate --serve {folder}"}


def preds_copy(res_by_seed, out, name):
    """Every split seed's preds.csv of a modality as one file in --out, gzip-compressed above 2 MB; returns it."""
    df = pd.concat([read_preds(res["preds"]) for res in res_by_seed.values()], ignore_index=True)
    text = df.to_csv(index=False, float_format="%.9g")
    path = out / f"preds_{name}.csv"
    if len(text.encode()) > 2_000_000:
        path = path.with_suffix(".csv.gz")
        df.to_csv(path, index=False, float_format="%.9g", compression={"method": "gzip", "mtime": 0})
    else:
        path.write_text(text)
    return path


def fairer(comps, name, b, label, suffix):
    """The answer sentences (ESSP and AUROC gap) of FairGen + reweighting against cell b of one modality."""
    paper = {c["metric"]: c for c in comps if (c["a"], c["b"]) == ("fairgen + reweighting", b)}
    gap_metric = [m for m in paper if m.startswith("AUROC gap")][0]
    e, g = paper["ESSP (accuracy)"], paper[gap_metric]
    return {"essp" + suffix: answer(e, f"{name}: ESSP (accuracy, fraction), FairGen + reweighting "
                                       f"{e['value_a']:.3f} vs {label} {e['value_b']:.3f}, difference"),
            "gap" + suffix: answer(g, f"{name}: {gap_metric}, FairGen + reweighting {g['value_a']:+.3f} vs {label} "
                                      f"{g['value_b']:+.3f} (nearer 0 is fairer), difference")}


def comparison_table(summary, out, args):
    """comparisons.md/.csv (and gaps.md/.csv where a modality has more than two groups) from the preds files in
    --out, with the one-sentence answers; fills summary's comparisons, gaps and answers."""
    summary["comparisons"], summary["gaps"], summary["answers"] = [], {}, {}
    rows, gap_rows, lines_, lines_fd = [], [], [], []
    for name, seeds in summary["modalities"].items():
        res = seeds["seed0"]
        df = read_preds(out / summary["preds"][name])  # the report's comparisons come from the file alone
        comps = [{**c, "modality": name} for c in comparisons_from_preds(df, res["attrs"], args.n_boot_compare)]
        summary["comparisons"] += comps
        for c in comps:
            rows.append([name] + comparison_rows([c])[0][:2] + [f"{c['value_a']:.3f}", f"{c['value_b']:.3f}"] +
                        comparison_rows([c])[0][2:])
        gaps = gap_tables(df, res["attrs"], args.n_boot_compare)
        if gaps:
            summary["gaps"][name] = gaps
            gap_rows += [[name, cell, f"{v['gap']:.3f}", f"{v.get('null_median', float('nan')):.3f}",
                          f"{v['excess']:+.3f}", f"{v['p']:.3g}"] for cell, v in gaps.items()]
        summary["answers"][name] = {
            "question": "Is FairGen (with reweighting) fairer than its base (the plain DDPM's data, no reweighting)?",
            **fairer(comps, name, "base", "base", ""),
            "question_fairdiffusion": "Is FairGen fairer than FairDiffusion, both with reweighting?",
            **fairer(comps, name, "fairdiffusion + reweighting", "FairDiffusion + reweighting", "_vs_fairdiffusion")}
        lines_ += [summary["answers"][name][k] for k in ("essp", "gap")]
        lines_fd += [summary["answers"][name][k] for k in ("essp_vs_fairdiffusion", "gap_vs_fairdiffusion")]
    methods = sorted({c["method"] for c in summary["comparisons"]})
    notes = [f"Is FairGen (with reweighting) fairer than its base? {' '.join(lines_)}",
             f"Is FairGen fairer than FairDiffusion, both with reweighting? {' '.join(lines_fd)}",
             "a - b for each pair of Table 1's cells (ViT, ratio 1.0): every method vs base, without and with "
             "downstream reweighting on both sides, FairGen + reweighting (the paper's FairGen) vs base without, and "
             "FairGen vs FairDiffusion (the paper's strongest baseline), each without and with reweighting. "
             "Accuracy and ESSP as fractions (Table 1 shows ESSP x100); AUROC gap: between the attribute groups, "
             "signed (first - second) for two groups, max - min for more (then see gaps.md for each gap against its "
             "permutation null; the paired bootstrap of a difference of max - min gaps resamples both alike). "
             "value a / b: the mean over replicates.",
             "Method: " + " | ".join(methods) + ". Units: test patients (rows without a patient id are their own "
             "unit). Replicates: downstream ViT seeds trained on the same real + synthetic images and tested on "
             "the same patients, so the CI covers test sampling and ViT training noise, not generator training "
             f"noise (one generator per method at {summary['scale']} scale). p two-sided, floored at 1 / (resamples "
             "+ 1); Holm over each modality's comparisons; MDE at 80% power, alpha 0.05: (1.96 + 0.84) SE.",
             "Read from preds_<modality>.csv(.gz) in this folder (diffusion.fairgen_study.comparisons_from_preds)."]
    write_table(out / "comparisons", ["modality"] + COMPARISON_HEADER[:2] + ["value a", "value b"] +
                COMPARISON_HEADER[2:], rows, title="Paired comparisons of the downstream ViT (FairGen Table 1's cells)",
                notes=notes)
    if gap_rows:
        write_table(out / "gaps", ["modality", "cell", "AUROC gap max - min", "null median", "excess", "p"],
                    gap_rows, title="Max - min AUROC gaps over more than two groups against their permutation null",
                    notes=[f"Method: {next(iter(next(iter(summary['gaps'].values())).values()))['method']} "
                           f"({args.n_boot_compare}); split seed 0, the AUROC the mean over the downstream seeds. "
                           "excess = gap - null median: a max - min gap is positive even between equal groups."])


def report(summary, out, runs, args):
    """Table 1, comparisons, FD / KID tables, figures, summary.json (split seed 0 in the tables and figures; every
    split seed in summary.json and in the comparisons)."""
    t1_rows, fd_rows, sub_rows, mem_rows = [], [], [], []
    summary["table1"], summary["fid"], summary["fid_var"], summary["kid"], summary["preds"] = {}, {}, {}, {}, {}
    D = args.preset["down_seeds"]
    for name, seeds in summary["modalities"].items():
        res = seeds["seed0"]
        summary["preds"][name] = preds_copy(seeds, out, name).name
        tag = name + (" (PHANTOM)" if res["data"] == "phantom" else "")
        t1 = res["downstream"]["table1"]
        summary["table1"][name] = {m: {k: t1[m][k] for k in ("essp_acc", "dp", "eo", "nar", "accuracy")} for m in t1}
        for m, e in t1.items():
            t1_rows.append([tag, m, fmt(e["essp_acc"]), fmt(e["dp"]), fmt(e["eo"]), fmt(e["nar"], 1, 3),
                            fmt(e["accuracy"]), fmt(e["auroc"], 1, 3) if "auroc" in e else "n/a",
                            " / ".join(f"{v:.3f}" for v in e["accuracy"]["seeds"])])
        fd = res["fd"]
        summary["fid"][name] = {m: fd[m]["fd"] for m in METHODS}
        summary["fid_var"][name] = {m: fd[m]["subgroup_variance"] for m in METHODS}
        summary["kid"][name] = {m: fd[m]["kid"] for m in METHODS}
        for m in METHODS:
            g = "; ".join(f"{k} {v['fd']:.2f}" for k, v in fd[m]["groups_equal_n"].items())
            fd_rows.append([tag, m, f"{fd[m]['fd']:.2f}", f"{fd[m]['n_real']} / {fd[m]['n_fake']}",
                            f"{g} (n={fd['n_equal']} each)", f"{fd[m]['subgroup_variance']:.3f}"])
            for k, v in fd[m]["kid"].items():
                sub_rows.append([tag, m, k, f"{fd[m]['groups_equal_n'][k]['fd']:.2f}",
                                 f"{v['mean']:.3g} ± {v['std']:.2g}", v["m"],
                                 f"{fd[m]['groups'][k]['n_real']} / {fd[m]['groups'][k]['n_fake']}"])
            mm = res["memorization"][m]
            mem_rows.append([tag, m, f"{100 * mm['fraction_copies']:.2f}%", f"{mm['pixel_nn_rmse']['median']:.3f}",
                             f"{mm['train_to_train_nn_rmse']['median']:.3f}",
                             f"{100 * mm['fraction_closer_than_train_p1']:.1f}%"])
        grid = [np.load(runs / f"{name}-seed0" / m / res["samples_file"]) for m in METHODS]
        blinded_set(name, res, grid, runs, out, args)
        for m, z in zip(METHODS, grid):
            pick = np.concatenate([np.nonzero(z["labels"] == c)[0][:6] for c in range(len(res["classes"]))])
            save_grid(z["images"][pick], out / f"samples_{name}_{m}.png", nrow=len(res["classes"]),
                      title=f"{tag}: {m} samples (rows: attribute|disease)", row_labels=res["classes"])
            src = runs / f"{name}-seed0" / m / "closest_pairs.png"
            if src.is_file():
                (out / f"memorization_{name}_{m}.png").write_bytes(src.read_bytes())
        fdir = runs / f"{name}-seed0" / "fairdiffusion"  # its sigma search: final sigma, batch loss gaps
        fb = json.loads((fdir / "metrics.json").read_text())["fair_bayes"]
        gaps, w = [t[-1] for t in fb["trajectory"]], args.preset["fair_window"]
        summary.setdefault("fair_bayes", {})[name] = {**{k: fb[k] for k in ("groups", "sigma_last_step", "sigma_next", "gp_updates")},
                                                      "mean_gap_first_window": float(np.mean(gaps[:w])),
                                                      "mean_gap_last_window": float(np.mean(gaps[-w:]))}
        (out / f"fair_bayes_{name}.png").write_bytes((fdir / "fair_bayes.png").read_bytes())
        radar({m: {g: t1[m].get(f"auroc[{g}]", {"value": np.nan})["value"] for g in res["attrs"]}
               for m in ["real only"] + METHODS}, out / f"radar_auc_{name}.png",
              f"Per-group AUROC, ViT, ratio 1.0, mean of {D} seeds ({tag})")
        sw = res["downstream"]["sweep"]
        lines({f"{k} ({m})": v for k, d in sw.items() for m, v in d.items()}, out / f"accuracy_vs_ratio_{name}.png",
              f"Test accuracy vs synthetic ratio, one seed ({tag})", "synthetic / real training images", "accuracy")
        bars({m: {"DP": (t1[m]["dp"]["value"] * 100, [c * 100 for c in t1[m]["dp"]["ci"]]),
                  "EO": (t1[m]["eo"]["value"] * 100, [c * 100 for c in t1[m]["eo"]["ci"]])} for m in t1},
             out / f"dp_eo_{name}.png", f"DP and EO x100, ViT, mean of {D} seeds ({tag})", "x100")
    t0 = time.time()
    comparison_table(summary, out, args)
    summary["seconds_comparisons"] = time.time() - t0
    notes = [f"Ours: from-scratch conditional DDPM ({summary['scale']} scale, preset {summary['preset']}), one patient-"
             f"level split, seed 0. Each value is the mean over {D} downstream ViT seeds (same training images, same "
             f"test patients; the accuracy of each in the last column); 95% CIs by percentile bootstrap over test "
             f"patients ({args.n_boot}) of that mean, the seeds held fixed: for differences between rows see "
             "comparisons.md (paired, seeds resampled too). DP, EO, ESSP (on accuracy) "
             f"x100, NAR as a fraction. Classifier: ViT ({summary['preset']['vit']}, {summary['preset']['down_epochs']} "
             "epochs) trained on real + synthetic images (ratio 1.0: as many synthetic as real), '+ reweighting' = "
             "adaptive inverse-performance reweighting. Preferences for DPO: judge = a "
             "classifier trained on real images (automatic), not physicians. Ratio sweep (one downstream seed): "
             + args.kinds + ".",
             "Modalities: " + "; ".join(f"{n}: classes {s['seed0']['classes']}, data {s['seed0']['data']}"
                                        + (f" - {' '.join(s['seed0']['notes'])}" if s['seed0']['notes'] else "")
                                        for n, s in summary["modalities"].items()),
             "Per-image predictions of every cell and seed: preds_<modality>.csv(.gz)."]
    notes.append(GAP_NOTE)
    n = len(summary.get("reused", []))
    notes.append(f"Wall time of this invocation: {summary['seconds'] / 60:.1f} min, then "
                 f"{summary['seconds_comparisons'] / 60:.1f} min for the comparisons" + (
        f", reusing {n} trained models and classifier fits from {runs}/ (their time is not in it)" if n else ""))
    write_table(out / "table1", ["modality", "method", "ESSP", "DP", "EO", "NAR", "accuracy", "AUROC",
                                 "accuracy by down seed"], t1_rows,
                title="Table 1 (ours): downstream fairness of each generator's synthetic data", notes=notes)
    pub = [[d, m, v["ESSP"], v["DP"], v["EO"], v["NAR"]] for (d, m), v in PUBLISHED.items()]
    write_table(out / "table1_published", ["data", "method", "ESSP", "DP", "EO", "NAR"], pub,
                title="FairGen's published Table 1 (ViT; Stable Diffusion based): for reference only, not comparable",
                notes=["Rows as the paper labels them: 'Base (ViT)' is the ViT on real images only (our 'real "
                       "only'), 'Stable Diffusion' the plain generator's synthetic data (our 'base'), "
                       "'FairDiffusion' (Luo et al. 2025) our 'fairdiffusion' (its Fair Bayesian Perturbation on our "
                       "DDPM; scikit-learn's Gaussian process where the original uses BoTorch). Other generator "
                       "(Stable Diffusion fine-tuned on the full data), other data (real Fitzpatrick17k "
                       "images), other classifier budget. docs/METHODS.md: FairGen's ESSP values are not reproducible "
                       "from its own definition; we did not tune toward them."])
    metric = summary['modalities'][next(iter(summary['modalities']))]['seed0']['fd']['metric']
    write_table(out / "fid", ["modality", "method", "FD", "n real / n synthetic", "per subgroup at equal n",
                              "subgroup variance (1/G, equal n)"],
                fd_rows, title="Feature distance of each method's samples to the real training images",
                notes=[f"{metric}: Frechet "
                       "distance on the penultimate features of a CNN trained on the real training images (disease "
                       "label), not Inception FID (no ImageNet weights offline). n < 2048: biased upwards; compare only "
                       "at equal n. Per subgroup: both sets subsampled to one n per modality (the smallest subgroup's "
                       "size, real or synthetic; compare.fd_equal_n), so that the inter-subgroup variance (1/G) "
                       "measures the subgroups, not their sizes (at unequal n it measured group size; those values "
                       "stay in summary.json). KID per subgroup: subgroup_fidelity.md."])
    write_table(out / "subgroup_fidelity", ["modality", "method", "group", "FD at equal n", "KID (mean ± std)",
                                            "n (= m)", "n real / n synthetic in group"], sub_rows,
                title="Per-subgroup fidelity at equal n: FD and KID on the same features",
                notes=[f"{metric} features. KID: unbiased MMD^2, kernel (x.y / d + 1)^3, mean ± std over 100 subsets "
                       "of m images from each set (fairness/compare.py kid; Binkowski et al. 2018); m = n = the "
                       "modality's smallest subgroup, the same for every method and group. FD at the same n "
                       "(compare.fd_equal_n, one subsample). A subset std shows the subsampling spread; where m is a "
                       "set's whole size that set is not resampled, so the std understates its sampling noise."])
    write_table(out / "memorization", ["modality", "method", "copies (RMSE < 0.02)", "median NN RMSE",
                                       "train-train median NN RMSE", "closer than train-train 1st pct."], mem_rows,
                title="Memorization audit: synthetic images against the DDPM's training images")
    write_json(out / "summary.json", summary)
    print((out / "table1.md").read_text())
    print((out / "comparisons.md").read_text())


if __name__ == "__main__":
    run(main, parse_args)
