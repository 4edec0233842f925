"""FairGen ("Preference-Aligned Diffusion for Demographically Equitable Medical Image Synthesis") with our own
from-scratch DDPM in place of Stable Diffusion, and its downstream fairness evaluation.

Per modality (common/modalities.py; class = attribute x disease) and split seed, one patient-level split
(70/10/20), whose training images the study writes to real_train.npz; then the stages, each a script of its own
(`--dry-run` prints them):
  fdnet, judge   two classifiers on the real training images: the network behind FD-cnn8 (target: disease) and,
                 separately seeded, the DPO judge (target: class), so that the judge never grades itself; the judge
                 and every stage below up to the samples run once per --gen-seeds generator (seed split seed +
                 1000 g, folder gen<g>/ for g > 0), so that the comparisons resample generators too
  pretrain       a plain conditional DDPM (the methods' shared starting point, as FairGen starts from a pretrained
                 SD)
  base / cbrs / sqrs / cbdm   fine-tuned from it for --finetune steps with the variant's sampler / loss
  fairdiffusion  the same fine-tune with FairDiffusion's Fair Bayesian Perturbation (diffusion/fairdiffusion.py;
                 GP-UCB search of per-group loss-weight noise every --fair-window steps)
  fairgen        SQRS + class-balancing loss for (finetune - dpo) steps, then DPO for --dpo-steps with pairs
                 from the judge (judge: classifier, never physicians; FairGen-code DPO form)
  samples        per method, the same number per class (ratio 1.0 = as many synthetic as real training images)
  downstream     (diffusion/fairgen_downstream.py) ViT on real + synthetic (ratio 1.0), with and without adaptive
                 reweighting, for each generator and --down-seeds downstream seeds on the same test patients: per-image
                 predictions in its preds.csv; and accuracy vs synthetic ratio {0, .25, .5, 1} for the --kinds
                 classifiers (ViT, ResNet-50, GB, KNN), one downstream seed; with several generators, two stages
                 (generator 0 with the real-only fits and the sweep; generators 1.. with --table-only) that make
                 runs side by side and that together write the rows one stage would
  eval           (diffusion/fairgen_eval.py) FD-cnn8 of each method's samples (generator 0) to the real training
                 images; per subgroup FD and KID (fairness/compare.py) at one common n per modality (the smallest
                 subgroup's), the inter-subgroup variance (1/G) of those equal-n FDs; memorization against the
                 training images
The study then gathers the stages' outputs into --out (preds_<modality>.csv, the blinded pair sets, figures the
stages drew, plan.json, stages.json) and diffusion/fairgen_report.py writes the tables from those files: Table 1
(accuracy, per-group AUROC, DP, EO, ESSP, NAR, the mean over generators and downstream seeds), the paired comparisons
of every method with base (bootstrap over generators, downstream seeds within them, then test patients; Holm per
modality), FD / KID, memorization.
SCALES below holds each scale's settings; every flag overrides its scale's value.

    python -m diffusion.fairgen_study                     # quick: 32 px, small models, one split, 2 generators (CPU)
    python -m diffusion.fairgen_study --scale full --out results/fairgen-full   # GPU: 64 px, 3 seeds
    python -m diffusion.fairgen_study --smoke --out smoke/fairgen               # ~5.5 min on 2 cores
    python -m diffusion.fairgen_report --out results/fairgen                    # the report again, from its files
"""
import argparse
from dataclasses import dataclass
import itertools
import math
from pathlib import Path
import shutil
import tempfile
import time

import numpy as np
import pandas as pd

from classify.downstream import KINDS
from common.cli import ArgumentParser, int_list, name_list, positive_int, run
from common.errors import DataError
from common.modalities import MODALITIES, csv_modality_table, export, load_modality, modality_name
from common.runs import default_runs, device_from, prepare_out_dir, write_config, write_json
from common.splits import patient_split, write_if_changed
from common.table import add_table_args, primary_label, table_from_args
from common.stages import TIMES_FILE, Stages, add_study_args, parse_scaled, planned, portable
from diffusion.annotate import blinded_pairs, write_pair_set
from diffusion.fairgen_downstream import number_values
from diffusion.fairgen_compare import METHODS, read_preds
from diffusion.fairgen_report import write_report

JUDGE = "classifier (automatic, trained on real images; not physicians)"  # the DPO preferences' source
CSV_TABLE = "csv_table.csv"  # --table: the csv modality's table, in the run folder
MORE_GENERATORS = "downstream_gen1plus"  # the downstream stage of generators 1 and up, beside downstream/
VARIANT_FLAGS = {"base": [], "cbrs": ["--sampler", "cbrs"], "sqrs": ["--sampler", "sqrs"], "cbdm": ["--cb-loss"],
                 "fairdiffusion": ["--fair-bayes"], "sqrs_cb": ["--sampler", "sqrs", "--cb-loss"]}
# Every setting a scale sets, in one place (a flag given on the command line wins; summary.json keeps them as
# "preset"). quick: the three modalities in about an hour on a 2-core CPU (docs/fairgen.md has the measured time): a
# small U-Net (16-32-32 channels), few steps (700 pretraining steps and DDIM-15 took 51.5 min), a ViT with 8x8
# patches and no dropout (~12x cheaper than 4x4 patches with dropout at 32 px, about as accurate:
# bench/vit_sizes.py) and no ResNet-50 in the ratio sweep (~10 min per modality from scratch on 2 cores; add it
# with --kinds): a chain check more than a generator worth judging. gen_seeds: independent generators per method
# (each its own judge, pretraining, fine-tunes, DPO and samples), so that the comparisons' CIs carry generator
# training noise; down_seeds: downstream ViT seeds per generator and Table-1 cell (a quick ViT fit takes ~7 s).
# full: a GPU; its 3 split seeds each train their own generators.
# fair_window: FairDiffusion's steps per GP update, the public code's 50 at full scale; 25 at quick scale, so
# that its 100 fine-tuning steps see 4 updates rather than 2
SCALES = {
    "quick": dict(size=32, width=16, mults="1,2,2", num_res=1, attn_res="8", pretrain=400, finetune=100, dpo=40,
                  fair_window=25,
                  batch=32, sample_steps=10, clf_epochs=10, down_epochs=16, seeds=1, gen_seeds=2, down_seeds=2,
                  pairs_per_class=8,
                  vit=dict(patch=8, dim=64, mlp=128, dropout=0.0), kinds="vit,gb,knn", blinded_per_condition=1,
                  n_boot=500, n_boot_compare=2000),
    "full": dict(size=64, width=64, mults="1,2,2,2", num_res=2, attn_res="16", pretrain=20000, finetune=2000,
                 fair_window=50,
                 dpo=500, batch=64, sample_steps=50, clf_epochs=40, down_epochs=40, seeds=3, gen_seeds=1, down_seeds=3,
                 pairs_per_class=64,
                 vit=dict(patch=4, dim=128, mlp=256), kinds=",".join(KINDS), blinded_per_condition=4,
                 n_boot=500, n_boot_compare=2000),
    "smoke": dict(size=16, width=8, mults="1,2", num_res=1, attn_res="8", pretrain=4, finetune=4, dpo=2,
                  fair_window=2, batch=8,
                  sample_steps=3, clf_epochs=1, down_epochs=1, seeds=1, gen_seeds=2, down_seeds=2, pairs_per_class=2,
                  vit=dict(patch=4, dim=16, mlp=32, heads=2, depth=1), kinds="vit,gb,knn",  # as quick scale
                  blinded_per_condition=1, n_boot=50, n_boot_compare=50),  # a chain check: 50 resamples cannot reject
}


def modality_list(text):
    """argparse type of --modalities: comma-separated modalities (common.modalities.modality_name, toy:N too)."""
    names = [modality_name(m.strip()) for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no modality in {text!r}; choose from {', '.join(MODALITIES)}")
    return ",".join(names)


def vit_size(text):
    """argparse type of --vit: 'patch=8,dim=64,dropout=0.0' -> {'patch': 8, 'dim': 64, 'dropout': 0.0}."""
    try:
        return number_values(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e.code).removeprefix("error: --vit ")) from None


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/fairgen", SCALES)
    p.add_argument("--modalities", default=None, type=modality_list,
                   help="comma-separated: cxr, nih, mri, skin, toy, csv (default: cxr,mri,skin; with --table: csv)")
    p.add_argument("--skin-root", default=None, help="Fitzpatrick17k folder (default: the skin phantom)")
    t = p.add_argument_group("your own data (docs/your-data.md): the modality csv, class = group x label")
    t.add_argument("--table", default=None, help="your label table (a CSV, one row per image): checked, then written "
                                                 "into the run folder as the csv modality every stage reads")
    add_table_args(t)
    t.add_argument("--primary", default=None, help="--table: the label the classes are made of (default: the first)")
    g = p.add_argument_group("the settings of a scale (default: its value in SCALES for --scale)")
    g.add_argument("--size", type=positive_int, help="image side (every stage)")
    g.add_argument("--width", type=positive_int, help="U-Net base channel width")
    g.add_argument("--mults", type=int_list(1), help="U-Net channel multiplier per resolution level, e.g. 1,2,2")
    g.add_argument("--num-res", type=positive_int, help="U-Net residual blocks per level")
    g.add_argument("--attn-res", type=int_list(1, allow_empty=True), help="resolutions with self-attention, e.g. 8")
    g.add_argument("--pretrain", type=positive_int, help="pretraining steps of the plain DDPM")
    g.add_argument("--finetune", type=positive_int, help="fine-tuning steps of every method (fairgen: SQRS + CB "
                                                         "loss for finetune - dpo steps, then DPO)")
    g.add_argument("--dpo-steps", dest="dpo", type=positive_int, metavar="STEPS",
                   help="DPO steps of the fairgen method")
    g.add_argument("--fair-window", type=positive_int, help="FairDiffusion's fine-tuning steps per GP update")
    g.add_argument("--batch", type=positive_int, help="DDPM batch size (pretraining, fine-tuning, DPO)")
    g.add_argument("--sample-steps", type=positive_int, help="DDIM steps of the samples, the DPO pairs and grids")
    g.add_argument("--clf-epochs", type=positive_int, help="epochs of the judge and the FD network")
    g.add_argument("--down-epochs", type=positive_int, help="epochs of the downstream classifiers")
    g.add_argument("--seeds", type=positive_int, help="split seeds (each its own split, generators, stages)")
    g.add_argument("--gen-seeds", type=positive_int, help="independent generators per method and split (each "
                                                          "its own pretraining, fine-tunes and samples)")
    g.add_argument("--down-seeds", type=positive_int, help="downstream ViT seeds per generator and Table-1 cell")
    g.add_argument("--pairs-per-class", type=positive_int, help="DPO pairs per class the judge makes")
    g.add_argument("--vit", type=vit_size, help="the downstream ViT's size as KEY=NUMBER,..., e.g. patch=8,dim=64")
    g.add_argument("--kinds", type=name_list(KINDS), help=f"downstream classifiers of the ratio sweep, of "
                                                          f"{','.join(KINDS)}")
    g.add_argument("--blinded-per-condition", type=positive_int,
                   help="pairs per condition and contest in the blinded expert-evaluation set")
    g.add_argument("--n-boot", type=positive_int, help="bootstrap resamples (patients) for Table 1's CIs")
    g.add_argument("--n-boot-compare", type=positive_int,
                   help="resamples of the paired comparisons (and permutations of the gap nulls): p is floored at "
                        "1 / (n + 1), so Holm over a modality's 27 comparisons needs n >> 27 / 0.05")
    p.add_argument("--sweep-methods", default="base,fairgen", type=name_list(METHODS),
                   help="methods whose synthetic data get the ratio sweep")
    p.add_argument("--dpo", dest="dpo_form", default="fairgen", choices=["fairgen", "diffusion"],
                   help="DPO form of the fairgen run")
    args = parse_scaled(p, SCALES, argv)
    args.modalities = args.modalities or ("csv" if args.table else "cxr,mri,skin")
    if args.table and "csv" not in args.modalities.split(","):
        p.error(f"--table with --modalities {args.modalities}: the table is the modality csv; add csv to --modalities")
    if not args.table and "csv" in args.modalities.split(","):
        p.error("--modalities csv: give your label table with --table")
    if args.dpo >= args.finetune:
        p.error(f"--dpo-steps {args.dpo}: must be below --finetune {args.finetune} (fairgen fine-tunes for "
                f"finetune - dpo steps before DPO)")
    return args


# ---- the plan: explicit settings in, stage commands out ------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One modality and split seed as the plan needs it: its stage folder, its skin data root (None: the phantom, or
    not skin), samples per class (ratio 1.0), and for the figures' titles its name and whether it is the phantom."""
    name: str
    seed: int
    folder: Path
    root: str | None
    per_class: int
    title: str
    phantom: bool


@dataclass(frozen=True)
class Stage:
    """One stage command: kind is the Stages method that runs it ('script': done when out/metrics.json records its
    argv; 'samples': done when the .npz out records it); phase the part of the study it is timed in."""
    kind: str
    module: str
    argv: list
    out: Path
    deps: list
    cell: Path
    phase: str


def samples_name(per_class, steps):
    return f"samples_{per_class}pc_{steps}steps.npz"  # the name holds what makes them differ


def data_flags(c, size, seed):
    return ["--data", c.name, "--size", str(size), "--split-seed", str(c.seed), "--seed", str(seed)] + \
        (["--data-root", c.root] if c.root else [])


def hflip(c):
    """The training flag of a cell whose images may be mirrored (skin: no left or right in a lesion photo)."""
    return ["--hflip"] if c.name == "skin" else []


def gen_folder(c, g):
    """Where generator g of a cell keeps its DDPMs and samples: the cell's folder (g = 0) or its gen<g>/ below."""
    return c.folder if g == 0 else c.folder / f"gen{g}"


def gen_seed(c, g):
    """The training and sampling seed of generator g (g = 0: the split seed, as with one generator)."""
    return c.seed + 1000 * g


def generator_stages(c, P, dpo_form):
    """The FD network of one cell (shared: a measuring instrument, applied to generator 0's samples), then per
    generator its judge, pretrained DDPM, fine-tunes and FairGen's DPO run."""
    clf = ["--epochs", str(P["clf_epochs"]), "--arch", "cnn8"] + hflip(c)

    def stage(module, argv, folder, deps=()):
        return Stage("script", module, argv, folder, list(deps), c.folder, "generators")
    out = [stage("classify.train_classifier", data_flags(c, P["size"], c.seed + 1) + clf +
                 ["--target", "label", "--out-dir", str(c.folder / "fdnet")], c.folder / "fdnet")]
    return out + [s for g in range(P["gen_seeds"]) for s in ddpm_stages(c, P, dpo_form, g, stage, clf)]


def ddpm_stages(c, P, dpo_form, g, stage, clf):
    """Generator g's judge (the DPO preferences' source, part of FairGen's training), pretrained DDPM, fine-tunes and
    FairGen's DPO run, in gen_folder(c, g)."""
    r, base = gen_folder(c, g), data_flags(c, P["size"], gen_seed(c, g))
    out = [stage("classify.train_classifier", base + clf + ["--target", "cls", "--out-dir", str(r / "judge")],
                 r / "judge")]
    ddpm = base + ["--width", str(P["width"]), "--mults", P["mults"], "--num-res", str(P["num_res"]), "--attn-res",
                   P["attn_res"], "--batch-size", str(P["batch"]), "--sample-every", "0", "--save-every", "100000",
                   "--grid-steps", str(P["sample_steps"])] + hflip(c)
    out.append(stage("diffusion.train_ddpm", ddpm + ["--steps", str(P["pretrain"]), "--lr", "5e-4", "--warmup", "100",
                                                     "--ema", "0.995", "--out-dir", str(r / "pretrain")],
                     r / "pretrain"))
    ft = ["--init", str(r / "pretrain/ckpt.pt"), "--lr", "2e-4", "--warmup", "10", "--ema", "0.99"]
    for v in ["base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "sqrs_cb"]:
        steps = P["finetune"] - (P["dpo"] if v == "sqrs_cb" else 0)
        fair = ["--fair-time-window", str(P["fair_window"])] if v == "fairdiffusion" else []
        out.append(stage("diffusion.train_ddpm", ddpm + ft + VARIANT_FLAGS[v] + fair +
                         ["--steps", str(steps), "--out-dir", str(r / v)], r / v, [r / "pretrain/metrics.json"]))
    out.append(stage("diffusion.train_dpo", base + hflip(c) + [
        "--init", str(r / "sqrs_cb/ckpt.pt"), "--judge", str(r / "judge/ckpt.pt"), "--sampler", "sqrs",
        "--cb-loss", "--dpo", dpo_form, "--steps", str(P["dpo"]), "--batch-size", str(P["batch"]),
        "--pairs-per-class", str(P["pairs_per_class"]), "--pair-steps", str(P["sample_steps"]), "--grid-steps",
        str(P["sample_steps"]), "--out-dir", str(r / "fairgen")], r / "fairgen",
        [r / "sqrs_cb/metrics.json", r / "judge/metrics.json"]))
    return out


def evaluation_stages(c, P, sweep_methods, device):
    """Each generator's samples, the downstream classifiers on them, and FD / KID / memorization of generator 0's."""
    r, name = c.folder, samples_name(c.per_class, P["sample_steps"])
    samples = {(m, g): gen_folder(c, g) / m / name for g in range(P["gen_seeds"]) for m in METHODS}
    out = [Stage("samples", "diffusion.sample_ddpm", [
        "--ckpt", str(path.parent / "ckpt.pt"), "--n-per-class", str(c.per_class), "--steps", str(P["sample_steps"]),
        "--seed", str(gen_seed(c, g)), "--out", str(path), "--device", str(device)], path,
        [path.parent / "metrics.json"], r, "sampling") for (m, g), path in samples.items()]
    vit = ",".join(f"{k}={v}" for k, v in P["vit"].items())

    def downstream(folder, gens, flags):  # the ViTs on generators gens' samples
        chosen = {(m, g): path for (m, g), path in samples.items() if g in gens}
        return Stage("script", "diffusion.fairgen_downstream", data_flags(c, P["size"], c.seed) +
                     [a for (m, g), path in chosen.items() for a in ("--samples", f"{m}{f'@{g}' if g else ''}={path}")]
                     + ["--down-seeds", str(P["down_seeds"]), "--epochs", str(P["down_epochs"]), "--vit", vit] + flags +
                     ["--device", str(device), "--out-dir", str(r / folder)], r / folder, list(chosen.values()), r,
                     "downstream")
    # generator 0 (with the real-only fits and the ratio sweep), and the further generators in a stage of their own:
    # each waits only for its own samples, and the two train beside each other (they were the study's last hour)
    out.append(downstream("downstream", {0}, ["--kinds", P["kinds"], "--sweep-methods", sweep_methods]))
    if P["gen_seeds"] > 1:
        out.append(downstream(MORE_GENERATORS, set(range(1, P["gen_seeds"])), ["--table-only"]))
    out.append(Stage("script", "diffusion.fairgen_eval", [
        "--fdnet", str(r / "fdnet/ckpt.pt"), "--real", str(r / "real_train.npz")] +
        [a for m in METHODS for a in ("--samples", f"{m}={samples[m, 0]}")] +
        ["--name", c.title] + (["--phantom"] if c.phantom else []) + ["--out-dir", str(r / "eval")],
        r / "eval", [r / "real_train.npz", r / "fdnet/metrics.json", *(samples[m, 0] for m in METHODS)], r,
        "fd_memorization"))
    return out


def plan(cells, P, dpo_form, sweep_methods, device):
    """The study's stages, in order: per cell (modality x split seed), the generators, their samples, the
    downstream classifiers and the evaluation. P: the scale's settings (SCALES' keys)."""
    return [s for c in cells for s in generator_stages(c, P, dpo_form) + evaluation_stages(c, P, sweep_methods,
                                                                                            device)]


# ---- what main writes before the stages, and gathers after them ----------------------------------------------------
def write_real_train(mod, path, train, dry):
    """The real training images as the eval stage reads them (common.modalities.export), rewritten only when their
    content changes, so that an unchanged split keeps its time stamp and the eval stage stays done. Returns whether
    it changed (dry: whether it would; nothing is written)."""
    want = {"images": mod.images[train], "labels": mod.table["cls"].to_numpy()[train],
            "groups": mod.table["attr"].to_numpy().astype(str)[train], "class_names": np.array(mod.class_names)}
    try:
        with np.load(path) as z:
            changed = set(z.files) != set(want) or not all(np.array_equal(z[k], v) for k, v in want.items())
    except (OSError, ValueError):
        changed = True
    if changed and not dry:
        path.parent.mkdir(parents=True, exist_ok=True)
        export(mod, path, train)
    return changed


def prepare_table(t, primary, group, runs, stages, tmp):
    """A label table (common.table.read_table) checked for the study (common.modalities.csv_modality_table): returns
    the csv modality's table as text, its path runs/csv_table.csv, and a copy in tmp to read now (main writes the
    path after every check, and only when its content changes, so that its stages stay done; a stage reading a table
    that would change is not fresh)."""
    text = csv_modality_table(t, primary, group).to_csv(index=False)
    path, read = runs / CSV_TABLE, tmp / CSV_TABLE
    read.write_text(text)
    if write_if_changed(path, text, dry=True):
        stages.changed.add(path)
    return text, path, read


def table_note(t, primary, table, group, bands):
    """The note every report on a label table opens with: the table, its groups and the label the classes use."""
    groups = t[t[f"label:{primary}"].notna()].groupby("group")["patient_id"].nunique()
    return (f"Your data: label table {portable(table)}; attribute: group column(s) {group}"
            f"{' (bands ' + ', '.join(bands) + ')' if bands else ''}, patients per group "
            f"{', '.join(f'{g} {n}' for g, n in groups.items())}; label {primary!r}: the classes are group x "
            f"({primary} / no {primary}).")


def prepare_cell(name, seed, root, P, runs, stages, dry, read_root=None):
    """Load one modality, split it by patient and write its real_train.npz; returns (Cell, its facts for
    plan.json). A dry run writes nothing and marks a real_train.npz it would rewrite as changed in stages.
    read_root: where to read the data from now, if not root (the checked copy of the csv table, written to root
    only after every cell is prepared)."""
    mod = load_modality(name, P["size"], read_root or root)
    split = patient_split(mod.table, seed=seed, stratify="attr")
    train = split == "train"
    n_train = int(train.sum())
    per_class = math.ceil(n_train / len(mod.class_names))  # ratio 1.0: as many synthetic as real training images
    r = runs / f"{name}-seed{seed}"
    if write_real_train(mod, r / "real_train.npz", train, dry) and dry:
        stages.changed.add(r / "real_train.npz")
    facts = {"data": mod.data, "classes": mod.class_names, "attrs": mod.attrs, "labels": mod.labels,
             "notes": mod.notes, "n_train": n_train, "n_test": int((split == "test").sum()),
             "synthetic_per_class": per_class, "samples_file": samples_name(per_class, P["sample_steps"]),
             "judge": f"classifier, one per generator ({r / 'judge/ckpt.pt'}; gen<g>/judge for g > 0)"}
    return Cell(name, seed, r, root, per_class, mod.name, mod.data == "phantom"), facts


def stopwatch():
    """lap() -> seconds since the previous lap() (the first: since stopwatch())."""
    last = [time.time()]

    def lap():
        now = time.time()
        dt, last[0] = now - last[0], now
        return dt
    return lap


def run_stages(stages, steps, t0):
    """Hand each planned stage to `stages` (run, reused, or with a dry Stages only listed); returns this invocation's
    seconds per cell folder and phase (a reused stage takes ~0)."""
    seconds, lap = {}, stopwatch()
    for (cell, phase), group in itertools.groupby(steps, key=lambda s: (s.cell, s.phase)):
        if cell not in seconds and not stages.dry:
            print(f"== {cell.name} ({(time.time() - t0) / 60:.1f} min)", flush=True)
        for s in group:
            getattr(stages, s.kind)(s.module, s.argv, s.out, s.deps)
        seconds.setdefault(cell, {})[phase] = lap()
    return seconds


def downstream_preds(c, P):
    """A cell's downstream preds.csv files, in the order one stage for every generator would write its rows."""
    return [c.folder / folder / "preds.csv" for folder in ["downstream"] + [MORE_GENERATORS] * (P["gen_seeds"] > 1)]


def gather_preds(out, name, cells, P):
    """Every split seed's downstream preds of a modality as one file in --out, gzip-compressed above 2 MB
    (fairgen_report.preds_file finds it)."""
    df = pd.concat([read_preds(f) for c in cells for f in downstream_preds(c, P)], ignore_index=True)
    text = df.to_csv(index=False, float_format="%.9g")
    path = out / f"preds_{name}.csv"
    if len(text.encode()) > 2_000_000:
        path = path.with_suffix(".csv.gz")
        df.to_csv(path, index=False, float_format="%.9g", compression={"method": "gzip", "mtime": 0})
    else:
        path.write_text(text)


def gather_blinded_set(out, c, facts, per_condition):
    """The blinded expert evaluation's pair set of one modality (diffusion/annotate.py serves it): per condition,
    real vs each method and each method vs each other, sides and order shuffled, sources hidden from the page."""
    real = np.load(c.folder / "real_train.npz")
    grid = [np.load(c.folder / m / facts["samples_file"]) for m in METHODS]
    classes = facts["classes"]
    pairs = blinded_pairs((real["images"], [classes[k] for k in real["labels"]]),
                          {m: (z["images"], [classes[k] for k in z["labels"]]) for m, z in zip(METHODS, grid)},
                          per_condition, seed=0)
    write_pair_set(out / "blinded_pairs" / c.name, "blinded", pairs, {
        "study": "fairgen", "modality": c.name, "data": facts["data"], "samples": facts["samples_file"],
        "per_condition": per_condition, "real": "training split (real_train.npz)"})


def gather(out, cells, facts, seconds, P):
    """Into --out: each modality's preds, and from its first split seed the blinded pair set, the closest-pair
    figures of the eval stage and FairDiffusion's sigma-search figure. Returns plan.json's modalities: each cell's
    facts, this invocation's seconds per phase, and the stage files the report reads."""
    modalities = {}
    for name, group in itertools.groupby(zip(cells, facts), key=lambda cf: cf[0].name):
        group = list(group)
        gather_preds(out, name, [c for c, _ in group], P)
        c, f = group[0]
        gather_blinded_set(out, c, f, P["blinded_per_condition"])
        for m in METHODS:
            src = c.folder / "eval" / f"closest_pairs_{m}.png"
            if src.is_file():
                shutil.copyfile(src, out / f"memorization_{name}_{m}.png")
        shutil.copyfile(c.folder / "fairdiffusion" / "fair_bayes.png", out / f"fair_bayes_{name}.png")
        modalities[name] = {f"seed{c.seed}": {
            **f, "preds": [str(p) for p in downstream_preds(c, P)],
            "seconds": seconds[c.folder], "files": {
                "eval": str(c.folder / "eval" / "metrics.json"), "downstream": str(c.folder / "downstream" /
                                                                                  "metrics.json"),
                **({"downstream_more": str(c.folder / MORE_GENERATORS / "metrics.json")} if P["gen_seeds"] > 1
                   else {}),
                "fairdiffusion": str(c.folder / "fairdiffusion" / "metrics.json"),
                "samples": {m: str(c.folder / m / f["samples_file"]) for m in METHODS}}} for c, f in group}
    return modalities


def main(args):
    t0 = time.time()
    device = device_from(args.device)
    runs = Path(args.runs or default_runs(args.out))  # each --out (and so each scale) has its own tree
    P = {k: getattr(args, k) for k in SCALES[args.scale]}  # the scale's settings, flags applied
    names = [m.strip() for m in args.modalities.split(",") if m.strip()]
    stages = Stages(dry=args.dry_run or bool(args.makefile), log=runs / TIMES_FILE)
    with tempfile.TemporaryDirectory() as tmp:  # the table is checked (and read from a copy) before anything is written
        csv = csv_read = None
        if args.table:
            t = table_from_args(args)
            primary = primary_label(t, args.primary)
            text, csv, csv_read = prepare_table(t, primary, args.group, Path(portable(runs)), stages, Path(tmp))
            note = table_note(t, primary, args.table, args.group, args.bands)
        if not stages.dry:
            out = prepare_out_dir(args.out, args.force)
            write_config(out, args, data=args.modalities, weights="none (from scratch)", preset=P,
                         judge="classifier (automatic; no physician preferences)")
        roots = {"skin": args.skin_root, "csv": csv and str(csv)}
        prepared = [prepare_cell(name, seed, roots.get(name), P, runs, stages, args.dry_run,
                                 csv_read if name == "csv" else None) for name in names for seed in range(P["seeds"])]
    if csv and not args.dry_run:
        write_if_changed(csv, text)
    for c, f in prepared:
        if c.name == "csv":  # the user's table, not the run folder's copy, and what its words stand for
            f["data"], f["notes"] = f"label table {portable(args.table)}", [note] + f["notes"]
    cells, facts = [c for c, _ in prepared], [f for _, f in prepared]
    seconds = run_stages(stages, plan(cells, P, args.dpo_form, args.sweep_methods, device), t0)
    if planned(stages, args.dry_run, args.makefile, f"preds_<modality>.csv, the blinded pair sets and plan.json "
                                                    f"gathered into {args.out}, "
                             "then the report from those files (diffusion.fairgen_report: Table 1, the comparisons, "
                             "FD / KID, memorization)"):
        return
    write_json(out / "plan.json", {
        "study": "fairgen", "scale": args.scale, "judge": JUDGE, "preset": P, "dpo": args.dpo_form,
        "n_boot": args.n_boot, "n_boot_compare": args.n_boot_compare, "runs": str(runs),
        "modalities": gather(out, cells, facts, seconds, P)})
    # this invocation only: the stages listed under "reused" were not recomputed
    stages.record(out / "stages.json", seconds=time.time() - t0)
    write_report(out)


if __name__ == "__main__":
    run(main, parse_args)
