"""The two heaviest trainers under torchrun: two CPU processes (gloo) against one process at the same global batch.

Each rank draws the same global batch and trains on its half; DDP averages the gradients. For a network whose
images do not interact within a batch (the DDPM U-Net: GroupNorm; the ViT without dropout: LayerNorm) the two runs
are then the same computation up to the order of float sums. The chest X-ray classifier's cnn8 (BatchNorm, dropout:
each rank's own statistics and masks) is only checked to finish with identical weights on both ranks.
"""
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(module, *args, nproc, cache):
    """python -m module args, under torchrun with nproc processes (nproc > 1) or as one ordinary process."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "FAIRSYNTH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*head, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_train_chexnet_on_two_processes_is_one_process_at_the_global_batch(tmp_path):
    common = ["--arch", "vit", "--dropout", "0", "--amp", "off", "--size", "16", "--epochs", "2", "--epoch-size", "99",
              "--schedule", "cosine", "--device", "cpu"]
    launch("classify.train_chexnet", *common, "--batch-size", "8", "--out-dir", str(tmp_path / "two"), nproc=2,
           cache=tmp_path / "cache")  # global batch 16: 6 steps of 16 and a last one of 3, split 1 + 2 (the
    # ranks' losses weighted 2/3 and 4/3: an unweighted average would give the one image half the step)
    launch("classify.train_chexnet", *common, "--batch-size", "16", "--out-dir", str(tmp_path / "one"), nproc=1,
           cache=tmp_path / "cache")
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert two["world_size"] == 2 and two["ranks_identical"] is True and "world_size" not in one
    np.testing.assert_allclose([h["loss"] for h in two["history"]], [h["loss"] for h in one["history"]], rtol=1e-5)
    np.testing.assert_allclose([h["val_any_auroc"] for h in two["history"]],
                               [h["val_any_auroc"] for h in one["history"]], atol=1e-6)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["model"] for d in ("two", "one"))
    assert max_difference(a, b) < 1e-4
    # rank 0 alone wrote the test predictions: one row per test image, the same rows as the single process
    p2, p1 = ((tmp_path / d / "preds.csv").read_text().splitlines() for d in ("two", "one"))
    assert len(p2) == len(p1) > 100 and [r.split(",")[0] for r in p2] == [r.split(",")[0] for r in p1]


def test_train_chexnet_cnn8_under_torchrun_keeps_the_ranks_identical(tmp_path):
    """BatchNorm and dropout under DDP: the run finishes, rank 0 alone reports and writes. (Identical weights
    across ranks are DDP's own guarantee; the check guards against a rank training outside it.)"""
    r = launch("classify.train_chexnet", "--size", "16", "--width", "4", "--epochs", "1", "--epoch-size", "64",
               "--device", "cpu", "--out-dir", str(tmp_path / "two"), nproc=2, cache=tmp_path / "cache")
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["ranks_identical"] is True and len(m["history"]) == 1
    assert r.stdout.count("test any-finding AUROC") == 1  # rank 0 reports, the other rank is silent
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_train_ddpm_on_two_processes_is_one_process_at_the_global_batch(tmp_path):
    common = ["--data", "toy", "--size", "16", "--width", "16", "--mults", "1,2", "--num-res", "1", "--attn-res", "8",
              "--steps", "6", "--warmup", "2", "--sample-every", "0", "--grid-per-class", "1", "--grid-steps", "2",
              "--device", "cpu"]
    launch("diffusion.train_ddpm", *common, "--batch-size", "4", "--out-dir", str(tmp_path / "two"), nproc=2,
           cache=tmp_path / "cache")
    launch("diffusion.train_ddpm", *common, "--batch-size", "8", "--out-dir", str(tmp_path / "one"), nproc=1,
           cache=tmp_path / "cache")
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["ranks_identical"] is True
    two, one = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("two", "one"))
    np.testing.assert_allclose([h[1] for h in two["history"]], [h[1] for h in one["history"]], rtol=1e-5)
    assert len(two["history"]) == 6 and two["history"][0][1] != two["history"][1][1]
    assert max_difference(two["ema"], one["ema"]) < 1e-5 and max_difference(two["model"], one["model"]) < 1e-5
