"""fairgen's downstream ViTs as one stage against the study's two (generator 0, and generators 1.. with
--table-only) side by side, on one modality at quick scale: wall time, and whether the two wrote the same rows.

    python bench/downstream_split.py [--modality mri] [--out results/bench/downstream_split.md]

The study's own plan (`diffusion.fairgen_study --dry-run`) gives the two commands. Their samples are stand-ins: each
method's and generator's .npz holds real training images drawn at random, as many per class as the study samples
(a ViT step costs the same whatever the pixels, so the times are the study's; the accuracies mean nothing). One
stage: the first command with the second's --samples, as the study ran it before the split. Every process runs
torch on one thread, as `make fairgen` runs its stages (THREADS=1): the one stage alone, then the two side by side.
Runs into runs/bench-downstream-split/.
"""
import argparse
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.cli import ArgumentParser, run  # noqa: E402
from common.modalities import load_modality, modality_name  # noqa: E402
from common.splits import patient_split  # noqa: E402
from bench.fullscale import cpu_name  # noqa: E402
from common.runs import git_commit  # noqa: E402

WORK = Path("runs/bench-downstream-split")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", default="mri", type=modality_name, help="one of the study's modalities")
    p.add_argument("--out", default=None, help="also write the result here (Markdown)")
    return p.parse_args(argv)


def downstream_commands(modality):
    """The quick plan's two downstream commands for the modality (argv lists, after `python -m module`)."""
    r = subprocess.run([sys.executable, "-m", "diffusion.fairgen_study", "--modalities", modality, "--dry-run",
                        "--runs", str(WORK / "runs"), "--out", str(WORK / "out")], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    cmds = [shlex.split(x.removeprefix("# reuse: "))[3:] for x in r.stdout.splitlines()
            if "-m diffusion.fairgen_downstream" in x]
    if len(cmds) != 2:
        raise SystemExit(f"error: expected 2 downstream stages in the plan, found {len(cmds)}")
    return cmds


def stand_in_samples(cmds, modality):
    """Write every --samples .npz the commands name: real training images of the plan's split, drawn with
    replacement, per class as many as the file name says (samples_<n>pc_...)."""
    argv = cmds[0]
    mod = load_modality(modality, int(argv[argv.index("--size") + 1]))
    train = patient_split(mod.table, seed=int(argv[argv.index("--split-seed") + 1]), stratify="attr") == "train"
    cls, attr = mod.table["cls"].to_numpy()[train], mod.table["attr"].to_numpy().astype(str)[train]
    images = mod.images[train]
    for k, spec in enumerate(b for c in cmds for a, b in zip(c, c[1:]) if a == "--samples"):
        path = ROOT / spec.split("=", 1)[1]
        per_class = int(re.search(r"samples_(\d+)pc", path.name).group(1))
        rng = np.random.default_rng(k)
        take = np.concatenate([rng.choice(np.nonzero(cls == c)[0], per_class) for c in np.unique(cls)])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=images[take], labels=cls[take], groups=attr[take])


def with_out(argv, folder):
    argv = list(argv)
    argv[argv.index("--out-dir") + 1] = str(folder)
    return argv + ["--force"] * ("--force" not in argv)


def start(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "diffusion.fairgen_downstream", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_all(procs):
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"error: a downstream stage failed: {err.strip()[-400:]}")


def main(args):
    a, b = downstream_commands(args.modality)
    stand_in_samples([a, b], args.modality)
    more = [x for pair in zip(b, b[1:]) if pair[0] == "--samples" for x in pair]
    one = a[:a.index("--out-dir")] + more + a[a.index("--out-dir"):]
    t0 = time.perf_counter()
    wait_all([start(with_out(one, WORK / "one"))])
    t1 = time.perf_counter()
    wait_all([start(with_out(a, WORK / "part0")), start(with_out(b, WORK / "part1"))])
    t2 = time.perf_counter()
    single, split = t1 - t0, t2 - t1
    rows = [(ROOT / WORK / f / "preds.csv").read_text().splitlines(keepends=True) for f in ("one", "part0", "part1")]
    same = rows[1][0] == rows[2][0] and rows[0] == rows[1] + rows[2][1:]  # one header, then the rows in order
    text = (f"# fairgen's downstream stage, one process against the study's two side by side ({args.modality}, quick)"
            f"\n\n`python bench/downstream_split.py --modality {args.modality}`, {cpu_name()} ({os.cpu_count()} cores"
            f"{', AVX-512 BF16' if 'avx512_bf16' in Path('/proc/cpuinfo').read_text() else ', no AVX-512 BF16'}), "
            f"one torch thread per process, one run, commit {git_commit()}.\n\n"
            f"| form | wall s |\n|---|---|\n| one stage (every generator) | {single:.1f} |\n"
            f"| two stages side by side (generator 0; generators 1.. --table-only) | {split:.1f} |\n\n"
            f"{single / split:.2f}x. The two stages' rows, concatenated, are the one stage's byte for byte: "
            f"**{'yes' if same else 'NO'}**.\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not same:
        raise SystemExit("error: the split stages' predictions differ from the single stage's")


if __name__ == "__main__":
    run(main, parse_args)
