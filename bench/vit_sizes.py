"""Which ViT the quick fairgen preset can afford: validation accuracy and fit time of ViT sizes on real images.

    python bench/vit_sizes.py [--modalities cxr,mri] [--epochs 12,16] [--sizes 'patch 8']

Per modality (common/modalities.py, 32 px, the study's patient-level split, seed 0), the downstream ViT of
classify/downstream.py is trained on the real training images only, for each size and epoch count, and scored on
the validation patients (the accuracy it selects its weights by, so optimistic; the test set is not touched).
Measured on a 2-core CPU: README, Benchmarks.
"""
import argparse
from pathlib import Path
import sys
import time

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from classify.downstream import fit_predict  # noqa: E402
from common.modalities import load_modality  # noqa: E402
from common.splits import patient_split  # noqa: E402
from common.data import to_signed  # noqa: E402

SIZES = {"patch 4, width 128 (full preset)": dict(patch=4, dim=128, mlp=256),
         "patch 4, width 64": dict(patch=4, dim=64, mlp=128),
         "patch 8, width 64": dict(patch=8, dim=64, mlp=128),
         "patch 8, width 64, no dropout (quick preset)": dict(patch=8, dim=64, mlp=128, dropout=0.0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modalities", default="cxr,mri", help="comma-separated modalities (common/modalities.py)")
    p.add_argument("--epochs", default="12,16", help="comma-separated epoch counts")
    p.add_argument("--sizes", default=None, help="only the sizes whose label contains this text, e.g. 'patch 8'")
    p.add_argument("--size", type=int, default=32, help="image size (the quick preset's)")
    a = p.parse_args()
    for name in a.modalities.split(","):
        mod = load_modality(name, a.size)
        split = patient_split(mod.table, seed=0, stratify="attr")
        L = len(mod.labels)
        y, g, x = mod.table["cls"].to_numpy() % L, mod.table["attr"].to_numpy().astype(str), to_signed(mod.images)
        tr, va = split == "train", split == "val"
        for label, kw in SIZES.items():
            if a.sizes and a.sizes not in label:
                continue
            for epochs in map(int, a.epochs.split(",")):
                t = time.time()
                prob = fit_predict("vit", (x[tr], y[tr], g[tr]), (x[va], y[va], g[va]), x[va], L, epochs=epochs,
                                   vit=kw)
                print(f"{name}: ViT {label}, {epochs} epochs: validation accuracy "
                      f"{np.mean(prob.argmax(1) == y[va]):.3f} ({va.sum()} images), {time.time() - t:.0f} s "
                      f"({tr.sum()} training images)", flush=True)


if __name__ == "__main__":
    main()
