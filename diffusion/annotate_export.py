"""diffusion.annotate --export: a pair set's answers as the CSV train_dpo --pairs reads (preference sets) or one row
per answer with the hidden sources (blinded sets), and <out>_summary.json beside it.
"""
from pathlib import Path

from common.errors import DataError
from common.runs import write_json
from diffusion.annotate_answers import CHOICES, read_answers, replay
from diffusion.annotate_pairs import load_pair_set
from diffusion.annotate_stats import agreement, preference_rates

def export(folder, out_csv, force=False):
    """Preference sets: the physicians' CSV (+ annotator, pair id, note) that train_dpo --pairs reads. Blinded
    sets: one row per answer with the hidden sources (an evaluation, never DPO training data). Both: a summary,
    <out>_summary.json. Existing outputs are refused without --force, and never written inside the pair set."""
    m = load_pair_set(folder)
    out_csv = Path(out_csv)
    summary_path = out_csv.with_name(out_csv.stem + "_summary.json")
    if out_csv.resolve().is_relative_to(Path(folder).resolve()):
        raise DataError(f"--out {out_csv}: lies inside the pair set {folder}; write the export elsewhere")
    for f in (out_csv, summary_path):
        if f.exists() and not force:
            raise DataError(f"--out {out_csv}: {f} exists (pass --force to replace it, or choose another --out)")
    answers, _ = replay(read_answers(folder, m))
    if not answers:
        raise DataError(f"{Path(folder) / 'answers.csv'}: no answers yet (serve the page first)")
    pairs = {p["id"]: p for p in m["pairs"]}
    rows, skipped = [], {c: 0 for c in CHOICES}
    for a in sorted(answers):
        for pid, (choice, note) in answers[a].items():
            p = pairs[pid]
            if m["kind"] == "blinded":
                rows.append({"pair_id": pid, "annotator": a, "condition": p["condition"], "choice": choice,
                             "left_source": p["left_source"], "right_source": p["right_source"], "note": note})
            elif choice in ("left", "right"):
                w, l = (p["left"], p["right"]) if choice == "left" else (p["right"], p["left"])
                rows.append({"condition": p["condition"], "preferred_path": str((Path(folder) / w).resolve()),
                             "rejected_path": str((Path(folder) / l).resolve()), "annotator": a, "pair_id": pid,
                             "note": note})
            if choice not in ("left", "right"):
                skipped[choice] += 1
    import pandas as pd
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    columns = ["pair_id", "annotator", "condition", "choice", "left_source", "right_source", "note"] \
        if m["kind"] == "blinded" else ["condition", "preferred_path", "rejected_path", "annotator", "pair_id", "note"]
    pd.DataFrame(rows, columns=columns).to_csv(out_csv, index=False)
    unacceptable = {}
    for key in ("condition", "group"):
        tally = {}
        for a in answers:
            for pid, (choice, _) in answers[a].items():
                t = tally.setdefault(pairs[pid][key], [0, 0])
                t[0] += choice == "both_unacceptable"
                t[1] += 1
        unacceptable[key] = {k: {"share": v[0] / v[1], "n_answers": v[1]} for k, v in sorted(tally.items())}
    marked = sorted({str((Path(folder) / pairs[pid][side]).resolve()) for a in answers
                     for pid, (choice, _) in answers[a].items() if choice == "both_unacceptable"
                     for side in ("left", "right")})
    summary = {"pair_set": m["id"], "kind": m["kind"], "n_pairs": len(pairs),
               "judge": f"{len(answers)} clinician{'s' if len(answers) > 1 else ''} ({', '.join(sorted(answers))})",
               "answers_per_annotator": {a: len(v) for a, v in sorted(answers.items())},
               "exported_rows": len(rows), "undecided": skipped,
               "both_unacceptable": unacceptable, "unacceptable_images": marked,
               "agreement": agreement(answers, list(pairs))}
    if m["kind"] == "blinded":
        summary["preference_rates"] = preference_rates(m, answers)
        summary["ci_method"] = "crossed bootstrap over pairs and annotators (Owen 2007), 2000 resamples, percentile"
    write_json(summary_path, summary)
    what = "answers (an evaluation: not DPO pairs)" if m["kind"] == "blinded" else "preference pairs"
    print(f"{len(rows)} {what} from {summary['judge']} -> {out_csv}; undecided: "
          + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if k not in ("left", "right")))
    return summary
