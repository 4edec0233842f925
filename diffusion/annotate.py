"""A local page where clinicians state preferences between synthetic images: the preference pairs FairGen's DPO
step needs (diffusion/train_dpo.py --pairs), and the blinded expert evaluation FairGen reports.

Two kinds of pair set, one page:
- preference: two samples of one model under the same condition (e.g. "female, Effusion"); the answer says which
  shows the condition better. Exported as the physicians' CSV `condition, preferred_path, rejected_path` (plus the
  annotator), which `train_dpo --pairs` reads; its outputs then name the clinicians as judge.
- blinded: a real image against a method's sample, or two methods' samples, under the same condition; source and
  side hidden and shuffled. The question: "which better shows the prompted finding?". `make fairgen` writes such a
  set (results/fairgen/blinded_pairs); the export gives each method's preference rate against real images and
  against each other method, with a CI over annotators and pairs, and the agreement between annotators.

Choices: left better (key 1), right better (2), both unacceptable (3), cannot tell (4); u undoes the last answer.
Every answer is appended to answers.csv and flushed to disk at once (a killed server loses nothing answered);
restarting resumes at each annotator's first unanswered pair; each annotator (by name) gets their own order.

    # from a trained DDPM: draw 2 x 20 samples per condition, then serve the page on http://127.0.0.1:8765
    python -m diffusion.annotate --ckpt runs/results/fairgen/cxr-seed0/sqrs_cb/ckpt.pt --pairs-per-class 20 --out prefs
    python -m diffusion.annotate --serve prefs          # serve an existing pair set again (or results/fairgen/...)
    python -m diffusion.annotate --export prefs --out pairs.csv   # the CSV for train_dpo, and summary.json
    python -m diffusion.train_dpo --init .../sqrs_cb/ckpt.pt --pairs pairs.csv --data cxr --size 32 --out-dir dpo

Safety: the server binds 127.0.0.1 unless --host says otherwise; it serves the page and the pair set's images by
pair id only (no path from a request reaches the file system); answers are validated; it refuses a folder whose
answers belong to another pair set; it sends nothing anywhere.
"""
import argparse
import csv
import hashlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import os
from pathlib import Path
import re
import threading
import time
from urllib.parse import parse_qs
import warnings

import numpy as np
from PIL import Image

from common.cli import ArgumentParser, nonneg_float, port, positive_int, run
from common.errors import DataError
from common.runs import device_from, write_json

CHOICES = ["left", "right", "both_unacceptable", "cannot_tell"]
ANSWER_COLUMNS = ["time", "annotator", "pair_set", "pair_id", "choice", "note"]
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,39}")
ATTR_WORDS = {"F": "female", "M": "male", "light": "light skin (Fitzpatrick 1-2)",
              "medium": "medium skin (Fitzpatrick 3-4)", "dark": "dark skin (Fitzpatrick 5-6)"}
QUESTIONS = {"preference": "Which image better shows this condition?",
             "blinded": "Which image better shows the prompted finding?"}


def condition_text(name):
    """'F|Effusion' -> 'female, Effusion'; 'dark|malignant epidermal' -> 'dark skin (Fitzpatrick 5-6), ...'."""
    attr, _, label = name.partition("|")
    return f"{ATTR_WORDS.get(attr, attr)}, {label}" if label else ATTR_WORDS.get(attr, attr)


# ---------------------------------------------------------------------------------------------------------------
# pair sets: pairs.json + images/ in one folder
def save_png(u8, path):
    """At the image's own size: the page enlarges it (pixelated), and train_dpo reads it back unchanged."""
    Image.fromarray(np.asarray(u8)).save(path)


def write_pair_set(folder, kind, pairs, recipe):
    """Write pairs.json for `pairs` (dicts with condition, left, right images as uint8 arrays, and for blinded sets
    left_source / right_source). The set's id is a hash of its recipe and images: answers record it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    h = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode())
    rows = []
    for i, p in enumerate(pairs):
        pid = f"p{i:04d}"
        row = {"id": pid, "condition": p["condition"], "text": condition_text(p["condition"]),
               "group": p["condition"].split("|")[0]}
        for side in ("left", "right"):
            rel = f"images/{pid}_{side}.png"
            save_png(p[side], folder / rel)
            h.update(np.ascontiguousarray(p[side]).tobytes())
            row[side] = rel
            if kind == "blinded":
                row[f"{side}_source"] = p[f"{side}_source"]
        rows.append(row)
    manifest = {"kind": kind, "id": h.hexdigest()[:16], "question": QUESTIONS[kind], "recipe": recipe, "pairs": rows}
    write_json(folder / "pairs.json", manifest)
    return manifest


PAIR_ID = re.compile(r"p\d{4,}")


def load_pair_set(folder):
    """pairs.json of a folder, checked: every pair has an id p0000..., a condition, and its two images at
    images/<id>_left.png and images/<id>_right.png (no other path is ever served)."""
    path = Path(folder) / "pairs.json"
    try:
        m = json.loads(path.read_text())
        assert m["kind"] in QUESTIONS and m["pairs"] and isinstance(m["id"], str)
        for p in m["pairs"]:
            assert PAIR_ID.fullmatch(p["id"]) and isinstance(p["condition"], str)
            assert p["left"] == f"images/{p['id']}_left.png" and p["right"] == f"images/{p['id']}_right.png"
    except FileNotFoundError:
        raise DataError(f"{path}: no pair set here (make one with --ckpt or --from-dir, or check the folder)")
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path}: not a pair set written by diffusion.annotate ({type(e).__name__})") from e
    return m


def model_recipe(ckpt, n, steps, guidance, seed):
    """What makes a pair set from a checkpoint (compared before any sampling, to resume an existing set)."""
    from common.runs import load_checkpoint
    return {"ckpt": str(Path(ckpt).resolve()), "step": load_checkpoint(ckpt).get("step"), "pairs_per_class": n,
            "steps": steps, "guidance": guidance, "seed": seed}


def preference_pairs_from_model(ckpt, n, steps, guidance, seed, device):
    """2n samples per condition of a DDPM checkpoint, paired two by two."""
    from diffusion.ddpm import Schedule
    from diffusion.sample_ddpm import generate, load_model
    model, ck = load_model(ckpt, device)
    a, names = ck["args"], ck["class_names"]
    classes = np.repeat(np.arange(len(names)), 2 * n)
    images = generate(model, Schedule(a["schedule"], a["T"]), classes, a["size"], a["channels"], "ddim", steps,
                      1.0, guidance, None, seed, device)
    return [{"condition": names[classes[i]], "left": images[i], "right": images[i + 1]}
            for i in range(0, len(images), 2)]


def dir_candidates(folder):
    """{condition folder: sorted image files} of --from-dir (one subfolder per condition)."""
    subdirs = sorted(d for d in Path(folder).iterdir() if d.is_dir()) if Path(folder).is_dir() else []
    if not subdirs:
        raise DataError(f"--from-dir {folder}: expected one subfolder of candidate images per condition "
                        f"(e.g. F__finding/*.png)")
    found = {d: sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) for d in subdirs}
    for d, files in found.items():
        if len(files) < 2:
            raise DataError(f"--from-dir {d}: {len(files)} images; a pair needs two per condition")
    return found


def preference_pairs_from_dir(found, n, seed):
    """Up to n pairs of two different images per condition folder, drawn at random ('|' written '__')."""
    rng = np.random.default_rng(seed)
    pairs = []
    for d, files in found.items():
        order = rng.permutation(len(files))
        for j in range(min(n, len(files) // 2)):
            imgs = []
            for f in (files[order[2 * j]], files[order[2 * j + 1]]):
                try:
                    with Image.open(f) as im:
                        imgs.append(np.asarray(im.convert("L" if im.mode == "L" else "RGB")))
                except OSError as e:
                    raise DataError(f"--from-dir {f}: not a readable image ({e})") from e
            pairs.append({"condition": d.name.replace("__", "|"), "left": imgs[0], "right": imgs[1]})
    return pairs


def blinded_pairs(real, methods, n, seed):
    """The blinded evaluation: per condition, n pairs of (real, method) for each method and n pairs of (method A,
    method B) for each two methods; sides shuffled. real and methods[m]: (images uint8, class names per image)."""
    rng = np.random.default_rng(seed)
    pools = {"real": real, **methods}
    names = sorted(set(real[1]))
    contests = [("real", m) for m in methods] + [(a, b) for i, a in enumerate(methods) for b in list(methods)[i + 1:]]
    pairs = []
    for c in names:
        idx = {s: np.nonzero(np.asarray(p[1]) == c)[0] for s, p in pools.items()}
        for a, b in contests:
            if len(idx[a]) == 0 or len(idx[b]) == 0:
                continue
            for _ in range(n):
                ia, ib = rng.choice(idx[a]), rng.choice(idx[b])
                sides = [(a, pools[a][0][ia]), (b, pools[b][0][ib])]
                if rng.random() < 0.5:
                    sides.reverse()
                pairs.append({"condition": c, "left": sides[0][1], "right": sides[1][1],
                              "left_source": sides[0][0], "right_source": sides[1][0]})
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


# ---------------------------------------------------------------------------------------------------------------
# answers: an append-only log, replayed
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


# ---------------------------------------------------------------------------------------------------------------
# the page
PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fairsynth: image preferences</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;background:#f6f6f4;color:#222}
#who,#work{max-width:760px;margin:auto} #work{display:none}
.imgs{display:flex;gap:16px;justify-content:center;margin:14px 0}
.imgs figure{margin:0;text-align:center} .imgs img{width:320px;height:320px;image-rendering:pixelated;
border:1px solid #999;background:#000}
.cond{font-size:1.5em;font-weight:600;text-align:center} .q{text-align:center;color:#444}
.btns{display:flex;gap:8px;justify-content:center;flex-wrap:wrap} button{font-size:1em;padding:8px 12px}
progress{width:100%;height:14px} .meta{display:flex;justify-content:space-between;font-size:.9em;color:#555}
textarea{width:100%;height:40px;margin-top:8px} #msg{color:#a00;text-align:center;min-height:1.2em}
</style></head><body>
<div id="who"><h2>Image preferences</h2><p>Your name or initials (your answers are saved under it; the same name
resumes where you stopped):</p><input id="name" maxlength="40" autofocus>
<button id="start">Start</button><p id="msg0"></p></div>
<div id="work"><div class="meta"><span id="me"></span><span id="count"></span></div><progress id="bar"></progress>
<p class="q" id="q"></p><div class="cond" id="cond"></div>
<div class="imgs"><figure><img id="L" alt="left image"><figcaption>left (1)</figcaption></figure>
<figure><img id="R" alt="right image"><figcaption>right (2)</figcaption></figure></div>
<div class="btns"><button data-c="left">Left better (1)</button><button data-c="right">Right better (2)</button>
<button data-c="both_unacceptable">Both unacceptable (3)</button><button data-c="cannot_tell">Cannot tell (4)</button>
<button id="undo">Undo last (u)</button></div>
<textarea id="note" maxlength="500" placeholder="optional note on this pair"></textarea><p id="msg"></p></div>
<script>
let me=localStorage.getItem("annotator")||"", cur=null;
const $=id=>document.getElementById(id);
$("name").value=me;
async function call(path,body){const r=await fetch(path,body?{method:"POST",headers:{"Content-Type":
"application/json"},body:JSON.stringify(body)}:{});const j=await r.json();if(!r.ok)throw new Error(j.error);return j}
function show(s){cur=s.pair;$("me").textContent="annotator: "+s.annotator;$("count").textContent=s.done+" / "+
s.total+" answered";$("bar").max=s.total;$("bar").value=s.done;$("q").textContent=s.question;$("undo").disabled=
!s.can_undo;$("note").value="";$("msg").textContent="";if(!cur){$("cond").textContent="All pairs answered: thank "+
"you. You may close this page.";$("L").removeAttribute("src");$("R").removeAttribute("src");return}
$("cond").textContent=cur.text;$("L").src="/img/"+cur.id+"/left";$("R").src="/img/"+cur.id+"/right"}
async function start(){me=$("name").value.trim();try{const s=await call("/api/state?annotator="+
encodeURIComponent(me));localStorage.setItem("annotator",me);$("who").style.display="none";
$("work").style.display="block";show(s)}catch(e){$("msg0").textContent=e.message}}
async function answer(c){if(!cur)return;try{show(await call("/api/answer",{annotator:me,pair_id:cur.id,choice:c,
note:$("note").value}))}catch(e){$("msg").textContent=e.message}}
async function undo(){try{show(await call("/api/undo",{annotator:me}))}catch(e){$("msg").textContent=e.message}}
$("start").onclick=start;$("name").onkeydown=e=>{if(e.key==="Enter")start()};
document.querySelectorAll("button[data-c]").forEach(b=>b.onclick=()=>answer(b.dataset.c));$("undo").onclick=undo;
document.onkeydown=e=>{if($("work").style.display!=="block"||e.target.id==="note")return;
const k={"1":"left","2":"right","3":"both_unacceptable","4":"cannot_tell"}[e.key];if(k)answer(k);
else if(e.key==="u")undo()};
</script></body></html>"""


def make_handler(store, allowed_hosts):
    """The request handler. Besides validating every answer it refuses requests that a page of another site could
    make through the clinician's browser: a Host that is not one of allowed_hosts (DNS rebinding; None: any, for a
    server opened to the network with --host), a POST whose Origin is another site's or whose body is not
    application/json (a cross-site form or text/plain POST); and it forbids framing (clickjacking)."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send(self, code, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            self.end_headers()
            self.wfile.write(data)

        def name(self, value):
            value = (value or "").strip()
            if not NAME.fullmatch(value):
                raise ValueError("name: 1-40 letters, digits, spaces, dots, dashes or underscores")
            return value

        def foreign(self, post):
            """Why this request is refused as coming from another site, or None."""
            host = self.headers.get("Host")
            if allowed_hosts is not None and host not in allowed_hosts:
                return "unknown Host"
            origin = self.headers.get("Origin")
            if post and origin is not None and origin != f"http://{host}":
                return "cross-site request"
            if post and self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return "expected a JSON body (Content-Type: application/json)"
            return None

        def do_GET(self):
            if self.foreign(post=False):
                return self.send(403, {"error": self.foreign(post=False)})
            path, _, query = self.path.partition("?")
            try:
                if path == "/":
                    return self.send(200, PAGE.encode(), "text/html; charset=utf-8")
                if path == "/api/state":
                    return self.send(200, store.state(self.name(parse_qs(query).get("annotator", [""])[0])))
                m = re.fullmatch(r"/img/(p\d{4,})/(left|right)", path)
                if m and m.group(1) in store.pairs:  # by pair id only: no request path reaches the file system
                    return self.send(200, (store.folder / store.pairs[m.group(1)][m.group(2)]).read_bytes(),
                                     "image/png")
                return self.send(404, {"error": "not found"})
            except ValueError as e:
                return self.send(400, {"error": str(e)})

        def do_POST(self):
            why = self.foreign(post=True)
            if why:
                return self.send(403, {"error": why})
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if not 0 < n <= 4096:
                    raise ValueError("request body missing or too large")
                body = json.loads(self.rfile.read(n))
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                name = self.name(body.get("annotator"))
                if self.path == "/api/answer":
                    note = body.get("note") or ""
                    if not isinstance(note, str) or len(note) > 500:
                        raise ValueError("note: text of at most 500 characters")
                    return self.send(200, store.answer(name, str(body.get("pair_id")), str(body.get("choice")),
                                                       note))
                if self.path == "/api/undo":
                    return self.send(200, store.undo(name))
                return self.send(404, {"error": "not found"})
            except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
                return self.send(400, {"error": str(e)})
    return Handler


def serve(folder, host="127.0.0.1", port=8765):
    """Serve the page for the pair set in `folder` until Ctrl-C."""
    store = Store(folder)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(store, None))
    except (OSError, OverflowError) as e:
        raise DataError(f"--port {port}: cannot listen on {host}:{port} ({e}); choose another --port") from e
    bound = server.server_address[1]
    if host in ("127.0.0.1", "localhost"):  # only this machine's names: a rebound DNS name is refused
        server.RequestHandlerClass = make_handler(store, {f"{h}:{bound}" for h in ("127.0.0.1", "localhost")})
    print(f"{len(store.pairs)} pairs ({store.manifest['kind']}) from {folder}; answers go to "
          f"{Path(folder) / 'answers.csv'}\nopen http://{host}:{bound}/ (Ctrl-C stops; restarting resumes)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"stopped; {len(store.rows)} answer rows are in {Path(folder) / 'answers.csv'}")
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# export: the DPO pairs and the summary
def cohen_kappa(a, b):
    """Cohen's kappa of two annotators' choices on the same pairs (NaN when undefined)."""
    cats = sorted(set(a) | set(b))
    if len(a) < 2 or len(cats) < 2:
        return float("nan")
    p_o = np.mean(np.array(a) == np.array(b))
    p_e = sum(np.mean(np.array(a) == c) * np.mean(np.array(b) == c) for c in cats)
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def fleiss_kappa(table):
    """Fleiss' kappa from an (items, categories) table of counts, the same number of raters per item."""
    t = np.asarray(table, float)
    if len(t) < 2 or t.sum(1).min() < 2:
        return float("nan")
    n = t.sum(1)[0]
    p_j = t.sum(0) / t.sum()
    p_i = ((t * (t - 1)).sum(1)) / (n * (n - 1))
    p_e = (p_j ** 2).sum()
    return float((p_i.mean() - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def agreement(answers, pair_ids):
    """Pairwise Cohen's kappa on shared pairs, and Fleiss' kappa over the pairs every annotator answered."""
    names = sorted(answers)
    pairwise = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(answers[a]) & set(answers[b]))
            pairwise[f"{a} vs {b}"] = {"kappa": cohen_kappa([answers[a][p][0] for p in shared],
                                                            [answers[b][p][0] for p in shared]), "n_pairs": len(shared)}
    common = [p for p in pair_ids if len(names) > 1 and all(p in answers[a] for a in names)]
    table = [[sum(answers[a][p][0] == c for a in names) for c in CHOICES] for p in common]
    return {"cohen": pairwise, "fleiss": {"kappa": fleiss_kappa(table), "n_pairs": len(common),
                                          "n_annotators": len(names)}}


def preference_rates(manifest, answers, n_boot=2000, seed=0):
    """Blinded sets: per (method, opponent) the share of decisive answers preferring the method's image, with a
    95% percentile CI from a crossed bootstrap (Owen 2007): each resample draws the pairs once, shared by all
    annotators, and the annotators, both with replacement, and pools the answers of the drawn annotators on the
    drawn pairs; so both the pairs and the annotators count as samples."""
    rng = np.random.default_rng(seed)
    pairs = {p["id"]: p for p in manifest["pairs"]}
    names = sorted(answers)
    wins = {}  # (method, opponent) -> {pair id: {annotator: 1 / 0}}
    for a, ans in answers.items():
        for pid, (choice, _) in ans.items():
            if choice not in ("left", "right"):
                continue
            p = pairs[pid]
            chosen, other = (p["left_source"], p["right_source"]) if choice == "left" else \
                (p["right_source"], p["left_source"])
            for m, opp, won in ((chosen, other, 1), (other, chosen, 0)):
                if m != "real":
                    wins.setdefault((m, opp), {}).setdefault(pid, {})[a] = won
    out = {}
    for (m, opp), by_pair in sorted(wins.items()):
        W = np.array([[by_pair[pid].get(a, np.nan) for pid in by_pair] for a in names])  # (annotators, pairs)
        boot = []
        for _ in range(n_boot):
            sub = W[np.ix_(rng.integers(0, len(names), len(names)), rng.integers(0, W.shape[1], W.shape[1]))]
            if np.isfinite(sub).any():
                boot.append(np.nanmean(sub))
        out.setdefault(m, {})[f"vs {opp}"] = {
            "rate": float(np.nanmean(W)), "ci": np.percentile(boot, [2.5, 97.5]).tolist(),
            "n_answers": int(np.isfinite(W).sum()), "n_pairs": W.shape[1],
            "n_annotators": int(np.isfinite(W).any(1).sum())}
    return out


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


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a train_ddpm.py / train_dpo.py checkpoint: draw the candidate pairs from it")
    src.add_argument("--from-dir", help="candidate images in one subfolder per condition ('|' in a class name "
                     "written '__', e.g. F__finding/)")
    src.add_argument("--serve", metavar="DIR", help="serve the pair set already in DIR")
    src.add_argument("--export", metavar="DIR", help="write the answers in DIR as train_dpo's pairs CSV (--out) and "
                     "a summary (<out>_summary.json)")
    p.add_argument("--out", help="the pair-set folder to create (--ckpt, --from-dir), or the CSV (--export)")
    p.add_argument("--pairs-per-class", type=positive_int, default=20, help="pairs per condition")
    p.add_argument("--steps", type=positive_int, default=25, help="DDIM steps for the candidates (--ckpt)")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="guidance scale of the candidates (--ckpt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidates and of their pairing")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (--ckpt)")
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address or name to listen on (default: this machine "
                   "only)")
    p.add_argument("--port", type=port, default=8765, help="port to listen on (0: any free port)")
    p.add_argument("--no-serve", action="store_true", help="write the pair set, do not start the server")
    p.add_argument("--force", action="store_true", help="--export: replace an earlier export")
    args = p.parse_args(argv)
    if (args.ckpt or args.from_dir or args.export) and not args.out:
        p.error("--out is required with --ckpt, --from-dir and --export")
    return args


def main(args):
    if args.export:
        return export(args.export, args.out, args.force)
    folder = Path(args.serve or args.out)
    if not args.serve:
        if args.ckpt:
            recipe = model_recipe(args.ckpt, args.pairs_per_class, args.steps, args.guidance, args.seed)
            make = lambda: preference_pairs_from_model(args.ckpt, args.pairs_per_class, args.steps, args.guidance,
                                                       args.seed, device_from(args.device))
        else:
            found = dir_candidates(args.from_dir)
            recipe = {"from_dir": str(Path(args.from_dir).resolve()), "pairs_per_class": args.pairs_per_class,
                      "seed": args.seed, "files": {d.name: [f.name for f in fs] for d, fs in found.items()}}
            make = lambda: preference_pairs_from_dir(found, args.pairs_per_class, args.seed)
        if (folder / "pairs.json").is_file():
            old = load_pair_set(folder)
            if old.get("recipe") != recipe:
                raise DataError(f"--out {folder}: holds another pair set ({old['id']}); choose another --out, or "
                                f"--serve it")
            print(f"{folder}: this pair set exists already; resuming it")
        elif folder.exists() and any(folder.iterdir()):
            raise DataError(f"--out {folder}: holds other files; choose a new folder for the pair set")
        else:
            write_pair_set(folder, "preference", make(), recipe)
    if not args.no_serve:
        if args.host not in ("127.0.0.1", "localhost"):
            print(f"warning: --host {args.host} lets other machines on the network open the page and answer")
        serve(folder, args.host, args.port)


if __name__ == "__main__":
    run(main, parse_args)
