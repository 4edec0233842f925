"""Shared fixtures: small files in each official format, and a loopback HTTP server for the download tests."""
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
import os
from pathlib import Path
import sys
import threading

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


# `make test` runs the files in pytest-xdist workers, one file per worker at a time, handed out in collection order:
# these files first, those that take longest (one to five minutes each on a 2-core CPU), so that the run does not
# end with one worker on a long file while the other has nothing left (xdist's own order, by number of tests, put
# test_fullscale.py, 3 tests and 2 minutes, last). Files not listed follow in pytest's order.
LONG_FILES = ["test_ddpm.py", "test_compare_study.py", "test_medmnist.py", "test_skintone.py", "test_chestxray.py",
              "test_fairgen.py", "test_fullscale.py", "test_study_shape.py", "test_fairdiffusion.py",
              "test_annotate.py", "test_compare.py", "test_bad_input.py", "test_fairness.py", "test_fairgen_table.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.6 reorders files by their number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test decodes into its own image cache, so tests never see each other's (or a user's) cache; and starts
    with no run folder that --force moved aside (a test failing in between would leave one for the next)."""
    import common.cache
    import common.runs
    monkeypatch.setattr(common.cache, "CACHE_DIR", tmp_path / "image-cache")
    monkeypatch.setattr(common.runs, "_REPLACED", [])


def write_png(path, size=32, value=None, rgb=False, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    a = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(a).save(path)
    return a


def shape_classifier(size, seed=7):
    """A CNN that tells discs (0) from squares (1) in toy images, trained on real ones with noise and contrast
    jitter so that it judges the shape, not a generator's residual noise. Input: (N, 1, S, S) in [-1, 1]."""
    import torch
    from classify.nets import CNN8
    from common.modalities import toy_images
    x, shape, _ = toy_images(1500, size, seed=seed)
    torch.manual_seed(0)
    clf = CNN8(1, 2, width=8)
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x).float()[:, None] / 127.5 - 1, torch.from_numpy(shape)
    for epoch in range(8):
        for i in torch.randperm(len(xt)).split(64):
            xb = xt[i] * (0.7 + 0.6 * torch.rand(len(i), 1, 1, 1)) + 0.25 * torch.randn_like(xt[i])
            loss = torch.nn.functional.cross_entropy(clf(xb), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    xv, sv, _ = toy_images(500, size, seed=seed + 1)
    with torch.no_grad():
        acc = (clf(torch.from_numpy(xv).float()[:, None] / 127.5 - 1).argmax(1).numpy() == sv).mean()
    assert acc > 0.97, f"the judge itself is not good enough ({acc:.3f})"
    return clf


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with HTTP Range support; `cut_after` bytes then a dropped connection, once per path."""
    cut_after = None
    cut_done = set()

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path.split("?")[0]))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        if cut is not None and self.path not in type(self).cut_done and len(body) > cut:
            type(self).cut_done.add(self.path)
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def http_server(tmp_path):
    """(base_url, folder it serves, handler class): files put in the folder are served on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Handler(RangeHandler):
        cut_after = None
        cut_done = set()

        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", folder, Handler
    srv.shutdown()
    srv.server_close()


SMOKE_FLAGS = {"classify.chestxray_study": ["--size", "32"],  # 32 px: the CVAE's 64 px samples get resized
               "classify.medmnist_study": ["--datasets", "breast,path"],  # path: not embedded, a "not run" row
               "vae.skintone_study": []}


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """smoke_study(module) -> (out, runs, completed process) of the study's smoke chain, run once per test session
    (its stage processes are what costs: each study's tests share one run)."""
    from forkserver import python_m
    done = {}

    def get(module):
        if module not in done:
            base = tmp_path_factory.mktemp(module.split(".")[-1])
            r = python_m(module, ["--smoke", *SMOKE_FLAGS[module], "--out",
                                  str(base / "out"), "--runs", str(base / "runs")], timeout=900)
            assert r.returncode == 0, r.stderr[-3000:]
            done[module] = (base / "out", base / "runs", r)
        return done[module]
    return get
