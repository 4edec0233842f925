"""FairGen ("Preference-Aligned Diffusion for Demographically Equitable Medical Image Synthesis") with our own
from-scratch DDPM in place of Stable Diffusion, and its downstream fairness evaluation.

Per modality (common/modalities.py; class = attribute x disease), with one patient-level split (70/10/20):
  judge, fdnet   two classifiers on the real training images: the DPO judge (target: class) and, separately
                 seeded, the network behind FD-cnn8 (target: disease), so that the judge never grades itself
  pretrain       a plain conditional DDPM (the shared starting point, as FairGen starts from a pretrained SD)
  base / cbrs / sqrs / cbdm   fine-tuned from it for --finetune steps with the variant's sampler / loss
  fairgen        SQRS + class-balancing loss for (finetune - dpo) steps, then DPO for --dpo-steps with pairs
                 from the judge (judge: classifier, never physicians; FairGen-code DPO form)
  samples        per method, the same number per class (ratio 1.0 = as many synthetic as real training images)
  FD             FD-cnn8 of each method's samples to the real training images, per subgroup, with the
                 inter-subgroup variance (1/G); n beside every value
  memorization   each method's samples against the DDPM's training images (fairness/memorization.py)
  downstream     ViT on real + synthetic (ratio 1.0), with and without adaptive reweighting: accuracy, per-group
                 AUROC, DP, EO, ESSP, NAR on the real test patients with bootstrap CIs (Table 1); and accuracy vs
                 synthetic ratio {0, .25, .5, 1} for the four classifiers (ViT, ResNet-50, GB, KNN)

    python -m diffusion.fairgen_study                     # quick: 32 px, small models, one seed (CPU)
    python -m diffusion.fairgen_study --scale full --out results/fairgen-full   # GPU: 64 px, 3 seeds
    python -m diffusion.fairgen_study --smoke --out smoke/fairgen               # seconds
"""
import argparse
import hashlib
import json
import math
from pathlib import Path
import time

import numpy as np
import torch

from classify import train_classifier
from classify.downstream import KINDS, fit_predict
from common.cli import ArgumentParser, positive_int, run
from common.modalities import MODALITIES, export, load_modality, modality_name
from common.report import save_grid, write_table
from common.runs import default_runs, device_from, prepare_out_dir, seed_everything, stage, write_config, write_json
from common.splits import patient_split
from diffusion import sample_ddpm, train_ddpm, train_dpo
from diffusion.annotate import blinded_pairs, write_pair_set
from fairness.figures import bars, lines, radar
from fairness.metrics import bootstrap, fairness_summary

METHODS = ["base", "cbrs", "sqrs", "cbdm", "fairgen"]
VARIANT_FLAGS = {"base": [], "cbrs": ["--sampler", "cbrs"], "sqrs": ["--sampler", "sqrs"], "cbdm": ["--cb-loss"],
                 "sqrs_cb": ["--sampler", "sqrs", "--cb-loss"]}
RATIOS = [0.0, 0.25, 0.5, 1.0]
# FairGen Table 1 (ViT, Fitzpatrick17k), their Stable-Diffusion-based numbers: never mixed with ours
PUBLISHED = {("fitzpatrick17k", "Stable Diffusion (base)"): {"ESSP": 5.11, "DP": 18.22, "EO": 7.56, "NAR": 0.36},
             ("fitzpatrick17k", "FairGen"): {"ESSP": 15.47, "DP": 4.51, "EO": 2.70, "NAR": 0.21}}
PRESETS = {
    # quick: the three modalities in under 45 min on a 2-core CPU (README has the measured time): a small U-Net
    # (16-32-32 channels), few steps (700 pretraining steps and DDIM-15 took 51.5 min), a ViT with 8x8 patches and
    # no dropout (~12x cheaper than 4x4 patches with dropout at 32 px, about as accurate: bench/vit_sizes.py) and
    # no ResNet-50 in the ratio sweep (~10 min per modality from scratch on 2 cores; add it with --kinds): a chain
    # check more than a generator worth judging. full: a GPU.
    "quick": dict(size=32, width=16, mults="1,2,2", num_res=1, attn_res="8", pretrain=400, finetune=100, dpo=40,
                  batch=32, sample_steps=10, clf_epochs=10, down_epochs=16, seeds=1, pairs_per_class=8,
                  vit=dict(patch=8, dim=64, mlp=128, dropout=0.0), kinds="vit,gb,knn", blinded_per_condition=1),
    "full": dict(size=64, width=64, mults="1,2,2,2", num_res=2, attn_res="16", pretrain=20000, finetune=2000,
                 dpo=500, batch=64, sample_steps=50, clf_epochs=40, down_epochs=40, seeds=3, pairs_per_class=64,
                 vit=dict(patch=4, dim=128, mlp=256), kinds=",".join(KINDS), blinded_per_condition=4),
    "smoke": dict(size=16, width=8, mults="1,2", num_res=1, attn_res="8", pretrain=4, finetune=4, dpo=2, batch=8,
                  sample_steps=3, clf_epochs=1, down_epochs=1, seeds=1, pairs_per_class=2,
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
    p.add_argument("--n-boot", type=positive_int, default=500, help="bootstrap resamples (patients) for CIs")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", default="results/fairgen", help="tables, figures, summary.json")
    p.add_argument("--runs", default=None, help="run folders (default: runs/<--out>, e.g. runs/results/fairgen); reused when "
                   "present")
    p.add_argument("--force", action="store_true", help="replace an existing --out (run folders are reused)")
    args = p.parse_args(argv)
    args.preset = PRESETS["smoke" if args.smoke else args.scale]
    args.kinds = args.kinds or args.preset["kinds"]
    return args


REUSED = []  # what this invocation took from runs/ instead of computing (its wall time leaves those out)


def stopwatch():
    """lap() -> seconds since the previous lap() (the first: since stopwatch())."""
    last = [time.time()]

    def lap():
        now = time.time()
        dt, last[0] = now - last[0], now
        return dt
    return lap


def run_step(module, argv, folder):
    """Run a script's main in-process unless its folder already holds the same finished run (same argv)."""
    done = folder / "metrics.json"
    cfg = folder / "config.json"
    if done.is_file() and cfg.is_file() and json.loads(cfg.read_text()).get("study_argv") == argv:
        print(f"  reuse {folder}")
        REUSED.append(str(folder))
        return
    a = module.parse_args(argv + ["--force"])
    with stage():  # a finished stage's replaced run goes now; a failure later does not roll this stage back
        module.main(a)
    c = json.loads(cfg.read_text())
    c["study_argv"] = argv
    cfg.write_text(json.dumps(c, indent=2))


def to_x(u8):
    x = torch.from_numpy(u8).float() / 127.5 - 1
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


def modality(name, args, seed, runs, device):
    """Train, sample and evaluate every method on one modality; returns its part of summary.json."""
    P = args.preset
    seconds, lap = {}, stopwatch()
    root = args.skin_root if name == "skin" else None
    mod = load_modality(name, P["size"], root)
    K = len(mod.class_names)
    split = patient_split(mod.table, seed=seed, stratify="attr")
    r = runs / f"{name}-seed{seed}"
    base = ["--data", name, "--size", str(P["size"]), "--split-seed", str(seed), "--seed", str(seed)] + \
        (["--data-root", root] if root else [])
    hflip = ["--hflip"] if name == "skin" else []
    clf = ["--epochs", str(P["clf_epochs"]), "--arch", "cnn8"] + hflip
    run_step(train_classifier, base + clf + ["--target", "cls", "--out-dir", str(r / "judge")], r / "judge")
    fd_argv = ["--data", name, "--size", str(P["size"]), "--split-seed", str(seed), "--seed", str(seed + 1)] + \
        (["--data-root", root] if root else []) + clf + ["--target", "label", "--out-dir", str(r / "fdnet")]
    run_step(train_classifier, fd_argv, r / "fdnet")
    ddpm = base + ["--width", str(P["width"]), "--mults", P["mults"], "--num-res", str(P["num_res"]), "--attn-res",
                   P["attn_res"], "--batch-size", str(P["batch"]), "--sample-every", "0", "--save-every", "100000",
                   "--grid-steps", str(P["sample_steps"])] + hflip
    run_step(train_ddpm, ddpm + ["--steps", str(P["pretrain"]), "--lr", "5e-4", "--warmup", "100", "--ema", "0.995",
                                 "--out-dir", str(r / "pretrain")], r / "pretrain")
    ft = ["--init", str(r / "pretrain/ckpt.pt"), "--lr", "2e-4", "--warmup", "10", "--ema", "0.99"]
    for v in ["base", "cbrs", "sqrs", "cbdm", "sqrs_cb"]:
        steps = P["finetune"] - (P["dpo"] if v == "sqrs_cb" else 0)
        run_step(train_ddpm, ddpm + ft + VARIANT_FLAGS[v] + ["--steps", str(steps), "--out-dir", str(r / v)], r / v)
    run_step(train_dpo, base + hflip + ["--init", str(r / "sqrs_cb/ckpt.pt"), "--judge", str(r / "judge/ckpt.pt"),
                                        "--sampler", "sqrs", "--cb-loss", "--dpo", args.dpo, "--steps", str(P["dpo"]),
                                        "--batch-size", str(P["batch"]), "--pairs-per-class", str(P["pairs_per_class"]),
                                        "--pair-steps", str(P["sample_steps"]), "--grid-steps", str(P["sample_steps"]),
                                        "--out-dir", str(r / "fairgen")], r / "fairgen")
    seconds["generators"] = lap()  # this invocation's time per phase (reused steps take ~0)
    train = split == "train"
    n_train = int(train.sum())
    per_class = math.ceil(n_train / K)
    export(mod, r / "real_train.npz", train)
    synth = {}
    samples_file = f"samples_{per_class}pc_{P['sample_steps']}steps.npz"  # the name holds what makes them differ
    for m in METHODS:
        out = r / m / samples_file
        if not out.is_file() or out.stat().st_mtime < (r / m / "ckpt.pt").stat().st_mtime:  # none, or stale
            sample_ddpm.main(sample_ddpm.parse_args(["--ckpt", str(r / m / "ckpt.pt"), "--n-per-class",
                                                     str(per_class), "--steps", str(P["sample_steps"]), "--seed",
                                                     str(seed), "--out", str(out), "--device", str(device),
                                                     "--force"]))
        synth[m] = np.load(out)
    seconds["sampling"] = lap()
    res = {"data": mod.data, "classes": mod.class_names, "attrs": mod.attrs, "labels": mod.labels,
           "notes": mod.notes, "n_train": n_train, "n_test": int((split == "test").sum()),
           "synthetic_per_class": per_class, "samples_file": samples_file, "judge": f"classifier ({r / 'judge/ckpt.pt'})"}
    res["fd"] = fd_scores(r, synth, mod)
    res["memorization"] = memorization(r, synth, mod)
    seconds["fd_memorization"] = lap()
    res["downstream"] = downstream(mod, split, synth, args, seed, device, r / "downstream.json")
    total = sum(seconds.values()) + lap()  # the last lap: the whole downstream step
    res["seconds"] = {**seconds, **res["downstream"].pop("seconds"), "total": total}
    print(f"  {name}: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["seconds"].items()), flush=True)
    return res


def fd_scores(r, synth, mod):
    from classify.nets import load_feature_extractor
    from fairness.fid import extract, fid_from_features, subgroup_fids
    net, label = load_feature_extractor(r / "fdnet/ckpt.pt")
    real = np.load(r / "real_train.npz")
    f_real = extract(net, real["images"])
    out = {"metric": label}
    for m, z in synth.items():
        f = extract(net, z["images"])
        per, var = subgroup_fids(f_real, f, real["groups"], z["groups"])
        out[m] = {"fd": fid_from_features(f_real, f), "n_real": len(f_real), "n_fake": len(f),
                  "groups": {g: {"fd": v[0], "n_real": v[1], "n_fake": v[2]} for g, v in per.items()},
                  "subgroup_variance": var}
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


def downstream(mod, split, synth, args, seed, device, cache_path):
    """Table 1 (ViT, ratio 1.0, +/- reweighting) and the ratio sweep; metrics on the real test patients.
    Every finished fit is kept in cache_path (with what it depends on), so that a killed study resumes there."""
    L = len(mod.labels)
    y_all = mod.table["cls"].to_numpy() % L
    g_all = mod.table["attr"].to_numpy().astype(str)
    pid = mod.table["patient_id"].fillna(mod.table.index.to_series().astype(str)).to_numpy()
    x_all = to_x(mod.images)
    sel = {s: split == s for s in ("train", "val", "test")}
    real_tr = (x_all[sel["train"]], y_all[sel["train"]], g_all[sel["train"]])
    val = (x_all[sel["val"]], y_all[sel["val"]], g_all[sel["val"]])
    x_te, y_te, g_te, pid_te = x_all[sel["test"]], y_all[sel["test"]], g_all[sel["test"]], pid[sel["test"]]
    n_train = len(real_tr[1])
    key = {"preset": args.preset, "n_boot": args.n_boot, "seed": seed,
           "samples": {m: hashlib.sha1(z["images"].tobytes()).hexdigest()[:16] for m, z in synth.items()}}
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    fits = cache.get("fits", {}) if cache.get("key") == key else {}

    def cached(name, compute):
        if name not in fits:
            fits[name] = compute()
            write_json(cache_path, {"key": key, "fits": fits})
        else:
            REUSED.append(f"{cache_path}:{name}")
        return fits[name]

    def train_set(method, ratio):
        if method is None or ratio == 0:
            return real_tr
        z = synth[method]
        rng = np.random.default_rng([seed, METHODS.index(method), int(round(100 * ratio))])  # same draw on resume
        take = rng.permutation(len(z["labels"]))[:int(round(ratio * n_train))]
        ys = z["labels"][take] % L
        return (torch.cat([real_tr[0], to_x(z["images"][take])]), np.r_[real_tr[1], ys],
                np.r_[real_tr[2], z["groups"][take].astype(str)])

    def evaluate(probs):
        pred = probs.argmax(1)
        p_bin = probs[:, 1] if L == 2 else probs
        stat = lambda idx: fairness_summary(y_te[idx], pred[idx], g_te[idx], p_bin[idx])
        point = stat(np.arange(len(y_te)))
        ci = bootstrap(stat, len(y_te), clusters=pid_te, n_boot=args.n_boot, seed=seed)
        return {k: {"value": float(v), "ci": list(ci.get(k, (np.nan, np.nan)))} for k, v in point.items()}

    P = args.preset
    seconds, lap = {}, stopwatch()
    table1 = {}
    for method in [None] + METHODS:
        for rw in (False, True):
            name = (method or "real only") + (" + reweighting" if rw else "")
            table1[name] = cached(f"table1/{name}", lambda: evaluate(fit_predict(
                "vit", train_set(method, 1.0), val, x_te, L, rw, seed, device, P["down_epochs"],
                vit=P["vit"])))
            print(f"  table 1: {name}: accuracy {table1[name]['accuracy']['value']:.3f}", flush=True)
    seconds["table1"] = lap()
    sweep = {}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        sweep[kind] = {}
        # ratio 0 is one fit shared by the methods; for the ViT it and ratio 1 are Table 1's fits (no reweighting)
        real_acc = table1["real only"]["accuracy"]["value"] if kind == "vit" else None
        for method in [m.strip() for m in args.sweep_methods.split(",") if m.strip()]:
            sweep[kind][method] = {}
            for ratio in RATIOS:
                if ratio == 0 and real_acc is not None:
                    acc = real_acc
                elif kind == "vit" and ratio == 1.0:
                    acc = table1[method]["accuracy"]["value"]
                else:
                    acc = cached(f"sweep/{kind}/{method}/{ratio}", lambda: float(np.mean(fit_predict(
                        kind, train_set(method, ratio), val, x_te, L, False, seed, device,
                        P["down_epochs"], vit=P["vit"]).argmax(1) == y_te)))
                    real_acc = acc if ratio == 0 else real_acc
                sweep[kind][method][ratio] = acc
        seconds[f"sweep_{kind}"] = lap()
    return {"table1": table1, "sweep": sweep, "seconds": seconds}


def main(args):
    t0 = time.time()
    REUSED.clear()  # per invocation, also when main() is called twice in one process
    device = device_from(args.device)
    out = prepare_out_dir(args.out, args.force)
    runs = Path(args.runs or default_runs(args.out))  # each --out (and so each scale) has its own tree
    scale = "smoke" if args.smoke else args.scale
    write_config(out, args, data=args.modalities, weights="none (from scratch)", preset=args.preset,
                 judge="classifier (automatic; no physician preferences)")
    summary = {"scale": scale, "judge": "classifier (automatic, trained on real images; not physicians)",
               "preset": args.preset, "dpo": args.dpo, "modalities": {}}
    for name in [m.strip() for m in args.modalities.split(",") if m.strip()]:
        for seed in range(args.preset["seeds"]):
            print(f"== {name}, seed {seed} ({(time.time() - t0) / 60:.1f} min)", flush=True)
            seed_everything(seed)
            summary["modalities"].setdefault(name, {})[f"seed{seed}"] = modality(name, args, seed, runs, device)
    summary["seconds"] = time.time() - t0  # this invocation only: steps listed under "reused" were not recomputed
    summary["reused"] = list(REUSED)
    report(summary, out, runs, args)


def fmt(entry, scale=100.0, digits=2):
    """'value [lo, hi]', with a dagger where the value lies outside its percentile CI (see GAP_NOTE)."""
    v, (lo, hi) = entry["value"], entry["ci"]
    mark = "†" if not lo <= v <= hi else ""
    return f"{v * scale:.{digits}f}{mark} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


GAP_NOTE = ("† the value lies outside its bootstrap CI. DP, EO and NAR are max - min gaps between groups, and "
            "resampling inflates a gap (two groups that happen to score alike in the test set rarely do in a "
            "resample), so near zero their percentile CI can sit above the value: read it as the range the gap "
            "takes under test-set noise, not as a confidence interval for it.")


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


def report(summary, out, runs, args):
    """Table 1, FD table, figures, summary.json (seed 0 in the tables; every seed in summary.json)."""
    t1_rows, fd_rows, mem_rows = [], [], []
    summary["table1"], summary["fid"], summary["fid_var"] = {}, {}, {}
    for name, seeds in summary["modalities"].items():
        res = seeds["seed0"]
        tag = name + (" (PHANTOM)" if res["data"] == "phantom" else "")
        t1 = res["downstream"]["table1"]
        summary["table1"][name] = {m: {k: t1[m][k] for k in ("essp_acc", "dp", "eo", "nar", "accuracy")} for m in t1}
        for m, e in t1.items():
            t1_rows.append([tag, m, fmt(e["essp_acc"]), fmt(e["dp"]), fmt(e["eo"]), fmt(e["nar"], 1, 3),
                            fmt(e["accuracy"]), fmt(e["auroc"], 1, 3) if "auroc" in e else "n/a"])
        fd = res["fd"]
        summary["fid"][name] = {m: fd[m]["fd"] for m in METHODS}
        summary["fid_var"][name] = {m: fd[m]["subgroup_variance"] for m in METHODS}
        for m in METHODS:
            g = "; ".join(f"{k} {v['fd']:.2f} (n={v['n_fake']})" for k, v in fd[m]["groups"].items())
            fd_rows.append([tag, m, f"{fd[m]['fd']:.2f}", f"{fd[m]['n_real']} / {fd[m]['n_fake']}", g,
                            f"{fd[m]['subgroup_variance']:.3f}"])
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
        radar({m: {g: t1[m].get(f"auroc[{g}]", {"value": np.nan})["value"] for g in res["attrs"]}
               for m in ["real only"] + METHODS}, out / f"radar_auc_{name}.png",
              f"Per-group AUROC, ViT, ratio 1.0 ({tag})")
        sw = res["downstream"]["sweep"]
        lines({f"{k} ({m})": v for k, d in sw.items() for m, v in d.items()}, out / f"accuracy_vs_ratio_{name}.png",
              f"Test accuracy vs synthetic ratio ({tag})", "synthetic / real training images", "accuracy")
        bars({m: {"DP": (t1[m]["dp"]["value"] * 100, [c * 100 for c in t1[m]["dp"]["ci"]]),
                  "EO": (t1[m]["eo"]["value"] * 100, [c * 100 for c in t1[m]["eo"]["ci"]])} for m in t1},
             out / f"dp_eo_{name}.png", f"DP and EO x100, ViT ({tag})", "x100")
    notes = [f"Ours: from-scratch conditional DDPM ({summary['scale']} scale, preset {summary['preset']}), one patient-"
             f"level split, seed 0; 95% CIs by bootstrap over test patients ({args.n_boot}). DP, EO, ESSP (on accuracy) "
             f"x100, NAR as a fraction. Classifier: ViT ({summary['preset']['vit']}, {summary['preset']['down_epochs']} "
             "epochs) trained on real + synthetic images (ratio 1.0: as many synthetic as real), '+ reweighting' = "
             "adaptive inverse-performance reweighting. Preferences for DPO: judge = a "
             "classifier trained on real images (automatic), not physicians. Ratio sweep: " + args.kinds + ".",
             "Modalities: " + "; ".join(f"{n}: classes {s['seed0']['classes']}, data {s['seed0']['data']}"
                                        + (f" - {' '.join(s['seed0']['notes'])}" if s['seed0']['notes'] else "")
                                        for n, s in summary["modalities"].items())]
    if any("†" in cell for row in t1_rows for cell in row):
        notes.append(GAP_NOTE)
    n = len(summary.get("reused", []))
    notes.append(f"Wall time of this invocation: {summary['seconds'] / 60:.1f} min" + (
        f", reusing {n} trained models and classifier fits from {runs}/ (their time is not in it)" if n else ""))
    write_table(out / "table1", ["modality", "method", "ESSP", "DP", "EO", "NAR", "accuracy", "AUROC"], t1_rows,
                title="Table 1 (ours): downstream fairness of each generator's synthetic data", notes=notes)
    pub = [[d, m, v["ESSP"], v["DP"], v["EO"], v["NAR"]] for (d, m), v in PUBLISHED.items()]
    write_table(out / "table1_published", ["data", "method", "ESSP", "DP", "EO", "NAR"], pub,
                title="FairGen's published Table 1 (ViT; Stable Diffusion based): for reference only, not comparable",
                notes=["Other generator (Stable Diffusion fine-tuned on the full data), other data (real Fitzpatrick17k "
                       "images), other classifier budget. FORMULAS.md: FairGen's ESSP values are not reproducible "
                       "from its own definition; we did not tune toward them."])
    write_table(out / "fid", ["modality", "method", "FD", "n real / n synthetic", "per subgroup", "subgroup variance (1/G)"],
                fd_rows, title="Feature distance of each method's samples to the real training images",
                notes=[f"{summary['modalities'][next(iter(summary['modalities']))]['seed0']['fd']['metric']}: Frechet "
                       "distance on the penultimate features of a CNN trained on the real training images (disease "
                       "label), not Inception FID (no ImageNet weights offline). n < 2048: biased upwards; compare only "
                       "at equal n."])
    write_table(out / "memorization", ["modality", "method", "copies (RMSE < 0.02)", "median NN RMSE",
                                       "train-train median NN RMSE", "closer than train-train 1st pct."], mem_rows,
                title="Memorization audit: synthetic images against the DDPM's training images")
    write_json(out / "summary.json", summary)
    print((out / "table1.md").read_text())


if __name__ == "__main__":
    run(main, parse_args)
