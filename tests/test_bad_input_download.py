"""common.download against bad input: hostile or broken rows in the Fitzpatrick17k table, URLs that are not http(s)
or point at this machine, servers that cut bodies, ignore Range or answer 416, bodies that are not images, MD5
mismatches, and malformed flags. Every server here listens on 127.0.0.1 only."""
import hashlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import io
import os
from pathlib import Path
import threading

import pandas as pd
from PIL import Image
import pytest

import common.download as dl
import common.download_http as dh
from common.errors import DataError
from conftest import write_png
from forkserver import python_m

FAKE_CSV_URL = "https://raw.example/fitzpatrick17k.csv"


def jpeg_bytes(seed=0, size=48):
    import numpy as np
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_table(served, rows, name="fitzpatrick17k.csv"):
    """rows: (md5hash, url); None leaves the cell empty."""
    pd.DataFrame([{"md5hash": h, "fitzpatrick_scale": 2, "fitzpatrick_centaur": 2, "label": "psoriasis",
                   "nine_partition_label": "inflammatory", "three_partition_label": "non-neoplastic", "qc": "",
                   "url": u, "url_alphanum": "x"} for h, u in rows]).to_csv(served / name, index=False)


def report(root):
    r = pd.read_csv(root / "download_report.csv", dtype={"md5hash": str, "url": str})
    return dict(zip(r["md5hash"].fillna("<nan>"), r["error"]))


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def decodes(path):
    with Image.open(path) as im:
        im.load()
    return True


# --- small servers with one behaviour each ----------------------------------------------------------------------
class Scripted(BaseHTTPRequestHandler):
    """routes: path -> (body, mode). Modes: 'ok' (200 + Content-Length, ignores Range), 'short' (announces the body,
    sends half, closes), 'no-length' (200 without Content-Length, body as given, closes), '416' / '416-bare' (416 to
    any Range request, with / without Content-Range, else 200), '206-from-0' (answers every request with 206 from
    byte 0), 'redirect' (302 to body)."""
    routes = {}
    seen = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).seen.append((self.path, rng))
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, mode = self.routes[self.path]
        n = len(body)
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", body.decode())
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode in ("416", "416-bare") and rng:
            self.send_response(416)
            if mode == "416":
                self.send_header("Content-Range", f"bytes */{n}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "206-from-0":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{n - 1}/{n}")
        else:
            self.send_response(200)
        if mode != "no-length":
            self.send_header("Content-Length", str(n))
        self.end_headers()
        self.wfile.write(body[:n // 2] if mode == "short" else body)


@pytest.fixture
def scripted():
    """start(routes) -> (base URL, handler class); the handler records (path, Range header) per request."""
    servers = []

    def start(routes):
        class H(Scripted):
            pass
        H.routes, H.seen = dict(routes), []
        srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", H

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


# --- 1. md5hash values that are paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../X", "ABSOLUTE", "../" + "0" * 29, "0" * 31, "g" * 32, None])
def test_hash_that_is_a_path_writes_nothing_outside_root(http_server, tmp_path, bad):
    base, served, _ = http_server
    if bad == "ABSOLUTE":
        bad = str(tmp_path / "elsewhere" / "X")
    good = "ab" * 16
    write_png(served / "imgs" / "good.jpg", size=24, rgb=True)
    write_png(served / "imgs" / "bad.jpg", size=24, rgb=True, seed=1)
    write_table(served, [(good, "https://atlas.example/imgs/good.jpg"), (bad, "https://atlas.example/imgs/bad.jpg")])
    root = tmp_path / "root"
    before = snapshot(tmp_path)
    dead = dl.download_fitzpatrick(root, url_base=base, csv_url=FAKE_CSV_URL, workers=2, delay=0.0)
    new = set(snapshot(tmp_path)) - set(before)
    assert new == {root / "fitzpatrick17k.csv", root / "download_report.csv", root / "images" / f"{good}.jpg"}
    assert len(dead) == 1
    rep = report(root)
    assert list(rep) == [bad if bad is not None else "<nan>"]
    assert "not 32 hexadecimal digits" in next(iter(rep.values()))


def test_image_path_refuses_what_leaves_root(tmp_path):
    assert dl.image_path(tmp_path, "0" * 32) == (tmp_path / "images" / ("0" * 32 + ".jpg")).resolve()
    for h in ("../../X", "/tmp/X", "0" * 32 + "/../../x", "", 17):
        with pytest.raises(DataError, match="not 32 hexadecimal digits"):
            dl.image_path(tmp_path, h)


# --- 2. schemes and hosts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/x.jpg", "data:image/png;base64,AAAA",
                                 "gopher://127.0.0.1/x", "//atlas.example/x.jpg", "atlas.example/x.jpg"])
def test_fetch_refuses_what_is_not_http(tmp_path, url):
    with pytest.raises(DataError, match="not an http:// or https:// URL"):
        dh.fetch(url, tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("with_url_base", [False, True])
def test_file_url_in_table_is_refused(http_server, tmp_path, with_url_base):
    base, served, _ = http_server
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(3))  # a real image: only the scheme check can keep it out
    write_png(served / "imgs" / "ok.jpg", size=24, rgb=True)
    h_file, h_ok = "1" * 32, "2" * 32
    write_table(served, [(h_file, f"file://{secret}"), (h_ok, f"{base}/imgs/ok.jpg")])
    root = tmp_path / "root"
    dl.download_fitzpatrick(root, url_base=base if with_url_base else None,
                            csv_url=FAKE_CSV_URL if with_url_base else f"{base}/fitzpatrick17k.csv",
                            workers=1, delay=0.0)
    assert not (root / "images" / f"{h_file}.jpg").exists()
    rep = report(root)
    assert set(rep) == ({h_file} if with_url_base else {h_file, h_ok})
    assert "not an http:// or https:// URL" in rep[h_file]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.1", "2130706433", "0.0.0.0",
                                  "[::ffff:127.0.0.1]", "10.1.2.3", "169.254.169.254", "192.168.0.1"])
def test_local_hosts_refused_without_url_base_allowed_with_it(http_server, tmp_path, host):
    base, served, _ = http_server
    port = base.rsplit(":", 1)[1]
    write_png(served / "imgs" / "0.jpg", size=24, rgb=True)
    h = "c" * 32
    write_table(served, [(h, f"http://{host}:{port}/imgs/0.jpg")])
    root = tmp_path / "root"
    dead = dl.download_fitzpatrick(root, csv_url=f"{base}/fitzpatrick17k.csv", workers=1, delay=0.0)
    assert [d[0] for d in dead] == [h] and not (root / "images" / f"{h}.jpg").exists()
    assert "name it with --url-base" in report(root)[h]  # refused before any request, with the way to allow it
    # named by --url-base, the same row is fetched (rebased to that server)
    dead = dl.download_fitzpatrick(root, url_base=base, workers=1, delay=0.0)
    assert dead == [] and decodes(root / "images" / f"{h}.jpg")


@pytest.mark.parametrize("host,refused", [("127.0.0.1", True), ("::1", True), ("::ffff:10.0.0.1", True),
                                          ("localhost", True), ("a.localhost", True), ("172.16.5.4", True),
                                          ("100.64.0.1", True), ("fe80::1", True), ("224.0.0.1", True),
                                          ("127.1", True), ("8.8.8.8", False), ("2606:4700::1111", False)])
def test_host_refusal(host, refused):
    assert (dh.host_refusal(host) is not None) == refused


def test_redirects_are_checked_too(scripted, tmp_path, monkeypatch):
    img = jpeg_bytes()
    base, _ = scripted({"/to-ftp": (b"ftp://127.0.0.1:9/x.jpg", "redirect"),
                        "/to-local": (b"http://localhost:1/x.jpg", "redirect"), "/x.jpg": (img, "ok")})
    with pytest.raises(DataError, match="redirected to ftp://127.0.0.1:9/x.jpg: not an http"):
        dh.fetch(f"{base}/to-ftp", tmp_path / "a.jpg")
    # a public host that redirects to this machine: pretend 127.0.0.1 were public, 'localhost' is still refused
    real = dh.host_refusal
    monkeypatch.setattr(dh, "host_refusal", lambda h: None if h == "127.0.0.1" else real(h))
    with pytest.raises(DataError, match="redirected to http://localhost:1/x.jpg: localhost is this machine"):
        dh.fetch(f"{base}/to-local", tmp_path / "b.jpg", public_only=True)
    assert not list(tmp_path.glob("*.jpg*"))


# --- 3. malformed URLs, reported per row -------------------------------------------------------------------------
def test_malformed_urls_are_reported_per_row(http_server, tmp_path):
    base, served, _ = http_server
    for i in range(2):
        write_png(served / "imgs" / f"{i}.jpg", size=24, rgb=True, seed=i)
    bad = {"a" * 32: ("http://[::1", "malformed URL"), "b" * 32: ("ht!tp://x", "not an http"),
           "c" * 32: ("", "no URL"), "d" * 32: (None, "no URL"), "e" * 32: ("http://atlas.example:abc/x", "malformed"),
           "f" * 32: ("http://", "no host")}
    rows = [("0" * 32, "https://atlas.example/imgs/0.jpg")] + [(h, u) for h, (u, _) in bad.items()] + \
        [("1" * 32, "https://atlas.example/imgs/1.jpg")]
    write_table(served, rows)
    root = tmp_path / "root"
    dead = dl.download_fitzpatrick(root, url_base=base, csv_url=FAKE_CSV_URL, workers=2, delay=0.0)
    assert sorted(d[0] for d in dead) == sorted(bad)
    rep = report(root)
    for h, (_, why) in bad.items():
        assert why in rep[h], (h, rep[h])
    for i in range(2):
        assert (root / "images" / f"{str(i) * 32}.jpg").read_bytes() == (served / "imgs" / f"{i}.jpg").read_bytes()


def test_spaces_and_non_ascii_in_a_path_are_encoded(scripted, tmp_path):
    img = jpeg_bytes()
    base, h = scripted({"/a%20b/%C3%A9.jpg": (img, "ok")})
    assert dh.fetch(f"{base}/a b/é.jpg", tmp_path / "x.jpg").read_bytes() == img


# --- 4. bodies that are not the whole file -----------------------------------------------------------------------
def test_short_body_is_not_counted_as_fetched(scripted, tmp_path):
    img = jpeg_bytes()
    base, h = scripted({"/x.jpg": (img, "short")})
    with pytest.raises(DataError, match=r"connection cut .* after 2 tries"):
        dh.fetch(f"{base}/x.jpg", tmp_path / "x.jpg", retries=1)
    assert not (tmp_path / "x.jpg").exists()


def test_truncated_images_are_not_counted_in_fitzpatrick(scripted, tmp_path):
    img = jpeg_bytes()
    served = tmp_path / "served"
    served.mkdir()
    hs, hn, hok = "1" * 32, "2" * 32, "3" * 32
    write_table(served, [(hs, "https://atlas.example/short.jpg"), (hn, "https://atlas.example/nolen.jpg"),
                         (hok, "https://atlas.example/ok.jpg")])
    base, _ = scripted({"/fitzpatrick17k.csv": ((served / "fitzpatrick17k.csv").read_bytes(), "ok"),
                        "/short.jpg": (img, "short"),                      # announced, then cut: every time
                        "/nolen.jpg": (img[:len(img) // 2], "no-length"),  # cut, and nothing announced
                        "/ok.jpg": (img, "ok")})
    root = tmp_path / "root"
    dead = dl.download_fitzpatrick(root, url_base=base, csv_url=FAKE_CSV_URL, workers=2, delay=0.0)
    assert sorted(d[0] for d in dead) == [hs, hn]
    rep = report(root)
    assert "connection cut" in rep[hs] and "not a readable image" in rep[hn]
    assert sorted(p.name for p in (root / "images").glob("*.jpg")) == [f"{hok}.jpg"]
    assert (root / "images" / f"{hok}.jpg").read_bytes() == img


def test_non_image_body_is_not_counted_and_broken_leftovers_are_refetched(scripted, tmp_path):
    img = jpeg_bytes(5)
    served = tmp_path / "served"
    served.mkdir()
    h_html, h_ok = "4" * 32, "5" * 32
    write_table(served, [(h_html, "https://atlas.example/page.jpg"), (h_ok, "https://atlas.example/ok.jpg")])
    base, handler = scripted({"/fitzpatrick17k.csv": ((served / "fitzpatrick17k.csv").read_bytes(), "ok"),
                              "/page.jpg": (b"<html><body>Moved to our new site</body></html>", "ok"),
                              "/ok.jpg": (img, "ok")})
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / f"{h_ok}.jpg").write_bytes(img[:len(img) // 3])  # left broken by an earlier run
    dead = dl.download_fitzpatrick(root, url_base=base, csv_url=FAKE_CSV_URL, workers=1, delay=0.0)
    assert [d[0] for d in dead] == [h_html] and "not a readable image" in report(root)[h_html]
    assert not (root / "images" / f"{h_html}.jpg").exists()
    assert (root / "images" / f"{h_ok}.jpg").read_bytes() == img  # not skipped as 'already here'
    # a readable image is skipped on the next run: no request for it
    handler.seen.clear()
    dl.download_fitzpatrick(root, url_base=base, workers=1, delay=0.0)
    assert ("/ok.jpg", None) not in handler.seen and ("/page.jpg", None) in handler.seen


# --- 5. Range: a stale .part, a server that ignores Range -------------------------------------------------------
@pytest.mark.parametrize("mode", ["416", "416-bare"])
def test_416_on_a_stale_part_fetches_anew(scripted, tmp_path, mode):
    payload = os.urandom(50_000)
    base, handler = scripted({"/f.bin": (payload, mode)})
    (tmp_path / "f.bin.part").write_bytes(os.urandom(70_000))  # from an older, longer version of the file
    assert dh.fetch(f"{base}/f.bin", tmp_path / "f.bin").read_bytes() == payload
    assert handler.seen == [("/f.bin", "bytes=70000-"), ("/f.bin", None)]
    assert not (tmp_path / "f.bin.part").exists()


@pytest.mark.parametrize("mode,requests", [("416", 1), ("416-bare", 2)])
def test_416_on_a_complete_part(scripted, tmp_path, mode, requests):
    """A .part the server confirms (Content-Range total = its size) is complete; unconfirmed, it is fetched anew."""
    payload = os.urandom(20_000)
    base, handler = scripted({"/f.bin": (payload, mode)})
    (tmp_path / "f.bin.part").write_bytes(payload)
    assert dh.fetch(f"{base}/f.bin", tmp_path / "f.bin").read_bytes() == payload
    assert len(handler.seen) == requests


@pytest.mark.parametrize("mode", ["ok", "206-from-0"])
def test_server_that_does_not_resume_where_asked(scripted, tmp_path, mode):
    """'ok' ignores Range (200, whole file); '206-from-0' claims to resume but sends from byte 0."""
    payload = os.urandom(40_000)
    base, handler = scripted({"/f.bin": (payload, mode)})
    (tmp_path / "f.bin.part").write_bytes(payload[:10_000] if mode == "206-from-0" else b"X" * 10_000)
    assert dh.fetch(f"{base}/f.bin", tmp_path / "f.bin").read_bytes() == payload
    assert handler.seen[0] == ("/f.bin", "bytes=10000-")


# --- 6. MD5 mismatch: the message says what was deleted, and it was ---------------------------------------------
@pytest.mark.parametrize("old_file,server_right", [(False, False), (True, False), (True, True)])
def test_md5_mismatch_deletes_what_it_says(scripted, tmp_path, old_file, server_right):
    payload = os.urandom(30_000)
    md5 = hashlib.md5(payload).hexdigest()
    base, _ = scripted({"/x.npz": (payload if server_right else payload[::-1], "ok")})
    dest = tmp_path / "x.npz"
    if old_file:
        dest.write_bytes(b"an older, damaged copy")
    if server_right:
        assert dh.fetch(f"{base}/x.npz", dest, md5=md5).read_bytes() == payload
        return
    with pytest.raises(DataError) as e:
        dh.fetch(f"{base}/x.npz", dest, md5=md5)
    msg = e.value.code
    assert msg.startswith(f"error: {base}/x.npz: MD5 ") and "does not match the published" in msg
    assert "deleted the download" in msg and (("earlier x.npz" in msg) == old_file)
    assert list(tmp_path.iterdir()) == []  # neither the download nor the earlier file is left


# --- 7. the command, as a user runs it ---------------------------------------------------------------------------
def run_cli(*args):
    r = python_m("common.download", args, timeout=120)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    return r


@pytest.fixture
def sentinels(tmp_path):
    """A root with a file in it, a file beside it, and a file where '../../X' in images/ would land."""
    root = tmp_path / "root"
    root.mkdir()
    files = {root / "keep.txt": b"mine\n", tmp_path / "beside.txt": b"also mine\n", tmp_path / "X.jpg": b"not yours"}
    for p, b in files.items():
        p.write_bytes(b)
    yield root
    for p, b in files.items():
        assert p.read_bytes() == b, p


def test_cli_hostile_table_reports_rows_and_touches_nothing_else(http_server, tmp_path, sentinels):
    base, served, _ = http_server
    write_png(served / "imgs" / "0.jpg", size=24, rgb=True)
    secret = tmp_path / "beside.txt"
    rows = [("0" * 32, "https://atlas.example/imgs/0.jpg"), ("../../X", "https://atlas.example/imgs/0.jpg"),
            ("1" * 32, f"file://{secret}"), ("2" * 32, "http://[::1"), ("3" * 32, "https://atlas.example/nope.jpg")]
    write_table(served, rows)
    r = run_cli("fitzpatrick17k", "--root", sentinels, "--url-base", base, "--csv-url", FAKE_CSV_URL,
                "--delay", "0.01", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "done: 1 fetched, 4 failed" in r.stdout
    rep = report(sentinels)
    assert set(rep) == {"../../X", "1" * 32, "2" * 32, "3" * 32}
    assert "not 32 hexadecimal" in rep["../../X"] and "not an http" in rep["1" * 32]
    assert "malformed URL" in rep["2" * 32] and "404" in rep["3" * 32]
    assert [p.name for p in (sentinels / "images").iterdir()] == ["0" * 32 + ".jpg"]


def test_cli_loopback_rows_refused_without_url_base(http_server, tmp_path, sentinels):
    base, served, _ = http_server
    write_png(served / "imgs" / "0.jpg", size=24, rgb=True)
    write_table(served, [("0" * 32, f"{base}/imgs/0.jpg"), ("1" * 32, base.replace("127.0.0.1", "localhost"))])
    r = run_cli("fitzpatrick17k", "--root", sentinels, "--csv-url", f"{base}/fitzpatrick17k.csv", "--delay", "0.01")
    assert r.returncode == 0 and "done: 0 fetched, 2 failed" in r.stdout, r.stdout + r.stderr
    assert all("name it with --url-base" in e for e in report(sentinels).values())
    assert not list(sentinels.rglob("*.jpg"))


def run_in_process(capsys, *args):
    """The command's own entry (common.cli.run over main and parse_args) without a new interpreter: same exit code
    and stderr as run_cli, a second faster."""
    from common.cli import run
    with pytest.raises(SystemExit) as e:
        run(dl.main, lambda: dl.parse_args([str(a) for a in args]))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return e.value.code, err


@pytest.mark.parametrize("args,names", [
    (["nih", "--archives", "a-b"], "--archives"), (["nih", "--archives", "0"], "--archives"),
    (["nih", "--archives", "13"], "--archives"), (["nih", "--archives", ""], "--archives"),
    (["nih", "--archives", "3-1"], "--archives"), (["nih", "--archives", "1-2-3"], "--archives"),
    (["fitzpatrick17k", "--csv-url", "file:///etc/hostname"], "--csv-url"),
    (["fitzpatrick17k", "--url-base", "http://[::1"], "--url-base"),
    (["fitzpatrick17k", "--url-base", "127.0.0.1:8000"], "--url-base"),
    (["fitzpatrick17k", "--workers", "0"], "--workers"), (["fitzpatrick17k", "--delay", "0"], "--delay"),
    (["fitzpatrick17k", "--delay", "nan"], "--delay"), (["fitzpatrick17k", "--limit", "-1"], "--limit"),
    (["medmnist", "--flags", "breast,nope"], "--flags"), (["medmnist", "--size", "32"], "--size"),
])
def test_bad_flags_one_line(sentinels, capsys, args, names):
    code, err = run_in_process(capsys, *args[:1], "--root", sentinels, *args[1:])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: argument " + names), err
    assert sorted(p.name for p in sentinels.iterdir()) == ["keep.txt"]  # nothing written


def test_archives_range_parses():
    assert dl.parse_args(["nih", "--root", "x", "--archives", "3-5, 1,4"]).archives == [3, 4, 5, 1]
    assert dl.parse_args(["nih", "--root", "x"]).archives == list(range(1, 13))


def test_cli_bad_archives_one_line(sentinels):
    r = run_cli("nih", "--root", sentinels, "--archives", "a-b")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: argument --archives:") and "'a-b'" in last, r.stderr
    assert sorted(p.name for p in sentinels.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("case,subprocess_", [("root-is-a-file", True), ("root-under-a-file", False),
                                              ("csv-404", True), ("csv-not-a-table", True),
                                              ("csv-without-columns", False)])
def test_bad_root_or_table_one_line(http_server, tmp_path, sentinels, capsys, case, subprocess_):
    base, served, _ = http_server
    (served / "garbage.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfd" * 50)
    (served / "other.csv").write_text("name,size\na,1\n")
    root, csv_url, names = sentinels, FAKE_CSV_URL, None
    if case == "root-is-a-file":
        root, names = tmp_path / "beside.txt", f"--root {tmp_path / 'beside.txt'}: is a file"
    elif case == "root-under-a-file":
        root, names = tmp_path / "beside.txt" / "sub", "--root"
    elif case == "csv-404":
        csv_url, names = "https://raw.example/missing.csv", f"{base}/missing.csv: HTTP 404"
    elif case == "csv-not-a-table":
        csv_url, names = "https://raw.example/garbage.csv", f"{sentinels / 'fitzpatrick17k.csv'}: not a readable"
    else:
        csv_url, names = "https://raw.example/other.csv", f"{sentinels / 'fitzpatrick17k.csv'}: lacks the columns"
    args = ["fitzpatrick17k", "--root", root, "--url-base", base, "--csv-url", csv_url, "--delay", "0.01"]
    if subprocess_:
        r = run_cli(*args)
        code, err = r.returncode, r.stderr
    else:
        code, err = run_in_process(capsys, *args)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: " + names), err
    assert not (sentinels / "images").exists()


def test_a_body_over_the_size_cap_is_not_kept(http_server, tmp_path):
    """A table URL that sends far more than an image is refused and nothing of it is kept (a full disk otherwise)."""
    base, served, _ = http_server
    (served / "huge.jpg").write_bytes(b"\xff" * 300_000)
    with pytest.raises(dl.DataError, match="allowed here"):
        dh.fetch(f"{base}/huge.jpg", tmp_path / "huge.jpg", max_bytes=100_000)
    assert not list(tmp_path.glob("huge*"))


def test_a_table_cut_short_without_a_length_is_not_kept_and_is_fetched_again(scripted, tmp_path, capsys):
    """A server that closes the label table early and announces no length: the cut table is refused (nothing kept),
    and a table an older version kept cut short is fetched again instead of being used."""
    served = tmp_path / "served"
    served.mkdir()
    write_table(served, [(f"{i:032x}", f"https://atlas.example/{i}.jpg") for i in range(40)])
    table = (served / "fitzpatrick17k.csv").read_bytes()
    base, H = scripted({"/fitzpatrick17k.csv": (table[:len(table) * 45 // 100], "no-length")})
    root = tmp_path / "root"
    with pytest.raises(DataError, match="cut short"):
        dl.download_fitzpatrick(root, url_base=base, csv_url=FAKE_CSV_URL, workers=2, delay=0.0)
    assert not (root / "fitzpatrick17k.csv").exists()
    (root / "fitzpatrick17k.csv").write_bytes(table[:len(table) // 2])  # what the old code kept
    H.routes["/fitzpatrick17k.csv"] = (table, "no-length")
    for i in range(40):
        H.routes[f"/{i}.jpg"] = (jpeg_bytes(i), "ok")
    dl.download_fitzpatrick(root, url_base=base, csv_url=FAKE_CSV_URL, workers=2, delay=0.0)
    assert (root / "fitzpatrick17k.csv").read_bytes() == table
    assert "fetching the table again" in capsys.readouterr().out
    assert len(list((root / "images").glob("*.jpg"))) == 40
