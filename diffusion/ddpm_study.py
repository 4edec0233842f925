"""Our conditional DDPM on NIH chest X-rays (class = sex x finding, classifier-free guidance), and its samplers
compared: DDIM-50 (eta 0 and 1) against ancestral DDPM-1000, by time and by the domain feature distance and KID of
each sampler's images to the real training images (docs/METHODS.md, "DDPM core").

The plan (this module): three stages, each a script with flags that writes files:
  diffusion.train_ddpm       the DDPM (resumable: a killed run continues at its last checkpoint)
  classify.train_classifier  the CNN whose penultimate features the feature distance uses (not Inception: offline)
  diffusion.eval_samplers    samples from each sampler, FD-cnn8 and KID per sampler and group (summary.json)
then the report (diffusion/ddpm_report.py) writes the table and README.md from the files in --out.

    python -m diffusion.ddpm_study                     # quick: embedded NIH1000, 32 px, ~25 min on a 2-core CPU
    python -m diffusion.ddpm_study --dry-run           # the stage commands
    python -m diffusion.ddpm_study --scale full --data-root /data/nih --out results-full/ddpm   # a GPU (not run here)
    python -m diffusion.ddpm_study --smoke --out smoke/ddpm   # seconds
"""
import argparse
import json
from pathlib import Path
import shutil

from common.cli import ArgumentParser, nonneg_int, positive_float, positive_int, run, unit_interval
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.stages import TIMES_FILE, Stages, add_study_args, parse_scaled, planned, portable
from diffusion.ddpm_report import write_report

# Every setting a scale sets (a flag given on the command line wins). quick: what a 2-core CPU trains in ~25 min
# (32 px, 2,400 steps); smoke: seconds; full: our choice for a GPU and the full NIH set (not run here).
SCALES = {
    "quick": {"size": 32, "width": 32, "mults": "1,2,2", "num_res": 1, "attn_res": 8, "steps": 2400,
              "batch_size": 32, "lr": 5e-4, "warmup": 100, "ema": 0.995, "save_every": 200, "sample_every": 800,
              "fd_epochs": 30, "n_per_class": 10},
    "full": {"size": 64, "width": 128, "mults": "1,2,2,2", "num_res": 2, "attn_res": 16, "steps": 50000,
             "batch_size": 64, "lr": 2e-4, "warmup": 1000, "ema": 0.9999, "save_every": 2000, "sample_every": 10000,
             "fd_epochs": 30, "n_per_class": 100},
    "smoke": {"size": 32, "width": 32, "mults": "1,2,2", "num_res": 1, "attn_res": 8, "steps": 4,
              "batch_size": 32, "lr": 5e-4, "warmup": 100, "ema": 0.995, "save_every": 200, "sample_every": 800,
              "fd_epochs": 1, "n_per_class": 2},
}
GATHERED = ("summary.json", "samples_ddim50_eta0.png", "samples_ddim50_eta1.png", "samples_ddpm1000.png",
            "train_loss_curve.png", "train_samples.png")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/ddpm", SCALES)
    p.add_argument("--data-root", default=None, help="your NIH copy (default: the embedded NIH1000)")
    p.add_argument("--size", type=positive_int, help="image side of the DDPM and the feature network")
    p.add_argument("--width", type=positive_int, help="U-Net base width")
    p.add_argument("--mults", help="U-Net channel multipliers per level")
    p.add_argument("--num-res", type=positive_int, help="residual blocks per level")
    p.add_argument("--attn-res", type=positive_int, help="self-attention at this side (px)")
    p.add_argument("--steps", type=positive_int, help="DDPM training steps")
    p.add_argument("--batch-size", type=positive_int, help="DDPM batch size")
    p.add_argument("--lr", type=positive_float, help="DDPM learning rate")
    p.add_argument("--warmup", type=nonneg_int, help="learning-rate warm-up steps")
    p.add_argument("--ema", type=unit_interval, help="EMA decay of the weights")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every N steps (what a killed run can lose)")
    p.add_argument("--sample-every", type=nonneg_int, help="sample grid every N steps (0: never)")
    p.add_argument("--fd-epochs", type=positive_int, help="epochs of the feature network")
    p.add_argument("--n-per-class", type=positive_int, help="samples per class and sampler")
    return parse_scaled(p, SCALES, argv)


def plan(runs, data_argv, size, width, mults, num_res, attn_res, steps, batch_size, lr, warmup, ema, save_every,
         sample_every, fd_epochs, n_per_class):
    """The three stages, a pure function of the settings."""
    stages = Stages(dry=True)
    stages.script("diffusion.train_ddpm", [
        "--data", "nih", *data_argv, "--size", size, "--width", width, "--mults", mults, "--num-res", num_res,
        "--attn-res", attn_res, "--steps", steps, "--batch-size", batch_size, "--lr", lr, "--warmup", warmup,
        "--ema", ema, "--save-every", save_every, "--sample-every", sample_every, "--out-dir", runs / "nih32",
        "--resume"], runs / "nih32", force=False)
    stages.script("classify.train_classifier", ["--data", "nih", *data_argv, "--size", size, "--target", "label",
                                                "--seed", 1, "--epochs", fd_epochs, "--out-dir", runs / "fdnet"],
                  runs / "fdnet")
    stages.output("diffusion.eval_samplers", ["--ckpt", runs / "nih32" / "ckpt.pt", "--fd-ckpt",
                                              runs / "fdnet" / "ckpt.pt", "--n-per-class", n_per_class, "--out",
                                              runs / "eval"], runs / "eval" / "summary.json",
                  deps=[runs / "nih32" / "metrics.json", runs / "fdnet" / "metrics.json"])
    return stages


def main(args):
    runs = Path(args.runs or default_runs(args.out))
    data_argv = ["--data-root", portable(args.data_root)] if args.data_root else []
    stages = plan(runs, data_argv, args.size, args.width, args.mults, args.num_res, args.attn_res, args.steps,
                  args.batch_size, args.lr, args.warmup, args.ema, args.save_every, args.sample_every,
                  args.fd_epochs, args.n_per_class)
    stages.log = runs / TIMES_FILE
    if planned(stages, args.dry_run, args.makefile, f"the table and README.md in {args.out}"):
        return
    out = prepare_out_dir(args.out, args.force)
    write_config(out, args, data=f"nih ({portable(args.data_root)})" if args.data_root else "nih1000")
    stages.run_all()
    for name in GATHERED:
        if (runs / "eval" / name).is_file():
            shutil.copyfile(runs / "eval" / name, out / name)
    stages.record(out / "stages.json")
    write_json(out / "plan.json", {"study": "ddpm", "scale": args.scale, "runs": str(runs),
                                   "eval": json.loads((runs / "eval" / "summary.json").read_text())["argv"][1:]})
    return write_report(out)


if __name__ == "__main__":
    run(main, parse_args)
