"""Download the public data sets fairsynth reads: resumable, checksummed where a checksum is published.

    python -m common.download medmnist --root data-full/medmnist [--flags path,derma,...] [--size 28]
    python -m common.download fitzpatrick17k --root data-full/fitzpatrick17k [--workers 4] [--limit N]
    python -m common.download nih --root data-full/nih [--archives 1,2,...]

medmnist        the official MedMNIST v2 files from their Zenodo record, each checked against its published MD5.
fitzpatrick17k  the label table from the dataset's GitHub repository, then every image from the URL in its `url`
                column, saved as <md5hash>.jpg. Polite: a few threads, a minimum delay between requests to the same
                host, retries with back-off; re-running resumes; dead links go to download_report.csv.
nih             the 12 image archives from the NIH Clinical Center's published links, each unpacked to
                images_NNN/images/*.png; the NIH publishes no checksums, so each archive is checked by unpacking
                it (gzip CRC) and by its published image count. The label table (Data_Entry_2017_v2020.csv.gz,
                shipped in data/) is copied beside them.
Every command takes --root (where to write) and --url-base (a mirror, or a test server on 127.0.0.1). Offline,
each stops at the first request with one line saying so. Partial files (*.part) are resumed with HTTP Range.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import hashlib
import http.client
import os
from pathlib import Path
import shutil
import socket
import sys
import tarfile
import threading
import time
import urllib.error
from urllib.parse import urlsplit, urlunsplit
import urllib.request

from tqdm import tqdm

from common.data import PROJECT_DATA, DataError

USER_AGENT = "fairsynth-downloader/1.0 (research; https://github.com/fairsynth)"
MEDMNIST_URL = "https://zenodo.org/records/10519652/files"
# Published MD5s (MedMNIST v2 `medmnist/info.py`, record 10519652) per flag and image size.
MEDMNIST_MD5 = {
    "path": {28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
             128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec"},
    "derma": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
              128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    "oct": {28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
            128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3"},
    "pneumonia": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                  128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "breast": {28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
               128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b"},
    "organa": {28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
               128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170"},
    "organc": {28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
               128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1"},
    "organs": {28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
               128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1"},
    "chest": {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
              128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    "blood": {28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
              128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601"},
    "tissue": {28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
               128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c"},
    "retina": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
               128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
}
STUDY_FLAGS = ["path", "derma", "oct", "pneumonia", "breast", "organa", "organc", "organs"]
FITZ_CSV_URL = "https://raw.githubusercontent.com/mattgroh/fitzpatrick17k/main/fitzpatrick17k.csv"
# The NIH Clinical Center's published archive links (batch_download_zips.py in the NIH Box folder), in order.
NIH_ARCHIVES = [
    "https://nihcc.box.com/shared/static/vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz",
    "https://nihcc.box.com/shared/static/i28rlmbvmfjbl8p2n3ril0pptcmcu9d1.gz",
    "https://nihcc.box.com/shared/static/f1t00wrtdk94satdfb9olcolqx20z2jp.gz",
    "https://nihcc.box.com/shared/static/0aowwzs5lhjrceb3qp67ahp0rd1l1etg.gz",
    "https://nihcc.box.com/shared/static/v5e3goj22zr6h8tzualxfsqlqaygfbsn.gz",
    "https://nihcc.box.com/shared/static/asi7ikud9jwnkrnkj99jnpfkjdes7l6l.gz",
    "https://nihcc.box.com/shared/static/jn1b4mw4n6lnh74ovmcjb8y48h8xj07n.gz",
    "https://nihcc.box.com/shared/static/tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j.gz",
    "https://nihcc.box.com/shared/static/upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj.gz",
    "https://nihcc.box.com/shared/static/l6nilvfa9cg3s28tqv1qc1olm3gnz54p.gz",
    "https://nihcc.box.com/shared/static/hhq8fkdgvcari67vfhs7ppg2w6ni4jze.gz",
    "https://nihcc.box.com/shared/static/ioqwiy20ihqwyr8pf4c24eazhh281pbu.gz",
]
NIH_COUNTS = [4999] + [10000] * 10 + [7121]  # images per archive (112,120 in all)


class Offline(DataError):
    pass


def rebase(url, url_base):
    """Swap scheme and host of url for url_base's (keeping the path): how tests point real URLs at 127.0.0.1."""
    if not url_base:
        return url
    b, u = urlsplit(url_base), urlsplit(url)
    return urlunsplit((b.scheme, b.netloc, b.path.rstrip("/") + u.path, u.query, ""))


def md5sum(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url, dest, md5=None, retries=3, timeout=30, progress=False):
    """Download url to dest (via dest.part, resumed with Range after a cut), verify md5 if given, rename.
    Connection failures on the first byte raise Offline; a checksum mismatch raises DataError and keeps nothing."""
    dest = Path(dest)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                if have and r.status != 206:  # server ignored Range: start again
                    have = 0
                total = int(r.headers.get("Content-Length", 0)) + have
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total or None, initial=have, unit="B", unit_scale=True, desc=dest.name,
                        disable=not progress, leave=False) as bar:
                    while True:
                        block = r.read(1 << 16)
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
                if total and part.stat().st_size < total:
                    raise ConnectionError(f"connection cut at {part.stat().st_size} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked past the end: the .part is complete
                break
            if e.code < 500 or attempt == retries:
                raise DataError(f"{url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(e, urllib.error.URLError) and not part.exists():
                raise Offline(f"cannot reach {urlsplit(url).netloc} ({reason}). No internet? Fetch the files on "
                              f"a connected machine and copy them under --root, or pass --url-base to a mirror.") \
                    from e
            if attempt == retries:
                raise DataError(f"{url}: {reason} after {retries + 1} tries; run the command again to resume "
                                f"from {part}") from e
        time.sleep(min(2 ** attempt, 10) * 0.1)
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise DataError(f"{url}: MD5 {got} does not match the published {md5}; the partial file was deleted. "
                            f"Run again, or check --url-base.")
    os.replace(part, dest)
    return dest


def download_medmnist(root, flags=STUDY_FLAGS, size=28, url_base=None):
    root = Path(root)
    for flag in flags:
        if flag not in MEDMNIST_MD5:
            raise DataError(f"unknown MedMNIST flag {flag!r}; choose from {sorted(MEDMNIST_MD5)}")
        name = f"{flag}mnist.npz" if size == 28 else f"{flag}mnist_{size}.npz"
        url = rebase(f"{MEDMNIST_URL}/{name}?download=1", url_base)
        print(f"{name}: ", end="", flush=True)
        fetch(url, root / name, md5=MEDMNIST_MD5[flag][size], progress=True)
        print("ok (MD5 verified)")


class Polite:
    """At most one request per `delay` seconds to each host."""

    def __init__(self, delay):
        self.delay, self.last, self.lock = delay, {}, threading.Lock()

    def wait(self, host):
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.last.get(host, 0) + self.delay)
            self.last[host] = slot
        time.sleep(max(0.0, slot - now))


def download_fitzpatrick(root, url_base=None, csv_url=FITZ_CSV_URL, workers=4, delay=0.5, limit=None):
    import pandas as pd
    root = Path(root)
    csv = fetch(rebase(csv_url, url_base), root / "fitzpatrick17k.csv")
    df = pd.read_csv(csv, dtype={"md5hash": str})
    missing = {"md5hash", "url"} - set(df.columns)
    if missing:
        raise DataError(f"{csv} lacks the columns {sorted(missing)}")
    df = df[df["url"].notna()]
    todo = [(h, u) for h, u in zip(df["md5hash"], df["url"]) if not (root / "images" / f"{h}.jpg").is_file()]
    if limit:
        todo = todo[:limit]
    print(f"{len(df)} images listed; fetching {len(todo)} that are not here yet")
    polite, dead = Polite(delay), []

    def one(item):
        h, u = item
        url = rebase(u, url_base)
        polite.wait(urlsplit(url).netloc)
        try:
            fetch(url, root / "images" / f"{h}.jpg", retries=2)
            return None
        except DataError as e:  # dead link, server error or unreachable host: report it, go on
            return (h, u, str(e.code).removeprefix("error: "), isinstance(e, Offline))

    with ThreadPoolExecutor(workers) as pool:
        for res in tqdm(pool.map(one, todo), total=len(todo), desc="fitzpatrick17k images"):
            if res:
                dead.append(res)
    report = root / "download_report.csv"
    pd.DataFrame([d[:3] for d in dead], columns=["md5hash", "url", "error"]).to_csv(report, index=False)
    print(f"done: {len(todo) - len(dead)} fetched, {len(dead)} failed, listed in {report}")
    if len(todo) > 1 and len(dead) == len(todo) and all(d[3] for d in dead):
        raise Offline(f"no image host could be reached (see {report}); no internet?")
    return [d[:3] for d in dead]


def download_nih(root, archives=range(1, 13), url_base=None, keep_archives=False):
    root = Path(root)
    for i in archives:
        if not 1 <= i <= 12:
            raise DataError(f"NIH archives are numbered 1-12, not {i}")
        folder = root / f"images_{i:03d}"
        if folder.is_dir() and len(list(folder.rglob("*.png"))) == NIH_COUNTS[i - 1]:
            print(f"images_{i:03d}: already unpacked")
            continue
        tgz = fetch(rebase(NIH_ARCHIVES[i - 1], url_base), root / f"images_{i:03d}.tar.gz", progress=True)
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".png")]
                tar.extractall(folder, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            tgz.unlink()
            raise DataError(f"{tgz} is damaged ({e}); deleted it, run again to fetch it anew") from e
        n = len(list(folder.rglob("*.png")))
        if n != NIH_COUNTS[i - 1]:
            raise DataError(f"images_{i:03d}: {n} images unpacked, the NIH lists {NIH_COUNTS[i - 1]}")
        print(f"images_{i:03d}: {n} images, as published")
        if not keep_archives:
            tgz.unlink()
    labels = root / "Data_Entry_2017_v2020.csv.gz"
    if not labels.exists():
        shutil.copy(PROJECT_DATA / "nih_cxr14" / "Data_Entry_2017_v2020.csv.gz", labels)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m common.download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True, metavar="{medmnist,fitzpatrick17k,nih}")

    def common(sp):
        sp.add_argument("--root", required=True, help="folder to download into (created if missing)")
        sp.add_argument("--url-base", default=None,
                        help="replace the scheme and host of every URL (a mirror, or http://127.0.0.1:PORT)")

    m = sub.add_parser("medmnist", help="official MedMNIST v2 .npz files, MD5-checked")
    common(m)
    m.add_argument("--flags", default=",".join(STUDY_FLAGS),
                   help=f"comma-separated data sets (default: the 8 of `make medmnist`); all: {','.join(MEDMNIST_MD5)}")
    m.add_argument("--size", type=int, default=28, choices=[28, 64, 128, 224], help="image size variant")
    f = sub.add_parser("fitzpatrick17k", help="label table + images from the URLs it lists")
    common(f)
    f.add_argument("--csv-url", default=FITZ_CSV_URL, help="where the label table is published")
    f.add_argument("--workers", type=int, default=4, help="parallel downloads (keep it small: these are other "
                   "people's servers)")
    f.add_argument("--delay", type=float, default=0.5, help="minimum seconds between requests to one host")
    f.add_argument("--limit", type=int, default=None, help="fetch at most this many images (for a trial)")
    n = sub.add_parser("nih", help="NIH ChestX-ray14 image archives (42 GB in all) + label table")
    common(n)
    n.add_argument("--archives", default="1-12", help="which of the 12 archives, e.g. '1' or '1,2' or '1-12'")
    n.add_argument("--keep-archives", action="store_true", help="keep the .tar.gz files after unpacking")
    return p.parse_args(argv)


def parse_range(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main(args):
    if args.dataset == "medmnist":
        download_medmnist(args.root, [f.strip() for f in args.flags.split(",") if f.strip()], args.size,
                          args.url_base)
    elif args.dataset == "fitzpatrick17k":
        download_fitzpatrick(args.root, args.url_base, args.csv_url, args.workers, args.delay, args.limit)
    else:
        download_nih(args.root, parse_range(args.archives), args.url_base, args.keep_archives)


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:
        sys.exit("interrupted: run the same command again to resume")
