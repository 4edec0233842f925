"""Does CPU bf16 autocast train a study's network as fp32 does? bf16 is used by default (`--amp auto`) only for a
network whose check below agrees.

    python bench/bf16_agreement.py --seeds 5 --out results/bench/bf16                        # the classifier, ~10 min
    python bench/bf16_agreement.py --loop cvae --seeds 5 --out results/bench/bf16_cvae       # the CVAE, ~15 min
    python bench/bf16_agreement.py --loop cvae --seeds 30 --first-seed 100 --out results/bench/bf16_cvae30  # ~86 min
    python bench/bf16_agreement.py --loop resvae --seeds 10 --out results/bench/bf16_resvae  # the ResVAE, ~17 min
    python bench/bf16_agreement.py --loop convae --seeds 10 --out results/bench/bf16_convae  # the conv AE
    python bench/bf16_agreement.py --loop mlpcgan --seeds 30 --jobs 2 --out results/bench/bf16_mlpcgan  # the cGAN
    python bench/bf16_agreement.py --loop mlpae --seeds 20 --jobs 2 --out results/bench/bf16_mlpae     # MLP AE
    python bench/bf16_agreement.py --loop mlpcvae --seeds 20 --jobs 2 --out results/bench/bf16_mlpcvae # MLP cVAE
    python bench/bf16_agreement.py --loop dcgan --seeds 30 --jobs 2 --out results/bench/bf16_dcgan     # the DCGAN

--loop chexnet: classify.train_chexnet at the quick chest X-ray study's settings (cnn8, width 16, 64 px, batch 32,
16 epochs, cosine, last epoch's weights; its own 70/10/20 patient split of NIH1000). --loop cvae: vae.train_cvae at
the quick study's settings (40 epochs at most, patience 10, batch 64; the women of its own 70/10/20 split).
--loop resvae: vae.train_resvae at the quick skintone study's settings (32 px, 15 epochs, batch 64, random VGG19 of
seed 0) on training set A (200 light images drawn with replacement) of a skin phantom made here with seed 1 (the
study's is seed 0, so no image of the check is one of the study's), and 100 light + 100 dark held-out images of
that phantom as validation images, drawn as the study draws a repeat's test sets. Each
seed trains twice, --amp off and --amp bf16: the same initial weights and batches, so a pair differs only by the
arithmetic. The rules, fixed before each run, on training and validation numbers only (test numbers, where a
loop has them, are shown, not used):
- chexnet (the rule of its committed check): the mean over seeds of the paired difference (bf16 - fp32) of the final
  training loss and of the last epoch's validation any-finding AUROC lies within one standard deviation of fp32
  across seeds (the run-to-run spread).
- cvae (stricter, an equivalence test): for the final training loss and the best validation loss (the early-stopping
  criterion), the 95% t-interval of the mean paired difference lies within +-margin, margin = fp32's standard
  deviation across seeds: bf16 is accepted only if the seeds exclude a difference as large as what a new seed
  changes. The same interval is printed for chexnet.
- resvae (the equivalence test of cvae): the final training loss, and on the validation images the study's own
  outcomes: the median reconstruction MSE of the light and of the dark images and their gap (dark - light).
- convae (the equivalence test of cvae): the final training MSE and the best validation MSE (the early-stopping
  criterion, computed in fp32 in both arms), compare's conv AE at its quick settings (10 epochs at most, patience 5,
  batch 64) on the 70/10/20 patient split of NIH1000 (all of its training images, both sexes).
- mlpcgan (cvae's equivalence rule): gan.train_mlp_cgan at the quick MedMNIST study's settings (1000 epochs, batch 128,
  150 images per class of the official training split drawn by the seed as the study draws them, 135 of them trained on,
  150 samples per class) on PneumoniaMNIST (the embedded set with the larger validation split, 524 images). A GAN has no
  validation loss, so two measures: the discriminator's training loss, averaged over the last 100 epochs (each epoch's
  last batch, 14 images), and the Frechet distance between the generator's samples and the official validation images,
  per class in the top 32 principal components of the official training split (all of it, the same basis for every run),
  averaged over the classes. The generator's loss is shown, not used. 3,000 steps of GAN training are chaotic: if a
  pair's two runs end as far apart as two seeds, the paired differences' sd is ~1.4 fp32's and the rule needs about 30
  seeds to pass when bf16 changes nothing (as the CVAE's did), so "does not agree" at fewer seeds may mean "too few
  seeds": summary.json's diff_sd / fp32_sd says which.
- mlpae, mlpcvae (cvae's equivalence rule): vae.train_mlp_ae and vae.train_mlp_cvae at the MedMNIST study's quick
  settings (300 epochs, batch 128, the cGAN's data and its 150 samples per class): the training loss averaged over the
  last 10 epochs (each epoch's last batch) and the cGAN's validation Frechet distance of the samples.
- dcgan (cvae's equivalence rule): gan.train_dcgan at compare's quick settings (64 px, width 16, 400 steps, batch 64)
  on the training part of NIH1000's 70/10/20 patient split (both sexes): the discriminator's loss averaged over the last
  100 steps, and the Frechet distance between 4 samples per validation image (of its class, noise seed 0) and the
  split's validation images, in the top 32 principal components of the training images' pixels (the same basis for
  every run). The generator's loss is shown, not used.
--jobs N (N > 1) trains N seeds at a time, each run on one torch thread, as a quick study runs its stages side by
side (this process's own measuring then uses one torch thread too): each arm's seconds then include a similar
side-by-side load, not the same one (the arms' runs drift out of step), and compare with other --jobs 1 seconds only as
a ratio within the check. A run's seconds are its training process's (start, data, training, its own outputs), not
this script's measuring. Writes summary.json (every run's history to 6 significant digits, the rule's numbers, the
verdict, the seconds of each arm, jobs and the runs' torch threads), curves.png (both arms' curves, per seed) and prints
a table.
"""
import argparse
from concurrent.futures import as_completed, ThreadPoolExecutor
import functools
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import numpy as np
from scipy import stats
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.runs import git_commit  # noqa: E402
from common.stages import config_threads  # noqa: E402

MEDMNIST_NPZ = "data/medmnist/pneumoniamnist.npz"
QUICK = ["--arch", "cnn8", "--width", "16", "--size", "64", "--batch-size", "32", "--epochs", "16", "--schedule",
         "cosine", "--patience", "0", "--keep", "last", "--device", "cpu"]


def phantom_sets(runs, seed=1, n=1000):
    """The resvae check's data: a skin phantom of its own (seed 1; the study's is seed 0) and a split file with
    training set A and held-out light and dark validation images, drawn as the skintone study draws a repeat's
    sets. Returns the stage flags that name them."""
    from common.phantom import make_phantom
    from common.splits import write_sets
    from vae.skin import load_skin
    from vae.skintone_study import repeat_sets
    folder = Path(runs) / f"phantom_seed{seed}"
    if not (folder / "fitzpatrick17k.csv").is_file():
        make_phantom(folder, n=n, size=64, seed=seed)
    t, _, _ = load_skin(folder, 32)
    sets = repeat_sets(t, 0, seed, n_test=100, n_train=200)
    write_sets(Path(runs) / "sets.csv", {k: sets[k] for k in ("A", "light", "dark")})
    return ["--data-root", str(folder), "--sets", str(Path(runs) / "sets.csv"), "--train-set", "A",
            "--test-sets", "light,dark"]


PCA_DIMS = 32


@functools.lru_cache(maxsize=4)
def medmnist_reference(npz, dims):
    """What every run of the mlpcgan check is measured against, read once: (mean, basis (pixels, dims)) of an
    official MedMNIST file's training split and {class: its validation images in that basis}, pixels in [0, 1]."""
    from common.data import medmnist_arrays
    images, labels, split, _, _ = medmnist_arrays(ROOT / npz)
    x = images.reshape(len(images), -1) / 255.0
    mean = x[split == "train"].mean(0)
    basis = np.linalg.svd(x[split == "train"] - mean, full_matrices=False)[2][:dims].T
    val = split == "val"
    return mean, basis, {int(c): (x[val & (labels == c)] - mean) @ basis for c in np.unique(labels[val])}


def medmnist_fd(npz, out, dims=PCA_DIMS):
    """The mlpcgan check's validation measure: per class, the Frechet distance between a run's samples.npz and the
    official validation images of that class, in the top `dims` principal components of the official training
    split (pixels in [0, 1]); the mean over classes, and each class's."""
    from fairness.fid import fid_from_features
    with np.load(out / "samples.npz") as z:
        gen, gen_y = z["images"].reshape(len(z["images"]), -1) / 255.0, z["labels"].ravel()
    mean, basis, val = medmnist_reference(npz, dims)
    per_class = {c: fid_from_features((gen[gen_y == c] - mean) @ basis, v) for c, v in val.items()}
    return {"val_fd": float(np.mean(list(per_class.values()))), "val_fd_per_class": per_class}


@functools.lru_cache(maxsize=2)
def nih_reference(size, dims):
    """What every run of the dcgan check is measured against, read once: (mean, basis (pixels, dims)) of the
    training images of NIH1000's 70/10/20 patient split (split seed 0), and its validation images in that basis
    and their classes; pixels in [-1, 1], as the DCGAN draws them."""
    from common.modalities import training_images
    _, train_x, _ = training_images("nih", size, None, "train")
    _, val_x, val_cls = training_images("nih", size, None, "val")
    x = train_x.reshape(len(train_x), -1) / 127.5 - 1
    mean = x.mean(0)
    basis = np.linalg.svd(x - mean, full_matrices=False)[2][:dims].T
    return mean, basis, (val_x.reshape(len(val_x), -1) / 127.5 - 1 - mean) @ basis, val_cls


def dcgan_fd(out, per_image=4, dims=PCA_DIMS):
    """The dcgan check's numbers beyond metrics.json: the training history (from ckpt.pt) and the validation Frechet
    distance of `per_image` samples per validation image, of its class (noise seed 0, the same in both arms)."""
    from fairness.fid import fid_from_features
    from gan.sample_dcgan import load_generator
    from gan.train_dcgan import generate
    G, ck = load_generator(out / "ckpt.pt")
    mean, basis, val, val_cls = nih_reference(64, dims)
    fake = generate(G, np.repeat(val_cls, per_image), seed=0).flatten(1).double().numpy()
    return {"history": ck["history"], "val_fd": float(fid_from_features((fake - mean) @ basis, val))}


def validation_medians(out):
    """{group: median reconstruction MSE} of a resvae run's held-out images (its preds.csv)."""
    import pandas as pd
    return pd.read_csv(out / "preds.csv").groupby("test_group")["mse"].median().to_dict()


# per loop: the module, its quick settings, the measures (name, how to read it from a run, used by the rule) and the
# curves drawn (history key or None for a history of numbers, axis label); optional: prepare(runs) -> the data flags
# of every run, read(out) -> more of a run's numbers than its metrics.json, x: the curves' axis (default epoch)
LOOPS = {
    "chexnet": {"module": "classify.train_chexnet", "settings": QUICK, "rule": "within_sd",
                "measures": [("loss", lambda r: r["history"][-1]["loss"], True),
                             ("val_auroc", lambda r: r["history"][-1]["val_any_auroc"], True),
                             ("test_auroc", lambda r: r["test_any_auroc"], False)],
                "curves": [("loss", "training loss (weighted BCE)"), ("val_any_auroc", "validation any-finding AUROC")],
                "title": "cnn8 on NIH1000 (quick settings)"},
    "cvae": {"module": "vae.train_cvae", "settings": ["--epochs", "40", "--patience", "10", "--batch-size", "64",
                                                      "--device", "cpu"], "rule": "equivalence",
             "measures": [("loss", lambda r: r["history"][-1]["loss"], True),
                          ("best_val_loss", lambda r: min(h["val_loss"] for h in r["history"]), True)],
             "curves": [("loss", "training loss (MSE + beta KL)"), ("val_loss", "validation loss")],
             "title": "chest X-ray CVAE on NIH1000's women (quick settings)", "log": True},
    "convae": {"module": "vae.train_conv_ae", "settings": ["--epochs", "10", "--batch-size", "64", "--device", "cpu"],
               "rule": "equivalence",
               "measures": [("loss", lambda r: r["history"][-1]["loss"], True),
                            ("best_val_mse", lambda r: min(h["val_mse"] for h in r["history"]), True)],
               "curves": [("loss", "training MSE"), ("val_mse", "validation MSE")],
               "title": "compare's conv AE on NIH1000 (quick settings)", "log": True},
    "resvae": {"module": "vae.train_resvae", "settings": ["--size", "32", "--width", "32", "--latent-channels", "64",
                                                          "--latent-res", "8", "--epochs", "15", "--batch-size", "64",
                                                          "--lr", "0.0001", "--perceptual-weight", "1.0",
                                                          "--no-pretrained", "--vgg-seed", "0", "--device", "cpu"],
               "rule": "equivalence", "prepare": phantom_sets, "read": lambda out: {"val": validation_medians(out)},
               "measures": [("loss", lambda r: r["history"][-1]["loss"], True),
                            ("val_median_mse_light", lambda r: r["val"]["light"], True),
                            ("val_median_mse_dark", lambda r: r["val"]["dark"], True),
                            ("val_gap_dark_minus_light", lambda r: r["val"]["dark"] - r["val"]["light"], True)],
               "curves": [("loss", "training loss (MSE + KL + perceptual)"), ("mse", "training MSE")],
               "title": "skintone ResVAE on phantom set A (quick settings)", "log": True},
    "mlpcgan": {"module": "gan.train_mlp_cgan", "settings": ["--npz", MEDMNIST_NPZ, "--per-class", "150", "--epochs",
                                                             "1000", "--n-per-class", "150", "--device", "cpu"],
                "rule": "equivalence", "read": lambda out: medmnist_fd(MEDMNIST_NPZ, out),
                "measures": [("loss_d_last100", lambda r: float(np.mean([h[0] for h in r["history"][-100:]])), True),
                             ("val_fd_pca32", lambda r: r["val_fd"], True),
                             ("loss_g_last100", lambda r: float(np.mean([h[1] for h in r["history"][-100:]])),
                              False)],
                "curves": [(0, "discriminator loss (last batch)"), (1, "generator loss (last batch)")],
                "title": "MedMNIST's MLP cGAN on PneumoniaMNIST (quick settings)"},
    "mlpae": {"module": "vae.train_mlp_ae", "settings": ["--npz", MEDMNIST_NPZ, "--per-class", "150", "--epochs", "300",
                                                         "--n-per-class", "150", "--device", "cpu"],
              "rule": "equivalence", "read": lambda out: medmnist_fd(MEDMNIST_NPZ, out),
              "measures": [("loss_last10", lambda r: float(np.mean(r["history"][-10:])), True),
                           ("val_fd_pca32", lambda r: r["val_fd"], True)],
              "curves": [(None, "training MSE (last batch)")],
              "title": "MedMNIST's MLP AE on PneumoniaMNIST (quick settings)", "log": True},
    "mlpcvae": {"module": "vae.train_mlp_cvae", "settings": ["--npz", MEDMNIST_NPZ, "--per-class", "150", "--epochs",
                                                             "300", "--n-per-class", "150", "--device", "cpu"],
                "rule": "equivalence", "read": lambda out: medmnist_fd(MEDMNIST_NPZ, out),
                "measures": [("loss_last10", lambda r: float(np.mean(r["history"][-10:])), True),
                             ("val_fd_pca32", lambda r: r["val_fd"], True)],
                "curves": [(None, "training loss (BCE + KL, last batch)")],
                "title": "MedMNIST's MLP cVAE on PneumoniaMNIST (quick settings)", "log": True},
    "dcgan": {"module": "gan.train_dcgan", "settings": ["--size", "64", "--width", "16", "--steps", "400",
                                                        "--batch-size", "64", "--device", "cpu"],
              "rule": "equivalence", "read": lambda out: dcgan_fd(out),
              "measures": [("loss_d_last100", lambda r: float(np.mean([h[1] for h in r["history"][-100:]])), True),
                           ("val_fd_pca32", lambda r: r["val_fd"], True),
                           ("loss_g_last100", lambda r: float(np.mean([h[2] for h in r["history"][-100:]])), False)],
              "curves": [(1, "discriminator loss"), (2, "generator loss")], "x": "step",
              "title": "compare's DCGAN on NIH1000 (quick settings)"},
}


def train(loop, seed, amp, runs, data_flags=(), resume=False, commit=None, env=None):
    """One run: its numbers and seconds. resume: a run whose folder holds done.json with this very command at this
    clean commit (a run of an interrupted check) is read, not trained again, its seconds those it took then
    ("resumed": true); at a dirty or unknown commit every run is trained (uncommitted code cannot be told apart).
    commit: the code's commit, looked up once per check (default: looked up here). env: the run's environment
    (default this process's); its OMP_NUM_THREADS is part of the command (CPU sums depend on the thread count)."""
    out = runs / f"{amp}_seed{seed}"
    cmd = [sys.executable, "-m", loop["module"], *loop["settings"], *data_flags, "--amp", amp, "--seed", str(seed),
           "--out-dir", str(out), "--force"]
    done, key = out / "done.json", {"command": cmd[1:], "commit": commit or git_commit(),
                                    "omp_threads": (os.environ if env is None else env).get("OMP_NUM_THREADS")}
    try:
        old = json.loads(done.read_text()) if resume and done.is_file() else {}
    except ValueError:  # a done.json cut short: train again
        old = {}
    clean = key["commit"] != "unknown" and not key["commit"].endswith("-dirty")
    resumed = clean and {k: old.get(k) for k in key} == key
    if resumed:
        seconds = old["seconds"]
    else:
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"{loop['module']} --amp {amp} --seed {seed} failed:\n{r.stderr[-2000:]}")
        seconds = time.time() - t0
        done.write_text(json.dumps({**key, "seconds": seconds}) + "\n")
    m = json.loads((out / "metrics.json").read_text())
    return {"seconds": seconds, "resumed": resumed, "threads": config_threads(out), "history": m.get("history"),
            **({"test_any_auroc": m["test"][-1]["auroc"]} if "test" in m else {}),
            **(loop["read"](out) if "read" in loop else {})}


def plot(loop, runs, seeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(loop["curves"]), figsize=(4.5 * len(loop["curves"]), 3.4), squeeze=False)
    axes = axes[0]
    for amp, colour in (("off", "tab:blue"), ("bf16", "tab:orange")):
        for i, s in enumerate(seeds):
            h = runs[amp][s]["history"]
            ep = [e.get("epoch", k + 1) if isinstance(e, dict) else k + 1 for k, e in enumerate(h)]
            label = ("fp32" if amp == "off" else "bf16 autocast") if i == 0 else None
            for ax, (key, _) in zip(axes, loop["curves"]):
                ax.plot(ep, [e if key is None else e[key] for e in h], color=colour, alpha=0.6, lw=1, label=label)
    for ax, (_, name) in zip(axes, loop["curves"]):
        ax.set(xlabel=loop.get("x", "epoch"), ylabel=name, yscale="log" if loop.get("log") else "linear")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{loop['title']}, fp32 vs CPU bf16 autocast, {len(seeds)} seeds each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def judge(a, b, rule):
    """The paired comparison of one measure: fp32 values a, bf16 values b (one per seed, same order)."""
    d = b - a
    sd = a.std(ddof=1)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    lo, hi = d.mean() - half, d.mean() + half
    within_sd = bool(abs(d.mean()) <= sd)
    equivalent = bool(-sd <= lo and hi <= sd)
    return {"fp32_mean": a.mean(), "fp32_sd": sd, "bf16_mean": b.mean(), "diff_mean": d.mean(),
            "diff_sd": d.std(ddof=1), "diff_ci95": [lo, hi], "within_fp32_sd": within_sd,
            "ci_within_fp32_sd": equivalent, "passes": within_sd if rule == "within_sd" else equivalent}


def significant(x, digits=6):
    """x (a number, or lists and dicts of them) with every float to `digits` significant digits."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, (list, tuple)):
        return [significant(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: significant(v, digits) for k, v in x.items()}
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", default="chexnet", choices=sorted(LOOPS), help="the network to check")
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm (each seed: one fp32 and one bf16 run)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed (seeds first-seed .. first-seed + seeds - 1): a new check on fresh seeds")
    p.add_argument("--out", default=None, help="summary.json and curves.png (default results/bench/bf16, "
                                               "results/bench/bf16_<loop> for other loops)")
    p.add_argument("--runs", default=None, help="the training runs' folders (replaced; default runs/bench/bf16_<loop>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds trained at a time; above 1 each run uses one torch thread (OMP_NUM_THREADS=1), as a "
                        "study's stages do side by side (default 1: one seed at a time on torch's default threads)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted check: runs already finished with the same command at the same "
                        "commit are read, not trained again (without it every run is trained afresh)")
    args = p.parse_args()
    if args.seeds < 3:
        p.error("--seeds: at least 3 (the rules need a spread across seeds)")
    if args.jobs < 1:
        p.error("--jobs: at least 1")
    loop = LOOPS[args.loop]
    out = Path(args.out or ("results/bench/bf16" if args.loop == "chexnet" else f"results/bench/bf16_{args.loop}"))
    runs_dir = Path(args.runs or f"runs/bench/bf16_{args.loop}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs_dir.mkdir(parents=True, exist_ok=True)
    data_flags = loop["prepare"](runs_dir) if "prepare" in loop else []
    runs, commit = {"off": {}, "bf16": {}}, git_commit()
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None
    if args.jobs > 1:  # this process's measuring (e.g. the DCGAN's samples) beside the runs: one thread too
        import torch
        torch.set_num_threads(1)

    def pair(s):  # a seed's two runs one after the other, so a drifting machine speed falls on both alike
        return s, {amp: train(loop, s, amp, runs_dir, data_flags, args.resume, commit, env) for amp in runs}

    with ThreadPoolExecutor(args.jobs) as pool:
        pending = [pool.submit(pair, s) for s in seeds]
        try:
            for f in tqdm(as_completed(pending), total=len(seeds), unit="seed",
                          desc=f"{args.loop}: seeds, fp32 then bf16 each, {args.jobs} at a time"):
                s, done = f.result()
                for amp in runs:
                    runs[amp][s] = done[amp]
        except BaseException:  # the first failure: start no other seed (the runs in flight finish first)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    rule, agree = {}, True
    print("| measure | fp32 mean (sd over seeds) | bf16 mean | paired difference bf16 - fp32: mean (sd) [95% CI] | "
          "mean within fp32's sd | CI within +-fp32's sd |")
    print("|---|---|---|---|---|---|")
    for key, read, used in loop["measures"]:
        a, b = (np.array([read(runs[amp][s]) for s in seeds]) for amp in ("off", "bf16"))
        rule[key] = judge(a, b, loop["rule"])
        if used:
            agree &= rule[key]["passes"]
        r = rule[key]
        print(f"| {key}{'' if used else ' (shown, not used)'} | {r['fp32_mean']:.5f} ({r['fp32_sd']:.5f}) | "
              f"{r['bf16_mean']:.5f} | {r['diff_mean']:+.5f} ({r['diff_sd']:.5f}) [{r['diff_ci95'][0]:+.5f}, "
              f"{r['diff_ci95'][1]:+.5f}] | {'yes' if r['within_fp32_sd'] else 'no'} | "
              f"{'yes' if r['ci_within_fp32_sd'] else 'no'} |")
    seconds = {amp: float(np.mean([runs[amp][s]["seconds"] for s in seeds])) for amp in runs}
    rule_words = "its mean paired difference within fp32's sd" if loop["rule"] == "within_sd" else \
        "the 95% CI of its paired difference within +-fp32's sd"
    print(f"verdict ({args.loop}, rule: {rule_words}): bf16 {'agrees' if agree else 'does not agree'} with fp32; "
          f"mean seconds per run fp32 {seconds['off']:.0f}, bf16 {seconds['bf16']:.0f} "
          f"({seconds['off'] / seconds['bf16']:.2f}x, the training processes: start, data, training, outputs)")
    plot(loop, runs, seeds, out / "curves.png")
    summary = {"git_commit": commit, "command": " ".join(sys.argv).replace(tempfile.gettempdir(), "<tmp>"),
               "loop": args.loop, "module": loop["module"], "settings": loop["settings"], "seeds": seeds,
               "data_flags": [f.replace(tempfile.gettempdir(), "<tmp>") for f in data_flags],
               "rule_kind": loop["rule"],
               "rule": {k: {kk: (vv if isinstance(vv, bool) else [float(x) for x in vv] if isinstance(vv, list)
                                 else float(vv)) for kk, vv in v.items()} for k, v in rule.items()},
               "agrees": agree, "seconds_per_run": seconds, "jobs": args.jobs,
               "threads_per_run": sorted({r["threads"] for v in runs.values() for r in v.values()} - {None}) or None,
               "runs": {amp: {str(s): {**r, "history": significant(r["history"])} for s, r in sorted(v.items())}
                        for amp, v in runs.items()}}
    text = json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1)[:-2]
    # the runs on one line, their histories to 6 significant digits: a GAN's 60 runs of 1,000 epochs stay ~1 MB
    (out / "summary.json").write_text(text + ',\n "runs": ' + json.dumps(summary["runs"], separators=(",", ":")) +
                                      "\n}\n")


if __name__ == "__main__":
    main()
