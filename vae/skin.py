"""Skin images by skin type, for the skintone study and vae/train_resvae.py: the light (Fitzpatrick 1-2) and dark
(5-6) images of Fitzpatrick17k, or of the procedural skin phantom when no data root is given, and the draw of a
training set A (100% light), B (50/50) or C (100% dark)."""
import numpy as np

from common.cache import load_images
from common.data import read_fitzpatrick, to_signed
from common.errors import DataError

SETS = {"A": "100% light", "B": "50/50", "C": "100% dark"}
PHANTOM_N = 4000


def load_skin(data_root, size):
    """(table of light/dark images with a `group` column, images (N, 3, S, S) in [-1, 1], data tag)."""
    if data_root:
        t, data = read_fitzpatrick(data_root, level="nine"), "fitzpatrick17k"
    else:
        from common.modalities import PHANTOM_DIR
        from common.phantom import make_phantom
        folder = PHANTOM_DIR / f"n{PHANTOM_N}"
        if not (folder / "fitzpatrick17k.csv").is_file():
            make_phantom(folder, n=PHANTOM_N, size=64, seed=0)
        t, data = read_fitzpatrick(folder, level="nine"), "phantom"
    t = t[t["skin_group"].isin(["light", "dark"])].reset_index(drop=True)
    t["group"] = t["skin_group"]
    x, ok = load_images(t["image"], size, "RGB")
    t, x = t[ok].reset_index(drop=True), x[ok]
    return t, to_signed(x), data


def draw_train_set(t, pool, which, n, rng):
    """Indices of a training set (A / B / C) of n images drawn with replacement from `pool`."""
    light, dark = pool[t["group"].to_numpy()[pool] == "light"], pool[t["group"].to_numpy()[pool] == "dark"]
    for name, members, sets in (("light (FST 1-2)", light, "AB"), ("dark (FST 5-6)", dark, "BC")):
        if which in sets and len(members) == 0:
            raise DataError(f"training set {which} needs {name} images and the data have none (check the "
                            f"fitzpatrick_scale column of your --data-root, or choose another set)")
    if which == "A":
        return rng.choice(light, n, replace=True)
    if which == "C":
        return rng.choice(dark, n, replace=True)
    return np.r_[rng.choice(light, n // 2, replace=True), rng.choice(dark, n - n // 2, replace=True)]
