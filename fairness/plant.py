"""A planted bias with a known answer: the positive control of the chest X-ray studies (in the manner of SimBA,
Stanley et al., MICCAI 2023). It writes a copy of an NIH data folder in which one group's images carry a seeded
image signature of a chosen strength, in training and test alike; every other image and the label table are copied
byte for byte. The studies then run on the copy unchanged (`--plant` of classify/chestxray_study.py makes this a
stage), so a study's answer on it can be checked against what was planted.

Kinds (strength in brackets):
  invert  [share 0-1]  the images of a share of the group's patients stored with inverted grey levels, as a scanner
                       that writes MONOCHROME1 images which a site forgot to flip. On those images every finding's
                       contrast has the other sign, so a classifier that saw few of them scores them near or below
                       chance, and one whose training set holds enough of the group learns both. Patients are drawn
                       with the seed; all images of a drawn patient are inverted.
  noise   [sd 0-1]     Gaussian noise of this standard deviation (grey levels / 255) on every image of the group,
                       seeded per image: a noisier detector. It removes information, so more of the group in
                       training recovers only part of the deficit.
  blur    [sigma, px]  a Gaussian blur of this sigma on every image of the group: a softer detector.
  lesion  [contrast 0-1] a disease sign only this group shows, as SimBA plants disease effects: on every image of the
                       group with a finding, a dark Gaussian spot (sd 6% of the width, peak depth `strength` x 255) at
                       a seeded place in the central lung region. The other group's images carry none, so a classifier
                       trained mostly on them has little chance to learn the sign, and one trained on as many of the
                       group as of the others can. Label-dependent by design: it changes what the disease looks like
                       in this group, not how the images are stored.
Strength 0 is the planted null: the same pipeline, every image byte-identical to the original.

    python -m fairness.plant --data-root data/nih_cxr14 --plant invert:0.5 --group F --out runs/planted/data
"""
import argparse
import hashlib
from pathlib import Path
import shutil

import numpy as np
from PIL import Image, ImageFilter

from common.cli import ArgumentParser, run
from common.data import NIH_CSV_NAMES, read_nih
from common.errors import DataError
from common.runs import recorded_command, write_json

KINDS = {"invert": (0.0, 1.0), "noise": (0.0, 1.0), "blur": (0.0, 20.0), "lesion": (0.0, 1.0)}  # strength ranges


def parse_plant(text):
    """'kind:strength' -> (kind, strength), checked against KINDS; argparse reports a ValueError as one line."""
    kind, _, value = str(text).partition(":")
    if kind not in KINDS or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:STRENGTH with KIND one of {', '.join(KINDS)} "
                                         f"(e.g. invert:0.5)")
    try:
        strength = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the strength {value!r} is not a number") from None
    low, high = KINDS[kind]
    if not low <= strength <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: the strength of {kind} lies in [{low:g}, {high:g}]")
    return kind, strength


def plant_label(kind, strength, group):
    """The words every output of a planted run carries in its titles."""
    return f"PLANTED {kind}:{strength:g} on {group}" + (" (the planted null: strength 0)" if strength == 0 else "")


def image_seed(seed, name):
    """A seed per image from the run's seed and the image's name, so an image's noise does not depend on order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def affected_patients(patients, share, seed):
    """The sorted patient ids whose images are inverted: round(share * n) of the group's patients, drawn with seed."""
    ids = np.array(sorted(set(patients)))
    n = int(round(share * len(ids)))
    return sorted(np.random.default_rng(seed).choice(ids, n, replace=False).tolist()) if n else []


def lesion(pixels, depth, seed):
    """A dark Gaussian spot (sd 6% of the width, peak depth x 255) centred at a seeded place in the central region
    (x in 25-75% of the width, y in 30-70% of the height: the lung fields of a frontal view)."""
    h, w = pixels.shape
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.75) * w
    yy, xx = np.mgrid[0:h, 0:w]
    spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.06 * w) ** 2))
    return np.clip(np.rint(pixels - depth * 255 * spot), 0, 255).astype(np.uint8)


def signature(pixels, kind, strength, seed):
    """One greyscale uint8 image with the signature applied (invert: the patient was drawn; lesion: the image has a
    finding)."""
    if kind == "invert":
        return 255 - pixels
    if kind == "lesion":
        return lesion(pixels, strength, seed)
    if kind == "noise":
        noisy = pixels + np.random.default_rng(seed).normal(0, strength * 255, pixels.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(strength)))


def plant(data_root, csv, kind, strength, group, seed, out):
    """Write the planted copy of data_root into out (images at the same relative paths, the label tables copied);
    returns the facts plant.json records: counts of the group's images and patients, and those affected."""
    root, out = Path(data_root), Path(out)
    t = read_nih(root, csv)
    in_group = (t["sex"] == group).to_numpy()
    if not in_group.any():
        raise DataError(f"--group {group}: no image of that group under {root} (groups found: "
                        f"{', '.join(sorted(t['sex'].unique()))})")
    chosen = set(affected_patients(t.loc[in_group, "patient_id"], strength, seed)) if kind == "invert" else None
    finding = (t["label:No Finding"] == 0).to_numpy()
    n_affected = 0
    for image, patient, member, sick in zip(t["image"], t["patient_id"], in_group, finding):
        src = Path(image)
        dst = out / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        hit = member and strength > 0 and (chosen is None or patient in chosen) and (kind != "lesion" or sick)
        if not hit:
            shutil.copyfile(src, dst)
            continue
        pixels = np.asarray(Image.open(src).convert("L"))
        Image.fromarray(signature(pixels, kind, strength, image_seed(seed, src.name))).save(dst)
        n_affected += 1
    for table in [Path(csv)] if csv else [p for name in NIH_CSV_NAMES for p in root.rglob(name)]:
        dst = out / (table.name if csv else table.relative_to(root))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(table, dst)
    return {"kind": kind, "strength": strength, "group": group, "seed": seed, "label": plant_label(kind, strength,
                                                                                                    group),
            "n_group_images": int(in_group.sum()), "n_group_patients": int(t.loc[in_group, "patient_id"].nunique()),
            "n_affected_images": n_affected,
            "affected_patients": sorted(chosen) if chosen is not None else
            "the group's images with a finding" if kind == "lesion" and strength else
            "all of the group" if strength else []}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the NIH folder to copy (images + label table)")
    p.add_argument("--csv", default=None, help="its label table (default: found under --data-root)")
    p.add_argument("--plant", required=True, type=parse_plant, help="KIND:STRENGTH, e.g. invert:0.5 (kinds above)")
    p.add_argument("--group", default="F", help="the group whose images carry the signature (a value of the sex "
                                                "column: F or M)")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the inverted patients, the noise and the places of the spots")
    p.add_argument("--out", required=True, help="the planted copy's folder; plant.json there records the command")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def main(args):
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"--out {out} exists; pass --force to replace it")
    if out.resolve() == Path(args.data_root).resolve() or Path(args.data_root).resolve() in out.resolve().parents:
        raise DataError(f"--out {out}: it lies inside --data-root {args.data_root}; write the copy elsewhere")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    facts = plant(args.data_root, args.csv, *args.plant, args.group, args.seed, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    write_json(out / "plant.json", {"argv": recorded_command(), **facts})
    print(f"{facts['label']}: {facts['n_affected_images']} of {facts['n_group_images']} images of group "
          f"{args.group} changed -> {out}")


if __name__ == "__main__":
    run(main, parse_args)
