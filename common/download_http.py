"""HTTP(S) fetching for common.download: one file from one URL, through a .part resumed with Range after a cut,
kept only once it holds the byte count the server announced and, where one is published, its MD5 matches.

URLs are checked before any request and again on every redirect: http:// and https:// only, and with public_only
no host on this machine or a private network (host_refusal), for URLs that come from a data table.
"""
import hashlib
import http.client
import ipaddress
import os
from pathlib import Path
import re
import socket
import time
import urllib.error
from urllib.parse import quote, urlsplit, urlunsplit
import urllib.request

from tqdm import tqdm

from common.errors import DataError

USER_AGENT = "fairsynth-downloader/1.0 (research; https://github.com/fairsynth)"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class Offline(DataError):
    pass


class _Cut(Exception):
    """One response did not leave the whole file in the .part (cut short, or resumable only from byte 0)."""


def _non_public(address):
    """True for loopback, private, link-local, unspecified, reserved, multicast and other non-global addresses
    (an IPv4-mapped IPv6 address is judged by its IPv4 part)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified
            or ip.is_reserved or ip.is_multicast)


def host_refusal(host):
    """Why `host` may not be fetched from a URL that came from a data table, or None.

    Covered: IP literals (IPv4, IPv6, IPv4-mapped) in loopback / private / link-local / unspecified / reserved /
    multicast ranges; 'localhost' and *.localhost; DNS names (and the odd numeric spellings like 2130706433 or
    0x7f.1 that the resolver turns into 127.0.0.1) that resolve, now, to any such address (socket.getaddrinfo, one
    look-up per URL). Not covered: a name that resolves differently when urllib connects a moment later (DNS
    rebinding), and an HTTP proxy from the environment, which connects on our behalf. A name that does not resolve
    passes here: urllib then fails on it the same way and the row is reported as unreachable."""
    h = host.rstrip(".").lower()
    if h in _LOOPBACK_NAMES or h.endswith(".localhost"):
        return "this machine (loopback)"
    try:
        if _non_public(h):
            return "a loopback, private, link-local or reserved address"
        return None
    except ValueError:
        pass  # a DNS name
    try:
        infos = socket.getaddrinfo(h, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    for info in infos:
        try:
            if _non_public(info[4][0]):
                return f"a name that resolves to the non-public address {info[4][0]}"
        except ValueError:
            return f"a name that resolves to an address that cannot be checked ({info[4][0]})"
    return None


def check_url(url, public_only=False):
    """The URL as it will be requested, or DataError saying what is wrong with it: http(s) only, a host, a valid
    port; with public_only, a host that is not this machine or a private network (see host_refusal). Spaces and
    non-ASCII characters in the path and query are percent-encoded (existing %-escapes are kept)."""
    if not isinstance(url, str) or not url.strip():
        raise DataError(f"{url!r}: no URL (give an http:// or https:// URL)")
    url = url.strip()
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError as e:
        raise DataError(f"{url}: malformed URL ({e}) (fix the URL)") from e
    if parts.scheme.lower() not in ("http", "https"):
        raise DataError(f"{url}: not an http:// or https:// URL (only those are fetched; fix the URL)")
    if not host:
        raise DataError(f"{url}: malformed URL (no host name) (fix the URL)")
    if public_only:
        why = host_refusal(host)
        if why:
            raise DataError(f"{url}: {host} is {why}, not fetched for a URL from the table (to download from a "
                            f"local server or mirror, name it with --url-base)")
    path = quote(parts.path, safe="/%:@!$&'()*+,;=~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=~?")
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


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


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are held to the same rule as the URL itself (http(s) only; public hosts where asked)."""

    def __init__(self, public_only):
        super().__init__()
        self.public_only = public_only

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            newurl = check_url(newurl, self.public_only)
        except DataError as e:
            fp.close()
            raise DataError(f"{req.full_url}: redirected to {e.code.removeprefix('error: ')}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _int_header(value):
    try:
        v = int(value)
        return v if v >= 0 else None
    except (TypeError, ValueError):
        return None


def _content_range(value):
    """'bytes START-END/TOTAL' -> (START, END, TOTAL or None); 'bytes */TOTAL' -> (None, None, TOTAL); else None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    start, end, total = (None if g in (None, "*") else int(g) for g in m.groups())
    return start, end, total


def _write_error(part, e):
    return DataError(f"{part}: cannot write ({e.strerror or e}) (check that --root is a folder you may write to, "
                     f"with free space)")


def _one_request(opener, url, part, timeout, progress, name, max_bytes=None):
    """One GET into `part`, resumed with Range when it already holds bytes. Returns when the part holds the whole
    file as far as the server announced its size (Content-Length of a 200, the total of a 206's Content-Range);
    raises _Cut when it is short (the next try resumes) or cannot be continued (the part is deleted, the next try
    starts at byte 0). Without any announced size (chunked or close-delimited body) what arrived is taken as
    whole: checksums (MedMNIST), unpacking (NIH) and decoding (Fitzpatrick17k) judge it afterwards."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        r = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # asked past the end: a finished download, or a stale .part of another file
            cr = _content_range(e.headers.get("Content-Range"))
            e.close()
            if cr is not None and cr[2] == have:
                return  # the server confirms: the .part is the whole file
            part.unlink()
            raise _Cut(f"the server cannot resume at byte {have} (HTTP 416): the partial file was stale, "
                       f"deleted it") from None
        raise
    except (ValueError, http.client.InvalidURL) as e:  # what urllib / http.client refuse to send
        raise DataError(f"{url}: malformed URL ({e}) (fix the URL)") from e
    with r:
        length = _int_header(r.headers.get("Content-Length"))
        if r.status == 206:
            cr = _content_range(r.headers.get("Content-Range"))
            if cr is None or cr[0] != have:
                part.unlink(missing_ok=True)
                raise _Cut(f"the server answered a resume at byte {have} with "
                           f"{r.headers.get('Content-Range')!r}; starting over")
            total, mode = cr[2], "ab"
        else:  # the whole file from byte 0, also when the server ignored Range: write a fresh part
            have, total, mode = 0, length, "wb"
        if max_bytes is not None and (total or 0) > max_bytes:
            raise DataError(f"{url}: {total} bytes announced, more than the {max_bytes} allowed here (not fetched)")
        try:
            f = open(part, mode)
        except OSError as e:
            raise _write_error(part, e) from e
        got = 0
        with f, tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=not progress,
                     leave=False) as bar:
            while True:
                block = r.read(1 << 16)
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as e:
                    raise _write_error(part, e) from e
                got += len(block)
                if max_bytes is not None and have + got > max_bytes:
                    f.close()
                    part.unlink(missing_ok=True)
                    raise DataError(f"{url}: more than the {max_bytes} bytes allowed here (not kept)")
                bar.update(len(block))
            try:
                f.flush()
            except OSError as e:
                raise _write_error(part, e) from e
    if length is not None and got < length:
        raise _Cut(f"connection cut after {got} of the {length} bytes announced")
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
            raise _Cut(f"{size} bytes where the server announced {total}; deleted them, starting over")
        raise _Cut(f"connection cut at {size} of {total} bytes")


def fetch(url, dest, md5=None, retries=3, timeout=30, progress=False, public_only=False, max_bytes=None):
    """Download url to dest (via dest.part, resumed with Range after a cut), verify md5 if given, rename.

    Only http(s) URLs are fetched, and with public_only none on this machine or a private network (host_refusal).
    The .part becomes dest only once it holds the byte count the server announced for the whole file. Connection
    failures on the first byte raise Offline; anything else that stops it raises DataError, naming the URL; a
    checksum mismatch keeps nothing."""
    url = check_url(url, public_only)
    dest = Path(dest)
    old_bad = False
    if dest.is_file():
        if md5 is None or md5sum(dest) == md5:
            return dest
        old_bad = True  # replaced below when the new download checks out, deleted when it does not
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest.parent}: cannot create the folder ({e.strerror or e}) (check --root)") from e
    part = dest.with_name(dest.name + ".part")
    opener = urllib.request.build_opener(_CheckedRedirects(public_only))
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2 ** attempt, 10) * 0.1)
        try:
            _one_request(opener, url, part, timeout, progress, dest.name, max_bytes)
            break
        except _Cut as e:
            last = e
        except urllib.error.HTTPError as e:
            e.close()
            if e.code < 500 or attempt == retries:
                raise DataError(f"{url}: HTTP {e.code} {e.reason} (check the URL, or --url-base)") from e
            last = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # socket.timeout is an OSError
            reason = getattr(e, "reason", e)
            if isinstance(e, urllib.error.URLError) and not part.exists() and attempt == 0:
                raise Offline(f"cannot reach {urlsplit(url).netloc} ({reason}). No internet? Fetch the files on "
                              f"a connected machine and copy them under --root, or pass --url-base to a mirror.") \
                    from e
            last = reason
    else:
        again = f"to resume from {part}" if part.exists() else "to try again"
        raise DataError(f"{url}: {last} after {retries + 1} tries (run the command again {again})")
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            gone = "the download"
            if old_bad:
                dest.unlink(missing_ok=True)
                gone += f" and the earlier {dest.name}, whose MD5 did not match either"
            raise DataError(f"{url}: MD5 {got} does not match the published {md5} (deleted {gone}; run again, or "
                            f"check --url-base)")
    os.replace(part, dest)
    return dest
