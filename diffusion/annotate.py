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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
from pathlib import Path
import re
from urllib.parse import parse_qs

from common.cli import ArgumentParser, nonneg_float, port, positive_int, run
from common.errors import DataError
from common.runs import device_from
from diffusion.annotate_answers import NAME, Store
from diffusion.annotate_export import export
from diffusion.annotate_page import PAGE
from diffusion.annotate_pairs import (dir_candidates, load_pair_set, model_recipe, preference_pairs_from_dir,
                                      preference_pairs_from_model, write_pair_set)
from diffusion.annotate_pairs import blinded_pairs  # noqa: F401  (re-exported: diffusion/fairgen_study.py imports it)


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
