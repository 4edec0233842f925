"""What starting a stage costs: the wall time of `python -m <stage module> --help` (interpreter start, every import
at the top of the module, argument parsing; no work), for each script the studies run as a stage.

    python bench/stage_start.py [--repeats 5] [--roots .,../old-checkout] [--out results/bench/stage_start.md]

Several --roots (checkouts of the repository, e.g. a git worktree at an older commit) are timed in the same run,
interleaved, so that their ratio is measured on one machine under one load. Prints the median per module and root,
and the slowest imports of the first root's median module (python -X importtime).
"""
import argparse
from pathlib import Path
import platform
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.cli import ArgumentParser, positive_int, run  # noqa: E402
from common.report import markdown_table  # noqa: E402

MODULES = ("classify.train_chexnet", "classify.train_classifier", "classify.train_resnet18", "vae.train_cvae",
           "vae.sample_cvae", "vae.train_conv_ae", "vae.sample_conv_ae", "vae.train_resvae", "vae.train_mlp_ae",
           "vae.train_mlp_cvae", "gan.train_dcgan", "gan.sample_dcgan", "gan.train_mlp_cgan", "diffusion.train_ddpm",
           "diffusion.sample_ddpm", "diffusion.train_dpo", "diffusion.fairgen_downstream", "diffusion.fairgen_eval",
           "diffusion.eval_samplers", "classify.generator_audit", "classify.ood_scores", "fairness.plant")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", default=",".join(MODULES), help="comma-separated stage modules to start")
    p.add_argument("--repeats", type=positive_int, default=5, help="starts per module and root (the median is kept)")
    p.add_argument("--roots", default=".", help="comma-separated repository checkouts to time against each other")
    p.add_argument("--out", default=None, help="also write the table here (Markdown)")
    return p.parse_args(argv)


def label(root):
    """A checkout as the table names it: its commit (a folder's path would name this machine's folders)."""
    r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (r.stdout.strip() or Path(root).name) + ("+changes" if dirty else "")


def start_seconds(root, module):
    """Seconds from launching `python -m module --help` in root to its exit."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: {root}: `python -m {module} --help` failed: {r.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


LOCAL = {"classify", "common", "diffusion", "fairness", "gan", "vae"}  # the repository's own (their time includes
# what they import)


def slowest_imports(root, module, n=6):
    """The n installed top-level packages with the largest cumulative import time (s) when module starts."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=root, capture_output=True,
                       text=True)
    cum = {}
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].strip().split(".")[0]
            if name in LOCAL:
                continue
            cum[name] = max(cum.get(name, 0), int(parts[1]) / 1e6)
    return sorted(cum.items(), key=lambda kv: -kv[1])[:n]


def main(args):
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    roots = [r.strip() for r in args.roots.split(",") if r.strip()]
    times = {(r, m): [] for r in roots for m in modules}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for m in modules:
            for r in roots:  # interleaved: a change of load hits every root alike
                times[(r, m)].append(start_seconds(r, m))
    med = {k: statistics.median(v) for k, v in times.items()}
    names = [label(r) for r in roots]
    header = ["module"] + [f"{n} (s)" for n in names] + ([f"{names[0]} / {n}" for n in names[1:]])
    rows = [[m] + [f"{med[(r, m)]:.2f}" for r in roots] + [f"{med[(roots[0], m)] / med[(r, m)]:.2f}"
                                                          for r in roots[1:]] for m in modules]
    rows.append(["median over modules"] + [f"{statistics.median(med[(r, m)] for m in modules):.2f}" for r in roots]
                + [""] * (len(roots) - 1))
    typical = sorted(modules, key=lambda m: med[(roots[0], m)])[len(modules) // 2]
    imports = ", ".join(f"{name} {s:.2f} s" for name, s in slowest_imports(roots[0], typical))
    table = markdown_table(header, rows)
    notes = (f"Median of {args.repeats} starts of `python -m <module> --help` per module and checkout, interleaved, "
             f"on {platform.processor() or platform.machine()} ({platform.system()}), Python "
             f"{platform.python_version()}. Slowest imports of {typical} at {names[0]} (cumulative): {imports}.")
    print(table + "\n\n" + notes)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Stage start times\n\n{table}\n\n{notes}\n\nWritten by `python "
                                  f"bench/stage_start.py --repeats {args.repeats} --roots <{', '.join(names)}>`.\n")


if __name__ == "__main__":
    run(main, parse_args)
