"""Is a VAE fair across skin types? The protocol of Lopez-Perez, Hauberg & Feragen (FORMULAS.md):

Skin types: light = Fitzpatrick 1-2, dark = 5-6 (3-4 and unknown dropped). Per repeat: two test sets (light and
dark, --n-test each, disjoint), then three training sets of --n-train images drawn with replacement from the rest:
A 100% light, B 50/50, C 100% dark. A residual perceptual VAE (vae/train_resvae.py) is trained on each and every
test image gets its reconstruction MSE and mean latent std. Reported: medians with bootstrap 95% CIs, a
Mann-Whitney U test of light vs dark within each training set, the Spearman correlation of latent std with MSE per
group (is the std a warning sign?), the MSE per diagnosis (paper Fig. 8), and the figures.

Data: Fitzpatrick17k under --data-root (`python -m common.download fitzpatrick17k --root DIR`); without it, the
procedural skin phantom (common/phantom.py), and every title says PHANTOM.

    python -m vae.skintone_study                                # quick: phantom, 32 px, 3 repeats (CPU)
    python -m vae.skintone_study --scale full --data-root /data/fitzpatrick17k --out results/skintone-full   # GPU
    python -m vae.skintone_study --smoke --out smoke/skintone   # seconds
"""
import argparse
import sys
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu, spearmanr

from common.cli import ArgumentParser, positive_int, run
from common.cache import load_images
from common.data import DataError, read_fitzpatrick
from common.report import save_grid, write_table
from common.runs import device_from, prepare_out_dir, seed_everything, write_config, write_json
from fairness.figures import boxplots
from vae.train_resvae import VGGPerceptual, add_args, fit, measure

SETS = {"A": "100% light", "B": "50/50", "C": "100% dark"}
SCALES = {  # quick: chosen so that the study runs in < 30 min on 2 CPU cores (README); full: the paper's
    "quick": {"size": 32, "n_test": 100, "n_train": 200, "epochs": 15, "repeats": 3},
    "full": {"size": 64, "n_test": 500, "n_train": 1668, "epochs": 15, "repeats": 10},
    "smoke": {"size": 16, "n_test": 8, "n_train": 24, "epochs": 1, "repeats": 1},
}
PHANTOM_N = 4000


def load_skin(data_root, size):
    """(table of light/dark images with a `group` column, images (N, 3, S, S) in [-1, 1], data tag)."""
    if data_root:
        t, data = read_fitzpatrick(data_root, level="nine"), "fitzpatrick17k"
    else:
        from common.modalities import PHANTOM_DIR
        from common.phantom import make_phantom
        folder = PHANTOM_DIR / f"n{PHANTOM_N}"
        if not (folder / "fitzpatrick17k.csv").is_file():
            make_phantom(folder, n=PHANTOM_N, size=64, seed=0)
        t, data = read_fitzpatrick(folder, level="nine"), "phantom"
    t = t[t["skin_group"].isin(["light", "dark"])].reset_index(drop=True)
    t["group"] = t["skin_group"]
    x, ok = load_images(t["image"], size, "RGB")
    t, x = t[ok].reset_index(drop=True), x[ok]
    return t, torch.from_numpy(x).float().permute(0, 3, 1, 2) / 127.5 - 1, data


def draw_train_set(t, pool, which, n, rng):
    """Indices of a training set (A / B / C) of n images drawn with replacement from `pool`."""
    light, dark = pool[t["group"].to_numpy()[pool] == "light"], pool[t["group"].to_numpy()[pool] == "dark"]
    for name, members, sets in (("light (FST 1-2)", light, "AB"), ("dark (FST 5-6)", dark, "BC")):
        if which in sets and len(members) == 0:
            raise DataError(f"training set {which} needs {name} images and the data have none (check the "
                            f"fitzpatrick_scale column of your --data-root, or choose another set)")
    if which == "A":
        return rng.choice(light, n, replace=True)
    if which == "C":
        return rng.choice(dark, n, replace=True)
    return np.r_[rng.choice(light, n // 2, replace=True), rng.choice(dark, n - n // 2, replace=True)]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="Fitzpatrick17k folder; default: the skin phantom")
    p.add_argument("--scale", default="quick", choices=["quick", "full"], help="sizes below (flags override)")
    p.add_argument("--smoke", action="store_true", help="tiny run to test the chain")
    p.add_argument("--n-test", type=positive_int, default=None, help="test images per group (quick 100, full 500)")
    p.add_argument("--n-train", type=positive_int, default=None, help="training images per set (quick 200, full 1668)")
    p.add_argument("--repeats", type=positive_int, default=None, help="repeats (quick 3, full 10)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the median CIs")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--out", default="results/skintone", help="figures, tables, summary.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_args(p)
    args = p.parse_args(argv)
    preset = SCALES["smoke" if args.smoke else args.scale]
    for k in ("n_test", "n_train", "repeats"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    given = sys.argv[1:] if argv is None else argv
    if "--size" not in given:
        args.size = preset["size"]
    if "--epochs" not in given:
        args.epochs = preset["epochs"]
    if args.smoke:
        args.width, args.latent_res, args.n_boot = 8, 4, 50
    return args


def median_ci(v, n_boot, rng):
    v = np.asarray(v)
    meds = np.median(v[rng.integers(0, len(v), (n_boot, len(v)))], axis=1)
    return float(np.median(v)), [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]


def main(args):
    t0 = time.time()
    device = device_from(args.device)
    out = prepare_out_dir(args.out, args.force)
    seed_everything(args.seed)
    t, x, data = load_skin(args.data_root, args.size)
    groups = t["group"].to_numpy()
    vgg = VGGPerceptual(args.pretrained, args.vgg_weights).to(device)
    tag = ("PHANTOM data" if data == "phantom" else data) + ("" if args.pretrained or args.vgg_weights
                                                              else ", random VGG19 (no ImageNet weights)") + \
        ("" if args.perceptual_weight else ", perceptual term off")
    scale = "smoke" if args.smoke else args.scale
    write_config(out, args, data=data, weights=f"VGG19: {vgg.source}", sizes={k: getattr(args, k) for k in (
        "size", "n_test", "n_train", "epochs", "repeats")})
    rows, grids = [], {}
    for r in range(args.repeats):
        rng = np.random.default_rng(args.seed + r)
        test = {g: rng.choice(np.nonzero(groups == g)[0], args.n_test, replace=False) for g in ("light", "dark")}
        pool = np.setdiff1d(np.arange(len(t)), np.r_[test["light"], test["dark"]])
        for s in SETS:
            print(f"repeat {r + 1}/{args.repeats}, training set {s} ({time.time() - t0:.0f} s)", flush=True)
            train = draw_train_set(t, pool, s, args.n_train, rng)
            run_args = argparse.Namespace(**{**vars(args), "seed": args.seed * 1000 + r * 10 + ord(s)})
            model, hist = fit(x[train], run_args, vgg, device, progress=False)
            for g, idx in test.items():
                mse, std, rec = measure(model, x[idx], device)
                rows += [{"repeat": r, "train_set": s, "test_group": g, "mse": m, "latent_std": sd,
                          "diagnosis": t["diagnosis_nine"].iloc[i], "skin_type": int(t["skin_type"].iloc[i])}
                         for m, sd, i in zip(mse, std, idx)]
                if r == 0:
                    grids[(s, g)] = (x[idx[:8]], rec[:8])
    df = pd.DataFrame(rows)
    df.to_csv(out / "per_image.csv", index=False)
    report(df, grids, args, out, data, tag, vgg, scale, time.time() - t0)


def report(df, grids, args, out, data, tag, vgg, scale, seconds):
    rng = np.random.default_rng(args.seed)
    summary = {"mse_median": {}, "mse_median_ci": {}, "latent_std_median": {}, "latent_std_median_ci": {},
               "p_value": {}, "spearman_std_mse": {}, "repeats": args.repeats, "data": data,
               "pretrained": vgg.source.startswith("imagenet"), "vgg": vgg.source, "scale": scale,
               "sizes": {k: getattr(args, k) for k in ("size", "n_test", "n_train", "epochs")}, "seconds": seconds}
    table, corr_rows = [], []
    for s in SETS:
        d = df[df["train_set"] == s]
        for key, col in (("mse", "mse"), ("latent_std", "latent_std")):
            summary[f"{key}_median"][s], summary[f"{key}_median_ci"][s] = {}, {}
            for g in ("light", "dark"):
                med, ci = median_ci(d.loc[d["test_group"] == g, col], args.n_boot, rng)
                summary[f"{key}_median"][s][g], summary[f"{key}_median_ci"][s][g] = med, ci
        light, dark = d.loc[d["test_group"] == "light", "mse"], d.loc[d["test_group"] == "dark", "mse"]
        summary["p_value"][s] = float(mannwhitneyu(light, dark, alternative="two-sided").pvalue)
        summary["spearman_std_mse"][s] = {}
        for g in ("light", "dark"):
            dd = d[d["test_group"] == g]
            rho, p = spearmanr(dd["latent_std"], dd["mse"])
            summary["spearman_std_mse"][s][g] = {"rho": float(rho), "p": float(p)}
            corr_rows.append([f"{s} ({SETS[s]})", g, f"{rho:.3f}", f"{p:.2g}", len(dd)])
        m, c = summary["mse_median"][s], summary["mse_median_ci"][s]
        sm, sc = summary["latent_std_median"][s], summary["latent_std_median_ci"][s]
        table.append([f"{s} ({SETS[s]})", *[f"{m[g]:.4f} [{c[g][0]:.4f}, {c[g][1]:.4f}]" for g in ("light", "dark")],
                      f"{summary['p_value'][s]:.2g}", *[f"{sm[g]:.4f} [{sc[g][0]:.4f}, {sc[g][1]:.4f}]"
                                                        for g in ("light", "dark")]])
    n = f"n = {args.n_test} test images per group x {args.repeats} repeats"
    write_table(out / "medians", ["training set", "MSE light", "MSE dark", "Mann-Whitney p (light vs dark)",
                                  "latent std light", "latent std dark"], table,
                title=f"Reconstruction MSE and latent std, medians [95% bootstrap CI] ({tag})",
                notes=[f"{n}; MSE of decode(mu(x)) on the [0, 1] scale. Paper (Fitzpatrick17k): MSE below 0.07 for "
                       f"all, light < dark in every training set including 50/50. Sizes: {summary['sizes']} "
                       f"(quick scale chosen for a 2-core CPU; full: 64 px, 500 / 1,668, 15 epochs, 10 repeats). "
                       f"VGG19: {vgg.source}. Wall time {seconds / 60:.1f} min."])
    write_table(out / "std_vs_mse", ["training set", "test group", "Spearman rho (latent std, MSE)", "p", "n"],
                corr_rows, title=f"Does the latent std track the reconstruction error? ({tag})",
                notes=["The paper's claim: the latent std is no warning sign of the larger error on dark skin."])
    by = {f"{s}": {g: df.loc[(df.train_set == s) & (df.test_group == g), "mse"] for g in ("light", "dark")}
          for s in SETS}
    boxplots(by, out / "fig3_mse.png", f"Fig. 3: reconstruction MSE by training set and test group ({tag})", "MSE",
             {"light": "#e8c39e", "dark": "#6b4226"})
    by_std = {s: {g: df.loc[(df.train_set == s) & (df.test_group == g), "latent_std"] for g in ("light", "dark")}
              for s in SETS}
    boxplots(by_std, out / "fig6_latent_std.png", f"Fig. 6: mean latent std ({tag})", "latent std",
             {"light": "#e8c39e", "dark": "#6b4226"})
    for g, fig in (("light", "fig4_recon_light.png"), ("dark", "fig5_recon_dark.png")):
        if ("A", g) in grids:
            orig = grids[("A", g)][0]
            rows = torch.cat([orig] + [grids[(s, g)][1] for s in SETS])
            save_grid(rows, out / fig, nrow=4, title=f"{g} test images (row 1) and reconstructions after A, B, C "
                                                     f"({tag})", row_labels=["original", "A", "B", "C"])
    diag = df.groupby(["diagnosis", "train_set", "test_group"])["mse"].median().unstack(["train_set", "test_group"])
    diag.to_csv(out / "fig8_mse_by_diagnosis.csv")
    boxplots({d[:14]: {f"{s}-{g}": df.loc[(df.diagnosis == d) & (df.train_set == s) & (df.test_group == g), "mse"]
                       for s in ("A", "C") for g in ("light", "dark")} for d in sorted(df["diagnosis"].unique())},
             out / "fig8_mse_by_diagnosis.png", f"Fig. 8: MSE by diagnosis, training sets A and C ({tag})", "MSE")
    write_json(out / "summary.json", summary)
    print((out / "medians.md").read_text())
    return summary


if __name__ == "__main__":
    run(main, parse_args)
