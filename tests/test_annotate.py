"""The clinicians' preference page (diffusion/annotate.py): HTTP-level safety, the answer log, the export that
train_dpo reads, agreement and preference rates, and a real headless Chromium driving the page (skipped, with the
reason, where Chromium, its driver or Selenium is missing; .ci/run installs them so that CI runs them)."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
from common.errors import DataError
from diffusion.annotate_answers import ANSWER_COLUMNS, Store, annotator_order, read_answers, replay
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
    found = dir_candidates(candidates(tmp_path / "cands"))
    recipe = {"from_dir": "x", "pairs_per_class": n, "seed": 0}
    return write_pair_set(tmp_path / "prefs", "preference", preference_pairs_from_dir(found, n, 0), recipe)


def start_server(folder, tmp_path, timeout=60):
    """The real command in a subprocess on a free port: (process, base URL); fails after `timeout` seconds. A
    thread keeps reading its output (so that the pipe never fills)."""
    import queue
    import threading
    p = subprocess.Popen([sys.executable, "-m", "diffusion.annotate", "--serve", str(folder), "--port", "0"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            seen.append(lines.get(timeout=timeout))
            m = re.search(r"open (http://127\.0\.0\.1:\d+)/", seen[-1])
            if m:
                return p, m.group(1)
    except queue.Empty:
        p.kill()
        raise AssertionError(f"the server did not start: {''.join(seen)}")


def kill(p):
    p.send_signal(signal.SIGKILL)  # as a crash would: no chance to clean up
    p.wait()


def request(base, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json",
                                                                  **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def server(tmp_path):
    m = make_set(tmp_path)
    p, base = start_server(tmp_path / "prefs", tmp_path)
    yield m, base, tmp_path / "prefs"
    kill(p)


def test_pairs_are_two_images_of_one_condition(tmp_path):
    m = make_set(tmp_path, n=3)
    assert len(m["pairs"]) == 6 and m["kind"] == "preference"
    for p in m["pairs"]:
        assert p["left"] != p["right"] and p["text"] in ("female, finding", "male, No Finding")
        assert np.asarray(Image.open(tmp_path / "prefs" / p["left"])).shape == (32, 32)


def test_http_serves_only_pair_images_and_validates_answers(server):
    m, base, folder = server
    secret = folder / "answers.csv"
    assert request(base, "/")[0] == 200
    for path in ["/img/../../etc/passwd", "/img/p0000/../../pairs.json", "/%2e%2e/pairs.json", "/pairs.json",
                 "/images/p0000_left.png", "/img/p9999/left", "/img/p0000/top", "/img/p0000/left/../right"]:
        assert request(base, path)[0] == 404, path
    status, body = request(base, "/img/p0000/left")
    assert status == 200 and body == (folder / m["pairs"][0]["left"]).read_bytes()
    bad = [{"annotator": "a", "pair_id": "p0000", "choice": "best"},
           {"annotator": "a", "pair_id": "../x", "choice": "left"},
           {"annotator": "<script>", "pair_id": "p0000", "choice": "left"},
           {"annotator": "", "pair_id": "p0000", "choice": "left"},
           {"annotator": "a", "pair_id": "p0000", "choice": "left", "note": "x" * 501},
           ["not", "an", "object"]]
    for body in bad:
        assert request(base, "/api/answer", body)[0] == 400, body
    assert request(base, "/api/answer", raw=b"{not json")[0] == 400
    assert request(base, "/api/answer", raw=b"{" + b" " * 5000 + b"}")[0] == 400
    assert request(base, "/api/undo", {"annotator": "a"})[0] == 400  # nothing to undo
    assert not secret.exists()  # no bad request wrote anything
    pid = json.loads(request(base, "/api/state?annotator=dr%20a")[1])["pair"]["id"]
    ok = {"annotator": "dr a", "pair_id": pid, "choice": "left", "note": "sharp\nborders"}
    assert request(base, "/api/answer", ok)[0] == 200
    assert request(base, "/api/answer", ok)[0] == 400  # a double click does not answer twice
    rows = list(csv.DictReader(open(secret)))
    assert [(r["annotator"], r["pair_id"], r["choice"], r["note"]) for r in rows] == [("dr a", pid, "left",
                                                                                       "sharp borders")]


def test_requests_another_site_could_make_are_refused(server):
    """A page of another site, open in the clinician's browser, must not answer for them (CSRF), nor read the
    images through a rebound DNS name; and the page may not be framed."""
    m, base, folder = server
    ok = {"annotator": "mallory", "pair_id": "p0000", "choice": "left"}
    assert request(base, "/api/answer", ok, headers={"Content-Type": "text/plain"})[0] == 403
    assert request(base, "/api/answer", ok, headers={"Origin": "http://evil.example"})[0] == 403
    assert request(base, "/img/p0000/left", headers={"Host": "evil.example:80"})[0] == 403
    assert request(base, "/api/state?annotator=x", headers={"Host": "rebound.example:8765"})[0] == 403
    assert not (folder / "answers.csv").exists()
    with urllib.request.urlopen(base + "/", timeout=10) as r:
        assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in r.headers[
            "Content-Security-Policy"]
    port = base.rsplit(":", 1)[1]
    assert request(base, "/api/answer", ok, headers={"Origin": f"http://localhost:{port}",
                                                     "Host": f"localhost:{port}"})[0] == 200


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


def test_answer_log_is_checked(tmp_path):
    m = make_set(tmp_path)
    log(tmp_path / "prefs", m, [("ann", m["pairs"][0]["id"], "left"), ("ann", "p9999", "left"),
                                ("ann", m["pairs"][1]["id"], "left")])
    with pytest.raises(DataError, match="line 3"):
        Store(tmp_path / "prefs")
    log(tmp_path / "prefs", m, [("ann", m["pairs"][0]["id"], "left")])
    with open(tmp_path / "prefs/answers.csv", "a") as f:
        f.write("2026-01-01T00:00:00,ann,")  # a write cut short by a kill
    with pytest.warns(UserWarning, match="incomplete"):
        store = Store(tmp_path / "prefs")
    assert store.state("ann")["done"] == 1
    (tmp_path / "prefs/answers.csv").write_text("")  # an empty log gets its header back with the next answer
    store = Store(tmp_path / "prefs")
    store.answer("ann", m["pairs"][0]["id"], "right", "=HYPERLINK(1)")
    rows = read_answers(tmp_path / "prefs", m)
    assert len(rows) == 1 and rows[0]["note"] == "'=HYPERLINK(1)"  # shown as text by a spreadsheet


def test_pair_set_paths_are_fixed(tmp_path):
    make_set(tmp_path)
    j = json.loads((tmp_path / "prefs/pairs.json").read_text())
    j["pairs"][0]["left"] = "../../.ssh/id_rsa"
    (tmp_path / "prefs/pairs.json").write_text(json.dumps(j))
    with pytest.raises(DataError, match="not a pair set"):
        load_pair_set(tmp_path / "prefs")


def test_killed_server_loses_nothing_and_resumes(tmp_path):
    m = make_set(tmp_path)
    order = annotator_order(m, "lee")
    p, base = start_server(tmp_path / "prefs", tmp_path)
    for pid, c in zip(order[:3], ["left", "right", "cannot_tell"]):
        assert request(base, "/api/answer", {"annotator": "lee", "pair_id": pid, "choice": c})[0] == 200
    kill(p)
    p, base = start_server(tmp_path / "prefs", tmp_path)
    state = json.loads(request(base, "/api/state?annotator=lee")[1])
    assert state["done"] == 3 and state["pair"]["id"] == order[3] and state["can_undo"]
    other = json.loads(request(base, "/api/state?annotator=kim")[1])
    assert other["done"] == 0 and annotator_order(m, "kim") != order  # each annotator has their own order
    kill(p)


def test_refuses_answers_of_another_pair_set(tmp_path):
    make_set(tmp_path)
    with open(tmp_path / "prefs/answers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ANSWER_COLUMNS)
        w.writeheader()
        w.writerow({"time": "t", "annotator": "a", "pair_set": "0123456789abcdef", "pair_id": "p0000",
                    "choice": "left", "note": ""})
    r = subprocess.run([sys.executable, "-m", "diffusion.annotate", "--serve", str(tmp_path / "prefs")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "another pair set" in r.stderr and "Traceback" not in r.stderr
    # and a new --from-dir set into a folder that holds a different one
    candidates(tmp_path / "c2", seed=5)
    r = subprocess.run([sys.executable, "-m", "diffusion.annotate", "--from-dir", str(tmp_path / "c2"), "--out",
                        str(tmp_path / "prefs"), "--no-serve"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "another pair set" in r.stderr and "Traceback" not in r.stderr


def log(folder, m, rows):
    with open(folder / "answers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ANSWER_COLUMNS)
        w.writeheader()
        for a, pid, c in rows:
            w.writerow({"time": "t", "annotator": a, "pair_set": m["id"], "pair_id": pid, "choice": c, "note": ""})


def test_export_pairs_ties_undo_and_agreement(tmp_path):
    from sklearn.metrics import cohen_kappa_score
    m = make_set(tmp_path)
    ids = [p["id"] for p in m["pairs"]]
    a = ["left", "right", "both_unacceptable", "cannot_tell", "left", "right"]
    b = ["left", "left", "both_unacceptable", "cannot_tell", "right", "right"]
    rows = [("ann", ids[0], "right"), ("ann", ids[0], "undo")]  # an undone answer does not count
    rows += [("ann", i, c) for i, c in zip(ids, a)] + [("bo", i, c) for i, c in zip(ids, b)]
    log(tmp_path / "prefs", m, rows)
    s = export(tmp_path / "prefs", tmp_path / "pairs.csv")
    df = pd.read_csv(tmp_path / "pairs.csv")
    assert len(df) == 8 and s["undecided"] == {"left": 0, "right": 0, "both_unacceptable": 2, "cannot_tell": 2}
    first = df[(df.annotator == "ann") & (df.pair_id == ids[1])].iloc[0]  # 'right' -> right image preferred
    assert first.preferred_path.endswith(m["pairs"][1]["right"]) and first.rejected_path.endswith(m["pairs"][1]["left"])
    assert first.condition == m["pairs"][1]["condition"]
    assert s["judge"] == "2 clinicians (ann, bo)"
    assert s["agreement"]["cohen"]["ann vs bo"]["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    assert s["agreement"]["fleiss"]["n_pairs"] == 6
    cond = m["pairs"][2]["condition"]
    assert s["both_unacceptable"]["condition"][cond]["share"] > 0 and len(s["unacceptable_images"]) == 2


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


def test_browser_answers_undo_restart_export(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    m = make_set(tmp_path)
    folder = tmp_path / "prefs"
    order = annotator_order(m, "Dr Okafor")
    d = browser()
    p, base = start_server(folder, tmp_path)
    try:
        def count():
            return d.find_element(By.ID, "count").text

        def wait_for(text):
            WebDriverWait(d, 10).until(lambda _: count().startswith(text))

        d.get(base + "/")
        d.find_element(By.ID, "name").send_keys("Dr Okafor")
        d.find_element(By.ID, "start").click()
        wait_for("0 / 6")
        assert d.find_element(By.ID, "cond").text == m["pairs"][int(order[0][1:])]["text"]
        body = d.find_element(By.TAG_NAME, "body")
        body.send_keys("1")  # left better
        wait_for("1 / 6")
        d.find_element(By.CSS_SELECTOR, "button[data-c=right]").click()
        wait_for("2 / 6")
        body.send_keys("3")  # both unacceptable ...
        wait_for("3 / 6")
        body.send_keys("u")  # ... undone
        wait_for("2 / 6")
        d.find_element(By.ID, "note").send_keys("left one has 2 artefacts")  # a digit typed in the note ...
        assert count().startswith("2 / 6")  # ... answers nothing
        d.find_element(By.CSS_SELECTOR, "button[data-c=left]").click()
        wait_for("3 / 6")
        kill(p)  # the server dies; the page's answers are on disk
        p, base = start_server(folder, tmp_path)
        d.get(base + "/")  # a new port is a new origin: the name is typed again
        d.find_element(By.ID, "name").send_keys("Dr Okafor")
        d.find_element(By.ID, "start").click()
        wait_for("3 / 6")  # resumes at the first unanswered pair
        for key in "421":
            body = d.find_element(By.TAG_NAME, "body")
            n = int(count().split()[0])
            body.send_keys(key)
            wait_for(f"{n + 1} / 6")
        assert "All pairs answered" in d.find_element(By.ID, "cond").text
    finally:
        d.quit()
        kill(p)
    r = subprocess.run([sys.executable, "-m", "diffusion.annotate", "--export", str(folder), "--out",
                        str(tmp_path / "pairs.csv")], cwd=ROOT, capture_output=True, text=True, timeout=60)
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
    s = json.loads((tmp_path / "pairs_summary.json").read_text())
    assert s["undecided"]["cannot_tell"] == 1 and s["undecided"]["both_unacceptable"] == 0


def test_browser_screenshot_is_not_blank(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    make_set(tmp_path)
    d = browser()
    p, base = start_server(tmp_path / "prefs", tmp_path)
    try:
        d.get(base + "/")
        d.find_element(By.ID, "name").send_keys("screenshot")
        d.find_element(By.ID, "start").click()
        WebDriverWait(d, 10).until(lambda _: d.execute_script(
            "return document.getElementById('R').complete && document.getElementById('R').naturalWidth > 0"))
        d.save_screenshot(str(tmp_path / "page.png"))
    finally:
        d.quit()
        kill(p)
    a = np.asarray(Image.open(tmp_path / "page.png").convert("L"), float)
    assert a.std() > 20  # not a blank page
    # the two random-noise images are drawn: their region varies much more than the page background
    h, w = a.shape
    assert a[h // 5: 4 * h // 5, :].std() > a[:, :20].std() + 10
    if os.environ.get("FAIRSYNTH_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["FAIRSYNTH_SCREENSHOT"])




def test_from_a_trained_ddpm_to_a_dpo_run_judged_by_clinicians(tmp_path):
    """The README's chain: a DDPM checkpoint -> a pair set -> answers (two clinicians, through the HTTP API the page
    uses) -> pairs.csv -> train_dpo, whose outputs name the clinicians as judge, never a classifier."""
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
    p, base = start_server(tmp_path / "prefs", tmp_path)
    try:
        for who, choices in (("dr-a", "left"), ("dr-b", "right")):
            for pid in annotator_order(m, who):
                assert request(base, "/api/answer", {"annotator": who, "pair_id": pid, "choice": choices})[0] == 200
    finally:
        kill(p)
    cli("diffusion.annotate", "--export", str(tmp_path / "prefs"), "--out", str(tmp_path / "pairs.csv"))
    assert len(pd.read_csv(tmp_path / "pairs.csv")) == 16
    cli("diffusion.train_dpo", "--init", str(tmp_path / "ddpm/ckpt.pt"), "--pairs", str(tmp_path / "pairs.csv"),
        "--data", "toy:64", "--size", "16", "--steps", "2", "--batch-size", "8", "--pair-batch", "4",
        "--grid-per-class", "1", "--grid-steps", "2", "--out-dir", str(tmp_path / "dpo"))
    metrics = json.loads((tmp_path / "dpo/metrics.json").read_text())
    config = json.loads((tmp_path / "dpo/config.json").read_text())
    for judge in (metrics["judge"], config["judge"]):
        assert judge == "2 clinicians (dr-a, dr-b)" and "classifier" not in judge
