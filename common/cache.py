"""Decode images once into a uint8 array at a requested size, cached on disk; later epochs never touch the files.

The cache is a .npy file that load_images returns memory-mapped (copy-on-write): every process that reads the same
images shares one copy in the page cache (the ranks of a torchrun job, the stages of a study), and a set larger than
RAM (112,120 NIH images at 224 px: 5.6 GB) is paged in as batches need it. Decoding writes straight into that file,
so RAM holds no second copy, and its disk space is reserved first (a full disk is an error naming the folder).

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
import platform
import warnings

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.data import as_uint8
from common.errors import DataError

CACHE_DIR = None  # a folder here overrides $FAIRSYNTH_CACHE (the tests give each test its own)
VERSION = "2"  # bump when the resize policy or the file format changes


def default_cache_dir():
    """$FAIRSYNTH_CACHE, read when a cache is opened (a stage forked from a study, or any command run in a process
    that imported this module earlier, sees its own environment), else .cache/images in the repository."""
    return Path(os.environ.get("FAIRSYNTH_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "images"))


def to_square(img, size, mode):
    img = img.convert(mode)
    w, h = img.size
    s = min(w, h)
    if w != h:
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.BOX if s > size else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def open_image(path):
    """A PIL image of an image file: anything PIL reads (PNG, JPEG, TIFF, ...), a .npy array ((H, W) or (H, W, 3),
    scaled as the .npz arrays are), or DICOM (pydicom; the stored pixel values, rescaled and windowed from their own
    range to 0-255, MONOCHROME1 inverted so that bone is bright)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
            raise ValueError(f"{path}: shape {a.shape}")
        return Image.fromarray(a if a.dtype == np.uint8 else as_uint8(a, str(path)))
    if suffix in (".dcm", ".dicom"):
        import pydicom  # optional: the label table refuses DICOM input without it, in one line
        d = pydicom.dcmread(path)
        a = d.pixel_array.astype(np.float64) * float(getattr(d, "RescaleSlope", 1)) + \
            float(getattr(d, "RescaleIntercept", 0))
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1)
        if getattr(d, "PhotometricInterpretation", "") == "MONOCHROME1":
            a = 1 - a
        return Image.fromarray(np.rint(a * 255).astype(np.uint8))
    return Image.open(path)


def decode_file(job):
    path, size, mode = job
    try:
        with open_image(path) as img:
            return to_square(img, size, mode)
    except (Exception, SystemExit):  # a file that does not decode (as_uint8 refuses with a DataError): left out
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


def available_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_all(sources, size, mode, workers, progress, out, pool_min=2000):
    """Decode sources into out (N, size, size[, 3]) uint8 (a memory map); returns ok (N,) bool. Image files are
    decoded by `workers` processes when there are more than pool_min of them (below, a pool's start costs more)."""
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
            if a.shape == out.shape[1:]:
                out[i] = a
            else:
                out[i] = to_square(Image.fromarray(a), size, mode)
            ok[i] = True
    jobs = [(sources[i], size, mode) for i in files]
    if jobs:
        bar = dict(total=len(jobs), desc=f"decode {size}px", disable=not progress)
        if workers > 1 and len(jobs) > pool_min:  # one process per core; results written as they arrive, in order
            with ProcessPoolExecutor(workers) as pool:
                for i, a in zip(files, tqdm(pool.map(decode_file, jobs, chunksize=64), **bar)):
                    if a is not None:
                        out[i], ok[i] = a, True
        else:
            for i, a in zip(files, tqdm(map(decode_file, jobs), **bar)):
                if a is not None:
                    out[i], ok[i] = a, True
    return ok


def reserve(path, shape):
    """A .npy file of uint8 `shape` at path, its disk space allocated now (writing into a memory map on a full disk
    would kill the process), opened as a writable memory map."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    return out


def load_images(sources, size, mode="L", cache_dir=None, strict=False, progress=None, workers=None, pool_min=2000):
    """(images uint8 (N, size, size) or (N, size, size, 3), memory-mapped from the cache; ok bool (N,)). Unreadable
    images are reported by path and left as zeros with ok=False (the caller drops them), or raise DataError under
    strict=True. workers: decoding processes (default: one per available core)."""
    sources = [str(s) for s in sources]
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', not {mode!r}")
    shape = (len(sources), size, size) + (() if mode == "L" else (3,))
    cache_dir = Path(cache_dir or CACHE_DIR or default_cache_dir())
    key = cache_key(sources, size, mode)
    path, ok_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.ok.npy"
    images = None
    if not sources:
        images, ok = np.zeros(shape, np.uint8), np.zeros(0, bool)
    elif path.is_file() and ok_path.is_file():
        try:
            ok, images = np.load(ok_path), np.load(path, mmap_mode="c")
            if images.shape != shape or images.dtype != np.uint8 or ok.shape != shape[:1]:
                raise ValueError(f"{images.shape} {images.dtype} images for {len(sources)} sources")
        except Exception as e:  # a cache file cut short by a kill, or damaged: it is ours, decode again
            warnings.warn(f"image cache {path} is unreadable ({e}); decoding the images again")
            images = None
    if images is None:
        progress = len(sources) > 500 if progress is None else progress
        tag = f"{platform.node()}-{os.getpid()}"  # unique also on a folder that several machines share
        tmp, ok_tmp = path.with_name(f"{key}.tmp-{tag}.npy"), path.with_name(f"{key}.ok.tmp-{tag}.npy")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            out = reserve(tmp, shape)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"image cache {cache_dir}: cannot write {np.prod(shape) / 1e9:.2f} GB there "
                            f"({e.strerror}); set FAIRSYNTH_CACHE to a writable folder with room") from e
        try:
            ok = decode_all(sources, size, mode, workers or available_cpus(), progress, out, pool_min)
            out.flush()
            del out
            np.save(ok_tmp, ok)
            os.replace(ok_tmp, ok_path)
            os.replace(tmp, path)  # last: the images file appears complete or not at all
        finally:
            tmp.unlink(missing_ok=True)
            ok_tmp.unlink(missing_ok=True)
        images = np.load(path, mmap_mode="c")
    if not ok.all():
        bad = [s for s, o in zip(sources, ok) if not o]
        msg = f"{len(bad)} of {len(sources)} images could not be read, e.g. {bad[:3]}"
        if strict:
            raise DataError(msg + " (drop --strict to skip them)")
        warnings.warn(msg + "; skipped")
    return images, ok
