"""The medmnist study's report (the plan is classify/medmnist_study.py): reads only the files the study gathered
into --out, and writes Table 2, the paired comparisons, summary.json and README.md.

    plan.json      the settings the report needs (seeds, subset sizes, classifier recipe, missing data sets, time)
    preds.csv      one row per official test image, data set, method (None / AE / cVAE / cGAN) and seed
    samples/       seed 0's sample grid of each generator (shown in README.md)

Each generator is compared with None per data set, paired by seed on the same test images (two-level bootstrap:
seeds, then test images; docs/METHODS.md).

    python -m classify.medmnist_report --out results/medmnist    # rebuild a finished run's report from its files
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError
from common.report import arithmetic, footer, markdown_table, report_command, stage_times, write_table
from common.runs import write_json
from fairness.compare import (COMPARISON_HEADER, answer, comparison, comparison_rows, family_facts,
                              paired_difference_replicates, with_holm)
from fairness.metrics import auroc_ovr

METHODS = ["None", "AE", "cVAE", "cGAN"]  # None (real images only) first: each generator is compared with it
# Chaptoukaev Table 2 AUC (150/class subsets), docs/METHODS.md; and MedMNIST v2 ResNet-18 (28) on the full sets.
PAPER_AUC = {"breast": [0.872, 0.885, 0.901, 0.850], "pneumonia": [0.942, 0.949, 0.942, 0.948]}
MEDMNIST_V2 = {"path": (.983, .907), "derma": (.917, .735), "oct": (.943, .743), "pneumonia": (.944, .854),
               "breast": (.901, .863), "organa": (.997, .935), "organc": (.992, .900), "organs": (.972, .782)}
TABLE2_HEADER = ["data set", *[f"{m} AUC" for m in METHODS], *[f"{m} ACC" for m in METHODS],
                 "paper AUC (None/AE/cVAE/cGAN)", "MedMNIST v2 full-data AUC/ACC"]


def read_preds(path):
    """preds.csv -> {dataset: {method: [(labels, probs (N, K), image ids) per seed]}}, each in image order."""
    df = pd.read_csv(path, dtype={"method": str}, keep_default_na=False, na_values=[""])  # "None" is a method
    out = {}
    for (flag, method, seed), d in df.groupby(["dataset", "method", "seed"], sort=True):
        d = d.sort_values("image")
        probs = d[[c for c in d.columns if c.startswith("p_") and d[c].notna().all()]].to_numpy(float)
        out.setdefault(flag, {}).setdefault(method, []).append((d["label"].to_numpy(), probs, d["image"].to_numpy()))
        seeds = out[flag].setdefault("seeds of " + method, [])
        seeds.append(seed)
    for flag, by in out.items():  # pairs are made by position: every method must have the same seeds
        if len({tuple(v) for k, v in by.items() if k.startswith("seeds of ")}) != 1:
            raise DataError(f"{path}: the methods of {flag} were run with different seeds; a paired comparison "
                            f"needs the same seeds for every method (rerun the study)")
        for k in [k for k in by if k.startswith("seeds of ")]:
            del by[k]
    return out


def auc_acc(y, probs):
    return auroc_ovr(y, probs), float((probs.argmax(1) == y).mean())


def comparisons(preds, n_boot):
    """Each generator vs None per data set, on AUC and ACC: replicates = seeds on the same official test images
    (two-level bootstrap: seeds, then test images; the images are the units: MedMNIST has no patient ids)."""
    rows = []
    for flag, by in preds.items():
        for method in METHODS[1:]:
            for k, metric in enumerate(("AUC", "ACC")):
                reps = []
                for (y, pa, ida), (_, pb, idb) in zip(by[method], by["None"]):
                    assert np.array_equal(ida, idb), "a paired comparison needs the same test images"
                    reps.append((lambda i, y=y, p=pa, k=k: auc_acc(y[i], p[i])[k],
                                 lambda i, y=y, p=pb, k=k: auc_acc(y[i], p[i])[k], ida))
                r = paired_difference_replicates(reps, n_boot=n_boot, seed=0)
                rows.append({**comparison(f"{flag}mnist {metric}", method, "None", r), "dataset": flag})
    # declared in code: the AUC of each generator against None per data set is the study's question (the
    # primary family, Holm over it alone); the ACC rows are exploratory
    return with_holm(rows, primary=[(r["metric"], r["a"], r["b"]) for r in rows if r["metric"].endswith(" AUC")])


def cell(v, best):
    s = f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"
    return f"**{s}**" if best else s


def read_run(out):
    """plan.json of a finished run as a dict; a missing plan.json or preds.csv stops with one line."""
    for name in ("plan.json", "preds.csv"):
        if not (out / name).is_file():
            raise DataError(f"--out {out}: no {name} there (run `python -m classify.medmnist_study --out {out}` "
                            f"first; the report reads the files a finished run gathered)")
    return json.loads((out / "plan.json").read_text())


def table2_rows(auc, acc, missing):
    """Per data set: each method's AUC and ACC (mean ± std over seeds, best in bold), the paper's and MedMNIST
    v2's; the missing data sets as 'not run'."""
    rows = []
    for flag in auc:
        ba = max(METHODS, key=lambda m: np.mean(auc[flag][m]))
        bc = max(METHODS, key=lambda m: np.mean(acc[flag][m]))
        paper = " / ".join(f"{v:.3f}" for v in PAPER_AUC[flag]) if flag in PAPER_AUC else "n/a"
        ref = "{:.3f} / {:.3f}".format(*MEDMNIST_V2[flag]) if flag in MEDMNIST_V2 else "n/a"
        rows.append([f"{flag}mnist", *[cell(auc[flag][m], m == ba) for m in METHODS],
                     *[cell(acc[flag][m], m == bc) for m in METHODS], paper, ref])
    for flag in missing:
        rows.append([f"{flag}mnist", *["not run"] * 8, " / ".join(f"{v:.3f}" for v in PAPER_AUC[flag])
                     if flag in PAPER_AUC else "n/a", "{:.3f} / {:.3f}".format(*MEDMNIST_V2.get(flag, (np.nan,) * 2))])
    return rows


def table2_notes(plan):
    """The notes under Table 2: the protocol as run, the missing data sets, and how it differs from the paper."""
    from classify.medmnist_study import SCALES  # the quick scale's epochs and width, chosen on validation data
    chosen = (SCALES["quick"]["epochs"], SCALES["quick"]["width"])
    missing = plan["datasets_missing"]
    patience = f" (early stopping patience {plan['patience']})" if plan["recipe"] == "paper" else ""
    return [f"Ours: mean ± std over {plan['seeds']} seeds (subset, generators and classifier reseeded), test split of "
            f"the official files; best per row in bold. {plan['per_class']} real images per class (train:val 9:1), "
            f"+{plan['n_gen']} generated per class. Classifier: ResNet-18 (28), width {plan['width']}"
            f"{' (ResNet-18 itself)' if plan['width'] == 64 else ' (every stage narrowed; CPU quick scale)'}, "
            f"{plan['recipe']} recipe, batch {plan['batch_size']}, {plan['epochs']} epochs"
            f"{patience}, weights kept at the best validation {'AUC' if plan['select'] == 'auc' else 'loss'}. Scale: "
            f"{plan['scale']}; wall time {plan['seconds'] / 60:.1f} min (this invocation; stages it reused not "
            f"counted).",
            "Generators' training arithmetic: " + ", ".join(
                f"{m} {arithmetic(v)}" for m, v in plan.get("generator_bf16", {}).items()) + " (bf16: --amp auto "
            "on a CPU with bf16 instructions, for a network whose bf16 check agreed and ran faster, BF16_CHECKED; "
            "sampling in fp32); the classifiers fp32."
            if "generator_bf16" in plan else "Generators' training arithmetic: not recorded by this run.",
            "Missing data sets (official .npz not under --data-root; fetch with `python -m common.download medmnist "
            f"--root DIR`): {', '.join(missing) if missing else 'none'}.",
            "Our embedded PneumoniaMNIST is rebuilt from two public partial copies (test split 621 images, not the "
            "official 624), so its numbers are close to, not identical with, the official split's.",
            "Protocol differences from the paper (not tuned toward it): our subset is 150 images per class from the "
            "official training split, split 9:1 into training and validation, and weights are kept at the best "
            f"validation {'AUC' if plan['select'] == 'auc' else 'loss'}; the paper reports the best test accuracy "
            "within 100 epochs (a choice made on test data). The quick scale's recipe (Adam, batch 32, weights by "
            "validation AUC) was chosen on the official validation split, which no stage uses, among five candidates "
            "by a rule fixed before that run (bench/medmnist_settings.py, results/bench/medmnist_settings.md), and "
            f"then its epochs and width among 3 x 3 the same way (results/bench/medmnist_size.md: {chosen[0]} epochs, "
            f"width {chosen[1]}" + ("; this run's " + f"{plan['epochs']} epochs, width {plan['width']} are not that "
                                    "choice" if (plan["epochs"], plan["width"]) != chosen else "") + ").",
            "Do not read a method as better from this table: the paired comparisons are in comparisons.md."]


def write_comparisons(out, rows_cmp, seeds, n_boot):
    """comparisons.md / .csv; returns the answers (one sentence per AUC comparison)."""
    answers = [answer(r, f"Does {r['a']} augmentation change {r['metric']} against None")
               for r in rows_cmp if r["metric"].endswith("AUC")]
    write_table(out / "comparisons", COMPARISON_HEADER, comparison_rows(rows_cmp),
                title="Each generator's augmentation against None, paired by seed on the same official test images",
                notes=[f"a - b, mean over {seeds} seeds; 95% CI and p from a two-level bootstrap (seeds, then "
                       f"test images; {n_boot} resamples, percentile); units are test images (MedMNIST has no "
                       f"patient ids). Primary: the AUC rows (the questions, declared in code), p (Holm) over "
                       f"them alone; the ACC rows are exploratory (Holm among themselves). MDE = (z + 0.84) x "
                       f"bootstrap SE at the family's first Holm step. Recompute from preds.csv."] + answers)
    return answers


def summary_of(rows_cmp, answers, auc, acc, plan):
    """summary.json's content, in its order."""
    return {"comparisons": rows_cmp, "answers": answers, **family_facts(rows_cmp, plan["n_boot"]),
            "auc": {f: {m: float(np.mean(v)) for m, v in d.items()} for f, d in auc.items()},
            "acc": {f: {m: float(np.mean(v)) for m, v in d.items()} for f, d in acc.items()},
            "auc_std": {f: {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in d.items()}
                        for f, d in auc.items()},
            "auc_runs": auc, "acc_runs": acc, "seeds": plan["seeds"], "scale": plan["scale"],
            "datasets_missing": plan["datasets_missing"], "seconds": plan["seconds"], "recipe": plan["recipe"],
            "epochs": plan["epochs"], "batch_size": plan["batch_size"], "select": plan["select"],
            "classifier_width": plan["width"]}


def write_readme(out, answers, rows, plan):
    """README.md: the answers, Table 2, how to read it, the sample grids, the command and commit."""
    grids = sorted((out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    text = ["# MedMNIST: does generative augmentation help a small-data classifier?", "",
            *[f"- {a}" for a in answers], "", "## Table 2: test AUC and ACC, None / AE / cVAE / cGAN augmentation", "",
            markdown_table(TABLE2_HEADER, rows), "", "## How to read it", "",
            f"A ResNet-18 (28) is trained on {plan['per_class']} real images per class alone (None) or with "
            f"+{plan['n_gen']} per class from a fully-connected AE, cVAE or cGAN; each cell is the mean ± std over "
            f"{plan['seeds']} seeds, the best per row in bold, beside the paper's AUC and MedMNIST v2's full-data "
            f"ResNet-18. A bold cell is not a finding: the answers above come from comparisons.md, each generator "
            f"against None paired by seed on the same test images (two-level bootstrap CI, Holm over the AUC rows); "
            f"'cannot tell at this scale' means the CI holds 0 or the difference does not survive Holm's "
            f"correction, and the MDE is the smallest effect the design would have seen. table2.md lists the "
            f"protocol's differences from the paper. Scale {plan['scale']}; preds.csv holds one row per test image, "
            f"method and seed, so every number here can be recomputed from it "
            f"(`python -m classify.medmnist_report --out {out}`).", ""]
    if grids:
        text += ["Seed 0's generated images: " + ", ".join(f"[{p.stem}](samples/{p.name})" for p in grids) + ".", ""]
    (out / "README.md").write_text("\n".join(text + [footer(), ""]))


def write_report(out):
    """Table 2, the paired comparisons, summary.json and README.md, from plan.json and preds.csv alone."""
    out = Path(out)
    plan = read_run(out)
    preds = read_preds(out / "preds.csv")
    auc = {f: {m: [auc_acc(y, p)[0] for y, p, _ in by[m]] for m in METHODS} for f, by in preds.items()}
    acc = {f: {m: [auc_acc(y, p)[1] for y, p, _ in by[m]] for m in METHODS} for f, by in preds.items()}
    rows_cmp = comparisons(preds, plan["n_boot"])
    rows = table2_rows(auc, acc, plan["datasets_missing"])
    write_table(out / "table2", TABLE2_HEADER, rows,
                title="Table 2: test AUC and ACC, None / AE / cVAE / cGAN augmentation", notes=table2_notes(plan))
    answers = write_comparisons(out, rows_cmp, plan["seeds"], plan["n_boot"])
    write_json(out / "summary.json", {**summary_of(rows_cmp, answers, auc, acc, plan), "stage_times": stage_times(out)})
    write_readme(out, answers, rows, plan)
    print((out / "table2.md").read_text())
    print((out / "comparisons.md").read_text())


if __name__ == "__main__":
    report_command(__doc__, write_report, "classify.medmnist_study",
                   needs=("plan.json", "preds.csv"))
