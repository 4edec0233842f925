"""diffusion.annotate --export: a pair set's answers as the CSV train_dpo --pairs reads (preference sets), one row per
answer with the hidden sources (blinded sets and reader studies), and <out>_summary.json beside it (strict JSON: a
statistic that cannot be computed is null with its reason).
"""
import json
from pathlib import Path

from common.errors import DataError
from common.runs import write_json
from diffusion.annotate_answers import CHOICES, Roster, ratings, read_answers, replay
from diffusion.annotate_pairs import load_pair_set
from diffusion.annotate_stats import agreement, preference_rates, reader_study


def disagreements(answers):
    """Pair ids on which two annotators gave opposite decisive answers (one 'left', another 'right')."""
    decisive = {}
    for ans in answers.values():
        for pid, (choice, _) in ans.items():
            if choice in ("left", "right"):
                decisive.setdefault(pid, set()).add(choice)
    return {pid for pid, cs in decisive.items() if len(cs) > 1}


def export(folder, out_csv, force=False):
    """Preference sets: the physicians' CSV (+ annotator, pair id, note, and `disagreement`: train_dpo leaves those
    rows out unless told to keep them) that train_dpo --pairs reads. Blinded sets and reader studies: one row per
    answer with the hidden sources (an evaluation, never DPO training data). All: a summary, <out>_summary.json,
    counting only annotators with at least one standing answer. Existing outputs are refused without --force, and
    never written inside the pair set."""
    m = load_pair_set(folder)
    kind = m["kind"]
    out_csv = Path(out_csv)
    summary_path = out_csv.with_name(out_csv.stem + "_summary.json")
    if out_csv.resolve().is_relative_to(Path(folder).resolve()):
        raise DataError(f"--out {out_csv}: lies inside the pair set {folder}; write the export elsewhere")
    for f in (out_csv, summary_path):
        if f.exists() and not force:
            raise DataError(f"--out {out_csv}: {f} exists (pass --force to replace it, or choose another --out)")
    rows_read = read_answers(folder, m)
    roster = Roster(folder).names()  # the names as the organiser wrote them, as the server shows them
    answers, _ = replay(rows_read, roster)
    if not answers:
        raise DataError(f"{Path(folder) / 'answers.csv'}: no standing answers yet (serve the page first)")
    rated = ratings(rows_read, roster)
    pairs = {p["id"]: p for p in m["pairs"]}
    split = disagreements(answers) if kind != "reader" else set()
    rows, tally = [], {c: 0 for c in CHOICES[kind]}
    for a in sorted(answers):
        for pid, (choice, note) in answers[a].items():
            p = pairs[pid]
            tally[choice] += 1
            if kind == "reader":
                rows.append({"pair_id": pid, "annotator": a, "condition": p["condition"], "group": p["group"],
                             "source": p["source"], "call": choice,
                             "correct": (choice == "synthetic") == (p["source"] != "real"),
                             "rating": rated.get(a, {}).get(pid), "note": note})
            elif kind == "blinded":
                rows.append({"pair_id": pid, "annotator": a, "condition": p["condition"], "choice": choice,
                             "left_source": p["left_source"], "right_source": p["right_source"],
                             "disagreement": pid in split, "note": note})
            elif choice in ("left", "right"):
                w, l = (p["left"], p["right"]) if choice == "left" else (p["right"], p["left"])
                rows.append({"condition": p["condition"], "preferred_path": str((Path(folder) / w).resolve()),
                             "rejected_path": str((Path(folder) / l).resolve()), "annotator": a, "pair_id": pid,
                             "disagreement": pid in split, "note": note})
    import pandas as pd
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    columns = {"reader": ["pair_id", "annotator", "condition", "group", "source", "call", "correct", "rating", "note"],
               "blinded": ["pair_id", "annotator", "condition", "choice", "left_source", "right_source",
                           "disagreement", "note"],
               "preference": ["condition", "preferred_path", "rejected_path", "annotator", "pair_id", "disagreement",
                              "note"]}[kind]
    pd.DataFrame(rows, columns=columns).to_csv(out_csv, index=False)
    n = len(answers)
    summary = {"pair_set": m["id"], "kind": kind, "n_pairs": len(pairs),
               "judge": f"{n} clinician{'s' if n > 1 else ''} ({', '.join(sorted(answers))})",
               "answers_per_annotator": {a: len(v) for a, v in sorted(answers.items())},
               "exported_rows": len(rows), "answers_by_choice": tally,
               "agreement": agreement(answers, list(pairs), CHOICES[kind])}
    if kind != "reader":
        summary["undecided"] = {c: tally[c] for c in ("both_unacceptable", "cannot_tell")}
        summary["pairs_with_disagreement"] = {
            "n": len(split), "ids": sorted(split),
            "note": "two annotators chose opposite images; train_dpo leaves these rows out unless "
                    "--keep-disagreements" if kind == "preference" else "two annotators chose opposite images"}
        summary.update(unacceptable_shares(answers, pairs, folder))
    if kind == "blinded":
        summary["preference_rates"] = preference_rates(m, answers)
        summary["ci_method"] = "crossed bootstrap over pairs and annotators (Owen 2007), 2000 resamples, percentile"
    if kind == "reader":
        summary["reader_study"] = reader_study(m, answers, rated)
    json.dumps(summary, allow_nan=False)  # strict JSON: a NaN here is a bug, not an output
    write_json(summary_path, summary)
    what = {"reader": "reader-study calls (an evaluation)", "blinded": "answers (an evaluation: not DPO pairs)",
            "preference": "preference pairs"}[kind]
    print(f"{len(rows)} {what} from {summary['judge']} -> {out_csv}" +
          ("" if kind == "reader" else f"; undecided: {tally['cannot_tell']} cannot tell, "
           f"{tally['both_unacceptable']} both unacceptable; {len(split)} pairs with disagreement"))
    return summary


def unacceptable_shares(answers, pairs, folder):
    """The share of 'both unacceptable' per condition and per group (does the generator fail one group more often?),
    and the images so marked."""
    out = {}
    for key in ("condition", "group"):
        t = {}
        for a in answers:
            for pid, (choice, _) in answers[a].items():
                c = t.setdefault(pairs[pid][key], [0, 0])
                c[0] += choice == "both_unacceptable"
                c[1] += 1
        out[key] = {k: {"share": v[0] / v[1], "n_answers": v[1]} for k, v in sorted(t.items())}
    marked = sorted({str((Path(folder) / pairs[pid][side]).resolve()) for a in answers
                     for pid, (choice, _) in answers[a].items() if choice == "both_unacceptable"
                     for side in ("left", "right")})
    return {"both_unacceptable": out, "unacceptable_images": marked}
