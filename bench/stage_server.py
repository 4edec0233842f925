"""What the stage server saves: `make <study> SMOKE=1` with each stage forked from one warm process
(common/stage_server.py, the default) against a fresh interpreter per stage (FAIRSYNTH_FORK_STAGES=0), alternating,
in fresh run folders, and whether the two wrote the same predictions.

    python bench/stage_server.py [--studies chestxray,medmnist,skintone] [--rounds 2] [--out results/bench/stage_server.md]

A smoke chain is mostly starts (each stage trains for seconds), so its ratio is the most the server can give; a quick
study's stages train for minutes, and there the saving is the per-stage seconds below times its number of stages.
Per stage, from the stages' own log lines (stage_times.jsonl): `start` is from the stage's process start (forked:
its client's start) to its main, `main` its main, which includes what a stage imports on first use (torch._dynamo
at a torch optimizer's first step, pyplot: a forked stage finds them imported). Runs into runs/bench-stage-server/.
"""
import argparse
import filecmp
import json
import os
from pathlib import Path
import platform
import shutil
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.cli import ArgumentParser, positive_int, run  # noqa: E402
from common.report import markdown_table  # noqa: E402

MODES = {"process": "0", "fork": "1"}  # FAIRSYNTH_FORK_STAGES
WORK = "runs/bench-stage-server"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default="chestxray,medmnist,skintone", help="comma-separated make targets (smoke)")
    p.add_argument("--rounds", type=positive_int, default=2, help="runs per study and mode, alternating")
    p.add_argument("--python", default=sys.executable, help="the interpreter make's stages run (PYTHON=)")
    p.add_argument("--out", default=None, help="also write the table here (Markdown)")
    return p.parse_args(argv)


def one_run(study, mode, python):
    """Wall seconds of `make <study> SMOKE=1` into a fresh folder, its stages' log lines, and its prediction files
    (copied to WORK/kept/<mode>/)."""
    out = f"{WORK}/{mode}"
    for folder in (ROOT / out, ROOT / "runs" / out):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run(["make", study, "SMOKE=1", f"SCALE_OUT={out}", f"PYTHON={python}"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "FAIRSYNTH_FORK_STAGES": MODES[mode]})
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"error: make {study} SMOKE=1 ({mode}) failed: {r.stderr.strip()[-400:]}")
    lines = [json.loads(x) for x in (ROOT / "runs" / out / study / "stage_times.jsonl").read_text().splitlines()]
    kept = ROOT / WORK / "kept" / mode / study
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    for f in (ROOT / out / study).glob("preds*.csv*"):
        shutil.copy(f, kept / f.name)
    return wall, lines, kept


def same_files(a, b):
    """Whether two folders hold the same files, byte for byte; None where the first is empty."""
    names = sorted(p.name for p in a.iterdir())
    if not names:
        return None
    return all((b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(args):
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    rows = []
    for study in studies:
        walls, last, same = {m: [] for m in MODES}, {}, []
        for k in tqdm(range(args.rounds), desc=study):
            for mode in (list(MODES) if k % 2 == 0 else list(MODES)[::-1]):  # alternating: load hits both alike
                wall, last[mode], _ = one_run(study, mode, args.python)
                walls[mode].append(wall)
            same.append(same_files(*(ROOT / WORK / "kept" / m / study for m in MODES)))
        med = {m: statistics.median(v) for m, v in walls.items()}
        per = {m: [sum(x[key] or 0.0 for x in last[m]) / len(last[m]) for key in ("start_s", "run_s")] for m in MODES}
        rows.append([study, str(len(last["fork"])), str(sum(bool(x.get("forked")) for x in last["fork"])),
                     f"{med['process']:.1f}", f"{med['fork']:.1f}", f"{med['process'] / med['fork']:.2f}",
                     *(f"{per[m][0]:.2f} / {per[m][1]:.2f}" for m in MODES),
                     {True: "yes", False: "NO", None: "no predictions"}[None if None in same else all(same)]])
    header = ["study (SMOKE=1)", "stages", "forked", "process per stage (s)", "forked (s)", "ratio",
              "per stage, process: start / main (s)", "per stage, forked: start / main (s)", "same predictions"]
    table = markdown_table(header, rows)
    notes = (f"Median wall time of {args.rounds} runs per mode, alternating, of `make <study> SMOKE=1` "
             f"(FAIRSYNTH_FORK_STAGES=0: a process per stage) on {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}; per-stage means from the last run of each mode.")
    print(table + "\n\n" + notes)
    if args.out:
        Path(args.out).write_text(f"# The stage server against a process per stage\n\n{table}\n\n{notes}\n\nWritten "
                                  f"by `python bench/stage_server.py --studies {args.studies} --rounds "
                                  f"{args.rounds}`.\n")


if __name__ == "__main__":
    run(main, parse_args)
