"""Chaptoukaev, "The Effectiveness of Generative Models for Data Augmentation in Medical Applications" (Table 2):
a ResNet-18 (28x28) trained on ~150 real images per class, alone (None) or with +150 images per class from a
fully-connected AE, cVAE or cGAN, on the MedMNIST sets. This file is the plan; classify/medmnist_report.py the report.

Per data set and seed, the stages (each a script run as its own command; `--dry-run` prints them), all on the
seed's subset (official train split, ~150 per class, train:val 9:1 within each class, common/data.medmnist_subset):
  vae.train_mlp_ae, vae.train_mlp_cvae, gan.train_mlp_cgan   the generators, each writing its samples.npz
  classify.train_resnet18 (x4)   None and each generator's samples appended; scored on the official test split
The study gathers into --out the classifiers' preds.csv (one file), seed 0's sample grids (samples/) and plan.json
(the settings the report needs); the report reads only those: AUC (one-vs-rest mean), ACC, and each generator
against None, paired by seed on the same test images. The settings of each scale are in SCALES below.
BreastMNIST and PneumoniaMNIST are embedded; the other six run when their official files are under --data-root
(`python -m common.download medmnist --root DIR`), and the table lists those that were missing.

    python -m classify.medmnist_study                                   # quick, CPU, embedded sets
    python -m classify.medmnist_study --scale full --data-root /data/medmnist --out results-full/medmnist  # GPU
    python -m classify.medmnist_study --smoke --out smoke/medmnist      # seconds
    python -m classify.medmnist_report --out smoke/medmnist             # the report again, from the run's files
"""
import argparse
import json
from pathlib import Path
import shutil
import time

import pandas as pd

from classify.medmnist_report import METHODS, write_report
from classify.train_resnet18 import add_args
from common.cli import ArgumentParser, as_argv, name_list, positive_int, run
from common.data import MEDMNIST, PROJECT_DATA, medmnist_file, require_dir
from common.download import STUDY_FLAGS
from common.errors import DataError
from common.runs import default_runs, prepare_out_dir, write_config, write_json
from common.stages import TIMES_FILE, Stages, add_study_args, parse_scaled, planned, portable

# the generators: method -> (training script, stage folder); METHODS (the report's) is None and these
GENERATORS = {"AE": ("vae.train_mlp_ae", "ae"), "cVAE": ("vae.train_mlp_cvae", "cvae"),
              "cGAN": ("gan.train_mlp_cgan", "cgan")}
PLAN_CLASSIFIER = ("width", "recipe", "batch_size", "epochs", "patience", "select")  # the report's classifier notes
# Every setting a scale sets, in one place (a flag given on the command line wins).
# quick (2-core CPU): ResNet-18 at width 16 (every stage / 4; 0.7 M parameters instead of 11.2 M: full width trains
# at ~10 images/s on one CPU core, 15x slower), the MedMNIST v2 optimiser (Adam 1e-3, x0.1 at 50% and 75%) at
# batch 32 for 10 epochs, weights kept at the best validation AUC (ties: the lower loss): chosen on the official
# validation split, which no stage uses, by bench/medmnist_settings.py (results/bench/medmnist_settings.md: mean
# validation AUC 0.899 against 0.870 for the paper's SGD at batch 32 and 0.725 at its batch 128; selecting on the
# validation loss, the recipe before, 0.866), then epochs x width with that recipe (--grid size,
# results/bench/medmnist_size.md: 10 epochs at width 16 0.918, the 20 epochs set before after looking at test AUCs
# 0.899, widths 8 and 32 0.886-0.911).
# full: ResNet-18 itself (width 64) and the paper's recipe, 100 epochs. smoke: seconds, to test the chain.
SCALES = {
    "quick": {"seeds": 3, "per_class": 150, "n_gen": 150, "epochs": 10, "recipe": "medmnist", "batch_size": 32,
              "select": "auc", "patience": 10, "width": 16, "ae_epochs": 300, "cvae_epochs": 300,
              "cgan_epochs": 1000},
    "full": {"seeds": 3, "per_class": 150, "n_gen": 150, "epochs": 100, "recipe": "paper", "batch_size": 128,
             "select": "auc", "patience": 20, "width": 64, "ae_epochs": 300, "cvae_epochs": 300, "cgan_epochs": 1000},
    "smoke": {"seeds": 2, "per_class": 20, "n_gen": 10, "epochs": 2, "recipe": "medmnist", "batch_size": 32,
              "select": "loss", "patience": 10, "width": 16, "ae_epochs": 2, "cvae_epochs": 2, "cgan_epochs": 2},
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/medmnist", SCALES)
    p.add_argument("--data-root", default=None, help="folder with official MedMNIST .npz files (default: embedded)")
    p.add_argument("--datasets", default=",".join(STUDY_FLAGS), type=name_list(list(MEDMNIST)),
                   help="MedMNIST flags to run")
    p.add_argument("--seeds", type=positive_int, help="seeds (subset, generators, classifier)")
    p.add_argument("--per-class", type=positive_int, help="real images per class")
    p.add_argument("--n-gen", type=positive_int, help="generated images per class")
    for g in ("ae", "cvae", "cgan"):
        p.add_argument(f"--{g}-epochs", type=positive_int, help=f"epochs of the MLP {g} (its script's other "
                                                                 f"settings are its defaults)")
    p.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples of the comparisons")
    add_args(p)  # the classifier's flags (classify/train_resnet18.py), passed to every classifier stage
    args = parse_scaled(p, SCALES, argv)
    return args


def find(flag, data_root):
    for root in [data_root, PROJECT_DATA / "medmnist"]:
        if root and medmnist_file(root, flag).is_file():
            return medmnist_file(root, flag)
    return None


def plan(stages, runs, found, seeds, per_class, n_gen, gen_epochs, classifier_flags, device="auto"):
    """The study's stages, added to `stages` (a dry Stages only lists them): per data set ({flag: .npz path}) and
    seed, the three generators (each writes its samples.npz; gen_epochs {"ae": .., "cvae": .., "cgan": ..}) and a
    classifier per method (classifier_flags: its flags as a command line), all on the seed's subset (the seed
    draws it), scored on the official test split (preds.csv), in runs/<flag>-seed<seed>/. Returns the
    [(flag, path, seed)] in order."""
    cells = []
    for flag, path in found.items():
        for seed in range(seeds):
            r = Path(runs) / f"{flag}-seed{seed}"
            data = ["--npz", path, "--per-class", per_class, "--seed", seed, "--device", device]
            for method, (module, g) in GENERATORS.items():
                stages.script(module, data + ["--epochs", gen_epochs[g], "--n-per-class", n_gen, "--out-dir", r / g],
                              r / g)
            for method in METHODS:
                synth = r / GENERATORS[method][1] / "samples.npz" if method != "None" else None
                stages.script("classify.train_resnet18", data + (["--synthetic", synth] if synth else []) + [
                    "--tag", f"dataset={flag}", "--tag", f"method={method}", *classifier_flags,
                    "--out-dir", r / f"classifier-{method}"], r / f"classifier-{method}",
                    deps=[synth.parent / "metrics.json"] if synth else [])
            cells.append((flag, path, seed))
    return cells


def gather(out, runs, cells):
    """The stages' outputs under out: preds.csv (the classifiers' rows together) and samples/ (seed 0's grids).
    Returns each generator's training arithmetic over the cells ({method: sorted bf16_autocast flags, None where a
    run recorded none})."""
    parts = [pd.read_csv(runs / f"{flag}-seed{seed}" / f"classifier-{m}" / "preds.csv", dtype={"method": str},
                         keep_default_na=False, na_values=[""]) for flag, _, seed in cells for m in METHODS]
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv", index=False, float_format="%.9g")
    (out / "samples").mkdir(exist_ok=True)
    for flag, path, seed in cells:
        for method, (_, g) in GENERATORS.items():
            if seed == 0:
                shutil.copyfile(runs / f"{flag}-seed0" / g / "samples.png",
                                out / "samples" / f"{Path(path).stem}_{method}.png")
    flags = {m: {json.loads((runs / f"{flag}-seed{seed}" / g / "metrics.json").read_text()).get("bf16_autocast")
                 for flag, _, seed in cells} for m, (_, g) in GENERATORS.items()}
    return {m: sorted(v, key=str) for m, v in flags.items()}


def main(args):
    t0 = time.time()
    if args.data_root:
        require_dir(args.data_root, "--data-root MedMNIST", "medmnist")  # never a silent fall-back to embedded
    flags = [f.strip() for f in args.datasets.split(",") if f.strip()]
    found = {f: find(f, args.data_root) for f in flags}
    missing = [f for f, p in found.items() if p is None]
    if len(missing) == len(found):
        raise DataError(f"--datasets {args.datasets}: none of these official .npz files is under "
                        f"{args.data_root or PROJECT_DATA / 'medmnist'} (fetch them with `python -m common.download "
                        f"medmnist --root DIR --flags {args.datasets}`)")
    runs = Path(args.runs or default_runs(args.out))
    stages = Stages(dry=True, log=runs / TIMES_FILE)
    cells = plan(stages, runs, {f: portable(p) for f, p in found.items() if p}, args.seeds, args.per_class, args.n_gen,
                 {g: getattr(args, f"{g}_epochs") for _, g in GENERATORS.values()}, as_argv(add_args, args),
                 args.device)
    if planned(stages, args.dry_run, args.makefile, f"preds.csv (the classifier stages' preds.csv together), "
                                                    f"plan.json, then classify.medmnist_report: Table 2 and the "
                                                    f"comparisons in {args.out}"):
        return
    out = prepare_out_dir(args.out, args.force)
    write_config(out, args, data={f: portable(p) for f, p in found.items() if p}, weights="none (from scratch)")
    stages.run_all()
    generator_bf16 = gather(out, runs, cells)
    stages.record(out / "stages.json")
    write_json(out / "plan.json", {"study": "medmnist", "scale": args.scale, "datasets": flags,
                                   "datasets_missing": missing, "seeds": args.seeds, "per_class": args.per_class,
                                   "n_gen": args.n_gen, **{k: getattr(args, k) for k in PLAN_CLASSIFIER},
                                   "n_boot": args.n_boot, "generator_bf16": generator_bf16,
                                   "seconds": time.time() - t0})
    write_report(out)


if __name__ == "__main__":
    run(main, parse_args)
