"""Decode images once into a uint8 array at a requested size, cached on disk; later epochs never touch the files.

Resize policy (every study uses it): centre-crop to a square, then a box (area) filter when shrinking and bicubic
when enlarging; grey ('L') or 'RGB'. The cache key is the list of sources (path, byte size, mtime) + size + mode.

Pixel arrays (.npz sources) must hold images, (N, H, W) or (N, H, W, 3): uint8 is taken as it is; other integer
types must lie in 0-255; float arrays are scaled by one stated rule, [0, 1] -> x255 (what ToTensor-style pipelines
save) and [0, 255] as it is, both rounded; anything else is refused with the file named (never cast blindly).
"""
from concurrent.futures import ProcessPoolExecutor
import hashlib
import os
from pathlib import Path
import warnings

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.data import DataError, as_uint8

CACHE_DIR = Path(os.environ.get("FAIRSYNTH_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "images"))
VERSION = "1"  # bump when the resize policy changes


def to_square(img, size, mode):
    img = img.convert(mode)
    w, h = img.size
    s = min(w, h)
    if w != h:
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BOX if s > size else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def decode_file(job):
    path, size, mode = job
    try:
        with Image.open(path) as img:
            return to_square(img, size, mode)
    except Exception:
        return None


def split_ref(src):
    file, key, row = src.split("::")
    return file, key, int(row)


def source_stamp(src):
    path = src.split("::")[0]
    try:
        st = os.stat(path)
        return f"{src}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{src}|missing"


def cache_key(sources, size, mode):
    h = hashlib.sha1(f"{VERSION}|{size}|{mode}".encode())
    for s in sources:
        h.update(source_stamp(s).encode())
    return h.hexdigest()[:20]


def decode_all(sources, size, mode, workers, progress):
    shape = (size, size) if mode == "L" else (size, size, 3)
    out = np.zeros((len(sources),) + shape, dtype=np.uint8)
    ok = np.zeros(len(sources), dtype=bool)
    arrays, files = {}, []
    for i, s in enumerate(sources):
        if "::" in s:
            file, key, row = split_ref(s)
            arrays.setdefault((file, key), []).append((i, row))
        else:
            files.append(i)
    for (file, key), rows in arrays.items():
        try:
            arr = np.load(file, mmap_mode="r")[key]
        except Exception as e:  # numpy raises many types for a bad file; the file is what the user needs
            raise DataError(f"{file}: cannot read the array '{key}' ({e}); check the file or download it again") \
                from e
        if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            raise DataError(f"{file}: '{key}' has shape {arr.shape}; images must be (N, H, W) or (N, H, W, 3) "
                            f"(reshape flat (N, H*W) arrays before saving)")
        if arr.dtype != np.uint8:
            arr = as_uint8(arr, f"{file} '{key}'")
        for i, row in rows:
            a = np.asarray(arr[row])
            if a.ndim == 3 and a.shape[-1] == 1:
                a = a[..., 0]
            if a.shape == shape:
                out[i] = a
            else:
                out[i] = to_square(Image.fromarray(a), size, mode)
            ok[i] = True
    jobs = [(sources[i], size, mode) for i in files]
    if jobs:
        if workers > 1 and len(jobs) > 2000:
            with ProcessPoolExecutor(workers) as pool:
                decoded = list(tqdm(pool.map(decode_file, jobs, chunksize=256), total=len(jobs),
                                    desc=f"decode {size}px", disable=not progress))
        else:
            decoded = [decode_file(j) for j in tqdm(jobs, desc=f"decode {size}px", disable=not progress)]
        for i, a in zip(files, decoded):
            if a is not None:
                out[i], ok[i] = a, True
    return out, ok


def load_images(sources, size, mode="L", cache_dir=None, strict=False, progress=None, workers=None):
    """(images uint8 (N, size, size) or (N, size, size, 3), ok bool (N,)). Unreadable images are reported by path
    and left as zeros with ok=False (the caller drops them), or raise DataError under strict=True."""
    sources = [str(s) for s in sources]
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', not {mode!r}")
    cache_dir = Path(cache_dir or CACHE_DIR)
    key = cache_key(sources, size, mode)
    path = cache_dir / f"{key}.npz"
    images = None
    if path.is_file():
        try:
            with np.load(path) as z:
                images, ok = z["images"], z["ok"]
            if len(images) != len(sources) or len(ok) != len(sources):
                raise ValueError(f"{len(images)} images for {len(sources)} sources")
        except Exception as e:  # a cache file cut short by a kill, or damaged: it is ours, decode again
            warnings.warn(f"image cache {path} is unreadable ({e}); decoding the images again")
            images = None
    if images is None:
        progress = len(sources) > 500 if progress is None else progress
        images, ok = decode_all(sources, size, mode, workers or min(4, os.cpu_count() or 1), progress)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, images=images, ok=ok)
            os.replace(tmp, path)
        except OSError as e:
            raise DataError(f"image cache {cache_dir}: cannot write there ({e.strerror}); set FAIRSYNTH_CACHE to a "
                            f"writable folder") from e
    if not ok.all():
        bad = [s for s, o in zip(sources, ok) if not o]
        msg = f"{len(bad)} of {len(sources)} images could not be read, e.g. {bad[:3]}"
        if strict:
            raise DataError(msg + " (drop --strict to skip them)")
        warnings.warn(msg + "; skipped")
    return images, ok
