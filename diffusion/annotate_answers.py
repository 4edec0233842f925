"""The answer log of a pair set (diffusion.annotate): answers.csv, one row appended and fsynced per answer or undo,
replayed into each annotator's answers; Store holds it for the server's threads.
"""
import csv
import hashlib
import os
from pathlib import Path
import re
import threading
import time
import warnings

import numpy as np

from common.errors import DataError
from diffusion.annotate_pairs import load_pair_set

CHOICES = ["left", "right", "both_unacceptable", "cannot_tell"]
ANSWER_COLUMNS = ["time", "annotator", "pair_set", "pair_id", "choice", "note"]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,39}")


def read_answers(folder, manifest):
    """Rows of answers.csv, checked against the pair set: answers of another pair set, unknown pairs or choices are
    refused naming the line; a last line cut short (a kill mid-write) is left out with a warning."""
    path = Path(folder) / "answers.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ANSWER_COLUMNS:
            raise DataError(f"{path}: its columns are {reader.fieldnames}, not {ANSWER_COLUMNS}")
        rows = list(reader)
    ids = {p["id"] for p in manifest["pairs"]}
    good = []
    for line, r in enumerate(rows, start=2):
        if r.get("pair_set") not in (None, manifest["id"]) and None not in r.values():
            raise DataError(f"{path}: line {line} answers another pair set ({r['pair_set']}, this one is "
                            f"{manifest['id']}); serve that folder with its own pairs.json, or start a new --out")
        valid = None not in r.values() and r["pair_id"] in ids and r["choice"] in CHOICES + ["undo"] and \
            NAME.fullmatch(r["annotator"] or "")
        if not valid:
            if line == len(rows) + 1:
                warnings.warn(f"{path}: its last line is incomplete (a write cut short); left out")
                continue
            raise DataError(f"{path}: line {line} is not a valid answer ({dict(r)}); fix or remove that line")
        good.append(r)
    return good


def replay(rows):
    """{annotator: {pair_id: (choice, note)}} after undos, and each annotator's answer stack."""
    stacks = {}
    for r in rows:
        s = stacks.setdefault(r["annotator"], [])
        if r["choice"] == "undo":
            if s:
                s.pop()
        else:
            s.append((r["pair_id"], r["choice"], r.get("note", "")))
    return {a: {pid: (c, n) for pid, c, n in s} for a, s in stacks.items()}, stacks


def annotator_order(manifest, name):
    """Each annotator's own order of the pairs (a permutation seeded by the name and the pair set)."""
    seed = int(hashlib.sha1(f"{manifest['id']}|{name}".encode()).hexdigest()[:8], 16)
    return [manifest["pairs"][i]["id"] for i in np.random.default_rng(seed).permutation(len(manifest["pairs"]))]


def safe_note(note):
    """One line of text; a leading = + - @ gets a quote, so that a spreadsheet opening the CSV shows it as text
    instead of running it as a formula."""
    note = " ".join(note.split())
    return "'" + note if note[:1] in ("=", "+", "-", "@") else note


class Store:
    """The pair set and its answer log, shared by the server's threads."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.manifest = load_pair_set(folder)
        self.pairs = {p["id"]: p for p in self.manifest["pairs"]}
        self.lock = threading.Lock()
        self.rows = read_answers(folder, self.manifest)
        self.answers, self.stacks = replay(self.rows)

    def state(self, name):
        done = self.answers.get(name, {})
        nxt = next((pid for pid in annotator_order(self.manifest, name) if pid not in done), None)
        pair = None if nxt is None else {"id": nxt, "text": self.pairs[nxt]["text"]}
        return {"annotator": name, "done": len(done), "total": len(self.pairs), "pair": pair,
                "question": self.manifest["question"], "can_undo": bool(self.stacks.get(name))}

    def append(self, row):
        """One row to answers.csv, flushed and fsynced before the answer counts."""
        path = self.folder / "answers.csv"
        new = not path.is_file() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, ANSWER_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.answers, self.stacks = replay(self.rows)

    def answer(self, name, pair_id, choice, note):
        with self.lock:
            if pair_id not in self.pairs:
                raise ValueError("unknown pair")
            if choice not in CHOICES:
                raise ValueError(f"choice must be one of {CHOICES}")
            if pair_id in self.answers.get(name, {}):
                raise ValueError("this pair is answered already (undo it first)")
            self.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "annotator": name,
                         "pair_set": self.manifest["id"], "pair_id": pair_id, "choice": choice,
                         "note": safe_note(note)})
            return self.state(name)

    def undo(self, name):
        with self.lock:
            if not self.stacks.get(name):
                raise ValueError("nothing to undo")
            last = self.stacks[name][-1][0]
            self.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "annotator": name,
                         "pair_set": self.manifest["id"], "pair_id": last, "choice": "undo", "note": ""})
            return self.state(name)
