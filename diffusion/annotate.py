"""A local page where clinicians judge synthetic images: the preference pairs FairGen's DPO step needs
(diffusion/train_dpo.py --pairs), the blinded expert evaluation FairGen reports, and a reader study (real or
synthetic?).

Three kinds of set, one page:
- preference: two samples of one model under the same condition (e.g. "female, Effusion"); the answer says which
  shows the condition better. Exported as the physicians' CSV `condition, preferred_path, rejected_path` (plus the
  annotator and a `disagreement` flag), which `train_dpo --pairs` reads; its outputs then name the clinicians.
- blinded: a real image against a method's sample, or two methods' samples, under the same condition; source and
  side hidden and shuffled. The question: "which better shows the prompted finding?". `make fairgen` writes such a
  set (results/fairgen/blinded_pairs); the export gives each method's preference rate against real images and
  against each other method, with a CI over annotators and pairs, and the agreement between annotators.
- reader (--reader-study BLINDED_DIR): one image at a time, "real or synthetic?" with a realism rating 1-5; as many
  real as synthetic images per condition. The export gives each reader's accuracy against 50%, the detection rate
  per method and per group (are one group's synthetic images easier to spot?), and the agreement between readers.

Who answers: the organiser names the annotators (--annotators "Dr A,Dr B"); the server prints one private link per
annotator, and only that link answers or undoes as that person (the names and tokens are kept in the set's
annotators.json, so links survive a restart: do not share or commit that file). Every annotator first answers the
same calibration block (--calibration pairs, in the same order: the overlap agreement is measured on), then their
share of the rest, split among the named annotators.

Only deliberate answers count: a pair can be answered once it has been on screen --min-view-ms, key repeats and keys
still held from the previous pair are ignored, buttons never keep the focus. Every answer is appended to
answers.csv with the time it was on screen and fsynced at once (a killed server loses nothing answered); a last line
cut short is moved aside to answers.torn-<time>.txt before anything is appended.

    # from a trained DDPM: draw 2 x 20 samples per condition, then serve the page on http://127.0.0.1:8765
    python -m diffusion.annotate --ckpt runs/results/fairgen/cxr-seed0/sqrs_cb/ckpt.pt --pairs-per-class 20 \
        --out prefs --annotators "Dr A,Dr B"
    python -m diffusion.annotate --serve prefs          # serve it again: the same links
    python -m diffusion.annotate --export prefs --out pairs.csv   # the CSV for train_dpo, and its summary
    python -m diffusion.train_dpo --init .../sqrs_cb/ckpt.pt --pairs pairs.csv --data cxr --size 32 --out-dir dpo
    # a reader study on make fairgen's blinded set
    python -m diffusion.annotate --reader-study results/fairgen/blinded_pairs/cxr --out reading_cxr \
        --annotators "Dr A,Dr B,Dr C"

Safety: the server binds 127.0.0.1 unless --host says otherwise; it serves the page and the set's images by id only
(no path from a request reaches the file system); every field of a request is type-checked (one 400 line);
requests whose headers or body do not arrive within a few seconds are dropped; it sends nothing anywhere.
"""
import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
from pathlib import Path
import re
import socket
import sys
import threading

from common.cli import ArgumentParser, nonneg_float, nonneg_int, port, positive_int, run
from common.errors import DataError
from common.runs import device_from
from diffusion.annotate_answers import Store, clean_name
from diffusion.annotate_export import export
from diffusion.annotate_page import PAGE
from diffusion.annotate_pairs import (dir_candidates, load_pair_set, model_recipe, preference_pairs_from_dir,
                                      preference_pairs_from_model, reader_items, write_pair_set)
from diffusion.annotate_pairs import blinded_pairs  # noqa: F401  (re-exported: diffusion/fairgen_study.py imports it)

REQUEST_SECONDS = 5  # a connection that has not sent its whole request (line, headers, body) by then is closed
FIELDS = {"/api/answer": {"pair_id": str, "choice": str, "note": str, "rating": int}, "/api/undo": {}}


def checked_body(raw, path):
    """The JSON object of a POST, every field of the type the endpoint expects (ValueError names the field)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError("request body nested too deeply")
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    expected = FIELDS[path]
    for key, value in body.items():
        if key not in expected:
            raise ValueError(f"unknown field {key!r} (expected {sorted(expected)})")
        want = expected[key]
        if value is None and key in ("note", "rating"):
            continue
        if not isinstance(value, want) or isinstance(value, bool):
            raise ValueError(f"{key}: expected {'text' if want is str else 'a whole number'}")
    for key in expected:
        if key in ("pair_id", "choice") and key not in body:
            raise ValueError(f"{key}: missing")
    note = body.get("note") or ""
    if len(note) > 500:
        raise ValueError("note: text of at most 500 characters")
    return body


class Forbidden(Exception):
    """A request without a valid annotator token."""


def make_handler(store, allowed_hosts):
    """The request handler. Answers and undos need the annotator's token (header X-Annotator-Token, from their
    private link). Besides it refuses requests that a page of another site could make through the clinician's
    browser: a Host that is not one of allowed_hosts (DNS rebinding; None: any, for a server opened to the network
    with --host), a POST whose Origin is another site's or whose body is not application/json (a cross-site form or
    text/plain POST); and it forbids framing (clickjacking)."""
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_SECONDS  # socket timeout: a client that goes silent frees its thread

        def setup(self):
            """One request per connection (HTTP/1.0), and a deadline for all of it: a client that drips its
            headers or body a byte at a time is cut off too."""
            super().setup()
            self.expired = False
            self.deadline = threading.Timer(REQUEST_SECONDS, self.cut_off)
            self.deadline.daemon = True
            self.deadline.start()

        def cut_off(self):
            self.expired = True  # what the handler then reads is cut short: it answers nothing
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def handle(self):
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):  # the client left, or was cut off: nobody to answer
                pass

        def finish(self):
            self.deadline.cancel()
            try:
                super().finish()
            except OSError:  # the connection was cut off
                pass

        def log_message(self, *a):
            pass

        def send(self, code, body, ctype="application/json"):
            if self.expired:
                return
            data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            self.send_header("Referrer-Policy", "no-referrer")
            self.end_headers()
            self.wfile.write(data)

        def annotator(self):
            name = store.roster.who(self.headers.get("X-Annotator-Token"))
            if name is None:
                raise Forbidden("this link is not valid: open the private link the organiser gave you")
            return name

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
            self.deadline.cancel()  # the request is in; a slow download of an image is not cut off
            if self.foreign(post=False):
                return self.send(403, {"error": self.foreign(post=False)})
            path = self.path.partition("?")[0]
            try:
                if path == "/":
                    return self.send(200, PAGE.encode(), "text/html; charset=utf-8")
                if path == "/api/state":
                    return self.send(200, store.state(self.annotator()))
                m = re.fullmatch(r"/img/(p\d{4,})/(left|right|image)", path)
                side = m and store.pairs.get(m.group(1), {}).get(m.group(2))
                if side:  # by pair id only: no request path reaches the file system
                    return self.send(200, (store.folder / side).read_bytes(), "image/png")
                return self.send(404, {"error": "not found"})
            except Forbidden as e:
                return self.send(403, {"error": str(e)})

        def do_POST(self):
            why = self.foreign(post=True)
            if why:
                return self.send(403, {"error": why})
            try:
                if self.path not in FIELDS:
                    return self.send(404, {"error": "not found"})
                n = int(self.headers.get("Content-Length") or 0)
                if not 0 < n <= 4096:
                    raise ValueError("request body missing or too large")
                raw = self.rfile.read(n)
                if len(raw) < n:  # the client left, or was cut off by the deadline
                    return
                self.deadline.cancel()  # the request is in: whatever happens now is answered
                body = checked_body(raw, self.path)
                name = self.annotator()
                try:
                    if self.path == "/api/answer":
                        done = store.answer(name, body["pair_id"], body["choice"], body.get("note") or "",
                                            body.get("rating"))
                    else:
                        done = store.undo(name)
                except OSError as e:  # the answer could not be written (disk full, read-only): said, not saved
                    print(f"could not write {store.folder / 'answers.csv'}: {e}", file=sys.stderr, flush=True)
                    return self.send(500, {"error": "the server could not save this answer (see its console); "
                                                    "tell the organiser"})
                return self.send(200, done)
            except Forbidden as e:
                return self.send(403, {"error": str(e)})
            except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
                return self.send(400, {"error": str(e)})
    return Handler


def serve(folder, host="127.0.0.1", port=8765, annotators=(), calibration=None, min_view_ms=300):
    """Serve the page for the set in `folder` until Ctrl-C, one private link per named annotator. One server per
    folder: a second one would keep its own copy of the log."""
    import fcntl  # POSIX; imported here so that the module (and fairgen's import of it) loads anywhere
    load_pair_set(folder)  # a folder that is no pair set is refused before anything is written into it
    lock = open(Path(folder) / ".serving.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DataError(f"--serve {folder}: another server is serving this folder; stop it first (two would each "
                        f"keep their own copy of the answers)")
    store = Store(folder, min_view_ms / 1000)
    if annotators:  # later serves without --annotators keep the roster (and its calibration block) as it is
        store.name_annotators(annotators, calibration)
    elif calibration is not None and calibration != store.roster.calibration:
        print(f"note: --calibration {calibration} ignored: the reading started with {store.roster.calibration}")
    if not store.roster.people:
        raise DataError("--annotators: name who may answer (e.g. --annotators \"Dr A,Dr B\"); the server prints "
                        "one private link per annotator")
    try:
        server = ThreadingHTTPServer((host, port), make_handler(store, None))
    except (OSError, OverflowError) as e:
        raise DataError(f"--port {port}: cannot listen on {host}:{port} ({e}); choose another --port") from e
    bound = server.server_address[1]
    if host in ("127.0.0.1", "localhost"):  # only this machine's names: a rebound DNS name is refused
        server.RequestHandlerClass = make_handler(store, {f"{h}:{bound}" for h in ("127.0.0.1", "localhost")})
    names = store.roster.names()
    print(f"{len(store.pairs)} {'images' if store.kind == 'reader' else 'pairs'} ({store.kind}) from {folder}; "
          f"answers go to {Path(folder) / 'answers.csv'}; calibration block: {store.roster.calibration}, then the "
          f"rest split among {len(names)} annotator{'s' if len(names) > 1 else ''}\nprivate links (one per "
          f"annotator; whoever holds a link answers as that person):", flush=True)
    for p in store.roster.people:
        print(f"  {p['name']}: http://{host}:{bound}/#t={p['token']}", flush=True)
    print(f"open http://{host}:{bound}/ through a link above (Ctrl-C stops; restarting resumes)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"stopped; {len(store.rows)} answer rows are in {Path(folder) / 'answers.csv'}")
    finally:
        server.server_close()


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a train_ddpm.py / train_dpo.py checkpoint: draw the candidate pairs from it")
    src.add_argument("--from-dir", help="candidate images in one subfolder per condition ('|' in a class name "
                     "written '__', e.g. F__finding/)")
    src.add_argument("--reader-study", metavar="BLINDED_DIR", help="make a reader study (real or synthetic?) from "
                     "a blinded pair set, e.g. results/fairgen/blinded_pairs/cxr, into --out")
    src.add_argument("--serve", metavar="DIR", help="serve the set already in DIR")
    src.add_argument("--export", metavar="DIR", help="write the answers in DIR as a CSV (--out; for a preference "
                     "set the one train_dpo reads) and a summary (<out>_summary.json)")
    p.add_argument("--out", help="the set's folder to create (--ckpt, --from-dir, --reader-study), or the CSV "
                   "(--export)")
    p.add_argument("--annotators", default="", help="comma-separated names of who may answer, e.g. \"Dr A,Dr "
                   "O'Brien\" (letters of any alphabet, spaces, apostrophes, hyphens, dots; case and spacing do not "
                   "make another person); needed the first time a set is served, later ones add people")
    p.add_argument("--calibration", type=nonneg_int, default=None, help="pairs every annotator answers first, in "
                   "the same order (agreement is measured on them; default 20); the rest is split among the "
                   "annotators. Fixed when a set is first served")
    p.add_argument("--min-view-ms", type=nonneg_int, default=300, help="a pair can be answered only after it has "
                   "been on screen this long")
    p.add_argument("--pairs-per-class", type=positive_int, default=20, help="pairs per condition")
    p.add_argument("--steps", type=positive_int, default=25, help="DDIM steps for the candidates (--ckpt)")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="guidance scale of the candidates (--ckpt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidates and of their pairing")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (--ckpt)")
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address or name to listen on (default: this machine "
                   "only)")
    p.add_argument("--port", type=port, default=8765, help="port to listen on (0: any free port)")
    p.add_argument("--no-serve", action="store_true", help="write the set, do not start the server")
    p.add_argument("--force", action="store_true", help="--export: replace an earlier export")
    args = p.parse_args(argv)
    if (args.ckpt or args.from_dir or args.reader_study or args.export) and not args.out:
        p.error("--out is required with --ckpt, --from-dir, --reader-study and --export")
    args.annotators = [a for a in args.annotators.split(",") if a.strip()]
    for a in args.annotators:  # said now, not after --ckpt has sampled for minutes
        try:
            clean_name(a)
        except ValueError as e:
            p.error(f"--annotators: {e}")
    return args


def main(args):
    if args.export:
        return export(args.export, args.out, args.force)
    folder = Path(args.serve or args.out)
    if not args.serve:
        if args.ckpt:
            recipe = model_recipe(args.ckpt, args.pairs_per_class, args.steps, args.guidance, args.seed)
            make = lambda: write_pair_set(folder, "preference", preference_pairs_from_model(  # noqa: E731
                args.ckpt, args.pairs_per_class, args.steps, args.guidance, args.seed, device_from(args.device)),
                recipe)
        elif args.reader_study:
            items, source_id = reader_items(args.reader_study, args.seed)
            recipe = {"reader_study_of": source_id, "seed": args.seed}
            make = lambda: write_pair_set(folder, "reader", items, recipe)  # noqa: E731
        else:
            found = dir_candidates(args.from_dir)
            recipe = {"from_dir": str(Path(args.from_dir).resolve()), "pairs_per_class": args.pairs_per_class,
                      "seed": args.seed, "files": {d.name: [f.name for f in fs] for d, fs in found.items()}}
            make = lambda: write_pair_set(folder, "preference", preference_pairs_from_dir(  # noqa: E731
                found, args.pairs_per_class, args.seed), recipe)
        if (folder / "pairs.json").is_file():
            old = load_pair_set(folder)
            if old.get("recipe") != recipe:
                raise DataError(f"--out {folder}: holds another pair set ({old['id']}); choose another --out, or "
                                f"--serve it")
            print(f"{folder}: this pair set exists already; resuming it")
        elif folder.exists() and any(folder.iterdir()):
            raise DataError(f"--out {folder}: holds other files; choose a new folder for the pair set")
        else:
            make()
    if not args.no_serve:
        if args.host not in ("127.0.0.1", "localhost"):
            print(f"warning: --host {args.host} lets other machines on the network open the page; only the "
                  f"private links can answer")
        serve(folder, args.host, args.port, args.annotators, args.calibration, args.min_view_ms)


if __name__ == "__main__":
    run(main, parse_args)
