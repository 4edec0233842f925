"""Every generator family on one task, under one fairness evaluation: which family, if any, helps the
under-represented sex most, at what cost to fidelity and privacy?

The task and protocol are the chest X-ray study's, and this study builds on a finished chestxray run (--chestxray,
default: the chestxray folder beside --out): it reads that run's plan.json (data, folds, seed, the classifier's
flags), its split files and its cells as files, and adds its own stages to the same run tree. Any finding vs No
Finding on NIH ChestX-ray14, patient-level k-fold cross-validation, a male-dominated training set, every classifier
given the same number of updates (2 n_male samples per epoch), thresholds on validation patients. Rows:
  balanced_real       n_male real women (the oracle)                                    [chestxray's cell]
  imbalanced_real     the baseline every row is compared with                           [chestxray's cell]
  loss_reweight       imbalanced, each sex half of the loss (--reweight-sex)
  oversample          imbalanced, each sex half of every epoch by sampling    [chestxray's imbalanced_reweight]
  classic_augment     imbalanced, flips + stronger affine and intensity jitter (--augment classic)
  ae                  imbalanced + conv AE images (decoded interpolations of same-class codes; vae/train_conv_ae.py)
  vae                 imbalanced + CVAE images (Korb & Hall; women of the pool only)    [chestxray's imbalanced_synth]
  gan                 imbalanced + conditional DCGAN images (gan/train_dcgan.py)
  ddpm                imbalanced + DDPM images, classifier-free guidance on sex x finding (diffusion/train_ddpm.py)
  ddpm_finding_only   imbalanced + the same number of images asked for by finding alone (Ktena et al.'s comparison
                      of what conditioning on the attribute adds): --finding-only separate trains a DDPM on the
                      finding alone (full scale); same (quick) asks the ddpm row's model, sex drawn as in the pool
  <family>_x<r>       the synthetic-amount sweep: r x the female deficit, for the family whose rows scored the
                      best mean VALIDATION any-finding AUROC over folds (chosen on validation data, never test)
Each generator trains on its fold's training pool only (compare_sets.csv: pool = every non-test, non-validation
image of the fold, both sexes; the CVAE: the pool's women) and draws n_male - n_f female images (the deficit), the
findings in the pool women's proportion; AE, GAN and DDPM also draw men (for fidelity and privacy per sex).
Class-conditional samples carry the any-finding label only: their 14 finding outputs get no loss.
Replicates: --replicates classifiers per row and fold (default: as many as the chestxray run has), each its own
seed, and --generator-seeds generators per family and fold (quick: 2); classifier replicate r trains on the samples
of generator seed r mod G (at most as many generators as replicates), and the comparisons resample generator
seeds, then classifier replicates within them, then patients, so that their CIs carry the noise of both trainings. chestxray's cells are its
replicates; one it lacks is added here with chestxray's own command (the vae row's replicates of another CVAE seed
are this study's cells, synth_vae, as chestxray's CVAE is one per fold).
Fidelity and privacy per sex are a stage per fold (classify/generator_audit.py: KID and FD in the features of the
fold's imbalanced_real classifier, the memorization audit against the fold's training pool); --ood-root adds a
stage that scores another data set (classify/ood_scores.py). The report (classify/compare_report.py) reads only
the files gathered into --out: AUROC overall / female / male, signed gap (M - F), DP and EO, each paired against
imbalanced_real on the same test patients; fidelity, privacy and cost per row.

    python -m classify.chestxray_study && python -m classify.compare_study   # quick: embedded NIH1000, CPU
    python -m classify.compare_study --dry-run             # the stage commands (reused ones marked)
    python -m classify.compare_study --scale full --out results-full/compare   # GPU, after chestxray's full run
    python -m classify.compare_study --smoke --out smoke/compare    # seconds, after chestxray's smoke run
"""
import argparse
import json
from pathlib import Path
import shutil
import time

import numpy as np
import pandas as pd

from classify.compare_generators import Generators, class_counts, generator_stages, mixed_counts, sweep_file
from classify.compare_report import FAMILIES, ROWS, row_cell, write_report
from classify.cxr_task import CONDITION_FLAGS, FEMALE, MALE, Task, classifier_stage, read_data, replicate_cell
from common.cli import ArgumentParser, name_list, nonneg_float, positive_int, run
from common.data import PROJECT_DATA
from common.errors import DataError
from common.report import save_grid
from common.runs import prepare_out_dir, write_config, write_json
from common.splits import read_sets, write_sets
from common.stages import TIMES_FILE, Stages, add_study_args, parse_scaled, planned, portable

CX_CELLS = {"balanced_real", "imbalanced_real", "imbalanced_reweight", "imbalanced_synth"}
# generator settings per scale (the classifier's and the CVAE's are the chestxray run's, so its cells are reused)
# quick: what 45 minutes of a 2-core CPU afforded beyond chestxray for one generator and classifier per cell (measured
# on fold 0's pool of 677 images: the AE 4.2 s an epoch, the DCGAN 0.125 s a step, the DDPM 0.5 s a step and 0.05 s
# a DDIM step per image with guidance); 2 generators and 3 classifiers per cell take longer (docs/compare.md, Time)
SCALES = {"quick": {"ae_epochs": 10, "gan_steps": 400, "gan_width": 16, "ddpm_steps": 200, "ddpm_size": 32,
                    "ddpm_width": 32, "ddpm_mults": "1,2,2", "ddpm_num_res": 1, "ddpm_attn_res": 8,
                    "sample_steps": 10, "finding_only": "same", "male_samples": 100, "ratios": "0.5,1,2",
                    "n_boot": 2000, "generator_seeds": 2},
          "full": {"ae_epochs": 100, "gan_steps": 20000, "gan_width": 64, "ddpm_steps": 50000, "ddpm_size": 64,
                   "ddpm_width": 128, "ddpm_mults": "1,2,2", "ddpm_num_res": 2, "ddpm_attn_res": 16,
                   "sample_steps": 100, "finding_only": "separate", "male_samples": 2000, "ratios": "0.5,1,4",
                   "n_boot": 2000, "generator_seeds": 2},
          "smoke": {"ae_epochs": 1, "gan_steps": 3, "gan_width": 8, "ddpm_steps": 3, "ddpm_size": 16,
                    "ddpm_width": 8, "ddpm_mults": "1,2", "ddpm_num_res": 1, "ddpm_attn_res": 8, "sample_steps": 3,
                    "finding_only": "same", "male_samples": 20, "ratios": "0.5,1,2", "n_boot": 50,
                    "generator_seeds": 1}}
def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, "results/compare", SCALES)
    p.add_argument("--chestxray", default=None,
                   help="the finished chestxray run this study builds on (its plan.json, split files and cells; "
                        "default: the chestxray folder beside --out, e.g. results/chestxray)")
    p.add_argument("--rows", type=name_list(list(ROWS)), default=",".join(ROWS),
                   help="comma-separated rows to run (imbalanced_real, the baseline, is always run)")
    p.add_argument("--ratios", help="the sweep's synthetic-to-deficit ratios (1 is the family's own row; empty: no "
                                    "sweep; quick 0.5,1,2: a DDPM's 4x would cost 9 more minutes)")
    p.add_argument("--finding-only", choices=["same", "separate"],
                   help="ddpm_finding_only's generator: 'separate', a DDPM trained on the finding alone (Ktena et "
                        "al.; full scale), or 'same', the ddpm row's model sampled with sex drawn as in the pool "
                        "(p(x | finding) = sum_s p(s | finding) p(x | s, finding); quick: no second training)")
    p.add_argument("--male-samples", type=positive_int,
                   help="male samples per fold and class-conditional generator, for fidelity and privacy per sex "
                        "(at most the deficit)")
    p.add_argument("--ae-epochs", type=positive_int, help="conv AE maximum epochs (early stopping on validation MSE)")
    p.add_argument("--gan-steps", type=positive_int, help="DCGAN training steps")
    p.add_argument("--gan-width", type=positive_int, help="DCGAN base width")
    p.add_argument("--ddpm-steps", type=positive_int, help="DDPM training steps (each DDPM row trains its own)")
    p.add_argument("--ddpm-size", type=positive_int,
                   help="DDPM image side (its samples are resized for the classifier)")
    p.add_argument("--ddpm-width", type=positive_int, help="DDPM U-Net base width")
    p.add_argument("--ddpm-mults", help="DDPM U-Net channel multipliers per level")
    p.add_argument("--ddpm-num-res", type=positive_int, help="DDPM residual blocks per level")
    p.add_argument("--ddpm-attn-res", type=positive_int, help="DDPM self-attention at this side (px)")
    p.add_argument("--sample-steps", type=positive_int, help="DDIM steps when sampling the DDPMs")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="classifier-free guidance scale w of the DDPMs")
    p.add_argument("--n-boot", type=positive_int, help="bootstrap resamples for CIs")
    p.add_argument("--replicates", type=positive_int, default=None,
                   help="classifiers per row and fold, each its own seed (replicate r of fold k: seed * 100 + k + "
                        "10000 r, as chestxray's); default: as many as the chestxray run has")
    p.add_argument("--generator-seeds", type=positive_int,
                   help="generators per family and fold, each its own seed (classifier replicate r trains on the "
                        "samples of generator seed r mod this); at most --replicates")
    p.add_argument("--ood-root", default=None,
                   help="a CheXpert folder (train.csv and its images; common.data.read_chexpert): every row's fold "
                        "classifiers (their mean score) rate its frontal images, an out-of-distribution test as in "
                        "Ktena et al.; AUROCs and the gap paired against imbalanced_real (no DP / EO: the "
                        "thresholds belong to the NIH validation patients)")
    p.add_argument("--ood-csv", default=None, help="the --ood-root label table (default: train.csv there)")
    args = parse_scaled(p, SCALES, argv)
    args.rows = list(dict.fromkeys(["imbalanced_real"] + args.rows.split(",")))
    if "ddpm_finding_only" in args.rows and "ddpm" not in args.rows and args.finding_only == "same":
        p.error("--rows: ddpm_finding_only with --finding-only same samples the ddpm row's model; add ddpm to --rows, "
                "or pass --finding-only separate")
    try:
        args.ratios = sorted({float(r) for r in args.ratios.split(",") if r.strip()})
    except ValueError:
        p.error(f"--ratios {args.ratios!r}: comma-separated positive numbers, e.g. 0.5,1,4")
    if any(r <= 0 for r in args.ratios):
        p.error(f"--ratios {args.ratios}: ratios must be positive")
    return args


def read_chestxray(folder, rows, ood=False):
    """The chestxray run's plan.json, checked: it has every cell the rows need and reads its labels under
    --data-root (the generators read the table there)."""
    f = Path(folder) / "plan.json"
    if not f.is_file():
        raise DataError(f"--chestxray {folder}: no plan.json there; this study builds on a finished chestxray run "
                        f"(`make chestxray`, or `python -m classify.chestxray_study --out {folder}`), or name it")
    cx = json.loads(f.read_text())
    missing = sorted({ROWS[r][0] for r in rows if ROWS[r][0] in CX_CELLS} - set(cx["conditions"]))
    if missing:
        raise DataError(f"--chestxray {folder}: that run has no {', '.join(missing)} cells; rerun it with every "
                        f"condition, or leave those rows out (--rows)")
    table = cx.get("table")
    if ood and table and (table["group"] != "sex" or table["minority"] != "F"):
        raise DataError(f"--ood-root with --chestxray {folder}: the out-of-distribution test scores CheXpert's women "
                        f"and men, and that run compares {table['minority']!r} with the rest of {table['group']}; "
                        f"leave --ood-root out")
    if cx.get("csv"):
        raise DataError(f"--chestxray {folder}: that run read its labels from --csv {cx['csv']}; the generators read "
                        f"the label table under --data-root: put it there and rerun chestxray without --csv")
    return cx


def validation_score(runs, row, folds, keep, replicates=1, gen_seeds=1):
    """Mean over folds and replicates of the validation score of the weights a row's classifiers kept (metrics.json
    history: the last epoch's with --keep last, the best with --keep best), or None before they have run."""
    scores = []
    for k in range(folds):
        for rep in range(replicates):
            f = Path(runs) / f"fold{k}" / row_folder(row, rep, gen_seeds) / "metrics.json"
            if not f.is_file():
                return None
            h = [e["val_score"] for e in json.loads(f.read_text())["history"]]
            scores.append(max(h) if keep == "best" else h[-1])
    return float(np.mean(scores))


def replicate_row_cell(row, rep, gen_seeds):
    """The classifier cell of a row's replicate rep: the row's cell, except the vae row's replicates on another
    CVAE seed than chestxray's (rep mod gen_seeds > 0): this study's synth_vae."""
    return "synth_vae" if row == "vae" and rep % gen_seeds else row_cell(row)[0]


def row_folder(row, rep, gen_seeds):
    """The classifier folder (under fold<k>) of a row's replicate rep."""
    return replicate_cell(replicate_row_cell(row, rep, gen_seeds), rep)


OWN_FLAGS = {"loss_reweight": ["--reweight-sex"], "classic_augment": ["--augment", "classic"]}


def row_classifier(stages, task, k, row, rep, fold_files, n_male, cx_replicates):
    """Fold k's classifier stage of a row's replicate rep, trained on the samples of generator seed rep mod G
    (fold_files: per generator seed {family: {what: file}}); nothing where chestxray's run has the cell already.
    chestxray's conditions get chestxray's own command (so either study reuses the other's cell)."""
    cell, fam, gs = replicate_row_cell(row, rep, len(fold_files)), row_cell(row)[1], rep % len(fold_files)
    if cell in CX_CELLS and rep < cx_replicates:
        return
    synth = fold_files[gs][fam]["train"] if fam else None
    train_set, extra = CONDITION_FLAGS.get(cell, ("imbalanced", OWN_FLAGS.get(row, ["--synthetic"] if fam else [])))
    extra = [a for e in extra for a in ([e, synth] if e == "--synthetic" else [e])]
    classifier_stage(stages, task, k, cell, train_set, extra, n_male, [synth] if synth else [], replicate=rep)


def fold_pools(t, runs, folds):
    """Per fold, from chestxray's split file: its sets, the training pool (every image of the table that is neither
    a test nor a validation image of the fold, in the table's order) and the pool's counts by sex and finding."""
    names = np.array([Path(i).name for i in t["image"]])
    finding, sex = (t["label:No Finding"] == 0).to_numpy(), t["sex"].to_numpy()
    out = []
    for k, f in enumerate(folds):
        held = read_sets(Path(runs) / f"fold{k}" / "sets.csv", names, ["test", "val"], flag="--chestxray")
        test, val = names[held["test"]], names[held["val"]]
        pool = np.nonzero(~np.isin(names, np.r_[test, val]))[0]
        pf = {s: finding[pool][sex[pool] == s] for s in (FEMALE, MALE)}
        out.append({"n_male": f["n_male"], "deficit": f["n_synthetic"], "pool": pool, "female_finding": pf[FEMALE],
                    "male_finding": pf[MALE], "pool_finding": finding[pool], "pool_sex": sex[pool],
                    "sets": {"pool": names[pool], "val": val, "test": test}})
    return out


def plan(g, task, pools, rows, male_samples, replicates=1, gen_seeds=1, cx_replicates=1):
    """The study's stages before the sweep, a pure function of its settings: per fold and generator seed each
    generator family's training and samples, and `replicates` classifiers per row (those chestxray's run lacks).
    Returns (stages, files per fold and generator seed: {family: {what: samples file}})."""
    stages = Stages(dry=True)
    families = [ROWS[r][1] for r in rows if ROWS[r][1]]
    files = []
    for k, fp in enumerate(pools):
        n = fp["deficit"]
        counts = {FEMALE: class_counts(n, fp["female_finding"], FEMALE),
                  MALE: class_counts(min(n, male_samples), fp["male_finding"], MALE),
                  "mixed": mixed_counts(n, fp["pool_finding"], fp["pool_sex"]), "n": n}
        files.append([{fam: generator_stages(stages, g, k, fam, counts, gs) for fam in families}
                      for gs in range(gen_seeds)])
        for rep in range(replicates):
            for row in rows:
                row_classifier(stages, task, k, row, rep, files[k], fp["n_male"], cx_replicates)
    return stages, files


def audit_stages(stages, g, rows, files, data_root, seed):
    """Per fold: KID, FD and the memorization audit of every generator row's samples (classify/generator_audit.py;
    generator seed 0's)."""
    wanted = [r for r in rows if r in ROWS and ROWS[r][1]]
    for k, f in enumerate(files):
        r, f = g.runs / f"fold{k}", f[0]  # generator seed 0's samples
        samples = [a for row in wanted for x in f[ROWS[row][1]].values() for a in ("--samples", f"{row}={x}")]
        deps = [r / "imbalanced_real" / "metrics.json", *[x for row in wanted for x in f[ROWS[row][1]].values()]]
        stages.output("classify.generator_audit", [
            "--data-root", data_root, "--sets", r / "sets.csv", "--pool-sets", r / "compare_sets.csv", "--features",
            r / "imbalanced_real" / "ckpt.pt", *samples, "--seed", seed, "--device", g.device,
            *(["--pairs-dir", r] if k == 0 else []), "--out", r / "audit.json"], r / "audit.json", deps=deps)


def ood_stage(stages, g, rows, folds, ood_root, ood_csv, size, replicates=1, gen_seeds=1):
    """Every row's fold classifiers (all its replicates: their mean score) score the --ood-root images
    (classify/ood_scores.py)."""
    ckpts = {row: [g.runs / f"fold{k}" / row_folder(row, rep, gen_seeds) / "ckpt.pt" for k in range(folds)
                   for rep in range(replicates)] for row in rows}
    out = g.runs / "ood_preds.csv"
    stages.output("classify.ood_scores", [
        "--ood-root", ood_root, *(["--ood-csv", ood_csv] if ood_csv else []),
        *[a for row, c in ckpts.items() for x in c for a in ("--cell", f"{row}={x}")], "--size", size,
        "--device", g.device, "--out", out], out, record=out.with_suffix(".json"),
        deps=[c.parent / "metrics.json" for cs in ckpts.values() for c in cs])


def sweep(stages, g, task, pools, families, ratios, keep, replicates=1, gen_seeds=1):
    """The ratio sweep: the family with the best mean validation AUROC (over folds and replicates), once its rows
    have run (chosen on validation data, never test). Returns (sweep rows, the choice)."""
    scores = {f: validation_score(g.runs, f, len(pools), keep, replicates, gen_seeds)
              for f in FAMILIES if f in families}
    best = None if not scores or any(v is None for v in scores.values()) else max(scores, key=scores.get)
    rows = []
    if best and ratios:
        for ratio in [r for r in ratios if r != 1]:
            row = f"{best}_x{ratio:g}"
            rows.append(row)
            for k, fp in enumerate(pools):
                f = [sweep_file(stages, g, k, best, ratio, fp["deficit"], fp["female_finding"], gs)
                     for gs in range(gen_seeds)]
                for rep in range(replicates):
                    classifier_stage(stages, task, k, row_cell(row)[0], "imbalanced", ["--synthetic", f[rep % gen_seeds]],
                                     fp["n_male"], [f[rep % gen_seeds]], replicate=rep)
    elif ratios and families:
        print(f"# the ratio sweep ({ratios}) follows once the generator rows have run: it takes the family with "
              f"the best mean validation any-finding AUROC (a rerun of this command adds its stages)")
    return rows, {"validation_any_auroc": scores, "family": best, "ratios": ratios}


def sample_grids(files, rows, out):
    """One grid per generator row from fold 0 (generator seed 0): a row per class (female / male x No Finding /
    finding)."""
    for row in [r for r in rows if r in ROWS and ROWS[r][1]]:
        imgs, labels = [], []
        for f in files[0][0][ROWS[row][1]].values():
            with np.load(f) as z:
                lab, images = z["labels"], z["images"]
                names = [str(n) for n in z["class_names"]] if lab.ndim == 1 else None
            if names is None:  # the CVAE's file: female images with drawn NIH label vectors
                imgs.append(images[:8])
                labels.append("F (CVAE)")
                continue
            for c in sorted(set(lab.tolist())):
                pick = np.nonzero(lab == c)[0][:8]
                if len(pick) == 8:
                    imgs.append(images[pick])
                    labels.append(names[c])
        if imgs:
            save_grid(np.concatenate(imgs), out / f"samples_{row}.png", nrow=len(imgs), row_labels=labels,
                      title=f"{row}: samples of fold 0's generator (a row per class)")


def cost(runs, files, rows, finding_only):
    """Generator training and sampling seconds per fold (mean; generator seed 0), from the stages' metrics.json and
    samples meta, and the training arithmetic over the folds (sorted bf16_autocast flags, None where a run recorded
    none; not for a row whose model is another row's)."""
    out = {}
    for row in [r for r in rows if r in ROWS and ROWS[r][1]]:
        fam = ROWS[row][1]
        shared = fam == "ddpm_finding" and finding_only == "same"  # the ddpm row's model: no training of its own
        folder = {"vae": "cvae"}.get(fam, fam)
        train, sample, bf16 = [], [], set()
        for k, f in enumerate(f[0] for f in files):
            m = {} if shared else json.loads((Path(runs) / f"fold{k}" / folder / "metrics.json").read_text())
            train.append(0.0 if shared else m.get("seconds", m.get("wall_s_this_session", np.nan)))
            bf16.add(m.get("bf16_autocast"))
            with np.load(f[fam]["train"]) as z:
                sample.append(json.loads(str(z["meta"])).get("seconds", np.nan))
        out[row] = {"train_s_per_fold": float(np.mean(train)), "sample_female_s_per_fold": float(np.mean(sample)),
                    **({} if shared else {"bf16_autocast": sorted(bf16, key=str)})}
    return out


def gather(runs, rows, files, finding_only, ood, out, replicates=1):
    """The files the report reads, in --out: preds.csv.gz (every row's out-of-fold predictions, per replicate;
    gzip: 12 rows x 1,000 images x 45 columns are 5 MB as text, 1.5 MB compressed), audit.json (each fold's),
    cost.json, the samples and closest-pairs figures, ood_preds.csv."""
    runs, gen_seeds = Path(runs), len(files[0])
    parts = [pd.read_csv(runs / f"fold{k}" / row_folder(row, rep, gen_seeds) / "preds.csv").assign(condition=row,
                                                                                                   replicate=rep)
             for rep in range(replicates) for row in rows for k in range(len(files))]
    pd.concat(parts, ignore_index=True).to_csv(out / "preds.csv.gz", index=False, float_format="%.9g",
                                               compression={"method": "gzip", "mtime": 0})  # the same bytes each run
    audits = [json.loads((runs / f"fold{k}" / "audit.json").read_text()) for k in range(len(files))]
    write_json(out / "audit.json", {"n_per_fold": [a["n"] for a in audits], "folds": [a["rows"] for a in audits]})
    write_json(out / "cost.json", cost(runs, files, rows, finding_only))
    sample_grids(files, rows, out)
    for png in sorted((runs / "fold0").glob("closest_pairs_*.png")):
        if png.stem[len("closest_pairs_"):] in rows:
            shutil.copyfile(png, out / png.name)
    if ood:
        shutil.copyfile(runs / "ood_preds.csv", out / "ood_preds.csv")


def main(args):
    t0 = time.time()
    cx_dir = args.chestxray or str(Path(args.out).parent / "chestxray")
    cx = read_chestxray(cx_dir, args.rows, bool(args.ood_root))
    runs = Path(args.runs or cx["runs"])  # chestxray's run tree: its cells and split files are read from there
    if not all((runs / f"fold{k}" / "sets.csv").is_file() for k in range(cx["folds"])):
        if args.dry_run:  # a fresh clone has chestxray's plan.json but not its run tree
            print(f"# compare builds on the chestxray run tree {runs}, which is not here: `make chestxray` makes it "
                  f"(`make chestxray DRY=1` lists its stages); compare's own stages are listed once it exists")
            return
        raise DataError(f"--chestxray {cx_dir}: its run tree {runs} (split files, cells) is not here; run that "
                        f"chestxray study first (`make chestxray`), or pass --runs where it is")
    cx_replicates = cx.get("replicates", 1)
    replicates = args.replicates or cx_replicates
    if args.generator_seeds > replicates:  # a generator no classifier trains on would be wasted
        print(f"# --generator-seeds {args.generator_seeds} > --replicates {replicates}: {replicates} generator(s) per "
              f"family and fold")
        args.generator_seeds = replicates
    t = read_data(cx["data_root"], None, cx["images_per_sex"], cx["size"], cx["folds"])
    pools = fold_pools(t, runs, cx["fold_sets"])
    default_root = Path(cx["data_root"]).resolve() == (PROJECT_DATA / "nih_cxr14").resolve()
    g = Generators(runs=runs, seed=cx["seed"], device=args.device,
                   root_argv=() if default_root else ("--data-root", cx["data_root"]), finding_only=args.finding_only,
                   **{k: getattr(args, k) for k in ("ae_epochs", "gan_steps", "gan_width", "ddpm_steps", "ddpm_size",
                                                    "ddpm_width", "ddpm_mults", "ddpm_num_res", "ddpm_attn_res",
                                                    "sample_steps", "guidance")})
    task = Task(data_argv=tuple(cx["data_argv"]), seed=cx["seed"], device=args.device,
                classifier_argv=tuple(cx["classifier_argv"]), runs=runs)
    changed = set()
    for k, fp in enumerate(pools):
        if write_sets(runs / f"fold{k}" / "compare_sets.csv", fp["sets"], dry=args.dry_run) and args.dry_run:
            changed.add(runs / f"fold{k}" / "compare_sets.csv")
    stages, files = plan(g, task, pools, args.rows, args.male_samples, replicates, args.generator_seeds,
                         cx_replicates)
    audit_stages(stages, g, args.rows, files, cx["data_root"], cx["seed"])
    stages.changed = changed
    families = [ROWS[r][1] for r in args.rows if ROWS[r][1]]

    def then():  # the sweep (once the generator rows have run: it is chosen on their validation scores), OOD
        sweep_rows, choice = sweep(stages, g, task, pools, families, args.ratios, cx["keep"], replicates,
                                   args.generator_seeds)
        if args.ood_root:
            ood_stage(stages, g, args.rows + sweep_rows, cx["folds"], portable(args.ood_root),
                      portable(args.ood_csv) if args.ood_csv else None, cx["size"], replicates, args.generator_seeds)
        return args.rows + sweep_rows, choice
    stages.log = runs / TIMES_FILE  # chestxray's: one file per run tree
    if args.dry_run or args.makefile:
        then()
        planned(stages, args.dry_run, args.makefile, f"the tables, figures and summary.json in {args.out}")
        return
    out = prepare_out_dir(args.out, args.force)
    write_config(out, args, data=cx["data"], weights=cx["weights"])
    stages.run_all()
    first = len(stages.rules)
    rows, choice = then()
    stages.run_all(start=first)
    gather(runs, rows, files, args.finding_only, args.ood_root, out, replicates)
    stages.record(out / "stages.json")
    write_json(out / "plan.json", {
        "study": "compare", "chestxray": portable(cx_dir), "scale": args.scale, "folds": cx["folds"],
        "female_fraction": cx["female_fraction"], "arch": cx["arch"], "size": cx["size"],
        "pretrained": cx["pretrained"], "data": cx["data"], "table": cx.get("table"), "n_boot": args.n_boot,
        "seed": cx["seed"],
        "rows": rows, "replicates": replicates, "generator_seeds": args.generator_seeds, "sweep": choice, "finding_only": args.finding_only, "ood": bool(args.ood_root),
        "seconds": time.time() - t0})
    return write_report(out)


if __name__ == "__main__":
    run(main, parse_args)
