"""The answer log of a pair set (diffusion.annotate): answers.csv, one row appended and fsynced per answer or undo,
replayed into each annotator's answers; the roster of who may answer (annotators.json: names and private link
tokens); each annotator's queue (a shared calibration block, then their share of the rest); Store holds it all for
the server's threads.
"""
import csv
import hashlib
import hmac
import json
import os
from pathlib import Path
import secrets
import shutil
import threading
import time
import unicodedata
import warnings

import numpy as np

from common.errors import DataError
from diffusion.annotate_pairs import load_pair_set

CHOICES = {"preference": ["left", "right", "both_unacceptable", "cannot_tell"],
           "blinded": ["left", "right", "both_unacceptable", "cannot_tell"],
           "reader": ["real", "synthetic"]}
RATINGS = range(1, 6)  # the reader study's realism rating: 1 clearly artificial ... 5 as real as a real image
ANSWER_COLUMNS = ["time", "annotator", "pair_set", "pair_id", "choice", "rating", "shown_ms", "note"]
OLD_COLUMNS = ["time", "annotator", "pair_set", "pair_id", "choice", "note"]  # logs written before the rating
NAME_MARKS = " '\u2019-.\u200c\u200d"  # and the zero-width (non-)joiners of Persian and Indic names


def clean_name(value):
    """An annotator's name as shown: letters of any script (with their combining marks: Devanagari, Arabic, Thai),
    spaces, apostrophes, hyphens and dots, 1-60 characters (Unicode NFC, runs of spaces made one). ValueError says
    what is allowed."""
    if not isinstance(value, str):
        raise ValueError("name: expected text")
    name = " ".join(unicodedata.normalize("NFC", value).split())
    if not 0 < len(name) <= 60 or not name[0].isalpha() or \
            not all(c.isalpha() or c in NAME_MARKS or unicodedata.category(c) in ("Mn", "Mc") for c in name):
        raise ValueError(f"name {value!r}: 1-60 characters, letters (any alphabet), spaces, apostrophes, hyphens "
                         f"and dots, starting with a letter")
    return name


def name_key(name):
    """Two names are one person when they agree after case folding and spacing: 'dr a', 'Dr  A', 'DR A'."""
    return clean_name(name).casefold()


def log_key(name):
    """name_key for a name of the log; a name written by an earlier version that today's rule refuses (digits)
    is its own key."""
    try:
        return name_key(name)
    except ValueError:
        return name


def read_answers(folder, manifest):
    """Rows of answers.csv, checked against the pair set: answers of another pair set, unknown pairs or choices are
    refused naming the line. A last line cut short (a write interrupted: the file does not end in a newline) is
    left out with a warning; Store sets it aside before it appends anything."""
    path = Path(folder) / "answers.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    data = path.read_bytes()
    torn = not data.endswith(b"\n")
    text = data.decode("utf-8", errors="replace")  # written as UTF-8 whatever the locale
    rows = list(csv.DictReader(text.splitlines(keepends=True)))
    header = next(csv.reader(text.splitlines()[:1]), [])
    if header not in (ANSWER_COLUMNS, OLD_COLUMNS):
        if torn and "\n" not in text:  # only a torn header
            warnings.warn(f"{path}: holds only a header cut short; left out")
            return []
        raise DataError(f"{path}: its columns are {header}, not {ANSWER_COLUMNS}")
    if torn and rows:
        warnings.warn(f"{path}: its last line is incomplete (a write cut short); left out")
        rows = rows[:-1]
    ids = {p["id"] for p in manifest["pairs"]}
    choices = CHOICES[manifest["kind"]] + ["undo"]
    good = []
    for line, r in enumerate(rows, start=2):
        if r.get("pair_set") not in (None, manifest["id"]) and None not in r.values():
            raise DataError(f"{path}: line {line} answers another pair set ({r['pair_set']}, this one is "
                            f"{manifest['id']}); serve that folder with its own pairs.json, or start a new --out")
        if None in r.values() or r["pair_id"] not in ids or r["choice"] not in choices or not logged_name(r) or \
                r.get("rating", "") not in ("", *map(str, RATINGS)):
            raise DataError(f"{path}: line {line} is not a valid answer ({dict(r)}); fix or remove that line")
        good.append(r)
    return good


def logged_name(row):
    """A log's annotator: non-empty printable text (names written by earlier versions may hold digits)."""
    a = row.get("annotator") or ""
    return 0 < len(a) <= 60 and a.isprintable() and a == a.strip()


def set_aside_torn(folder):
    """If answers.csv ends in a line cut short, move that line into answers.torn-<time>.txt and cut the log back to
    its last whole line, so that the next answer starts a line of its own. Returns the set-aside file or None."""
    path = Path(folder) / "answers.csv"
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    aside = path.with_name(f"answers.torn-{time.strftime('%Y%m%dT%H%M%S')}.txt")
    with open(aside, "ab") as f:
        f.write(data[cut:] + b"\n")
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    warnings.warn(f"{path}: its last line was cut short (an interrupted write); moved to {aside.name}, and the log "
                  f"continues from its last whole line")
    return aside


def upgrade_old_log(folder):
    """A log in the layout of earlier versions (no rating, no shown_ms) is rewritten in today's layout before
    anything is appended (the old file kept as answers.v1.csv), so that new answers record their time on screen."""
    path = Path(folder) / "answers.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if next(csv.reader(f), None) != OLD_COLUMNS:
                return
            f.seek(0)
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e}); save it as UTF-8, then serve again") from e
    bad = next((i for i, r in enumerate(rows, start=2) if None in r), None)
    if bad:
        raise DataError(f"{path}: line {bad} has more fields than the header; fix or remove that line")
    backup = path.with_name("answers.v1.csv")
    if not backup.exists():
        shutil.copyfile(path, backup)
    tmp = path.with_name("answers.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ANSWER_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**{c: "" for c in ANSWER_COLUMNS}, **r})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    warnings.warn(f"{path}: rewritten in today's columns ({', '.join(ANSWER_COLUMNS)}); the original is "
                  f"{backup.name}")


def replay(rows, names=()):
    """{annotator: {pair_id: (choice, note)}} after undos, and each annotator's answer stack. An annotator whose
    answers were all undone has an empty stack and no entry in the first dict: they count nowhere. Names that are
    one person ('Dr A', 'dr  a') are one annotator, shown as in `names` (the roster), else as first logged."""
    shown = {log_key(n): n for n in names}
    stacks = {}
    for r in rows:
        s = stacks.setdefault(shown.setdefault(log_key(r["annotator"]), r["annotator"]), [])
        if r["choice"] == "undo":
            if s:
                s.pop()
        else:
            s.append((r["pair_id"], r["choice"], r.get("note", ""), r.get("rating") or ""))
    answers = {a: {pid: (c, n) for pid, c, n, _ in s} for a, s in stacks.items() if s}
    return answers, stacks


def ratings(rows, names=()):
    """{annotator: {pair_id: rating}} of the standing answers (the reader study's realism rating)."""
    _, stacks = replay(rows, names)
    return {a: {pid: int(r) for pid, _, _, r in s if r} for a, s in stacks.items() if s}


def shared_order(manifest):
    """The set's one shuffled order (seeded by its id): the calibration block is its first pairs. A reader study's
    items come in blocks of one real and one synthetic image of one condition: its order keeps each block
    together, so that every calibration block and every share holds as many real as synthetic images."""
    rng = np.random.default_rng(int(hashlib.sha1(manifest["id"].encode()).hexdigest()[:8], 16))
    if manifest["kind"] != "reader":
        return [manifest["pairs"][i]["id"] for i in rng.permutation(len(manifest["pairs"]))]
    blocks = {}
    for p in manifest["pairs"]:
        blocks.setdefault(p["block"], []).append(p["id"])
    keys = sorted(blocks)
    return [pid for i in rng.permutation(len(keys)) for pid in blocks[keys[i]]]


def annotator_queue(manifest, roster, name, calibration):
    """The pairs `name` answers, in order: the calibration block (the first `calibration` pairs of the shared
    order, the same for everyone, so that every two annotators share them), then every len(roster)-th pair of the
    rest starting at the annotator's place in the roster (their share). roster: the names, in the order named.
    A reader study splits whole blocks (one real, one synthetic image), then shuffles each part, so that the order
    of the images says nothing about their source."""
    order = shared_order(manifest)
    k, i = len(roster), [name_key(n) for n in roster].index(name_key(name))
    if manifest["kind"] != "reader":
        return order[:calibration] + order[calibration:][i::k]
    cut = calibration + calibration % 2  # whole blocks
    blocks = [order[j:j + 2] for j in range(cut, len(order), 2)]
    seed = int(hashlib.sha1(f"{manifest['id']}|{name_key(name)}".encode()).hexdigest()[:8], 16)
    calib = [order[j] for j in np.random.default_rng(int(manifest["id"][:8], 16)).permutation(min(cut, len(order)))]
    share = [pid for b in blocks[i::k] for pid in b]
    return calib + [share[j] for j in np.random.default_rng(seed).permutation(len(share))]


def safe_note(note):
    """One line of text; a leading = + - @ gets a quote, so that a spreadsheet opening the CSV shows it as text
    instead of running it as a formula."""
    note = " ".join(note.split())
    return "'" + note if note[:1] in ("=", "+", "-", "@") else note


class Roster:
    """Who may answer: annotators.json in the pair set's folder holds each named annotator's private token (the
    link the organiser hands them), the size of the calibration block, in the order named. Kept across restarts, so
    links stay valid; naming more annotators later adds links and re-splits the pairs after the calibration block."""

    def __init__(self, folder):
        self.path = Path(folder) / "annotators.json"
        self.people, self.calibration = [], None
        if self.path.is_file():
            try:
                j = json.loads(self.path.read_text(encoding="utf-8"))
                self.people = [{"name": clean_name(p["name"]), "token": str(p["token"])} for p in j["annotators"]]
                self.calibration = int(j["calibration"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.path}: not a roster written by diffusion.annotate ({e}); move it away and "
                                f"name the annotators again (--annotators)") from e

    def names(self):
        return [p["name"] for p in self.people]

    def add(self, names, calibration, n_pairs):
        """Name annotators (new ones get a token) and fix the calibration block's size (capped at the set's size)
        the first time; calibration None keeps the size fixed then (20 if none is)."""
        keys = {name_key(n): n for n in self.names()}
        for raw in names:
            try:
                name = clean_name(raw)
            except ValueError as e:
                raise DataError(f"--annotators: {e}") from e
            if name_key(name) in keys and keys[name_key(name)] != name:
                raise DataError(f"--annotators: {name!r} is the same person as {keys[name_key(name)]!r} (names are "
                                f"compared ignoring case and spacing); write them one way")
            if name_key(name) not in keys:
                self.people.append({"name": name, "token": secrets.token_urlsafe(18)})
                keys[name_key(name)] = name
        if calibration is None:
            calibration = self.calibration if self.calibration is not None else 20
        calibration = min(calibration, n_pairs)
        if self.calibration is not None and calibration != self.calibration:
            raise DataError(f"--calibration {calibration}: this reading started with a calibration block of "
                            f"{self.calibration} pairs ({self.path}); keep it, or start a new pair-set folder")
        self.calibration = calibration
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:  # the tokens are secrets
            json.dump({"annotators": self.people, "calibration": self.calibration}, f, indent=2, ensure_ascii=False)
        os.replace(tmp, self.path)

    def who(self, token):
        """The annotator whose token this is, or None (compared in constant time)."""
        if not isinstance(token, str) or not token:
            return None
        found = None
        for p in self.people:
            if hmac.compare_digest(p["token"].encode(), token.encode()):
                found = p["name"]
        return found


class Store:
    """The pair set, its roster and its answer log, shared by the server's threads. An answer counts only for the
    pair the server last showed that annotator, and only once it has been on screen for min_view seconds."""

    def __init__(self, folder, min_view=0.3):
        self.folder = Path(folder)
        self.manifest = load_pair_set(folder)
        self.kind = self.manifest["kind"]
        self.pairs = {p["id"]: p for p in self.manifest["pairs"]}
        self.roster = Roster(folder)
        self.min_view = min_view
        self.lock = threading.Lock()
        set_aside_torn(folder)
        upgrade_old_log(folder)
        self.rows = read_answers(folder, self.manifest)
        self.answers, self.stacks = replay(self.rows, self.roster.names())
        self.shown = {}  # annotator -> (pair id, time.monotonic() when the server sent it)

    def name_annotators(self, names, calibration):
        """Add people to the roster, then replay the log under the roster's spelling of their names."""
        with self.lock:
            self.roster.add(names, calibration, len(self.pairs))
            self.answers, self.stacks = replay(self.rows, self.roster.names())

    def queue(self, name):
        return annotator_queue(self.manifest, self.roster.names(), name, self.roster.calibration)

    def state(self, name):
        with self.lock:
            done = self.answers.get(name, {})
            queue = self.queue(name)
            nxt = next((pid for pid in queue if pid not in done), None)
            pair = None
            if nxt is not None:
                p = self.pairs[nxt]
                pair = {"id": nxt, "text": p["text"], "images": ["image"] if self.kind == "reader" else
                        ["left", "right"]}
                self.shown[name] = (nxt, time.monotonic())  # the page shows what it last fetched: from now on
            tally = {}
            for pid in queue:
                if pid in done:
                    tally[done[pid][0]] = tally.get(done[pid][0], 0) + 1
            calibration = self.roster.calibration + (self.roster.calibration % 2 if self.kind == "reader" else 0)
            return {"annotator": name, "kind": self.kind, "done": sum(pid in done for pid in queue),
                    "total": len(queue), "calibration": min(calibration, len(self.pairs)), "pair": pair,
                    "question": self.manifest["question"], "can_undo": bool(self.stacks.get(name)), "tally": tally,
                    "choices": CHOICES[self.kind], "min_view_ms": round(self.min_view * 1000)}

    def append(self, row):
        """One row to answers.csv (UTF-8), flushed and fsynced before the answer counts; a line left torn by a
        failed earlier write is set aside first, so no row is ever written onto it."""
        path = self.folder / "answers.csv"
        set_aside_torn(self.folder)
        size = path.stat().st_size if path.is_file() else 0
        new = size == 0
        try:
            with open(path, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, ANSWER_COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # not saved: nor left half on disk, to count after a restart
            with open(path, "r+b") as f:
                f.truncate(size)
            raise
        self.rows.append({c: str(row.get(c, "")) for c in ANSWER_COLUMNS})
        self.answers, self.stacks = replay(self.rows, self.roster.names())

    def answer(self, name, pair_id, choice, note, rating=None):
        with self.lock:
            if pair_id not in self.pairs:
                raise ValueError("unknown pair")
            if choice not in CHOICES[self.kind]:
                raise ValueError(f"choice must be one of {CHOICES[self.kind]}")
            if self.kind == "reader" and rating not in RATINGS:
                raise ValueError("rating: a whole number from 1 (clearly artificial) to 5 (as real as a real image)")
            if self.kind != "reader" and rating is not None:
                raise ValueError("rating: only the reader study asks for one")
            if pair_id in self.answers.get(name, {}):
                raise ValueError("this pair is answered already (undo it first)")
            shown_id, shown_at = self.shown.get(name, (None, 0.0))
            if shown_id != pair_id:
                raise ValueError("this is not the pair on your screen (reload the page)")
            seconds = time.monotonic() - shown_at
            if seconds < self.min_view:
                raise ValueError(f"answered {seconds * 1000:.0f} ms after the pair was shown; the page waits "
                                 f"{self.min_view * 1000:.0f} ms")
            self.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "annotator": name,
                         "pair_set": self.manifest["id"], "pair_id": pair_id, "choice": choice,
                         "rating": "" if rating is None else rating, "shown_ms": round(seconds * 1000),
                         "note": safe_note(note)})
        return self.state(name)

    def undo(self, name):
        with self.lock:
            if not self.stacks.get(name):
                raise ValueError("nothing to undo")
            last = self.stacks[name][-1][0]
            self.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "annotator": name,
                         "pair_set": self.manifest["id"], "pair_id": last, "choice": "undo", "rating": "",
                         "shown_ms": "", "note": ""})
            self.shown.pop(name, None)
        return self.state(name)
