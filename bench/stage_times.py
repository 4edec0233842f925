"""Where the studies' time goes: each study's stage seconds summed by kind, from the stages.json each study wrote.

    python bench/stage_times.py [--results results] [--out results/bench/stage_times.md]

Two tables: each study's minutes by kind, and each stage module's minutes and share of its study's recorded stage
time, beside the training loop of bench/machine_limit.py it runs, that loop's bf16 speed in the committed loop table
(results/bench/machine_limit_all.md) and its bf16 agreement check (results/bench/bf16*/summary.json), so that one
table shows where the minutes go and which loops bf16 could still speed up.

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
import json
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.cli import ArgumentParser, run  # noqa: E402
from common.report import markdown_table, stage_times  # noqa: E402
from common.stages import KINDS  # noqa: E402

STUDIES = ("chestxray", "compare", "skintone", "medmnist", "fairgen", "ddpm", "chestxray_planted",
           "chestxray_planted_null", "compare_planted")
# the training loop of bench/machine_limit.py that each stage module runs (a study's own where it differs: compare's
# DDPM is the 32 px ddpm32, fairgen's the U-Net), and the bf16 agreement check of bench/bf16_agreement.py per loop
LOOPS = {"classify.train_chexnet": "cnn8", "vae.train_cvae": "cvae", "vae.train_resvae": "resvae",
         "classify.train_resnet18": "resnet18", "gan.train_mlp_cgan": "mlpcgan", "vae.train_mlp_ae": "mlpae",
         "vae.train_mlp_cvae": "mlpcvae", "gan.train_dcgan": "dcgan", "vae.train_conv_ae": "convae",
         "diffusion.train_ddpm": {"compare": "ddpm32", "fairgen": "unet", "ddpm": "ddpm32"},
         "diffusion.train_dpo": "unet", "diffusion.fairgen_downstream": "vit"}
# results/bench/<folder>/summary.json of each loop's bf16 check (the CVAE's: its second, 30-seed check; its first,
# bf16_cvae, was too small to tell)
CHECKS = {"cnn8": "bf16", "cvae": "bf16_cvae30", "resvae": "bf16_resvae", "convae": "bf16_convae",
          "mlpcgan": "bf16_mlpcgan", "dcgan": "bf16_dcgan", "mlpae": "bf16_mlpae", "mlpcvae": "bf16_mlpcvae"}
# loops left unchecked on purpose, and why (stage minutes from the committed runs' stages.json)
UNCHECKED = {"resnet18": "not checked: 1.25x on the training step, under a minute of medmnist's 3.5 to gain",
             "ddpm32": "not checked: 1.08x on the training step, about a minute to gain; train_ddpm's bf16 is for "
                       "GPUs"}
FASTER = 1.05  # a loop whose check agrees trains in bf16 only if its runs were at least this much faster per run


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


def bf16_speeds(path):
    """{loop: bf16 x fp32} from the committed loop table's variant rows ("| loop | bf16 | images/s | x fp32 | ...")."""
    speeds = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 4 and cells[1] == "bf16":
                speeds[cells[0]] = cells[3]
    return speeds


def check_verdict(bench, loop, speed=""):
    """The bf16 agreement check's verdict for a loop: 'agrees', 'agrees, not faster per run' (its runs' seconds
    within FASTER: it stays fp32), 'not shown to agree', 'not checked' (with the reason where it was left on
    purpose), or, for a loop that the loop table shows slower under bf16 (speed, its 'x fp32' cell, below 1), 'none:
    slower in bf16 (loop table)'."""
    path = Path(bench) / CHECKS.get(loop, "-") / "summary.json"
    if not path.is_file():
        try:
            return "none: slower in bf16 (loop table)" if float(speed) < 1 else UNCHECKED.get(loop, "not checked")
        except ValueError:
            return UNCHECKED.get(loop, "not checked")
    summary = json.loads(path.read_text())
    if not summary["agrees"]:
        return "not shown to agree"
    ratio = summary["seconds_per_run"]["off"] / summary["seconds_per_run"]["bf16"]
    return "agrees" if ratio >= FASTER else f"agrees, not faster per run ({ratio:.2f}x): stays fp32"


def module_rows(name, folder, bench):
    """One row per stage module of a study: its stages, minutes, share of the study's recorded stage time (process
    starts apart), its loop, the loop's bf16 speed-up and check."""
    path = folder / "stages.json"
    stages = json.loads(path.read_text()) if path.is_file() else {}
    if "stage_seconds" not in stages:
        return []
    minutes, count = {}, {}
    for line, rec in zip(stages["stages"], stages["stage_seconds"]):
        if rec:
            module = line.split()[2]
            minutes[module] = minutes.get(module, 0.0) + rec["run_s"] / 60
            count[module] = count.get(module, 0) + 1
    total, speeds = sum(minutes.values()), bf16_speeds(Path(bench) / "machine_limit_all.md")
    rows = []
    for module in sorted(minutes, key=lambda m: -minutes[m]):
        loop = LOOPS.get(module, "")
        loop = loop.get(name, "") if isinstance(loop, dict) else loop
        rows.append([name, module, str(count[module]), f"{minutes[module]:.1f}", f"{minutes[module] / total:.0%}",
                     loop, speeds.get(loop, "") if loop else "",
                     check_verdict(bench, loop, speeds.get(loop, "")) if loop else ""])
    return rows


def main(args):
    rows, modules = [], []
    for name in [s.strip() for s in args.studies.split(",") if s.strip()]:
        rows.append(study_row(name, Path(args.results) / name))
        modules += module_rows(name, Path(args.results) / name, Path(args.results) / "bench")
    header = ["study", "stages"] + [f"{k} (min)" for k in KINDS] + ["total (min)", "stages not recorded"]
    table = markdown_table(header, rows)
    by_module = markdown_table(["study", "stage module", "stages recorded", "min", "share of the study's stage time",
                                "training loop", "bf16 x fp32 (machine_limit_all.md)", "bf16 check"], modules)
    print(table + "\n\n" + by_module)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# Stage minutes by kind ({args.results}/<study>/stages.json)\n\n{table}\n\n"
                                  f"## By stage module\n\n{by_module}\n\n"
                                  "Each stage's own seconds (common/stages.py); a reused stage keeps the seconds "
                                  "of the run that made it; the module shares leave out process starts. bf16 x fp32: "
                                  "the loop's training-step speed under bf16 autocast in the committed loop table "
                                  "(one run, 2-core CPU with AVX512-BF16); bf16 check: bench/bf16_agreement.py's "
                                  "verdict (a loop whose check agrees trains in bf16 under --amp auto on such a CPU; "
                                  "cnn8's check used a weaker rule than the others', docs/bench.md; 'none: slower "
                                  "in bf16 (loop table)': a loop that bf16 slowed down in that table stays fp32 and "
                                  "needs no check). Stages that ran side by side (make's JOBS, the default since "
                                  "007abbe) each count their own seconds, so a study's total can exceed its wall "
                                  "time. Written by bench/stage_times.py.\n")


if __name__ == "__main__":
    run(main, parse_args)
