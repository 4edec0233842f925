"""The clinicians' preference page (diffusion/annotate.py): HTTP-level safety, the answer log, the export that
train_dpo reads, agreement and preference rates, and a real headless Chromium driving the page (skipped, with the
reason, where Chromium, its driver or Selenium is missing; .ci/run installs them so that CI runs them)."""
import csv
import json
import os
import re
import shutil
from pathlib import Path
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
from forkserver import python_m
from common.errors import DataError
from diffusion.annotate_answers import (ANSWER_COLUMNS, Roster, Store, annotator_queue, clean_name, name_key,
                                        read_answers, replay)
from diffusion.annotate_export import export
from diffusion.annotate_pairs import (blinded_pairs, dir_candidates, load_pair_set, preference_pairs_from_dir,
                                      write_pair_set)
from diffusion.annotate_stats import fleiss_kappa, preference_rates


def candidates(folder, n=6, seed=0, conditions=("F__finding", "M__No Finding")):
    rng = np.random.default_rng(seed)
    for c in conditions:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder


def make_set(tmp_path, n=3):
    found = dir_candidates(candidates(tmp_path / "cands", n=max(6, 2 * n)))
    recipe = {"from_dir": "x", "pairs_per_class": n, "seed": 0}
    return write_pair_set(tmp_path / "prefs", "preference", preference_pairs_from_dir(found, n, 0), recipe)


class Server:
    """The real command in a subprocess on a free port: .base (URL), .links ({name: token}), .output() (what it
    printed so far). A thread keeps reading its output (so that the pipe never fills)."""

    def __init__(self, folder, annotators="Dr A,Dr B", min_view_ms=0, calibration=None, timeout=240):
        import queue
        import threading
        cmd = [sys.executable, "-m", "diffusion.annotate", "--serve", str(folder), "--port", "0", "--min-view-ms",
               str(min_view_ms)] + (["--annotators", annotators] if annotators else []) + \
            (["--calibration", str(calibration)] if calibration is not None else [])
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.p.stdout], daemon=True).start()
        self.links = {}
        try:
            while True:
                self.seen.append(self.lines.get(timeout=timeout))
                link = re.match(r"  (.+): (http://127\.0\.0\.1:\d+)/#t=(\S+)", self.seen[-1])
                if link:
                    self.links[link.group(1)] = link.group(3)
                m = re.search(r"open (http://127\.0\.0\.1:\d+)/", self.seen[-1])
                if m:
                    self.base = m.group(1)
                    return
        except Exception:
            self.p.kill()
            raise AssertionError(f"the server did not start: {''.join(self.seen)}")

    def output(self):
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def link(self, name):
        return f"{self.base}/#t={self.links[name]}"

    def kill(self):
        kill(self.p)


def kill(p):
    p.send_signal(signal.SIGKILL)  # as a crash would: no chance to clean up
    p.wait()


def request(base, path, body=None, raw=None, headers=None, token=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **({"X-Annotator-Token": token} if token else {}), **(headers or {})}
    req = urllib.request.Request(base + path, data=data, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def state(srv, name):
    status, body = request(srv.base, "/api/state", token=srv.links[name])
    assert status == 200, body
    return json.loads(body)


def answer_next(srv, name, choice, rating=None, note=None):
    """Answer the pair the server shows `name`, as the page does: state first, then the answer."""
    pid = state(srv, name)["pair"]["id"]
    body = {"pair_id": pid, "choice": choice, **({"rating": rating} if rating else {}), **({"note": note} if note
                                                                                            else {})}
    status, out = request(srv.base, "/api/answer", body, token=srv.links[name])
    assert status == 200, out
    return pid


@pytest.fixture
def server(tmp_path):
    m = make_set(tmp_path)
    srv = Server(tmp_path / "prefs", calibration=4)
    yield m, srv, tmp_path / "prefs"
    srv.kill()


def test_pairs_are_two_images_of_one_condition(tmp_path):
    m = make_set(tmp_path, n=3)
    assert len(m["pairs"]) == 6 and m["kind"] == "preference"
    for p in m["pairs"]:
        assert p["left"] != p["right"] and p["text"] in ("female, finding", "male, No Finding")
        assert np.asarray(Image.open(tmp_path / "prefs" / p["left"])).shape == (32, 32)


def test_http_serves_only_pair_images_and_validates_answers(server):
    m, srv, folder = server
    base, tok = srv.base, srv.links["Dr A"]
    secret = folder / "answers.csv"
    assert request(base, "/")[0] == 200
    for path in ["/img/../../etc/passwd", "/img/p0000/../../pairs.json", "/%2e%2e/pairs.json", "/pairs.json",
                 "/images/p0000_left.png", "/img/p9999/left", "/img/p0000/top", "/img/p0000/left/../right",
                 "/img/p0000/image", "/annotators.json"]:
        assert request(base, path)[0] == 404, path
    status, body = request(base, "/img/p0000/left")
    assert status == 200 and body == (folder / m["pairs"][0]["left"]).read_bytes()
    pid = state(srv, "Dr A")["pair"]["id"]
    bad = [{"pair_id": pid, "choice": "best"}, {"pair_id": "../x", "choice": "left"},
           {"pair_id": pid, "choice": "left", "note": "x" * 501},
           {"pair_id": 5, "choice": "left"}, {"pair_id": pid, "choice": True}, {"pair_id": [pid], "choice": "left"},
           {"pair_id": pid, "choice": "left", "note": {"a": 1}}, {"pair_id": pid, "choice": "left", "rating": 3},
           {"pair_id": pid, "choice": "left", "annotator": "Dr B"}, {"choice": "left"},
           ["not", "an", "object"], True, 5, "left"]
    for body in bad:
        assert request(base, "/api/answer", body, token=tok)[0] == 400, body
    for raw in (b"{not json", b"{" + b" " * 5000 + b"}", b"[" * 4000 + b"]" * 4000, b"[" * 4000, b"\xff\xfe", b"null"):
        assert request(base, "/api/answer", raw=raw, token=tok)[0] == 400, raw[:10]
    assert request(base, "/api/undo", {}, token=tok)[0] == 400  # nothing to undo
    assert request(base, "/api/undo", {"annotator": "Dr B"}, token=tok)[0] == 400
    assert not secret.exists()  # no bad request wrote anything
    ok = {"pair_id": pid, "choice": "left", "note": "sharp\nborders"}
    assert request(base, "/api/answer", ok, token=tok)[0] == 200
    assert request(base, "/api/answer", ok, token=tok)[0] == 400  # a double click does not answer twice
    rows = list(csv.DictReader(open(secret)))
    assert [(r["annotator"], r["pair_id"], r["choice"], r["note"]) for r in rows] == [("Dr A", pid, "left",
                                                                                       "sharp borders")]
    assert int(rows[0]["shown_ms"]) >= 0
    assert "Traceback" not in srv.output()  # every bad body got its 400 line, none crashed the handler


def test_only_an_annotators_own_link_answers_or_undoes(server):
    """No sign-in to guess: the organiser names the annotators, each gets a private link (a random token), and a
    request without it (or with another's) cannot answer or undo as them."""
    m, srv, folder = server
    assert set(srv.links) == {"Dr A", "Dr B"} and len(set(srv.links.values())) == 2
    assert all(len(t) >= 20 for t in srv.links.values())
    pid = answer_next(srv, "Dr A", "left")
    nxt = state(srv, "Dr A")["pair"]["id"]
    for token in (None, "", "x" * 24, srv.links["Dr A"][:-1]):
        assert request(srv.base, "/api/state", token=token)[0] == 403
        assert request(srv.base, "/api/answer", {"pair_id": nxt, "choice": "left"}, token=token)[0] == 403
        assert request(srv.base, "/api/undo", {}, token=token)[0] == 403
    assert request(srv.base, "/api/undo", {}, token=srv.links["Dr B"])[0] == 400  # B's undo is B's: nothing
    rows = list(csv.DictReader(open(folder / "answers.csv")))
    assert [(r["annotator"], r["pair_id"], r["choice"]) for r in rows] == [("Dr A", pid, "left")]
    roster = json.loads((folder / "annotators.json").read_text())
    assert oct((folder / "annotators.json").stat().st_mode & 0o777) == "0o600"
    assert {p["name"]: p["token"] for p in roster["annotators"]} == srv.links
    # a restart keeps the links (no --annotators: the roster as it was); naming one more adds a link, keeping the
    # calibration block the reading started with (4) without being told again
    srv.kill()
    again = Server(folder, annotators="Dr C")
    try:
        assert again.links["Dr A"] == srv.links["Dr A"] and set(again.links) == {"Dr A", "Dr B", "Dr C"}
        assert state(again, "Dr C")["calibration"] == 4
        assert state(again, "Dr A")["done"] == 1
    finally:
        again.kill()
    srv.p = again.p


def test_names_any_alphabet_one_person_however_written(tmp_path):
    for ok in ("Dr Zo\u00eb M\u00fcller", "Dr O'Brien", "Dr. Anne-Marie Ng", "\u738b\u533b\u751f",
               "Dr O\u2019Neil", "\u092a\u094d\u0930\u093f\u092f\u093e \u0936\u0930\u094d\u092e\u093e",
               "\u0645\u062d\u0645\u0651\u062f", "\u0e17\u0e31\u0e01\u0e29\u0e34\u0e13",
               "\u0639\u0644\u06cc\u200c\u0631\u0636\u0627"):
        assert clean_name(ok) == ok
    assert clean_name("  Dr   A ") == "Dr A" and name_key("dr a") == name_key("Dr  A") == name_key("DR A")
    for bad in ("", " ", "<script>", "Dr 5", "a" * 61, "'quote first", 5, None, ["Dr A"]):
        with pytest.raises(ValueError):
            clean_name(bad)
    make_set(tmp_path)
    roster = Roster(tmp_path / "prefs")
    with pytest.raises(DataError, match="same person"):
        roster.add(["Dr A", "dr  a"], 20, 6)
    for extra in ([], ["--annotators", "Dr 5"], ["--annotators", "Dr A,dr  a"]):  # nobody; a digit; twice
        r = python_m("diffusion.annotate", ["--serve", str(tmp_path / "prefs"), "--port", "0", *extra], timeout=60)
        assert r.returncode == 2 and "--annotators" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_pair_counts_only_once_shown_for_a_moment(tmp_path):
    make_set(tmp_path)
    srv = Server(tmp_path / "prefs", min_view_ms=300)
    try:
        tok = srv.links["Dr A"]
        s = state(srv, "Dr A")
        other = next(p["id"] for p in load_pair_set(tmp_path / "prefs")["pairs"] if p["id"] != s["pair"]["id"])
        status, body = request(srv.base, "/api/answer", {"pair_id": s["pair"]["id"], "choice": "left"}, token=tok)
        assert status == 400 and b"ms after the pair was shown" in body  # a key pressed as the pair appeared
        time.sleep(0.35)
        status, body = request(srv.base, "/api/answer", {"pair_id": other, "choice": "left"}, token=tok)
        assert status == 400 and b"not the pair on your screen" in body
        assert request(srv.base, "/api/answer", {"pair_id": s["pair"]["id"], "choice": "left"}, token=tok)[0] == 200
        rows = list(csv.DictReader(open(tmp_path / "prefs/answers.csv")))
        assert len(rows) == 1 and int(rows[0]["shown_ms"]) >= 300
    finally:
        srv.kill()


def test_slow_clients_are_dropped(server):
    """40 requests that never finish sending must not hold the server: each is dropped after REQUEST_SECONDS, and
    the page is served meanwhile."""
    import socket
    from diffusion.annotate import REQUEST_SECONDS
    m, srv, folder = server
    host, port = srv.base[len("http://"):].split(":")
    drip = socket.create_connection((host, int(port)), timeout=30)  # sends a header line now and then, forever
    drip.sendall(b"GET / HTTP/1.1\r\n")
    socks = []
    for i in range(40):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /api/answer HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\nContent-Type: "
                  b"application/json\r\nContent-Length: 100\r\n\r\n{" if i % 2 else b"GET / HTTP/1.1\r\nHo")
        socks.append(s)
    t0 = time.monotonic()
    assert request(srv.base, "/")[0] == 200 and time.monotonic() - t0 < 3
    dripping = True
    while dripping and time.monotonic() - t0 < REQUEST_SECONDS + 5:
        time.sleep(1)
        try:
            drip.sendall(b"X-Slow: 1\r\n")
        except OSError:
            dripping = False
    assert not dripping or drip.recv(100) == b""  # cut off by the deadline for the whole request
    assert time.monotonic() - t0 < REQUEST_SECONDS + 5
    def closed_by_server(s):
        s.settimeout(REQUEST_SECONDS + 10)  # a recv that outlasts this raises: the server kept the thread
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True
    assert all(closed_by_server(s) for s in socks)
    assert time.monotonic() - t0 < REQUEST_SECONDS + 10
    for s in socks:
        s.close()
    assert not (folder / "answers.csv").exists() and "Traceback" not in srv.output()


def test_an_answer_that_cannot_be_written_is_said_and_not_counted(tmp_path, capsys):
    """A full disk (or any write error) while answering: the page gets one line saying so, the answer does not
    count, the server's console names the file, and the server goes on."""
    import threading
    from http.server import ThreadingHTTPServer
    from diffusion.annotate import make_handler
    m = make_set(tmp_path)
    Roster(tmp_path / "prefs").add(["Dr A"], 0, len(m["pairs"]))
    store = Store(tmp_path / "prefs", min_view=0)

    def full_disk(row):
        raise OSError(28, "No space left on device")
    store.append = full_disk
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(store, None))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base, tok = f"http://127.0.0.1:{httpd.server_address[1]}", store.roster.people[0]["token"]
        pid = json.loads(request(base, "/api/state", token=tok)[1])["pair"]["id"]
        status, body = request(base, "/api/answer", {"pair_id": pid, "choice": "left"}, token=tok)
        assert status == 500 and b"could not save this answer" in body and b"prefs" not in body
        s = json.loads(request(base, "/api/state", token=tok)[1])
        assert s["done"] == 0 and s["pair"]["id"] == pid  # not counted; the same pair again
    finally:
        httpd.shutdown()
    assert "No space left on device" in capsys.readouterr().err


def test_requests_another_site_could_make_are_refused(server):
    """A page of another site, open in the clinician's browser, must not answer for them (CSRF), nor read the
    images through a rebound DNS name; and the page may not be framed."""
    m, srv, folder = server
    base, tok = srv.base, srv.links["Dr A"]
    pid = state(srv, "Dr A")["pair"]["id"]
    ok = {"pair_id": pid, "choice": "left"}
    assert request(base, "/api/answer", ok, headers={"Content-Type": "text/plain"}, token=tok)[0] == 403
    assert request(base, "/api/answer", ok, headers={"Origin": "http://evil.example"}, token=tok)[0] == 403
    assert request(base, "/img/p0000/left", headers={"Host": "evil.example:80"})[0] == 403
    assert request(base, "/api/state", headers={"Host": "rebound.example:8765"}, token=tok)[0] == 403
    assert not (folder / "answers.csv").exists()
    with urllib.request.urlopen(base + "/", timeout=10) as r:
        assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in r.headers[
            "Content-Security-Policy"] and r.headers["Referrer-Policy"] == "no-referrer"
    port = base.rsplit(":", 1)[1]
    assert request(base, "/api/answer", ok, headers={"Origin": f"http://localhost:{port}",
                                                     "Host": f"localhost:{port}"}, token=tok)[0] == 200


def test_export_never_overwrites(tmp_path):
    m = make_set(tmp_path)
    log(tmp_path / "prefs", m, [("ann", m["pairs"][0]["id"], "left")])
    for out in (tmp_path / "prefs/answers.csv", tmp_path / "prefs/sub/p.csv"):
        with pytest.raises(DataError, match="inside the pair set"):
            export(tmp_path / "prefs", out)
    export(tmp_path / "prefs", tmp_path / "p.csv")
    with pytest.raises(DataError, match="exists"):
        export(tmp_path / "prefs", tmp_path / "p.csv")
    export(tmp_path / "prefs", tmp_path / "p.csv", force=True)


def test_answer_log_is_checked_and_a_torn_line_set_aside(tmp_path):
    m = make_set(tmp_path)
    log(tmp_path / "prefs", m, [("ann", m["pairs"][0]["id"], "left"), ("ann", "p9999", "left"),
                                ("ann", m["pairs"][1]["id"], "left")])
    with pytest.raises(DataError, match="line 3"):
        Store(tmp_path / "prefs")
    log(tmp_path / "prefs", m, [("ann", m["pairs"][0]["id"], "left")])
    torn = "2026-01-01T00:00:00,ann,"
    with open(tmp_path / "prefs/answers.csv", "a") as f:
        f.write(torn)  # a write cut short by a kill
    with pytest.warns(UserWarning, match="incomplete"):  # the export reads around it and changes nothing
        assert len(read_answers(tmp_path / "prefs", m)) == 1
    with pytest.warns(UserWarning, match="moved to answers.torn-"):
        store = Store(tmp_path / "prefs", min_view=0)
    aside = list((tmp_path / "prefs").glob("answers.torn-*.txt"))
    assert len(aside) == 1 and aside[0].read_text() == torn + "\n"
    assert (tmp_path / "prefs/answers.csv").read_bytes().endswith(b"\n")
    store.roster.add(["ann"], 0, len(m["pairs"]))
    store.state("ann")
    pid = store.shown["ann"][0]
    store.answer("ann", pid, "right", "=HYPERLINK(1)")  # on a line of its own, never onto the torn one
    store.state("ann")
    store.answer("ann", store.shown["ann"][0], "left", "")
    rows = read_answers(tmp_path / "prefs", m)  # a restart reads every answer: nothing lost, no refusal
    assert [r["pair_id"] for r in rows][1] == pid and len(rows) == 3
    assert rows[1]["note"] == "'=HYPERLINK(1)"  # shown as text by a spreadsheet
    (tmp_path / "prefs/answers.csv").write_text("")  # an empty log gets its header back with the next answer
    store = Store(tmp_path / "prefs", min_view=0)
    store.state("ann")
    store.answer("ann", store.shown["ann"][0], "right", "")
    assert len(read_answers(tmp_path / "prefs", m)) == 1


def test_an_old_log_is_upgraded_and_its_names_are_people(tmp_path):
    """A log written by an earlier version (no rating, no shown_ms) is rewritten in today's columns (the original
    kept) before anything is appended; its 'dr a' is the roster's 'Dr A'."""
    m = make_set(tmp_path)
    folder = tmp_path / "prefs"
    old = "time,annotator,pair_set,pair_id,choice,note\r\n" + "".join(
        f"t,{who},{m['id']},{pid},left,\r\n" for who, pid in (("dr a", "p0000"), ("Dr  A", "p0001")))
    (folder / "answers.csv").write_text(old)
    Roster(folder).add(["Dr A"], 0, len(m["pairs"]))
    with pytest.warns(UserWarning, match="rewritten in today's columns"):
        store = Store(folder, min_view=0)
    assert (folder / "answers.v1.csv").read_bytes() == old.encode()
    assert store.state("Dr A")["done"] == 2 and list(store.answers) == ["Dr A"]
    store.answer("Dr A", store.shown["Dr A"][0], "right", "")
    rows = list(csv.DictReader(open(folder / "answers.csv")))
    assert list(rows[0]) == ANSWER_COLUMNS and rows[-1]["shown_ms"] != "" and len(rows) == 3


def test_names_in_a_log_are_the_rosters_names_in_the_server_and_the_export(tmp_path):
    """Answers logged as 'dr a' before the roster existed belong to the 'Dr A' the organiser then names: the page
    resumes them, and the export calls them 'Dr A'."""
    m = make_set(tmp_path)
    folder = tmp_path / "prefs"
    log(folder, m, [("dr a", "p0000", "left"), ("Dr  A", "p0001", "right")])
    srv = Server(folder, annotators="Dr A", calibration=0)
    try:
        s = state(srv, "Dr A")
        assert s["done"] == 2 and s["can_undo"] and s["pair"]["id"] not in ("p0000", "p0001")
    finally:
        srv.kill()
    summary = export(folder, tmp_path / "p.csv")
    assert summary["judge"] == "1 clinician (Dr A)" and set(pd.read_csv(tmp_path / "p.csv").annotator) == {"Dr A"}


def test_pair_set_paths_are_fixed(tmp_path):
    make_set(tmp_path)
    j = json.loads((tmp_path / "prefs/pairs.json").read_text())
    j["pairs"][0]["left"] = "../../.ssh/id_rsa"
    (tmp_path / "prefs/pairs.json").write_text(json.dumps(j))
    with pytest.raises(DataError, match="not a pair set"):
        load_pair_set(tmp_path / "prefs")


def test_killed_server_loses_nothing_and_resumes(tmp_path):
    m = make_set(tmp_path)
    srv = Server(tmp_path / "prefs", annotators="Lee,Kim")
    order = annotator_queue(m, ["Lee", "Kim"], "Lee", 20)
    for c in ["left", "right", "cannot_tell"]:
        answer_next(srv, "Lee", c)
    srv.kill()
    srv = Server(tmp_path / "prefs")
    try:
        s = state(srv, "Lee")
        assert s["done"] == 3 and s["pair"]["id"] == order[3] and s["can_undo"]
        assert state(srv, "Kim")["done"] == 0
    finally:
        srv.kill()


def test_calibration_block_then_a_split(tmp_path):
    """Every annotator answers the same first pairs in the same order (the overlap kappa needs), then their share
    of the rest: the shares are disjoint and cover the set."""
    m = make_set(tmp_path, n=15)  # 30 pairs
    names = ["Dr A", "Dr B", "Dr C"]
    queues = {n: annotator_queue(m, names, n, 6) for n in names}
    assert all(q[:6] == queues["Dr A"][:6] for q in queues.values())
    rest = [q[6:] for q in queues.values()]
    assert sorted(sum(rest, [])) == sorted(p["id"] for p in m["pairs"] if p["id"] not in queues["Dr A"][:6])
    assert [len(r) for r in rest] == [8, 8, 8]
    assert annotator_queue(m, names, "dr  b", 6) == queues["Dr B"]  # one person however written
    assert annotator_queue(m, names, "Dr A", 100) == annotator_queue(m, names, "Dr B", 100)  # all shared


def test_refuses_answers_of_another_pair_set(tmp_path):
    make_set(tmp_path)
    with open(tmp_path / "prefs/answers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ANSWER_COLUMNS)
        w.writeheader()
        w.writerow({"time": "t", "annotator": "a", "pair_set": "0123456789abcdef", "pair_id": "p0000",
                    "choice": "left", "note": ""})
    r = python_m("diffusion.annotate", ["--serve", str(tmp_path / "prefs"), "--annotators", "Dr A"], timeout=60)
    assert r.returncode == 2 and "another pair set" in r.stderr and "Traceback" not in r.stderr
    # and a new --from-dir set into a folder that holds a different one
    candidates(tmp_path / "c2", seed=5)
    r = python_m("diffusion.annotate", ["--from-dir", str(tmp_path / "c2"), "--out",
                                        str(tmp_path / "prefs"), "--no-serve"], timeout=60)
    assert r.returncode == 2 and "another pair set" in r.stderr and "Traceback" not in r.stderr


def log(folder, m, rows):
    with open(folder / "answers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ANSWER_COLUMNS)
        w.writeheader()
        for a, pid, c, *rating in rows:
            w.writerow({"time": "t", "annotator": a, "pair_set": m["id"], "pair_id": pid, "choice": c,
                        "rating": rating[0] if rating else "", "note": ""})


def strict_json(path):
    """The file parsed as strict JSON: NaN or Infinity fail."""
    def refuse(c):
        raise AssertionError(f"{path}: {c} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_export_pairs_ties_undo_agreement_and_disagreements(tmp_path):
    from sklearn.metrics import cohen_kappa_score
    from diffusion.train_dpo import csv_pairs
    m = make_set(tmp_path, n=5)  # 10 pairs
    ids = [p["id"] for p in m["pairs"]]
    a = ["left", "right", "both_unacceptable", "cannot_tell", "left", "right", "left", "left", "right", "left"]
    b = ["left", "left", "both_unacceptable", "cannot_tell", "right", "right", "left", "cannot_tell", "right", "left"]
    rows = [("ann", ids[0], "right"), ("ann", ids[0], "undo")]  # an undone answer does not count
    rows += [("ann", i, c) for i, c in zip(ids, a)] + [("bo", i, c) for i, c in zip(ids, b)]
    rows += [("cy", ids[3], "left"), ("cy", ids[3], "undo")]  # all of cy's answers undone: cy counts nowhere
    log(tmp_path / "prefs", m, rows)
    s = export(tmp_path / "prefs", tmp_path / "pairs.csv")
    assert strict_json(tmp_path / "pairs_summary.json")["judge"] == "2 clinicians (ann, bo)"
    df = pd.read_csv(tmp_path / "pairs.csv")
    assert len(df) == 15 and s["undecided"] == {"both_unacceptable": 2, "cannot_tell": 3}
    first = df[(df.annotator == "ann") & (df.pair_id == ids[1])].iloc[0]  # 'right' -> right image preferred
    assert first.preferred_path.endswith(m["pairs"][1]["right"]) and first.rejected_path.endswith(m["pairs"][1]["left"])
    assert first.condition == m["pairs"][1]["condition"]
    assert set(s["answers_per_annotator"]) == {"ann", "bo"}
    assert s["agreement"]["cohen"]["ann vs bo"]["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    assert s["agreement"]["fleiss"]["n_pairs"] == 10
    # opposite decisive answers on ids[1] (right / left) and ids[4] (left / right): flagged, and left out of DPO
    assert s["pairs_with_disagreement"]["ids"] == sorted([ids[1], ids[4]])
    assert set(df[df.disagreement].pair_id) == {ids[1], ids[4]}
    names = sorted({p["condition"] for p in m["pairs"]})
    xw, _, _, judge = csv_pairs(tmp_path / "pairs.csv", names, 32, 1)
    assert len(xw) == 11 and judge == "2 clinicians (ann, bo)"
    assert len(csv_pairs(tmp_path / "pairs.csv", names, 32, 1, keep_disagreements=True)[0]) == 15
    cond = m["pairs"][2]["condition"]
    assert s["both_unacceptable"]["condition"][cond]["share"] > 0 and len(s["unacceptable_images"]) == 2


def test_kappa_over_too_few_shared_pairs_is_null_with_the_reason(tmp_path):
    m = make_set(tmp_path)  # 6 pairs
    ids = [p["id"] for p in m["pairs"]]
    log(tmp_path / "prefs", m, [(w, i, c) for w in ("ann", "bo") for i, c in zip(ids, ["left", "right"] * 3)])
    s = export(tmp_path / "prefs", tmp_path / "p.csv")
    k = strict_json(tmp_path / "p_summary.json")["agreement"]
    assert k["cohen"]["ann vs bo"] == {"kappa": None, "n_pairs": 6, "reason": "6 shared pairs; at least 10 are "
                                                                               "needed"}
    assert k["fleiss"]["kappa"] is None and "6 shared pairs" in k["fleiss"]["reason"]
    assert s["pairs_with_disagreement"]["n"] == 0


def test_fleiss_kappa_known_values():
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    # Fleiss (1971)'s worked example as reproduced widely: 10 items, 14 raters, 5 categories, kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1], [7, 7, 0, 0, 0],
             [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    # Fleiss (1971)-style check by hand: 2 raters, 4 items, agreement on 2 -> P_bar = 0.5, p = (0.5, 0.5)
    assert fleiss_kappa([[2, 0], [0, 2], [1, 1], [1, 1]]) == pytest.approx(0.0)


def test_blinded_rates_find_a_planted_preference(tmp_path):
    rng = np.random.default_rng(0)
    names = ["F|finding", "M|finding"]
    img = lambda v: np.full((20, 16, 16), v, np.uint8)  # noqa: E731
    real = (img(200), [names[i % 2] for i in range(20)])
    methods = {"good": (img(190), real[1]), "bad": (img(10), real[1])}
    pairs = blinded_pairs(real, methods, 10, seed=1)
    assert {(p["left_source"], p["right_source"]) for p in pairs} >= {("real", "good"), ("good", "real")}
    m = write_pair_set(tmp_path / "ev", "blinded", pairs, {"test": 1})
    # three annotators who prefer the brighter image (the planted 'finding'), two of them with 10% noise (with two
    # annotators the crossed bootstrap's CI is rightly wide: one noisy annotator drawn twice moves the rate a lot)
    rows = []
    for a, noise in (("a", 0.0), ("b", 0.1), ("c", 0.1)):
        for p in m["pairs"]:
            bright = "left" if np.asarray(Image.open(tmp_path / "ev" / p["left"])).mean() > \
                np.asarray(Image.open(tmp_path / "ev" / p["right"])).mean() else "right"
            flip = rng.random() < noise
            rows.append((a, p["id"], {"left": "right", "right": "left"}[bright] if flip else bright))
    log(tmp_path / "ev", m, rows)
    s = export(tmp_path / "ev", tmp_path / "ev_pairs.csv")
    r = s["preference_rates"]
    assert r["bad"]["vs real"]["rate"] < 0.25 and r["bad"]["vs real"]["ci"][1] < 0.5
    assert r["good"]["vs bad"]["rate"] > 0.75 and r["good"]["vs bad"]["ci"][0] > 0.5
    assert r["good"]["vs real"]["rate"] < 0.3  # real (200) is brighter than good (190)
    assert s["agreement"]["cohen"]["a vs b"]["kappa"] > 0.3
    # the CI resamples pairs (shared by the annotators) and annotators: for two annotators who answer alike, its
    # width is about that of a binomial CI over the pairs, not sqrt(annotators) narrower
    b = replay([r for r in read_answers(tmp_path / "ev", m) if r["annotator"] == "b"])[0]["b"]
    twins = preference_rates(m, {"b": b, "b2": b})
    widths = []
    for opp in twins.values():
        for g in opp.values():
            if 0 < g["rate"] < 1:
                se = np.sqrt(g["rate"] * (1 - g["rate"]) / g["n_pairs"])
                widths.append((g["ci"][1] - g["ci"][0]) / (2 * 1.96 * se))
    assert widths and 0.6 < np.median(widths) < 1.5


# ---------------------------------------------------------------------------------------------------------------
# a real browser
def browser():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("Selenium is not installed (requirements-dev.txt)")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/run does this)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,800"):
        opts.add_argument(a)
    opts.binary_location = chrome
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def open_page(d, srv, name):
    """Open `name`'s private link and press Start; returns the helpers the browser tests use."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    d.get(srv.link(name))
    WebDriverWait(d, 10).until(lambda _: d.find_element(By.ID, "start").is_displayed())
    d.find_element(By.ID, "start").click()

    def count():  # -1 while the page has not drawn a pair yet
        text = d.find_element(By.ID, "count").text
        return int(text.split()[0]) if text else -1

    def ready():  # the answer buttons are enabled once the pair has been on screen for the minimum
        WebDriverWait(d, 10).until(lambda _: d.execute_script(
            "const b=document.querySelector('button[data-c]');return b&&!b.disabled"))

    def wait_count(n):
        WebDriverWait(d, 10).until(lambda _: d.find_element(By.ID, "work").is_displayed() and count() == n or
                                   d.find_element(By.ID, "end").is_displayed())
    return count, ready, wait_count


def key(d, k, kind="keyDown", repeat=False):
    """A real key event through Chromium's input pipeline (as a keyboard sends it; repeat=True as auto-repeat)."""
    d.execute_cdp_cmd("Input.dispatchKeyEvent", {"type": kind, "key": k, "code": f"Digit{k}" if k.isdigit() else "",
                                                 "text": k if kind == "keyDown" and len(k) == 1 else "",
                                                 "windowsVirtualKeyCode": ord(k.upper()) if len(k) == 1 else 13,
                                                 "autoRepeat": repeat})


def test_browser_answers_undo_restart_export(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    m = make_set(tmp_path)
    folder = tmp_path / "prefs"
    d = browser()
    srv = Server(folder, annotators="Dr Okafor,Dr O'Brien", min_view_ms=300)
    order = annotator_queue(m, ["Dr Okafor", "Dr O'Brien"], "Dr Okafor", 20)
    try:
        count, ready, wait_count = open_page(d, srv, "Dr Okafor")
        wait_count(0)
        assert d.find_element(By.ID, "cond").text == m["pairs"][int(order[0][1:])]["text"]
        body = d.find_element(By.TAG_NAME, "body")
        ready()
        body.send_keys("1")  # left better
        wait_count(1)
        ready()
        d.find_element(By.CSS_SELECTOR, "button[data-c=right]").click()
        wait_count(2)
        ready()
        body.send_keys("3")  # both unacceptable ...
        wait_count(3)
        body.send_keys("u")  # ... undone
        wait_count(2)
        d.find_element(By.ID, "note").send_keys("left one has 2 artefacts")  # a digit typed in the note ...
        assert count() == 2  # ... answers nothing
        ready()
        d.find_element(By.CSS_SELECTOR, "button[data-c=left]").click()
        wait_count(3)
        srv.kill()  # the server dies; the page's answers are on disk
        srv = Server(folder, min_view_ms=300)  # the same links
        count, ready, wait_count = open_page(d, srv, "Dr Okafor")
        wait_count(3)  # resumes at the first unanswered pair
        for k in "421":
            n = count()
            ready()
            d.find_element(By.TAG_NAME, "body").send_keys(k)
            wait_count(n + 1)
        WebDriverWait(d, 10).until(lambda _: d.find_element(By.ID, "end").is_displayed())
        tally = d.find_element(By.ID, "tally").text
        assert "You answered 6 of 6" in tally and "3 left better" in tally and "1 cannot tell" in tally
        assert not d.find_element(By.ID, "work").is_displayed()  # no images or answer buttons on the end screen
    finally:
        d.quit()
        srv.kill()
    r = python_m("diffusion.annotate", ["--export", str(folder), "--out", str(tmp_path / "pairs.csv")], timeout=60)
    assert r.returncode == 0, r.stderr
    expected = list(zip(order, ["left", "right", "left", "cannot_tell", "right", "left"]))
    df = pd.read_csv(tmp_path / "pairs.csv")
    pairs = {q["id"]: q for q in m["pairs"]}
    want = [(pid, pairs[pid][c], pairs[pid]["right" if c == "left" else "left"]) for pid, c in expected
            if c in ("left", "right")]
    got = [(r.pair_id, os.path.relpath(r.preferred_path, folder), os.path.relpath(r.rejected_path, folder))
           for r in df.itertuples()]
    assert sorted(got) == sorted(want) and set(df.annotator) == {"Dr Okafor"}
    notes = df.set_index("pair_id")["note"]
    assert notes[expected[2][0]] == "left one has 2 artefacts"
    s = strict_json(tmp_path / "pairs_summary.json")
    assert s["undecided"]["cannot_tell"] == 1 and s["undecided"]["both_unacceptable"] == 0
    shown = [int(r["shown_ms"]) for r in csv.DictReader(open(folder / "answers.csv")) if r["choice"] != "undo"]
    assert min(shown) >= 300  # the page records how long each pair was on screen, never less than the minimum


def test_browser_takes_only_deliberate_answers(tmp_path):
    """A key held down answers one pair, not one per key repeat nor the next pair; Enter or Space after a click
    answers nothing (the button has not kept the focus); a double click answers once and leaves no error under the
    next pair; a stopped server is said in words."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    make_set(tmp_path, n=5)
    folder = tmp_path / "prefs"
    d = browser()
    srv = Server(folder, annotators="Dr A", min_view_ms=300)
    try:
        count, ready, wait_count = open_page(d, srv, "Dr A")
        ready()
        key(d, "1")  # pressed ...
        for _ in range(12):  # ... and held for 1.2 s: the keyboard repeats it
            time.sleep(0.1)
            key(d, "1", repeat=True)
        key(d, "1")  # a second keyDown without a keyUp in between (some keyboards): still the same press
        wait_count(1)
        ready()
        time.sleep(0.3)
        assert count() == 1  # the next pair was on screen long enough, and was not answered by the held key
        key(d, "1", "keyUp")
        d.find_element(By.CSS_SELECTOR, "button[data-c=left]").click()
        wait_count(2)
        ready()
        for k in ("Enter", " "):
            ActionChains(d).send_keys(k).perform()
        time.sleep(0.5)
        assert count() == 2 and d.execute_script("return document.activeElement.tagName") != "BUTTON"
        ActionChains(d).double_click(d.find_element(By.CSS_SELECTOR, "button[data-c=right]")).perform()
        wait_count(3)
        ready()
        time.sleep(0.3)
        assert count() == 3 and d.find_element(By.ID, "msg").text == ""
        srv.kill()
        d.find_element(By.TAG_NAME, "body").send_keys("2")
        WebDriverWait(d, 10).until(lambda _: "not answering" in d.find_element(By.ID, "msg").text)
    finally:
        d.quit()
        srv.kill()
    rows = list(csv.DictReader(open(folder / "answers.csv")))
    assert [r["choice"] for r in rows] == ["left", "left", "right"]


def test_browser_screenshot_is_not_blank(tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait
    make_set(tmp_path)
    d = browser()
    srv = Server(tmp_path / "prefs", annotators="Dr A")
    try:
        open_page(d, srv, "Dr A")
        WebDriverWait(d, 10).until(lambda _: d.execute_script(
            "const i=document.querySelectorAll('#imgs img');return i.length==2&&[...i].every(x=>x.complete&&"
            "x.naturalWidth>0)"))
        d.save_screenshot(str(tmp_path / "page.png"))
    finally:
        d.quit()
        srv.kill()
    a = np.asarray(Image.open(tmp_path / "page.png").convert("L"), float)
    assert a.std() > 20  # not a blank page
    # the two random-noise images are drawn: their region varies much more than the page background
    h, w = a.shape
    assert a[h // 5: 4 * h // 5, :].std() > a[:, :20].std() + 10
    if os.environ.get("FAIRSYNTH_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["FAIRSYNTH_SCREENSHOT"])


def blinded_set(folder):
    """A blinded pair set as make fairgen writes results/fairgen/blinded_pairs/<modality> (diffusion.fairgen_study
    calls the same blinded_pairs and write_pair_set): distinct real images, and two methods' samples."""
    rng = np.random.default_rng(3)
    names = ["F|finding", "M|finding"]
    img = lambda n, lo, hi: rng.integers(lo, hi, (n, 16, 16), dtype=np.uint8)  # noqa: E731
    real = (img(40, 100, 200), [names[i % 2] for i in range(40)])
    methods = {"fairgen": (img(40, 90, 210), real[1]), "base": (img(40, 0, 255), real[1])}
    return write_pair_set(folder, "blinded", blinded_pairs(real, methods, 12, seed=1), {"test": "blinded"})


def test_reader_study_accuracy_and_kappa_by_hand(tmp_path):
    """The reader study (real or synthetic?) from a blinded set, answered by two simulated readers through the
    HTTP API the page uses; accuracy, its exact CI, p against 50%, detection per method and Cohen's kappa checked
    against a hand computation."""
    from scipy.stats import binomtest
    from sklearn.metrics import cohen_kappa_score
    blinded_set(tmp_path / "blinded")
    r = python_m("diffusion.annotate", ["--reader-study", str(tmp_path / "blinded"),
                                        "--out", str(tmp_path / "reading"), "--no-serve"], timeout=60)
    assert r.returncode == 0, r.stderr
    m = load_pair_set(tmp_path / "reading")
    items = {p["id"]: p for p in m["pairs"]}
    assert m["kind"] == "reader" and all((tmp_path / "reading" / p["image"]).is_file() for p in m["pairs"])
    for c in ("F|finding", "M|finding"):  # as many real as synthetic images per condition, both methods in
        src = [p["source"] for p in m["pairs"] if p["condition"] == c]
        assert src.count("real") == len(src) - src.count("real") > 0 and {"fairgen", "base"} <= set(src)
    # reader 1 spots every 'base' image and calls everything else real; reader 2 calls by a fixed pattern
    call1 = lambda p: "synthetic" if items[p]["source"] == "base" else "real"  # noqa: E731
    call2 = lambda p: "synthetic" if int(p[1:]) % 3 == 0 else "real"  # noqa: E731
    names = ["Reader One", "Reader Two"]
    srv = Server(tmp_path / "reading", annotators=",".join(names), calibration=12)
    given = {}
    try:
        for name, call in zip(names, (call1, call2)):
            given[name] = []
            while (s := state(srv, name))["pair"]:
                pid = s["pair"]["id"]
                assert request(srv.base, "/api/answer", {"pair_id": pid, "choice": call(pid)},
                               token=srv.links[name])[0] == 400  # no rating: refused
                assert request(srv.base, "/api/answer", {"pair_id": pid, "choice": call(pid), "rating": 6},
                               token=srv.links[name])[0] == 400
                answer_next(srv, name, call(pid), rating=1 + int(pid[1:]) % 5)
                given[name].append(pid)
    finally:
        srv.kill()
    # the same 12 calibration images first, in the same order; then disjoint shares; every queue balanced
    assert given[names[0]][:12] == given[names[1]][:12]
    assert not set(given[names[0]][12:]) & set(given[names[1]][12:])
    assert sorted(given[names[0]] + given[names[1]][12:]) == sorted(items)
    for q in given.values():
        src = [items[p]["source"] == "real" for p in q]
        assert sum(src) * 2 == len(src) and sum(src[:12]) == 6
    r = python_m("diffusion.annotate", ["--export", str(tmp_path / "reading"), "--out",
                                        str(tmp_path / "reading.csv")], timeout=120)
    assert r.returncode == 0, r.stderr
    summary = strict_json(tmp_path / "reading_summary.json")
    s = summary["reader_study"]
    truth = lambda p: "synthetic" if items[p]["source"] != "real" else "real"  # noqa: E731
    for name, call in zip(names, (call1, call2)):
        q = given[name]
        k = sum(call(p) == truth(p) for p in q)
        got = s["per_reader"][name]
        assert got["accuracy"] == pytest.approx(k / len(q)) and got["n_images"] == len(q)
        ci = binomtest(k, len(q)).proportion_ci(method="exact")
        assert got["ci"] == pytest.approx([ci.low, ci.high])
        assert got["p_vs_chance"] == pytest.approx(binomtest(k, len(q), 0.5).pvalue)
        sens = np.mean([call(p) == "synthetic" for p in q if truth(p) == "synthetic"])
        spec = np.mean([call(p) == "real" for p in q if truth(p) == "real"])
        assert got["balanced_accuracy"] == pytest.approx((sens + spec) / 2)
    answered = [(n, p) for n in names for p in given[n]]
    call = dict(zip(names, (call1, call2)))
    base = [call[n](p) == "synthetic" for n, p in answered if items[p]["source"] == "base"]
    assert s["by_source"]["base"]["share_called_synthetic"] == pytest.approx(np.mean(base))
    real = [call[n](p) == "real" for n, p in answered if items[p]["source"] == "real"]
    assert s["by_source"]["real"]["share_called_real"] == pytest.approx(np.mean(real))
    g = s["by_group"]["F"]["synthetic_called_synthetic"]
    assert g["share"] == pytest.approx(np.mean([call[n](p) == "synthetic" for n, p in answered
                                                if items[p]["source"] != "real" and items[p]["group"] == "F"]))
    assert g["ci"][0] <= g["share"] <= g["ci"][1]
    assert s["per_reader"]["Reader One"]["accuracy"] > 0.6  # spotting one method of two beats chance
    shared = given[names[0]][:12]  # the only images both answered
    kappa = summary["agreement"]["cohen"]["Reader One vs Reader Two"]
    assert kappa["n_pairs"] == 12
    assert kappa["kappa"] == pytest.approx(cohen_kappa_score([call1(p) for p in shared], [call2(p) for p in shared]))
    ratings = [1 + int(p[1:]) % 5 for n, p in answered if items[p]["source"] == "base"]
    assert s["by_source"]["base"]["mean_realism"] == pytest.approx(np.mean(ratings))
    df = pd.read_csv(tmp_path / "reading.csv")
    assert len(df) == len(answered) and set(df.columns) >= {"source", "call", "correct", "rating", "group"}


def test_from_a_trained_ddpm_to_a_dpo_run_judged_by_clinicians(tmp_path):
    """The README's chain: a DDPM checkpoint -> a pair set -> answers (two clinicians, through the HTTP API the page
    uses) -> pairs.csv -> train_dpo, whose outputs name the clinicians as judge, never a classifier, and leave out
    the pair on which they disagreed."""
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r
    tiny = ["--data", "toy:64", "--size", "16", "--width", "8", "--mults", "1,2", "--num-res", "1", "--attn-res", "8"]
    cli("diffusion.train_ddpm", *tiny, "--steps", "2", "--batch-size", "8", "--sample-every", "0", "--grid-steps", "2",
        "--out-dir", str(tmp_path / "ddpm"))
    cli("diffusion.annotate", "--ckpt", str(tmp_path / "ddpm/ckpt.pt"), "--pairs-per-class", "2", "--steps", "2",
        "--out", str(tmp_path / "prefs"), "--no-serve")
    m = load_pair_set(tmp_path / "prefs")
    assert len(m["pairs"]) == 8 and {p["condition"] for p in m["pairs"]} == {"dark|disc", "dark|square",
                                                                              "bright|disc", "bright|square"}
    srv = Server(tmp_path / "prefs", annotators="dr-a,dr-b")
    try:
        for who in ("dr-a", "dr-b"):
            for i in range(8):  # dr-b chooses the other image on the first pair of the shared order
                answer_next(srv, who, "right" if who == "dr-b" and i == 0 else "left")
    finally:
        srv.kill()
    cli("diffusion.annotate", "--export", str(tmp_path / "prefs"), "--out", str(tmp_path / "pairs.csv"))
    assert len(pd.read_csv(tmp_path / "pairs.csv")) == 16
    r = cli("diffusion.train_dpo", "--init", str(tmp_path / "ddpm/ckpt.pt"), "--pairs", str(tmp_path / "pairs.csv"),
            "--data", "toy:64", "--size", "16", "--steps", "2", "--batch-size", "8", "--pair-batch", "4",
            "--grid-per-class", "1", "--grid-steps", "2", "--out-dir", str(tmp_path / "dpo"))
    assert "2 rows on pairs where clinicians disagree are left out" in r.stdout
    metrics = json.loads((tmp_path / "dpo/metrics.json").read_text())
    config = json.loads((tmp_path / "dpo/config.json").read_text())
    assert metrics["n_pairs"] == 14
    for judge in (metrics["judge"], config["judge"]):
        assert judge == "2 clinicians (dr-a, dr-b)" and "classifier" not in judge
