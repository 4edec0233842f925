"""Does CPU bf16 autocast train the quick chest X-ray classifier as fp32 does? (issue #21: bf16 is used if and only
if its loss curve and final metrics agree with fp32's within the run-to-run spread.)

    python bench/bf16_agreement.py --seeds 5 --out results/bench/bf16     # ~10 min on 2 cores

For each seed, classify.train_chexnet at the quick study's settings (cnn8, width 16, 64 px, batch 32, 16 epochs,
cosine, last epoch's weights; its own 70/10/20 patient split of NIH1000) twice, with --amp off and --amp bf16: the
same initial weights, batches and augmentation, so the pair differs only by the arithmetic. The rule, fixed before
the run and on training and validation numbers only: bf16 agrees when, for the final training loss and for the
validation any-finding AUROC of the last epoch, the mean over seeds of the paired difference (bf16 - fp32) lies
within one standard deviation of fp32 across seeds (the run-to-run spread). The test AUROCs are shown, not used.
Writes summary.json (every run's history and test AUROC, the rule's numbers, the verdict, the seconds of each arm),
curves.png (both arms' loss and validation curves, per seed) and prints a table.
"""
import argparse
import json
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.runs import git_commit  # noqa: E402

QUICK = ["--arch", "cnn8", "--width", "16", "--size", "64", "--batch-size", "32", "--epochs", "16", "--schedule",
         "cosine", "--patience", "0", "--keep", "last", "--device", "cpu"]


def train(seed, amp, runs):
    out = runs / f"{amp}_seed{seed}"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "classify.train_chexnet", *QUICK, "--amp", amp, "--seed", str(seed),
                        "--out-dir", str(out), "--force"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"train_chexnet --amp {amp} --seed {seed} failed:\n{r.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"seconds": time.time() - t0, "history": m["history"], "test_any_auroc": m["test"][-1]["auroc"]}


def plot(runs, seeds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for amp, colour in (("off", "tab:blue"), ("bf16", "tab:orange")):
        for i, s in enumerate(seeds):
            h = runs[amp][s]["history"]
            ep = [e["epoch"] for e in h]
            label = ("fp32" if amp == "off" else "bf16 autocast") if i == 0 else None
            axes[0].plot(ep, [e["loss"] for e in h], color=colour, alpha=0.6, lw=1, label=label)
            axes[1].plot(ep, [e["val_any_auroc"] for e in h], color=colour, alpha=0.6, lw=1, label=label)
    axes[0].set(xlabel="epoch", ylabel="training loss (weighted BCE)")
    axes[1].set(xlabel="epoch", ylabel="validation any-finding AUROC")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"cnn8 on NIH1000 (quick settings), fp32 vs CPU bf16 autocast, {len(seeds)} seeds each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per arm (each seed: one fp32 and one bf16 run)")
    p.add_argument("--out", default="results/bench/bf16", help="summary.json and curves.png")
    p.add_argument("--runs", default="runs/bench/bf16", help="the training runs' folders (replaced)")
    args = p.parse_args()
    out, runs_dir = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    runs = {amp: {s: train(s, amp, runs_dir) for s in seeds} for amp in ("off", "bf16")}
    final = {amp: {"loss": np.array([runs[amp][s]["history"][-1]["loss"] for s in seeds]),
                   "val_auroc": np.array([runs[amp][s]["history"][-1]["val_any_auroc"] for s in seeds]),
                   "test_auroc": np.array([runs[amp][s]["test_any_auroc"] for s in seeds])} for amp in runs}
    rule, agree = {}, True
    print("| measure | fp32 mean (sd over seeds) | bf16 mean | paired difference bf16 - fp32 (mean, sd) | within "
          "fp32's sd |")
    print("|---|---|---|---|---|")
    for key in ("loss", "val_auroc", "test_auroc"):
        a, b = final["off"][key], final["bf16"][key]
        d = b - a
        within = bool(abs(d.mean()) <= a.std(ddof=1))
        rule[key] = {"fp32_mean": a.mean(), "fp32_sd": a.std(ddof=1), "bf16_mean": b.mean(),
                     "diff_mean": d.mean(), "diff_sd": d.std(ddof=1), "within_fp32_sd": within}
        if key != "test_auroc":  # the rule uses training and validation numbers only
            agree &= within
        print(f"| {key}{' (shown, not used)' if key == 'test_auroc' else ''} | {a.mean():.4f} ({a.std(ddof=1):.4f}) "
              f"| {b.mean():.4f} | {d.mean():+.4f} ({d.std(ddof=1):.4f}) | {'yes' if within else 'no'} |")
    seconds = {amp: float(np.mean([runs[amp][s]["seconds"] for s in seeds])) for amp in runs}
    print(f"verdict: bf16 {'agrees' if agree else 'does not agree'} with fp32 within the seeds' spread; "
          f"mean seconds per run fp32 {seconds['off']:.0f}, bf16 {seconds['bf16']:.0f} "
          f"({seconds['off'] / seconds['bf16']:.2f}x, process start and evaluation included)")
    plot(runs, seeds, out / "curves.png")
    summary = {"git_commit": git_commit(), "command": " ".join(sys.argv).replace(tempfile.gettempdir(), "<tmp>"), "settings": QUICK, "seeds": seeds,
               "rule": {k: {kk: (float(vv) if not isinstance(vv, bool) else vv) for kk, vv in v.items()}
                        for k, v in rule.items()},
               "agrees": agree, "seconds_per_run": seconds,
               "runs": {amp: {str(s): r for s, r in v.items()} for amp, v in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
