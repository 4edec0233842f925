"""Pair sets of diffusion.annotate: a folder holding pairs.json and images/<pair id>_left.png, _right.png. Preference
sets pair two samples of one model under one condition (from a DDPM checkpoint, or from a folder of candidate images);
blinded sets pair a real image with a method's sample, or two methods' samples (diffusion/fairgen_study.py writes
them), their sources recorded in pairs.json and hidden from the page.
"""
import hashlib
import json
from pathlib import Path
import re

import numpy as np
from PIL import Image

from common.errors import DataError
from common.runs import write_json

ATTR_WORDS = {"F": "female", "M": "male", "light": "light skin (Fitzpatrick 1-2)",
              "medium": "medium skin (Fitzpatrick 3-4)", "dark": "dark skin (Fitzpatrick 5-6)"}
QUESTIONS = {"preference": "Which image better shows this condition?",
             "blinded": "Which image better shows the prompted finding?",
             "reader": "Is this image real or synthetic? And how realistic does it look (1 clearly artificial, "
                       "5 as real as a real image)?"}


def condition_text(name):
    """'F|Effusion' -> 'female, Effusion'; 'dark|malignant epidermal' -> 'dark skin (Fitzpatrick 5-6), ...'."""
    attr, _, label = name.partition("|")
    return f"{ATTR_WORDS.get(attr, attr)}, {label}" if label else ATTR_WORDS.get(attr, attr)


def save_png(u8, path):
    """At the image's own size: the page enlarges it (pixelated), and train_dpo reads it back unchanged."""
    Image.fromarray(np.asarray(u8)).save(path)


def write_pair_set(folder, kind, pairs, recipe):
    """Write pairs.json for `pairs` (dicts with condition, left, right images as uint8 arrays, and for blinded sets
    left_source / right_source; a reader study's items: condition, image, source, block). The set's id is a hash of
    its recipe and images: answers record it."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    h = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode())
    sides = {"image": ""} if kind == "reader" else {"left": "_left", "right": "_right"}
    rows = []
    for i, p in enumerate(pairs):
        pid = f"p{i:04d}"
        row = {"id": pid, "condition": p["condition"], "text": condition_text(p["condition"]),
               "group": p["condition"].split("|")[0]}
        for side, suffix in sides.items():
            rel = f"images/{pid}{suffix}.png"
            save_png(p[side], folder / rel)
            h.update(np.ascontiguousarray(p[side]).tobytes())
            row[side] = rel
            if kind == "blinded":
                row[f"{side}_source"] = p[f"{side}_source"]
        if kind == "reader":
            row.update(source=p["source"], block=p["block"])
        rows.append(row)
    manifest = {"kind": kind, "id": h.hexdigest()[:16], "question": QUESTIONS[kind], "recipe": recipe, "pairs": rows}
    write_json(folder / "pairs.json", manifest)
    return manifest


PAIR_ID = re.compile(r"p\d{4,}")


def load_pair_set(folder):
    """pairs.json of a folder, checked: every pair has an id p0000..., a condition, and its two images at
    images/<id>_left.png and images/<id>_right.png (a reader study's item: its one image at images/<id>.png); no
    other path is ever served."""
    path = Path(folder) / "pairs.json"
    try:
        m = json.loads(path.read_text())
        assert m["kind"] in QUESTIONS and m["pairs"] and isinstance(m["id"], str)
        for p in m["pairs"]:
            assert PAIR_ID.fullmatch(p["id"]) and isinstance(p["condition"], str)
            if m["kind"] == "reader":
                assert p["image"] == f"images/{p['id']}.png" and isinstance(p["source"], str) and \
                    isinstance(p["block"], int)
            else:
                assert p["left"] == f"images/{p['id']}_left.png" and p["right"] == f"images/{p['id']}_right.png"
        if m["kind"] == "reader":  # blocks of one real and one synthetic image: the queues split whole blocks
            blocks = {}
            for p in m["pairs"]:
                blocks.setdefault(p["block"], []).append(p["source"] == "real")
            assert all(sorted(b) == [False, True] for b in blocks.values())
    except FileNotFoundError:
        raise DataError(f"{path}: no pair set here (make one with --ckpt or --from-dir, or check the folder)")
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path}: not a pair set written by diffusion.annotate ({type(e).__name__})") from e
    return m


def model_recipe(ckpt, n, steps, guidance, seed):
    """What makes a pair set from a checkpoint (compared before any sampling, to resume an existing set)."""
    from common.runs import load_checkpoint
    return {"ckpt": str(Path(ckpt).resolve()), "step": load_checkpoint(ckpt).get("step"), "pairs_per_class": n,
            "steps": steps, "guidance": guidance, "seed": seed}


def preference_pairs_from_model(ckpt, n, steps, guidance, seed, device):
    """2n samples per condition of a DDPM checkpoint, paired two by two."""
    from diffusion.ddpm import Schedule
    from diffusion.sample_ddpm import generate, load_model
    model, ck = load_model(ckpt, device)
    a, names = ck["args"], ck["class_names"]
    classes = np.repeat(np.arange(len(names)), 2 * n)
    images = generate(model, Schedule(a["schedule"], a["T"]), classes, a["size"], a["channels"], "ddim", steps,
                      1.0, guidance, None, seed, device)
    return [{"condition": names[classes[i]], "left": images[i], "right": images[i + 1]}
            for i in range(0, len(images), 2)]


def dir_candidates(folder):
    """{condition folder: sorted image files} of --from-dir (one subfolder per condition)."""
    subdirs = sorted(d for d in Path(folder).iterdir() if d.is_dir()) if Path(folder).is_dir() else []
    if not subdirs:
        raise DataError(f"--from-dir {folder}: expected one subfolder of candidate images per condition "
                        f"(e.g. F__finding/*.png)")
    found = {d: sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) for d in subdirs}
    for d, files in found.items():
        if len(files) < 2:
            raise DataError(f"--from-dir {d}: {len(files)} images; a pair needs two per condition")
    return found


def preference_pairs_from_dir(found, n, seed):
    """Up to n pairs of two different images per condition folder, drawn at random ('|' written '__')."""
    rng = np.random.default_rng(seed)
    pairs = []
    for d, files in found.items():
        order = rng.permutation(len(files))
        for j in range(min(n, len(files) // 2)):
            imgs = []
            for f in (files[order[2 * j]], files[order[2 * j + 1]]):
                try:
                    with Image.open(f) as im:
                        imgs.append(np.asarray(im.convert("L" if im.mode == "L" else "RGB")))
                except OSError as e:
                    raise DataError(f"--from-dir {f}: not a readable image ({e})") from e
            pairs.append({"condition": d.name.replace("__", "|"), "left": imgs[0], "right": imgs[1]})
    return pairs


def blinded_pairs(real, methods, n, seed):
    """The blinded evaluation: per condition, n pairs of (real, method) for each method and n pairs of (method A,
    method B) for each two methods; sides shuffled. real and methods[m]: (images uint8, class names per image)."""
    rng = np.random.default_rng(seed)
    pools = {"real": real, **methods}
    names = sorted(set(real[1]))
    contests = [("real", m) for m in methods] + [(a, b) for i, a in enumerate(methods) for b in list(methods)[i + 1:]]
    pairs = []
    for c in names:
        idx = {s: np.nonzero(np.asarray(p[1]) == c)[0] for s, p in pools.items()}
        for a, b in contests:
            if len(idx[a]) == 0 or len(idx[b]) == 0:
                continue
            for _ in range(n):
                ia, ib = rng.choice(idx[a]), rng.choice(idx[b])
                sides = [(a, pools[a][0][ia]), (b, pools[b][0][ib])]
                if rng.random() < 0.5:
                    sides.reverse()
                pairs.append({"condition": c, "left": sides[0][1], "right": sides[1][1],
                              "left_source": sides[0][0], "right_source": sides[1][0]})
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def reader_items(blinded_folder, seed=0):
    """The reader study's items from a blinded pair set: its distinct images (the same real image can sit in
    several pairs), in blocks of one real and one synthetic image of one condition (the synthetic ones taken in
    turn from each method, so that every method is represented); as many blocks per condition as it has real or
    synthetic images, whichever is fewer. Returns item dicts (condition, image, source, block), shuffled, and the
    blinded set's id."""
    m = load_pair_set(blinded_folder)
    if m["kind"] != "blinded":
        raise DataError(f"--reader-study {blinded_folder}: a {m['kind']} pair set; the reader study is built from "
                        f"a blinded one (make fairgen writes results/fairgen/blinded_pairs/<modality>)")
    rng = np.random.default_rng(seed)
    seen, pools = set(), {}  # condition -> source -> images
    for p in m["pairs"]:
        for side in ("left", "right"):
            with Image.open(Path(blinded_folder) / p[side]) as im:
                u8 = np.asarray(im)
            key = hashlib.sha1(u8.tobytes() + str(u8.shape).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                pools.setdefault(p["condition"], {}).setdefault(p[f"{side}_source"], []).append(u8)
    items = []
    for c, by_source in sorted(pools.items()):
        real = by_source.get("real", [])
        methods = {s: [by_source[s][i] for i in rng.permutation(len(by_source[s]))]
                   for s in sorted(by_source) if s != "real"}
        synth = []
        while len(synth) < len(real) and any(methods.values()):
            for s, imgs in methods.items():
                if imgs and len(synth) < len(real):
                    synth.append((s, imgs.pop()))
        for j, (s, u8) in enumerate(synth):
            block = len(items) // 2
            items += [{"condition": c, "image": real[j], "source": "real", "block": block},
                      {"condition": c, "image": u8, "source": s, "block": block}]
    if not items:
        raise DataError(f"--reader-study {blinded_folder}: no condition has both a real and a synthetic image")
    return [items[i] for i in rng.permutation(len(items))], m["id"]
