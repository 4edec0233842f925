"""fairgen's report resamples its Table 1 cells, comparison rows and permutation gaps in forked processes
(fairness.compare.map_forked): the three computations on a committed run's preds files, forked against the plain
loop, alternating, with the run's own resample counts; and whether the two give the same numbers, to the bit.

    python bench/report_fork.py [--run results/fairgen] [--rounds 1] [--out results/bench/report_fork.md]

These three are what the report spends its minutes on (the rest reads files and draws figures); the whole report
cannot be rerun from a committed folder alone, since it also reads the run's stage files under runs/.
"""
import argparse
import json
import os
from pathlib import Path
import sys
import time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import diffusion.fairgen_compare as fc  # noqa: E402
from bench.fullscale import cpu_name  # noqa: E402
from common.cli import ArgumentParser, positive_int, run  # noqa: E402
from common.runs import git_commit  # noqa: E402
from fairness.compare import map_forked  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="results/fairgen", help="a finished fairgen run's --out (summary.json, preds)")
    p.add_argument("--rounds", type=positive_int, default=1, help="runs of each form, alternating")
    p.add_argument("--out", default=None, help="also write the table here (Markdown)")
    return p.parse_args(argv)


def resample_all(frames, s):
    """Table 1, the comparisons and the gaps of every modality, as the report computes them; JSON text."""
    return json.dumps({m: [fc.table1_from_preds(df, s["n_boot"]),
                           fc.comparisons_from_preds(df, s["modalities"][m]["seed0"]["attrs"], s["n_boot_compare"]),
                           fc.gap_tables(df, s["modalities"][m]["seed0"]["attrs"], s["n_boot_compare"])]
                       for m, df in frames.items()}, sort_keys=True)


def main(args):
    run_dir = ROOT / args.run
    s = json.loads((run_dir / "summary.json").read_text())
    s.update({k: json.loads((run_dir / "plan.json").read_text())[k] for k in ("n_boot", "n_boot_compare")})
    frames = {m: fc.read_preds(run_dir / name) for m, name in s["preds"].items()}
    forms = {"forked": map_forked, "plain loop": lambda fn, n, jobs=None: [fn(i) for i in range(n)]}
    seconds, texts = {f: [] for f in forms}, {}
    for r in range(args.rounds):
        for form in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            fc.map_forked = forms[form]
            t0 = time.perf_counter()
            texts[form] = resample_all(frames, s)
            seconds[form].append(time.perf_counter() - t0)
            print(f"{form}: {seconds[form][-1]:.1f} s", flush=True)
    best = {f: min(v) for f, v in seconds.items()}
    same = texts["forked"] == texts["plain loop"]
    text = (f"# fairgen's report: its resampling forked against the plain loop\n\n`python bench/report_fork.py --run "
            f"{args.run} --rounds {args.rounds}`, {cpu_name()} ({len(os.sched_getaffinity(0))} cores), commit "
            f"{git_commit()}; Table 1 ({s['n_boot']} resamples), the comparisons and the gaps "
            f"({s['n_boot_compare']}) of {', '.join(frames)}.\n\n| form | seconds (fastest of {args.rounds}) |\n"
            f"|---|---|\n" + "".join(f"| {f} | {best[f]:.1f} |\n" for f in forms) +
            f"\n{best['plain loop'] / best['forked']:.2f}x. The same numbers to the bit: "
            f"**{'yes' if same else 'NO'}**.\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not same:
        raise SystemExit("error: the forked resampling's numbers differ from the plain loop's")


if __name__ == "__main__":
    run(main, parse_args)
