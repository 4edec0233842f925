"""Time our Frechet distance against pytorch-fid's on 2048-d features of 5,000 samples, in one run.

    python bench/fid_bench.py [--n 5000] [--dim 2048] [--repeats 3]

Features are random but realistically correlated (a random low-rank-plus-noise covariance), the two sets differ
in mean and covariance. Prints both times, the speed ratio and the relative difference of the two values.
pytorch-fid is installed for this benchmark only (requirements-dev.txt).
"""
import argparse
from pathlib import Path
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fairness.fid import frechet_distance, stats  # noqa: E402


def features(rng, n, dim, shift):
    basis = rng.normal(size=(256, dim)) / np.sqrt(256)
    return rng.normal(size=(n, 256)) @ basis * (1 + shift) + rng.normal(size=(n, dim)) * 0.3 + shift


def main(args):
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    s1, s2 = stats(features(rng, args.n, args.dim, 0.0)), stats(features(rng, args.n, args.dim, 0.1))
    t_ours, t_ref = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = frechet_distance(*s1, *s2)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = calculate_frechet_distance(*s1, *s2)
        t_ref.append(time.perf_counter() - t)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"numpy {np.__version__}")
    print(f"n={args.n}, dim={args.dim}, best of {args.repeats}")
    print(f"ours (Cholesky+eigvalsh): {min(t_ours):.2f} s  FID={ours:.6f}")
    print(f"pytorch-fid (sqrtm):      {min(t_ref):.2f} s  FID={ref:.6f}")
    print(f"speed-up {min(t_ref) / min(t_ours):.1f}x, relative difference {abs(ours - ref) / abs(ref):.2e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="samples per set")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool3: 2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    main(p.parse_args())
