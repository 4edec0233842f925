"""Where the studies' time goes: each study's stage seconds summed by kind, from the stages.json each study wrote.

    python bench/stage_times.py [--results results] [--out results/bench/stage_times.md]

Every stage process records its own seconds when it succeeds (common/stages.py): the time from its process start to
its main (starting Python and importing) and in its main. The study sums them by kind (generator training,
sampling, classifier training, evaluation, data preparation, process start) into stages.json (its report copies
them into summary.json's "stage_times"). A stage reused from an earlier run keeps the seconds it took when it ran;
compare's row counts the stages it shares with chestxray's (the CVAE of the first seed) again. The make process and
each study's own process (splits, gathering, report) are not stages and are not counted.

This script reads no clock: the table is a record of how long each study's stages took on the machine that ran
them; compare studies only where one machine ran both. A study whose stages.json predates stage timing is listed
as "not recorded" (rerun it to fill its row).
"""
import argparse
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.cli import ArgumentParser, run  # noqa: E402
from common.report import markdown_table, stage_times  # noqa: E402
from common.stages import KINDS  # noqa: E402

STUDIES = ("chestxray", "compare", "skintone", "medmnist", "fairgen", "ddpm")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="the folder holding each study's folder (make's OUT)")
    p.add_argument("--studies", default=",".join(STUDIES), help="comma-separated study folders to list")
    p.add_argument("--out", default=None, help="also write the table here (Markdown)")
    return p.parse_args(argv)


def study_row(name, folder):
    """One table row: the study's minutes by kind, its total and how many stages had no record."""
    times = stage_times(folder)
    if not times:
        why = "not recorded (run before stage timing; rerun the study)" if (folder / "stages.json").is_file() else \
            "no stages.json"
        return [name, why] + [""] * (len(KINDS) + 1)
    k = times["by_kind"]
    return [name, str(len(times["per_stage"]))] + [f"{k[kind] / 60:.1f}" for kind in KINDS] + \
        [f"{k['total'] / 60:.1f}", str(k["not recorded"])]


def main(args):
    rows = []
    for name in [s.strip() for s in args.studies.split(",") if s.strip()]:
        rows.append(study_row(name, Path(args.results) / name))
    header = ["study", "stages"] + [f"{k} (min)" for k in KINDS] + ["total (min)", "stages not recorded"]
    table = markdown_table(header, rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Stage minutes by kind ({args.results}/<study>/stages.json)\n\n{table}\n\n"
                                  "Each stage's own seconds (common/stages.py); a reused stage keeps the seconds "
                                  "of the run that made it. Written by bench/stage_times.py.\n")


if __name__ == "__main__":
    run(main, parse_args)
