"""The fairgen study's report, from files alone: what the study gathered into --out (plan.json, stages.json,
preds_<modality>.csv(.gz), blinded pairs, figures) and the stage files plan.json names (the eval and downstream
stages' metrics.json, FairDiffusion's sigma search, the samples). Writes Table 1 (ours and the paper's), the paired
comparisons (gaps.md for more than two groups), FD / KID / memorization, figures, summary.json and README.md.

    python -m diffusion.fairgen_report --out results/fairgen     # rebuild a finished run's report
"""
import json
from pathlib import Path
import time

import numpy as np

from common.errors import DataError
from common.report import footer, markdown_table, report_command, save_grid, stage_times, write_table
from common.runs import write_json
from diffusion.fairgen_compare import (METHODS, comparisons_from_preds, gap_tables, read_preds, replicate_words,
                                       signed_gap_name, table1_from_preds)
from diffusion.fairgen_published import write_published
from fairness.compare import COMPARISON_HEADER, answer, comparison_rows, family_facts
from fairness.figures import bars, lines, radar

GAP_NOTE = ("DP, EO and NAR are max - min gaps between groups (never below 0), and resampling inflates a gap (two "
            "groups that happen to score alike in the test set rarely do in a resample), so their percentile CI "
            "cannot contain 0 and can sit above the value (marked †): read it as the range the gap takes under "
            "test-set noise, not as a confidence interval or a test. Whether a method changes a gap: comparisons.md "
            "(signed AUROC gap, paired) and gaps.md (permutation nulls).")
ANSWERS = [("Is FairGen (with reweighting) fairer than its base?", ""),  # summary's answers: essp<suffix>, gap<suffix>
           ("Is FairGen fairer than FairDiffusion, both with reweighting?", "_vs_fairdiffusion")]


# ---- the study's files as summary.json ----------------------------------------------------------------------------
def read_json(path):  # a file the study or a stage wrote
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it ({type(e).__name__}); is --out a finished fairgen_study run?") from e


def preds_file(out, name):
    """The gathered preds of a modality in --out: preds_<name>.csv, or .csv.gz above 2 MB."""
    path = out / f"preds_{name}.csv"
    return path if path.is_file() else path.with_suffix(".csv.gz")


def cell_result(c, preds, seed, n_boot):
    """One modality and split seed of summary.json: plan.json's facts, the eval stage's FD / memorization, the
    downstream stage's ratio sweep, Table 1 from the split's preds rows, the seconds per phase."""
    ev, down = read_json(c["files"]["eval"]), read_json(c["files"]["downstream"])
    res = {k: c[k] for k in ("data", "classes", "attrs", "labels", "notes", "n_train", "n_test", "synthetic_per_class",
                             "samples_file", "judge")}
    res["fd"], res["memorization"] = ev["fd"], ev["memorization"]
    sweep = {k: {m: {float(q): a for q, a in v.items()} for m, v in d.items()} for k, d in down["sweep"].items()}
    res["downstream"] = {"sweep": sweep, "table1": table1_from_preds(preds[preds["split_seed"] == seed], n_boot, seed)}
    res["preds"] = c["preds"]
    # per phase: the study invocation's (a reused stage takes ~0); downstream_*: the downstream stage's own
    more = read_json(c["files"]["downstream_more"])["seconds"] if "downstream_more" in c["files"] else {}
    res["seconds"] = {**c["seconds"], **{f"downstream_{k}": v for k, v in down["seconds"].items()},
                      **{f"downstream_gen1plus_{k}": v for k, v in more.items()},
                      "total": sum(c["seconds"].values())}
    return res


def load_summary(out, plan, stages):
    """summary.json's first part: the settings, each modality's results per split seed, the stages run."""
    summary = {**{k: plan[k] for k in ("scale", "judge", "preset", "dpo")}, "modalities": {}}
    for name, seeds in plan["modalities"].items():
        preds = read_preds(preds_file(out, name))
        summary["modalities"][name] = {key: cell_result(c, preds, int(key.removeprefix("seed")), plan["n_boot"])
                                       for key, c in seeds.items()}
    summary["seconds"], summary["reused"], summary["stages"] = stages["seconds"], stages["reused"], stages["stages"]
    return {**summary, "stage_times": stage_times(out)}


# ---- tables -------------------------------------------------------------------------------------------------------
def fmt(entry, scale=100.0, digits=2):
    """'value [lo, hi]', with a dagger where the value lies outside its percentile CI (see GAP_NOTE)."""
    v, (lo, hi) = entry["value"], entry["ci"]
    mark = "†" if not lo <= v <= hi else ""
    return f"{v * scale:.{digits}f}{mark} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def modality_rows(summary, out, name, rows):
    """One modality (split seed 0) into summary.json's tables and into the rows of Table 1, fid, subgroup_fidelity
    and memorization; returns its tag (the name, with PHANTOM where it is)."""
    res = summary["modalities"][name]["seed0"]
    summary["preds"][name] = preds_file(out, name).name
    tag = name + (" (PHANTOM)" if res["data"] == "phantom" else "")
    t1, fd = res["downstream"]["table1"], res["fd"]
    summary["table1"][name] = {m: {k: t1[m][k] for k in ("essp_acc", "dp", "eo", "nar", "accuracy")} for m in t1}
    rows["t1"] += [[tag, m, fmt(e["essp_acc"]), fmt(e["dp"]), fmt(e["eo"]), fmt(e["nar"], 1, 3), fmt(e["accuracy"]),
                    fmt(e["auroc"], 1, 3) if "auroc" in e else "n/a",
                    " / ".join(f"{v:.3f}" for v in e["accuracy"]["seeds"])] for m, e in t1.items()]
    summary["fid"][name] = {m: fd[m]["fd"] for m in METHODS}
    summary["fid_var"][name] = {m: fd[m]["subgroup_variance"] for m in METHODS}
    summary["kid"][name] = {m: fd[m]["kid"] for m in METHODS}
    for m in METHODS:
        g = "; ".join(f"{k} {v['fd']:.2f}" for k, v in fd[m]["groups_equal_n"].items())
        rows["fd"].append([tag, m, f"{fd[m]['fd']:.2f}", f"{fd[m]['n_real']} / {fd[m]['n_fake']}",
                           f"{g} (n={fd['n_equal']} each)", f"{fd[m]['subgroup_variance']:.3f}"])
        rows["sub"] += [[tag, m, k, f"{fd[m]['groups_equal_n'][k]['fd']:.2f}", f"{v['mean']:.3g} ± {v['std']:.2g}",
                         v["m"], f"{fd[m]['groups'][k]['n_real']} / {fd[m]['groups'][k]['n_fake']}"]
                        for k, v in fd[m]["kid"].items()]
        mm = res["memorization"][m]
        rows["mem"].append([tag, m, f"{100 * mm['fraction_copies']:.2f}%", f"{mm['pixel_nn_rmse']['median']:.3f}",
                            f"{mm['train_to_train_nn_rmse']['median']:.3f}",
                            f"{100 * mm['fraction_closer_than_train_p1']:.1f}%"])
    folder = out / "blinded_pairs" / name  # the study gathered it; diffusion/annotate.py serves it
    res["blinded_pairs"] = {"folder": str(folder), "n_pairs": len(read_json(folder / "pairs.json")["pairs"]),
                            "serve": f"python -m diffusion.annotate --serve {folder} --annotators \"Dr A,Dr B\""}
    return tag


def fair_bayes(path, window):
    """FairDiffusion's sigma search (its stage's metrics.json): final sigma, GP updates, mean batch loss gap over the
    first and the last `window` steps."""
    fb = read_json(path)["fair_bayes"]
    gaps = [t[-1] for t in fb["trajectory"]]
    return {**{k: fb[k] for k in ("groups", "sigma_last_step", "sigma_next", "gp_updates")},
            "mean_gap_first_window": float(np.mean(gaps[:window])),
            "mean_gap_last_window": float(np.mean(gaps[-window:]))}


def modality_figures(out, name, tag, res, samples, replicates):
    """Sample grids (from the samples plan.json names), per-group AUROC radar, accuracy vs ratio, DP / EO bars."""
    for m in METHODS:
        z = np.load(samples[m])
        pick = np.concatenate([np.nonzero(z["labels"] == c)[0][:6] for c in range(len(res["classes"]))])
        save_grid(z["images"][pick], out / f"samples_{name}_{m}.png", nrow=len(res["classes"]),
                  title=f"{tag}: {m} samples, generator 0 (rows: attribute|disease)", row_labels=res["classes"])
    t1 = res["downstream"]["table1"]
    radar({m: {g: t1[m].get(f"auroc[{g}]", {"value": np.nan})["value"] for g in res["attrs"]}
           for m in ["real only"] + METHODS}, out / f"radar_auc_{name}.png",
          f"Per-group AUROC, ViT, ratio 1.0, mean of {replicates} ({tag})")
    sw = res["downstream"]["sweep"]
    lines({f"{k} ({m})": v for k, d in sw.items() for m, v in d.items()}, out / f"accuracy_vs_ratio_{name}.png",
          f"Test accuracy vs synthetic ratio, one seed, generator 0 ({tag})", "synthetic / real training images",
          "accuracy")
    bars({m: {"DP": (t1[m]["dp"]["value"] * 100, [c * 100 for c in t1[m]["dp"]["ci"]]),
              "EO": (t1[m]["eo"]["value"] * 100, [c * 100 for c in t1[m]["eo"]["ci"]])} for m in t1},
         out / f"dp_eo_{name}.png", f"DP and EO x100, ViT, mean of {replicates} ({tag})", "x100")


def fairer(comps, name, b, label, suffix, gap_metric):
    """The answer sentences (ESSP and the signed AUROC gap, gap_metric) of FairGen + reweighting against cell b of
    one modality."""
    paper = {c["metric"]: c for c in comps if (c["a"], c["b"]) == ("fairgen + reweighting", b)}
    e, g = paper["ESSP (accuracy)"], paper[gap_metric]
    return {"essp" + suffix: answer(e, f"{name}: ESSP (accuracy, fraction), FairGen + reweighting "
                                       f"{e['value_a']:.3f} vs {label} {e['value_b']:.3f}, difference"),
            "gap" + suffix: answer(g, f"{name}: {gap_metric}, FairGen + reweighting {g['value_a']:+.3f} vs {label} "
                                      f"{g['value_b']:+.3f} (nearer 0 is fairer), difference")}


def modality_comparisons(summary, out, name, n_boot_compare):
    """One modality's comparisons, gaps and answers from its preds file in --out, into summary; returns the rows of
    comparisons.md and gaps.md."""
    res = summary["modalities"][name]["seed0"]
    df = read_preds(out / summary["preds"][name])  # the report's comparisons come from the file alone
    comps = [{**c, "modality": name} for c in comparisons_from_preds(df, res["attrs"], n_boot_compare)]
    summary["comparisons"] += comps
    summary["primary_families"][name] = family_facts(comps, n_boot_compare)
    gap = signed_gap_name(res["attrs"])
    rows = [[name] + comparison_rows([c])[0][:2] + [f"{c['value_a']:.3f}", f"{c['value_b']:.3f}"] +
            comparison_rows([c])[0][2:] for c in comps]
    gaps = gap_tables(df, res["attrs"], n_boot_compare)
    if gaps:
        summary["gaps"][name] = gaps
    gap_rows = [[name, cell, f"{v['gap']:.3f}", f"{v.get('null_median', float('nan')):.3f}", f"{v['excess']:+.3f}",
                 f"{v['p']:.3g}"] for cell, v in gaps.items()]
    summary["answers"][name] = {
        "question": "Is FairGen (with reweighting) fairer than its base (the plain DDPM's data, no reweighting)?",
        **fairer(comps, name, "base", "base", "", gap),
        "question_fairdiffusion": "Is FairGen fairer than FairDiffusion, both with reweighting?",
        **fairer(comps, name, "fairdiffusion + reweighting", "FairDiffusion + reweighting", "_vs_fairdiffusion", gap)}
    return rows, gap_rows


def comparison_table(summary, out, n_boot_compare):
    """comparisons.md/.csv (and gaps.md/.csv where a modality has more than two groups) from the preds files in
    --out, with the one-sentence answers; fills summary's comparisons, gaps and answers."""
    summary["comparisons"], summary["gaps"], summary["answers"], summary["primary_families"] = [], {}, {}, {}
    rows, gap_rows = [], []
    for name in summary["modalities"]:
        r, g = modality_comparisons(summary, out, name, n_boot_compare)
        rows, gap_rows = rows + r, gap_rows + g
    methods = sorted({c["method"] for c in summary["comparisons"]})
    notes = [f"{q} {' '.join(x[k + sfx] for x in summary['answers'].values() for k in ('essp', 'gap'))}"
             for q, sfx in ANSWERS] + [
        "a - b for each pair of Table 1's cells (ViT, ratio 1.0): every method vs base, without and with downstream "
        "reweighting on both sides, FairGen + reweighting (the paper's FairGen) vs base without, and FairGen vs "
        "FairDiffusion (the paper's strongest baseline), each without and with reweighting. Accuracy and ESSP as "
        "fractions (Table 1 shows ESSP x100); AUROC gap: between the attribute groups, signed (first - last), and "
        "for more than two groups also max - min (then see gaps.md for each gap against its permutation null; the "
        "paired bootstrap of a difference of max - min gaps resamples both alike). value a / b: the mean over "
        "replicates.",
        "Primary (declared in code: diffusion/fairgen_compare.primary_keys): per modality, "
        "the signed AUROC gap of FairGen + reweighting minus base and minus FairDiffusion + reweighting; Holm over "
        "those two alone (the smallest Holm p they can reach: " + ", ".join(
            f"{m} {f['min_holm_p']:.3f}" for m, f in summary["primary_families"].items()) + "), and separately over "
        "the rows marked exploratory (ESSP and max - min gaps are built from absolute differences, biased toward "
        "'no change'). MDE at 80% power at the family's first Holm step.",
        "Method: " + " | ".join(methods) + ". Units: test patients (rows without a patient id are their own unit). " +
        replicates_note(summary) + " p two-sided, 2 (1 + tail) / (resamples + 1).",
        "Read from preds_<modality>.csv(.gz) in this folder (diffusion.fairgen_compare.comparisons_from_preds)."]
    write_table(out / "comparisons", ["modality"] + COMPARISON_HEADER[:2] + ["value a", "value b"] +
                COMPARISON_HEADER[2:], rows, title="Paired comparisons of the downstream ViT (FairGen Table 1's cells)",
                notes=notes)
    if gap_rows:
        write_table(out / "gaps", ["modality", "cell", "AUROC gap max - min", "null median", "excess", "p"],
                    gap_rows, title="Max - min AUROC gaps over more than two groups against their permutation null",
                    notes=[f"Method: {next(iter(next(iter(summary['gaps'].values())).values()))['method']} "
                           f"({n_boot_compare}); split seed 0, the AUROC the mean over the downstream seeds. "
                           "excess = gap - null median: a max - min gap is positive even between equal groups."])


def replicates_note(summary):
    """What the comparisons' replicates are, and so which noise their CIs carry."""
    P = summary["preset"]
    if P.get("seeds", 1) > 1:
        return (f"Replicates: the {P['seeds']} split seeds (each its own test patients and generators), each "
                f"statistic the mean over its {replicate_words(P)}; the CI carries generator and ViT training noise "
                "and test sampling, coarsely with so few splits.")
    if P.get("gen_seeds", 1) > 1:
        return (f"Replicates: {replicate_words(P)} each (the same ViT seeds for every generator), tested on the same "
                "patients; a resample draws generators, then ViT seeds within them, then patients, so the CI carries "
                f"generator training noise (each of the {P['gen_seeds']} generators its own judge, pretraining, "
                "fine-tunes, DPO and samples; with so few generators the resampled spread is (G - 1) / G of theirs, "
                "and coarse), ViT training noise and test sampling. ViT seed d is the same seed in every generator "
                "(crossed), resampled as if nested: its effect differs with the training images.")
    return ("Replicates: downstream ViT seeds trained on the same real + synthetic images and tested on the same "
            "patients, so the CI covers test sampling and ViT training noise, not generator training noise (one "
            f"generator per method at {summary['scale']} scale).")


TABLE1_HEADER = ["modality", "method", "ESSP", "DP", "EO", "NAR", "accuracy", "AUROC",
                 "accuracy by replicate (generator, ViT seed)"]
TABLE1_TITLE = "Table 1 (ours): downstream fairness of each generator's synthetic data"


def table1_notes(summary, plan):
    P, n = summary["preset"], len(summary["reused"])
    return [f"Ours: from-scratch conditional DDPM ({summary['scale']} scale, preset {P}), one patient-level split, "
            f"seed 0. Each value is the mean over {replicate_words(P)} (real only: the ViT seeds; same test "
            f"patients; the accuracy of each in the last column, in the order (generator, ViT seed)); 95% CIs by "
            f"percentile bootstrap over test patients ({plan['n_boot']}) of that mean, the replicates held fixed: for "
            f"differences between rows see comparisons.md (paired, replicates resampled too). DP, EO, ESSP (on "
            f"accuracy) x100, NAR as a fraction. Classifier: ViT ({P['vit']}, {P['down_epochs']} epochs) trained on "
            "real + synthetic images (ratio 1.0: as many synthetic as real), '+ reweighting' = adaptive "
            "inverse-performance reweighting. Preferences for DPO: judge = a classifier trained on real images "
            f"(automatic), not physicians. Ratio sweep (one downstream seed, generator 0): {P['kinds']}.",
            "Modalities: " + "; ".join(f"{n}: classes {s['seed0']['classes']}, data {s['seed0']['data']}"
                                       + (f" - {' '.join(s['seed0']['notes'])}" if s['seed0']['notes'] else "")
                                       for n, s in summary["modalities"].items()),
            "Per-image predictions of every cell and seed: preds_<modality>.csv(.gz).", GAP_NOTE,
            f"Wall time of this invocation: {summary['seconds'] / 60:.1f} min, then "
            f"{summary['seconds_comparisons'] / 60:.1f} min for the comparisons" + (
                f", reusing {n} trained models and classifier fits from {plan['runs']}/ (their time is not in it)"
                if n else "")]


def write_tables(out, summary, plan, rows):
    """Table 1 (ours and the published), fid, subgroup_fidelity and memorization (.md and .csv)."""
    write_table(out / "table1", TABLE1_HEADER, rows["t1"], title=TABLE1_TITLE, notes=table1_notes(summary, plan))
    write_published(out / "table1_published")
    metric = next(iter(summary["modalities"].values()))["seed0"]["fd"]["metric"]
    write_table(out / "fid", ["modality", "method", "FD", "n real / n synthetic", "per subgroup at equal n",
                              "subgroup variance (1/G, equal n)"], rows["fd"],
                title="Feature distance of each method's samples (generator 0) to the real training images",
                notes=[f"{metric}: Frechet distance on the penultimate features of a CNN trained on the real training "
                       "images (disease label), not Inception FID (no ImageNet weights offline). n < 2048: biased "
                       "upwards; compare only at equal n. Per subgroup: both sets subsampled to one n per modality "
                       "(the smallest subgroup's size, real or synthetic; compare.fd_equal_n), so that the "
                       "inter-subgroup variance (1/G) measures the subgroups, not their sizes (at unequal n it "
                       "measured group size; those values stay in summary.json). KID per subgroup: "
                       "subgroup_fidelity.md."])
    write_table(out / "subgroup_fidelity", ["modality", "method", "group", "FD at equal n", "KID (mean ± std)",
                                            "n (= m)", "n real / n synthetic in group"], rows["sub"],
                title="Per-subgroup fidelity at equal n: FD and KID on the same features (generator 0)",
                notes=[f"{metric} features. KID: unbiased MMD^2, kernel (x.y / d + 1)^3, mean ± std over 100 subsets "
                       "of m images from each set (fairness/compare.py kid; Binkowski et al. 2018); m = n = the "
                       "modality's smallest subgroup, the same for every method and group. FD at the same n "
                       "(compare.fd_equal_n, one subsample). A subset std shows the subsampling spread; where m is a "
                       "set's whole size that set is not resampled, so the std understates its sampling noise."])
    write_table(out / "memorization", ["modality", "method", "copies (RMSE < 0.02)", "median NN RMSE",
                                       "train-train median NN RMSE", "closer than train-train 1st pct."], rows["mem"],
                title="Memorization audit: synthetic images (generator 0) against the DDPM's training images")


def write_readme(out, summary, plan, rows):
    """README.md: the answers first, then Table 1 inline, how to read it, the other files, the command and commit."""
    lines_ = [f"# FairGen with our DDPM: is preference-aligned synthetic data fairer? ({summary['scale']} scale)", ""]
    for q, sfx in ANSWERS:  # each question, then its answer per modality and metric
        lines_ += [f"**{q}**", "", *(f"- {a[k + sfx]}" for a in summary["answers"].values() for k in ("essp", "gap")),
                   ""]
    lines_ += [f"## {TABLE1_TITLE}", "", markdown_table(TABLE1_HEADER, rows["t1"]), "", "## How to read it", ""]
    lines_ += [f"- {n}" for n in table1_notes(summary, plan)[:2]] + [
        "- Each answer above is a paired difference of two Table-1 cells with its 95% CI, Holm-corrected p and the "
        "smallest effect the design could detect (MDE); 'cannot tell at this scale' means the CI contains 0.",
        f"- {GAP_NOTE}",
        "- More: comparisons.md (every pair of cells), gaps.md (more than two groups), fid.md and subgroup_fidelity.md "
        "(FD and KID per subgroup at equal n), memorization.md, table1_published.md (the paper's numbers, not "
        "comparable), figures (samples_*, radar_auc_*, accuracy_vs_ratio_*, dp_eo_*, fair_bayes_*, memorization_*; "
        "the samples, FD, memorization, FairDiffusion's search and blinded_pairs/ are generator 0's), "
        "blinded_pairs/ (`diffusion.annotate --serve DIR --annotators ..`), summary.json, preds_<modality>.csv*.", "",
        footer()]
    (out / "README.md").write_text("\n".join(lines_) + "\n")


def write_report(out):
    """Every table, figure, summary.json and README.md of a finished fairgen run, from the files in `out`."""
    out = Path(out)
    plan, stages = read_json(out / "plan.json"), read_json(out / "stages.json")
    summary = load_summary(out, plan, stages)
    summary["table1"], summary["fid"], summary["fid_var"], summary["kid"], summary["preds"] = {}, {}, {}, {}, {}
    rows = {"t1": [], "fd": [], "sub": [], "mem": []}
    for name, seeds in summary["modalities"].items():
        files = plan["modalities"][name]["seed0"]["files"]  # the stage files of split seed 0
        modality_figures(out, name, modality_rows(summary, out, name, rows), seeds["seed0"], files["samples"],
                         replicate_words(plan["preset"]))
        summary.setdefault("fair_bayes", {})[name] = fair_bayes(files["fairdiffusion"], plan["preset"]["fair_window"])
    t0 = time.time()
    comparison_table(summary, out, plan["n_boot_compare"])
    summary["seconds_comparisons"] = time.time() - t0
    write_tables(out, summary, plan, rows)
    write_json(out / "summary.json", summary)
    write_readme(out, summary, plan, rows)
    print((out / "table1.md").read_text())
    print((out / "comparisons.md").read_text())


if __name__ == "__main__":
    report_command(__doc__, write_report, "diffusion.fairgen_study",
                   needs=("plan.json", "stages.json"))
