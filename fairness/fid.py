"""Frechet Inception Distance (and its domain-network variant), per subgroup, with the inter-subgroup variance.

    python -m fairness.fid REAL FAKE [--groups CSV] [--weights PATH | --no-pretrained] [--json OUT]
    python -m classify.domain_fd REAL FAKE --domain-ckpt CKPT [--groups CSV] [--json OUT]   # a classifier's features

REAL and FAKE are folders of images (PNG/JPEG) or .npz files with a uint8 `images` array (and optionally a
`groups` array: the output of our samplers). Features:
- Inception-v3 pool3 (2048-d), written over torchvision's Inception-v3 modules. Weights: torchvision's ImageNet
  weights by default (a user's machine downloads them once), or the pytorch-fid file `pt_inception-2015-12-05-*.pth`
  by --weights PATH, which gives the standard TF-Inception FID (its pooling quirks are reproduced). Torchvision's
  weights give "FID-tv", close to but not the standard number. --no-pretrained uses a random Inception: the
  number is only good for a smoke test and is labelled so.
- a classifier's: the penultimate features of a classifier checkpoint from this project (classify.domain_fd, the same
  command with --domain-ckpt CKPT; this package loads no classifier), labelled FD-<network>, for runs without
  ImageNet weights.
Preprocessing: grey images repeated to 3 channels; [0, 255] -> [0, 1]; bilinear resize to 299x299
(align_corners=False, as pytorch-fid); then 2x - 1.
Distance: FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) in float64. Tr((S_r S_g)^(1/2)) is the sum of
the square roots of the eigenvalues of R^T S_g R with R R^T = S_r (Cholesky factor, or the PSD square root
when S_r is singular): a symmetric PSD matrix, so one symmetric eigendecomposition; --sqrtm scipy takes
scipy.linalg.sqrtm of the non-symmetric product instead (pytorch-fid's path, slower), as a cross-check. A
full-rank covariance needs n >= 2048 images: n is printed beside every FID and a warning is given below that. Subgroup variance = (1/G) sum_g (FID_g - mean_g FID_g)^2 (population, denominator G).
"""
import argparse
import hashlib
import os
from pathlib import Path
import warnings
import zipfile
import zlib

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from common.cli import ArgumentParser, run
from common.errors import DataError
from common.runs import load_state_dict_file, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# ---- the Frechet distance ------------------------------------------------------------------------------------------
def psd_sqrt(a):
    """Symmetric PSD square root by eigendecomposition (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1, s2):
    """Tr((S1 S2)^(1/2)) = sum sqrt(eig(R^T S2 R)) for any R with R R^T = S1: S1 S2 is similar to that symmetric
    PSD matrix. R is the Cholesky factor when S1 is positive definite (n > dim), else S1's PSD square root."""
    try:
        r = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:  # rank-deficient covariance (fewer samples than dimensions)
        r = psd_sqrt(s1)
    m = r.T @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, s1, mu2, s2, method="eigh"):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = trace_sqrt_product(s1, s2)
    elif method == "scipy":
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # singular product: offset the diagonals, as pytorch-fid does
            off = np.eye(len(s1)) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
        tr_covmean = float(np.trace(covmean.real))
    else:
        raise ValueError(f"method must be 'eigh' or 'scipy', not {method!r}")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def stats(features):
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_features(f1, f2, method="eigh"):
    return frechet_distance(*stats(f1), *stats(f2), method=method)


# ---- Inception-v3 pool3 features ---------------------------------------------------------------------------------
def _mixed(block, x, pool):
    """A torchvision InceptionA/C/E block's branches with the pooling branch's pool chosen by the caller (the
    TF-Inception FID weights need count_include_pad=False, and max pooling in the last block)."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE
    if isinstance(block, InceptionA):
        b = [block.branch1x1(x), block.branch5x5_2(block.branch5x5_1(x)),
             block.branch3x3dbl_3(block.branch3x3dbl_2(block.branch3x3dbl_1(x)))]
    elif isinstance(block, InceptionC):
        b7 = block.branch7x7_3(block.branch7x7_2(block.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(block, f"branch7x7dbl_{i}")(d)
        b = [block.branch1x1(x), b7, d]
    elif isinstance(block, InceptionE):
        b3 = block.branch3x3_1(x)
        d = block.branch3x3dbl_2(block.branch3x3dbl_1(x))
        b = [block.branch1x1(x), torch.cat([block.branch3x3_2a(b3), block.branch3x3_2b(b3)], 1),
             torch.cat([block.branch3x3dbl_3a(d), block.branch3x3dbl_3b(d)], 1)]
    else:
        return block(x)
    return torch.cat(b + [block.branch_pool(pool(x))], 1)


class InceptionPool3(torch.nn.Module):
    """Inception-v3 up to the 2048-d global average pool. fid_pooling=True reproduces the TF graph that the
    pytorch-fid weights come from."""

    def __init__(self, net, fid_pooling):
        super().__init__()
        self.net, self.fid_pooling = net, fid_pooling

    def forward(self, x):  # x: (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        n = self.net
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2"]:
            x = getattr(n, name)(x)  # (B, 192, 35, 35) after these
        avg_tf = lambda t: F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
        avg_tv = lambda t: F.avg_pool2d(t, 3, stride=1, padding=1)
        for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            pool = avg_tf if self.fid_pooling else avg_tv
            if self.fid_pooling and name == "Mixed_7c":
                pool = lambda t: F.max_pool2d(t, 3, stride=1, padding=1)
            x = _mixed(getattr(n, name), x, pool)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, 2048)


def inception(weights="torchvision"):
    """(feature net, label): weights is 'torchvision', a path to the pytorch-fid file, or None (random)."""
    from torchvision.models import Inception_V3_Weights, inception_v3
    if weights is None:
        torch.manual_seed(0)
        return InceptionPool3(inception_v3(weights=None, aux_logits=False, init_weights=True), False).eval(), \
            "FID-random-inception (smoke test only; not comparable to any published FID)"
    if weights == "torchvision":
        try:
            net = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
        except Exception as e:
            raise DataError(f"cannot load torchvision's Inception-v3 ImageNet weights ({type(e).__name__}: {e}). "
                            f"Offline? Pass --weights pt_inception-2015-12-05-6726825d.pth or --no-pretrained, or "
                            f"use a classifier's features: python -m classify.domain_fd --domain-ckpt CKPT") from e
        return InceptionPool3(net, False).eval(), "FID-tv (torchvision Inception weights; close to, not equal to, " \
                                                  "the standard TF-Inception FID)"
    path = Path(weights)
    if not path.is_file():
        raise DataError(f"--weights {path}: not found. The pytorch-fid file is "
                        f"pt_inception-2015-12-05-6726825d.pth from github.com/mseitzer/pytorch-fid/releases.")
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    load_state_dict_file(path, net)  # weights_only: a pickle that would run code is refused, never run
    return InceptionPool3(net, True).eval(), "FID (pytorch-fid TF-Inception weights)"


@torch.no_grad()
def extract(net, images, batch_size=64, device="cpu"):
    """uint8 (N, H, W) or (N, H, W, 3) -> float64 (N, D) features."""
    net = net.to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(np.asarray(images[i:i + batch_size])).float().div(255)
        x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        out.append(net(x.to(device)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1))


# ---- inputs ----------------------------------------------------------------------------------------------------
def load_input(path):
    """(uint8 images, file names or None, groups array or None) from a folder of images or an .npz."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path} not found")
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: not an .npz archive (the zip of arrays that np.savez writes)")
        try:
            with np.load(path) as z:  # allow_pickle=False: object arrays are refused, not unpickled
                if "images" not in z.files:
                    raise DataError(f"{path} has no `images` array (it has {z.files})")
                images, groups = z["images"], (z["groups"] if "groups" in z.files else None)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: cannot read it as an .npz of arrays ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0]})") from e
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.ndim == 4 and images.shape[-1] != 3 \
                or not len(images):
            raise DataError(f"{path}: `images` must be a non-empty uint8 array (N, H, W) or (N, H, W, 3), not "
                            f"{images.dtype} {images.shape}")
        if groups is not None and len(groups) != len(images):
            raise DataError(f"{path}: {len(groups)} `groups` for {len(images)} `images`")
        return images, None, groups
    if not path.is_dir():
        raise DataError(f"{path} is neither a folder of images nor an .npz file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    from PIL import Image
    from common.cache import load_images
    try:
        with Image.open(files[0]) as im:
            size, mode = im.size[0], ("L" if im.mode in ("L", "I", "I;16", "1") else "RGB")
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{files[0]}: cannot read it as an image ({e})") from e
    images, ok = load_images(files, size, mode, progress=False)
    if not ok.any():
        raise DataError(f"{path}: none of its {len(files)} images could be read")
    return images[ok], [f.name for f, o in zip(files, ok) if o], None


def cached_features(net, label, path, images, device):
    """Features of one input, cached on disk by (input, network)."""
    h = hashlib.sha1(label.encode())
    h.update(images.tobytes() if images.size < 50_000_000 else str(Path(path).stat()).encode())
    cache = Path(os.environ.get("FAIRSYNTH_CACHE", Path(__file__).resolve().parent.parent / ".cache")) / "fid"
    key = cache / f"{h.hexdigest()[:20]}.npy"
    if key.is_file():
        return np.load(key)
    f = extract(net, images, device=device)
    key.parent.mkdir(parents=True, exist_ok=True)
    np.save(key, f)
    return f


def subgroup_fids(f_real, f_fake, g_real, g_fake, method="eigh"):
    """{group: (FID, n_real, n_fake)} for each group present in both sets, plus the population variance."""
    out = {}
    for g in sorted(set(np.asarray(g_real).tolist()) & set(np.asarray(g_fake).tolist())):
        r, f = f_real[np.asarray(g_real) == g], f_fake[np.asarray(g_fake) == g]
        if min(len(r), len(f)) >= 2:
            out[g] = (fid_from_features(r, f, method), len(r), len(f))
    vals = np.array([v[0] for v in out.values()])
    variance = float(((vals - vals.mean()) ** 2).mean()) if len(vals) else float("nan")  # denominator G
    return out, variance


def warn_small(n, what):
    if n < 2048:
        warnings.warn(f"{what}: n={n} < 2048 images, the 2048-d covariance is rank-deficient; this FID is biased "
                      f"upwards and comparable only to FIDs at the same n")


def read_pair(real, fake, groups=None):
    """The two inputs, read and checked: ((images, groups or None) of REAL, the same of FAKE); groups: a CSV
    (file,group) naming each image's subgroup (--groups; folders of images only)."""
    (xr, names_r, gr), (xf, names_f, gf) = load_input(real), load_input(fake)
    for path, x in ((real, xr), (fake, xf)):
        if len(x) < 2:
            raise DataError(f"{path}: {len(x)} image; a Frechet distance needs at least 2 per set")
    if groups:
        from common.data import read_csv_checked
        g = read_csv_checked(groups, ["file", "group"])
        lookup = dict(zip(g["file"].map(lambda s: Path(str(s)).name), g["group"].astype(str)))
        if names_r is None or names_f is None:
            raise DataError("--groups names files; use folders of images, or .npz inputs with a `groups` array")
        gr = np.array([lookup.get(n, "?") for n in names_r])
        gf = np.array([lookup.get(n, "?") for n in names_f])
    return (xr, gr), (xf, gf)


def check_json(path, force):
    """Refuse a --json that is a folder, or that exists without --force (before anything is computed)."""
    if path and Path(path).is_dir():
        raise DataError(f"--json {path}: is a folder; --json names the file to write")
    if path and Path(path).exists() and not force:
        raise DataError(f"--json {path}: exists (pass --force to replace it, or choose another --json)")


def distances(net, label, real, fake, sqrtm="eigh", device="cpu"):
    """FID (or FD) of the inputs real = (path, images, groups or None) and fake (the same) on the features of
    net (labelled label), overall and per subgroup when both have groups; printed, and returned as a dict."""
    (path_r, xr, gr), (path_f, xf, gf) = real, fake
    fr = cached_features(net, label, path_r, xr, device)
    ff = cached_features(net, label, path_f, xf, device)
    warn_small(min(len(fr), len(ff)), "overall")
    result = {"metric": label, "fid": fid_from_features(fr, ff, sqrtm), "n_real": len(fr), "n_fake": len(ff),
              "sqrtm": sqrtm}
    print(f"{label}\n  overall: {result['fid']:.3f}  (n_real={len(fr)}, n_fake={len(ff)})")
    if gr is not None and gf is not None:
        per, var = subgroup_fids(fr, ff, np.asarray(gr).astype(str), np.asarray(gf).astype(str), sqrtm)
        for k, (v, nr, nf) in per.items():
            print(f"  group {k}: {v:.3f}  (n_real={nr}, n_fake={nf})")
            warn_small(min(nr, nf), f"group {k}")
        print(f"  inter-subgroup variance (1/G): {var:.3f}  (G={len(per)})" +
              ("" if per else "; no group has >= 2 images in both sets"))
        result.update(groups={k: {"fid": v, "n_real": nr, "n_fake": nf} for k, (v, nr, nf) in per.items()},
                      subgroup_variance=var)
    return result


def main(args):
    # the inputs read and checked before the feature network is loaded (or downloaded) and anything is computed
    (xr, gr), (xf, gf) = read_pair(args.real, args.fake, args.groups)
    check_json(args.json, args.force)
    net, label = inception(None if args.no_pretrained else (args.weights or "torchvision"))
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    result = distances(net, label, (args.real, xr, gr), (args.fake, xf, gf), args.sqrtm, device)
    if args.json:
        write_json(args.json, result)
    return result


def add_args(p):
    """The flags of every FD command but the feature network's (fairness.fid: Inception; classify.domain_fd: a
    classifier's)."""
    p.add_argument("real", help="folder of real images, or .npz with `images` (and optionally `groups`)")
    p.add_argument("fake", help="folder of generated images, or .npz with `images` (and optionally `groups`)")
    p.add_argument("--groups", help="CSV with columns file,group naming each image's subgroup (both folders)")
    p.add_argument("--sqrtm", choices=["eigh", "scipy"], default="eigh",
                   help="matrix square root: symmetric eigendecomposition (default) or scipy.linalg.sqrtm")
    p.add_argument("--device", default="auto", help="'auto' or 'cpu'")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --json")
    return p


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m fairness.fid", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="path to pytorch-fid's pt_inception-2015-12-05-6726825d.pth (standard FID)")
    w.add_argument("--no-pretrained", action="store_true", help="random Inception weights (smoke tests only)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
