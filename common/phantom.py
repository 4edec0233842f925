"""A procedural skin-lesion phantom for `make skintone` and `make fairgen` on machines without Fitzpatrick17k images.

It writes a folder in Fitzpatrick17k's own format (`fitzpatrick17k.csv` + `images/<md5hash>.jpg`), so the real
reader and every study run on it unchanged; its `url` column says `phantom://`, and every output made from it must
say "phantom" in its title.

What it models: skin tone by Fitzpatrick type (a base colour per type, per-image jitter, uneven lighting, pore
texture, a few hairs) and a lesion whose shape, colour and texture depend on the diagnosis (nine-partition level).
The (skin type x diagnosis) frequencies are the real ones: counted once from the Fitzpatrick17k label table
(16,577 rows; 16,012 with a skin type 1-6; mattgroh/fitzpatrick17k `fitzpatrick17k.csv`) and kept below.
What it does not model: nothing here makes one skin type harder to reconstruct or classify on purpose; the noise,
lighting and lesion size have the same distribution for every type. Whatever gap a study finds on it comes from
the colours and frequencies alone.

    python -m common.phantom --out data-phantom/skin --n 3000 --size 64
"""
import argparse
import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.cli import ArgumentParser, positive_int, run
from common.errors import DataError

# Counts of (nine-partition diagnosis, Fitzpatrick type 1..6) in fitzpatrick17k.csv (rows with type -1 dropped).
JOINT = {
    "benign dermal": [216, 364, 225, 136, 60, 17],
    "benign epidermal": [160, 247, 202, 198, 81, 21],
    "benign melanocyte": [68, 60, 48, 33, 18, 6],
    "genodermatoses": [143, 261, 266, 251, 182, 62],
    "inflammatory": [1907, 3134, 2111, 1862, 1045, 468],
    "malignant cutaneous lymphoma": [38, 50, 42, 29, 14, 3],
    "malignant dermal": [17, 27, 29, 42, 24, 12],
    "malignant epidermal": [265, 467, 277, 170, 77, 31],
    "malignant melanoma": [133, 198, 108, 60, 32, 15],
}
THREE = {"benign dermal": "benign", "benign epidermal": "benign", "benign melanocyte": "benign",
         "genodermatoses": "non-neoplastic", "inflammatory": "non-neoplastic",
         "malignant cutaneous lymphoma": "malignant", "malignant dermal": "malignant",
         "malignant epidermal": "malignant", "malignant melanoma": "malignant"}
# The three most frequent fine labels within each nine-partition class, with their counts (same table).
FINE = {
    "benign dermal": {"syringoma": 125, "telangiectases": 120, "pyogenic granuloma": 111},
    "benign epidermal": {"porokeratosis actinic": 179, "prurigo nodularis": 168, "milia": 111},
    "benign melanocyte": {"nevocytic nevus": 85, "halo nevus": 81, "congenital nevus": 67},
    "genodermatoses": {"neurofibromatosis": 187, "hailey hailey disease": 172, "dariers disease": 148},
    "inflammatory": {"psoriasis": 622, "lichen planus": 479, "allergic contact dermatitis": 420},
    "malignant cutaneous lymphoma": {"mycosis fungoides": 176},
    "malignant dermal": {"kaposi sarcoma": 151},
    "malignant epidermal": {"squamous cell carcinoma": 536, "basal cell carcinoma": 460, "actinic keratosis": 168},
    "malignant melanoma": {"melanoma": 244, "superficial spreading melanoma ssm": 116, "malignant melanoma": 105},
}
# Base skin colour (RGB) per Fitzpatrick type, light to dark (our choice, from typical ITA-angle photographs).
SKIN_RGB = np.array([[236, 203, 178], [222, 180, 150], [196, 148, 112], [160, 112, 78], [112, 74, 50],
                     [70, 46, 33]], dtype=float)
# Lesion per diagnosis: (colour multiplier on the skin colour, shape, texture). Our choice.
LESION = {
    "benign dermal": ((1.05, 0.80, 0.80), "dome", "smooth"),
    "benign epidermal": ((0.85, 0.75, 0.65), "round", "scaly"),
    "benign melanocyte": ((0.55, 0.42, 0.35), "round", "smooth"),
    "genodermatoses": ((0.90, 0.78, 0.70), "papules", "smooth"),
    "inflammatory": ((1.10, 0.72, 0.70), "plaque", "scaly"),
    "malignant cutaneous lymphoma": ((1.00, 0.68, 0.62), "plaque", "smooth"),
    "malignant dermal": ((0.70, 0.45, 0.62), "dome", "smooth"),
    "malignant epidermal": ((1.02, 0.88, 0.82), "irregular", "scaly"),
    "malignant melanoma": ((0.40, 0.30, 0.28), "irregular", "mottled"),
}


def smooth_noise(rng, size, scale):
    """Low-frequency noise: a coarse random grid upsampled bicubically, in [-1, 1]."""
    g = rng.uniform(-1, 1, (scale, scale)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def lesion_mask(rng, size, shape):
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.12, 0.22)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if shape == "papules":
        m = np.zeros((size, size))
        for _ in range(rng.integers(4, 9)):
            py, px = rng.uniform(0.2, 0.8, 2)
            m = np.maximum(m, np.clip(1 - np.sqrt((yy - py) ** 2 + (xx - px) ** 2) / (r * 0.35), 0, 1))
        return m
    if shape in ("irregular", "plaque"):
        theta = np.arctan2(yy - cy, xx - cx)
        k = rng.integers(3, 7)
        wobble = 1 + (0.35 if shape == "irregular" else 0.15) * np.sin(k * theta + rng.uniform(0, 6.3))
        wobble += 0.2 * smooth_noise(rng, size, 5) if shape == "irregular" else 0
        r = r * (1.4 if shape == "plaque" else 1.0)
        d = d / wobble
    edge = 0.25 if shape in ("round", "dome") else 0.4
    m = np.clip((r - d) / (r * edge), 0, 1)
    return m ** 0.5 if shape == "dome" else m


def render(rng, fst, nine, size):
    """One phantom image (size, size, 3) uint8 for Fitzpatrick type fst (1..6) and a nine-partition diagnosis."""
    base = SKIN_RGB[fst - 1] * rng.uniform(0.92, 1.08) + rng.normal(0, 4, 3)
    light = 1 + 0.12 * smooth_noise(rng, size, 3)  # uneven lighting
    pores = 0.04 * rng.standard_normal((size, size))  # fine texture
    img = base[None, None] * (light + pores)[..., None]
    colour, shape, texture = LESION[nine]
    m = lesion_mask(rng, size, shape)[..., None]
    lesion = base[None, None] * np.array(colour)[None, None] * (light[..., None])
    if texture == "scaly":
        lesion = lesion * (1 + 0.18 * (rng.random((size, size, 1)) > 0.7))
    elif texture == "mottled":
        lesion = lesion * (1 + 0.35 * smooth_noise(rng, size, 9)[..., None])
    img = img * (1 - m) + lesion * m
    for _ in range(rng.integers(0, 4)):  # hairs
        y0, x0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, np.pi)
        t = np.linspace(-size / 3, size / 3, size * 2)
        ys = np.clip((y0 + t * np.sin(ang)).astype(int), 0, size - 1)
        xs = np.clip((x0 + t * np.cos(ang)).astype(int), 0, size - 1)
        img[ys, xs] *= 0.45
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_labels(rng, n):
    """n draws of (skin type, nine-partition diagnosis, fine label) from the real joint frequencies."""
    nines = list(JOINT)
    counts = np.array([JOINT[k] for k in nines], dtype=float)  # (9, 6)
    flat = rng.choice(counts.size, size=n, p=(counts / counts.sum()).ravel())
    rows = []
    for f in flat:
        nine, fst = nines[f // 6], f % 6 + 1
        fine = FINE[nine]
        label = rng.choice(list(fine), p=np.array(list(fine.values())) / sum(fine.values()))
        rows.append((fst, nine, label))
    return rows


def make_phantom(out, n=3000, size=64, seed=0):
    """Write n phantom images and their fitzpatrick17k.csv under out; returns the CSV path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i, (fst, nine, label) in enumerate(sample_labels(rng, n)):
        buf = io.BytesIO()
        Image.fromarray(render(rng, fst, nine, size)).save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        md5 = hashlib.md5(data).hexdigest()
        (out / "images" / f"{md5}.jpg").write_bytes(data)
        records.append({"md5hash": md5, "fitzpatrick_scale": fst, "fitzpatrick_centaur": fst, "label": label,
                        "nine_partition_label": nine, "three_partition_label": THREE[nine], "qc": "",
                        "url": f"phantom://seed{seed}/{i}", "url_alphanum": f"phantomseed{seed}n{i}"})
    csv = out / "fitzpatrick17k.csv"
    pd.DataFrame(records).to_csv(csv, index=False)
    return csv


def is_phantom(table):
    return "url" in table.columns and table["url"].astype(str).str.startswith("phantom://").any()


def main(args):
    if (Path(args.out) / "fitzpatrick17k.csv").exists():
        raise DataError(f"--out {args.out}: already holds a data set (fitzpatrick17k.csv); choose another --out or "
                        f"delete it yourself")
    csv = make_phantom(args.out, args.n, args.size, args.seed)
    print(f"wrote {args.n} phantom skin images ({args.size}px) and {csv}")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write fitzpatrick17k.csv and images/ into")
    p.add_argument("--n", type=positive_int, default=3000, help="number of images")
    p.add_argument("--size", type=positive_int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
