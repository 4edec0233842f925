"""Downloads against a loopback HTTP server: success, checksum mismatch, resume after a cut, offline."""
import hashlib
import io
import tarfile

import numpy as np
import pandas as pd
import pytest

import common.download as dl
import common.download_http as dh
from common.data import read_fitzpatrick, read_medmnist, read_nih
from common.errors import DataError
from conftest import write_png
from forkserver import python_m


def fake_medmnist(folder, name="breastmnist.npz"):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 255, (50, 28, 28), dtype=np.uint8) if k == "images"
                           else rng.integers(0, 2, (50, 1)).astype(np.uint8))
              for s in ("train", "val", "test") for k in ("images", "labels")}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    (folder / "records/10519652/files").mkdir(parents=True, exist_ok=True)
    (folder / "records/10519652/files" / name).write_bytes(data)
    return hashlib.md5(data).hexdigest()


def test_medmnist_download_verifies_md5(http_server, tmp_path, monkeypatch):
    base, served, _ = http_server
    md5 = fake_medmnist(served)
    monkeypatch.setitem(dl.MEDMNIST_MD5, "breast", {28: md5})
    dl.download_medmnist(tmp_path / "mm", ["breast"], 28, url_base=base)
    assert len(read_medmnist(tmp_path / "mm/breastmnist.npz")) == 150
    monkeypatch.setitem(dl.MEDMNIST_MD5, "breast", {28: "0" * 32})
    with pytest.raises(DataError, match="does not match the published"):
        dl.download_medmnist(tmp_path / "mm2", ["breast"], 28, url_base=base)
    assert not list((tmp_path / "mm2").glob("*"))  # nothing half-written is kept


def test_resume_after_a_cut(http_server, tmp_path):
    base, served, handler = http_server
    payload = np.random.default_rng(1).bytes(300_000)
    (served / "big.bin").write_bytes(payload)
    handler.cut_after = 100_000  # the first response is cut after 100 kB
    dest = dh.fetch(f"{base}/big.bin", tmp_path / "big.bin", md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and "/big.bin" in handler.cut_done
    # a .part left by an earlier, killed run is continued with a Range request, not restarted
    (served / "b2.bin").write_bytes(payload)
    (tmp_path / "b2.bin.part").write_bytes(payload[:123_456])
    assert dh.fetch(f"{base}/b2.bin", tmp_path / "b2.bin").read_bytes() == payload


def test_offline_fails_at_once_with_one_line(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = python_m("common.download", ["medmnist", "--root", str(tmp_path),
                                     "--flags", "breast", "--url-base", f"http://127.0.0.1:{port}"], timeout=60)
    assert r.returncode == 2
    err = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: cannot reach 127.0.0.1") and "Traceback" not in r.stderr


def test_fitzpatrick_download_with_dead_links(http_server, tmp_path):
    base, served, _ = http_server
    rows = []
    for i in range(4):
        h = f"{i:032x}"
        if i != 2:  # image 2 is a dead link
            write_png(served / "imgs" / f"{i}.jpg", size=24, rgb=True, seed=i)
        rows.append({"md5hash": h, "fitzpatrick_scale": i % 6 + 1, "fitzpatrick_centaur": 1, "label": "psoriasis",
                     "nine_partition_label": "inflammatory", "three_partition_label": "non-neoplastic",
                     "qc": "", "url": f"https://some-atlas.example/imgs/{i}.jpg", "url_alphanum": "x"})
    pd.DataFrame(rows).to_csv(served / "fitzpatrick17k.csv", index=False)
    dead = dl.download_fitzpatrick(tmp_path, url_base=base, csv_url="https://raw.example/fitzpatrick17k.csv",
                                   workers=2, delay=0.0)
    assert [d[0] for d in dead] == [f"{2:032x}"]
    report = pd.read_csv(tmp_path / "download_report.csv")
    assert len(report) == 1 and "404" in report["error"][0]
    with pytest.warns(UserWarning, match="1 of 4 images"):
        assert len(read_fitzpatrick(tmp_path)) == 3
    again = dl.download_fitzpatrick(tmp_path, url_base=base, delay=0.0)  # a re-run asks only for what is missing
    assert [d[0] for d in again] == [f"{2:032x}"]


def test_nih_download_unpacks_and_counts(http_server, tmp_path, monkeypatch):
    base, served, _ = http_server
    pngs = tmp_path / "src"
    names = ["00000001_000.png", "00000002_000.png", "00000003_000.png"]
    for i, n in enumerate(names):
        write_png(pngs / "images" / n, size=16, seed=i)
    archive = served / "shared/static/vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pngs / "images", arcname="images")
    monkeypatch.setattr(dl, "NIH_COUNTS", [3] + dl.NIH_COUNTS[1:])
    dl.download_nih(tmp_path / "nih", [1], url_base=base)
    assert len(list((tmp_path / "nih/images_001/images").glob("*.png"))) == 3
    with pytest.warns(UserWarning, match="3 found"):
        t = read_nih(tmp_path / "nih")  # the shipped full label table is copied beside the images
    assert len(t) == 3
    monkeypatch.setattr(dl, "NIH_COUNTS", [4] + dl.NIH_COUNTS[1:])
    with pytest.raises(DataError, match="3 images unpacked, the NIH lists 4"):
        dl.download_nih(tmp_path / "nih2", [1], url_base=base)


def test_download_help_reads_well():
    r = python_m("common.download", ["--help"])
    assert r.returncode == 0 and all(d in r.stdout for d in ("medmnist", "fitzpatrick17k", "nih", "MD5"))
    r = python_m("common.download", ["fitzpatrick17k", "--help"])
    assert "--url-base" in r.stdout and "--delay" in r.stdout
