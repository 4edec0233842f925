"""The full-data path, simulated on this machine (issue #21, part 3): an NIH ChestX-ray14 root at full resolution,
the full-scale commands capped to a few steps, and what they cost, extrapolated to the real data's size.

    python bench/fullscale.py --root /tmp/nih-full --n 10000 --out bench/fullscale_10000.json   # ~40 min, 2 cores
    python bench/fullscale.py --root /tmp/nih-200 --n 200 --out /tmp/fullscale_200.json         # ~4 min

1. The root: n rows of the official label table (data/nih_cxr14/Data_Entry_2017_v2020.csv.gz, 112,120 rows), whole
   patients in the table's order, written as 1024 x 1024 greyscale PNGs under their official names and spread over
   images_001/images ... images_012/images as the download unpacks (4,999 files in the first archive, 10,000 in
   each next one), with Data_Entry_2017_v2020.csv beside them. The pixels are a SIMULATION of size, not of content:
   an embedded NIH1000 image (64 px) upsampled bicubically, plus seeded Gaussian noise (sd --noise grey levels) so
   that a file is about as large as a real one (the 112,120 official PNGs take 45 GB: ~400 KB each) and takes as
   long to decode. Built once; files already there are kept (a killed build resumes).
2. Decoding: common.cache.load_images at 224 px over every file, with one worker and with one per core, each into a
   fresh cache: images/s, images/s per core, peak memory, the cache's size on disk.
3. The full-scale commands, capped: `classify.chestxray_study --scale full` (DenseNet-121 at 224 px without
   ImageNet weights, 2 folds, 60 images of each sex for training and testing, 1 epoch, CVAE 1 epoch; every image
   of the root is still decoded and cached) and diffusion.train_ddpm with fairgen's full preset (64 px, width 64,
   3 steps), each a separate process: exit status, wall time, peak memory (the largest process of the command's
   tree, ru_maxrss: it counts the pages of the memory-mapped cache the process touched, which the kernel can drop).
4. The memorization audit at this training-set size (1,000 synthetic images against all n at 64 px).
5. One training step of each full-scale network (bench/machine_limit.py): FLOPs and seconds per image.

It writes --out (JSON) and prints the extrapolation to 112,120 images (docs/fullscale.md).
"""
import argparse
import json
from multiprocessing import Pool
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
from PIL import Image
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.cache import available_cpus  # noqa: E402
from common.data import PROJECT_DATA  # noqa: E402
from common.runs import git_commit  # noqa: E402

FULL_N = 112120  # images in NIH ChestX-ray14
TABLE = PROJECT_DATA / "nih_cxr14" / "Data_Entry_2017_v2020.csv.gz"


def as_recorded(cmd, root, work):
    """The command as the results record it: the machine's temporary folders named <root> and <tmp>."""
    return " ".join(cmd[1:]).replace(str(work), "<tmp>").replace(str(root), "<root>")


def cpu_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def archive(row):
    """The official archive (images_001 ... images_012) that holds the table's row-th image."""
    return 1 if row < 4999 else 2 + (row - 4999) // 10000


def write_png(job):
    path, small, seed, noise = job
    if path.is_file():
        return path.stat().st_size
    big = np.asarray(Image.fromarray(small).resize((1024, 1024), Image.Resampling.BICUBIC), dtype=np.float32)
    big = big + np.random.default_rng(seed).normal(0, noise, big.shape)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(big.round().clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed build leaves no half-written image
    return path.stat().st_size


def build_root(root, n, noise, workers):
    """The NIH-layout root of the first whole patients up to n images; returns (rows, bytes on disk)."""
    table = pd.read_csv(TABLE)
    table["row"] = np.arange(len(table))
    per_patient = table.groupby("Patient ID", sort=False).size()
    patients = per_patient.index[per_patient.cumsum() <= n]
    rows = table[table["Patient ID"].isin(patients)]
    embedded = sorted((PROJECT_DATA / "nih_cxr14" / "images").glob("*.png"))
    small = [np.asarray(Image.open(p).convert("L")) for p in embedded]
    jobs = []
    for name, r in zip(rows["Image Index"], rows["row"]):
        folder = root / f"images_{archive(r):03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / name, small[r % len(small)], int(r), noise))
    with Pool(workers) as pool:
        sizes = list(tqdm(pool.imap(write_png, jobs, chunksize=8), total=len(jobs), desc="1024 px PNGs"))
    rows.drop(columns="row").to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    return len(rows), int(np.sum(sizes))


def measured(cmd, env=None, cwd=ROOT):
    """Run cmd; (exit status, wall seconds, peak RSS in GB of its largest process, output tail)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the command and every process it waited for
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, usage.ru_maxrss / 1e6, out[-1500:]


def decode_child(root, size, workers):
    """(In a child process) decode every image of root at size px; print its seconds and count as JSON."""
    from common.cache import load_images
    from common.data import read_nih
    t = read_nih(root)
    t0 = time.time()
    x, ok = load_images(t["image"], size, "L", workers=workers, progress=False)
    print(json.dumps({"seconds": time.time() - t0, "n": int(ok.sum()), "shape": list(x.shape)}))


def decode(root, size, workers, cache):
    rc, wall, rss, out = measured([sys.executable, __file__, "--decode-child", str(root), str(size), str(workers)],
                                  env={"FAIRSYNTH_CACHE": str(cache)})
    if rc:
        raise SystemExit(f"decoding failed:\n{out}")
    r = json.loads(out.strip().splitlines()[-1])
    r.update(workers=workers, peak_rss_gb=rss, images_per_s=r["n"] / r["seconds"],
             images_per_s_per_worker=r["n"] / r["seconds"] / workers,
             cache_bytes=sum(f.stat().st_size for f in Path(cache).glob("*.npy")))
    return r


def audit_at_scale(root, cache, n_synth=1000):
    from common.cache import load_images
    from common.data import read_nih
    from fairness.memorization import audit
    train, ok = load_images(read_nih(root)["image"], 64, "L", cache_dir=cache, progress=False)
    train = np.asarray(train[ok])
    synth = np.random.default_rng(0).integers(0, 256, (n_synth, 64, 64), dtype=np.uint8)
    t0 = time.time()
    res, *_ = audit(synth, train)
    return {"n_train": len(train), "n_synth": n_synth, "n_train_queries": res["n_train_queries"],
            "seconds": time.time() - t0}


# One A100 80GB, mixed precision, training ResNet-50 v1.5 at 224 px: 2,470 images/s (NVIDIA DeepLearningExamples,
# PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance: NVIDIA DGX A100", 1 GPU, NGC
# pytorch-21.03). Times ResNet-50's FLOPs per image-step (counted here) it is the sustained rate assumed for our nets.
A100_RESNET50_IMAGES_S = 2470


def full_scale_plan():
    """Image-steps of `make chestxray SCALE=full` on all 112,120 NIH images, from the label table alone: its folds,
    each fold's sets (classify.cxr_task.fold_sets) and its settings (SCALES['full']), at most --epochs
    epochs (early stopping may stop sooner)."""
    from classify.chestxray_study import parse_args as study_args
    from classify.cxr_task import fold_sets
    from common.data import read_nih
    from common.splits import patient_kfold
    args = study_args(["--scale", "full"])
    t = read_nih(PROJECT_DATA / "nih_cxr14", TABLE, require_images=False)
    fold = patient_kfold(t, args.folds, seed=args.seed, stratify="sex")
    train = val = test = cvae = 0
    for k in range(args.folds):
        sets, n_male, _ = fold_sets(k, fold, t, args.seed, args.val_fraction, args.female_fraction,
                                    args.cvae_female)
        train += args.epochs * 2 * n_male * len(args.conditions)  # every condition: epochs of 2 n_male images
        val += args.epochs * len(sets["val"]) * len(args.conditions)  # a validation pass per epoch
        test += len(sets["test"]) * len(args.conditions)
        cvae += args.cvae_epochs * len(sets["cvae_train"])
    return {"images": len(t), "folds": args.folds, "conditions": len(args.conditions), "epochs": args.epochs,
            "classifier_train_image_steps": train, "classifier_eval_images": val + test,
            "cvae_image_steps": cvae, "cvae_epochs": args.cvae_epochs}


def resnet50_gflop_per_image_step():
    from torch.utils.flop_counter import FlopCounterMode
    import torchvision
    net, x = torchvision.models.resnet50(), torch.rand(2, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / len(x) / 1e9


def measured_gpu_hours(plan, gpu_path):
    """GPU-hours of the full-scale chest X-ray study and of fairgen's pretraining from bench/gpu_steps.py's images/s
    (each network in the arithmetic `--amp auto` gives it on a GPU; an evaluated image costs a third of a training
    image-step, the forward pass alone). Compute only (no data loading, augmentation or EMA): a lower bound."""
    from diffusion.fairgen_study import SCALES as FAIRGEN
    g = json.loads(Path(gpu_path).read_text())
    ips = {r["net"]: r["images_per_s"] for r in g["rows"] if r["as_trained"]}
    missing = {"densenet121", "cvae", "unet64"} - set(ips)
    if missing:
        raise SystemExit(f"--gpu {gpu_path}: no rate for {', '.join(sorted(missing))} (run bench/gpu_steps.py with "
                         f"every network)")
    s = (plan["classifier_train_image_steps"] + plan["classifier_eval_images"] / 3) / ips["densenet121"] + \
        plan["cvae_image_steps"] / ips["cvae"]
    full = FAIRGEN["full"]
    pretrain = full["pretrain"] * full["batch"] / ips["unet64"]  # steps x images per modality and seed
    return {"gpu": g["gpu"], "chestxray_gpu_hours": s / 3600, "fairgen_pretrain_gpu_hours": pretrain / 3600,
            "images_per_s": ips}


def report(paths, gpu=None):
    """The extrapolation to 112,120 images from measurement files (two sizes: the memory's growth per image); with
    gpu (bench/gpu_steps.py's JSON), the GPU-hours from measured rates beside the assumed one."""
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["n"])
    big = runs[-1]
    plan = full_scale_plan()
    N = plan["images"]
    dec = max(big["decode_224"], key=lambda d: d["workers"])
    per_core = dec["images_per_s_per_worker"]
    rate = resnet50_gflop_per_image_step() * A100_RESNET50_IMAGES_S  # GFLOP/s sustained, assumed
    steps = big.get("steps") or {}
    dn = steps.get("densenet121", {}).get("gflop_per_image")
    cv = 0.314  # the CVAE's GFLOP per image-step (bench/machine_limit.py --loops cvae)
    gpu_h = None
    if dn:
        flop = plan["classifier_train_image_steps"] * dn + plan["classifier_eval_images"] * dn / 3 + \
            plan["cvae_image_steps"] * cv
        gpu_h = flop / rate / 3600
    print(f"full-scale chest X-ray study on {N:,} images: {plan['folds']} folds x {plan['conditions']} conditions, "
          f"<= {plan['epochs']} epochs: {plan['classifier_train_image_steps']:,} classifier image-steps, "
          f"{plan['classifier_eval_images']:,} evaluated images, {plan['cvae_image_steps']:,} CVAE image-steps")
    print(f"decode at 224 px: {per_core:.1f} images/s per core -> {N / per_core / 3600:.2f} core-hours "
          f"({N / per_core / 3600 / 16:.2f} h on 16 cores), once; cache {N * 224 * 224 / 1e9:.2f} GB at 224 px "
          f"+ {N * 64 * 64 / 1e9:.2f} GB at 64 px")
    for key in ("chestxray_capped", "ddpm_capped"):
        pts = [(r["n"], r[key]["peak_rss_gb"]) for r in runs if key in r]
        if len(pts) >= 2:
            (n0, m0), (n1, m1) = pts[0], pts[-1]
            slope = (m1 - m0) / (n1 - n0)
            print(f"{key}: peak RSS {m0:.2f} GB at {n0} images, {m1:.2f} GB at {n1}: {slope * 1e6:.0f} KB per image "
                  f"-> {m0 + slope * (N - n0):.1f} GB at {N:,}")
    if gpu_h:
        print(f"GPU: DenseNet-121 {dn:.2f} GFLOP per image-step, at the rate one A100 sustains on ResNet-50 "
              f"({rate / 1e3:.0f} TFLOP/s, assumed): {gpu_h:.1f} GPU-hours")
    measured = measured_gpu_hours(plan, gpu) if gpu else None
    if measured:
        ips = measured["images_per_s"]
        print(f"GPU, measured on one {measured['gpu']} (bench/gpu_steps.py; DenseNet-121 {ips['densenet121']:.0f} "
              f"images/s in bf16, CVAE {ips['cvae']:.0f} in fp32, fairgen's U-Net {ips['unet64']:.0f} in bf16): "
              f"chest X-ray study {measured['chestxray_gpu_hours']:.1f} GPU-hours; fairgen pretraining "
              f"{measured['fairgen_pretrain_gpu_hours']:.2f} GPU-hours per modality and seed (compute alone: a lower "
              f"bound)")
    return {"plan": plan, "decode_core_hours": N / per_core / 3600, "assumed_tflops": rate / 1e3, "gpu_hours": gpu_h,
            "measured": measured}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=False, help="the simulated NIH root (built there when missing)")
    p.add_argument("--n", type=int, default=200, help="images of the root (whole patients, official table order)")
    p.add_argument("--noise", type=float, default=2.0, help="sd of the noise added to the upsampled images (grey levels)")
    p.add_argument("--out", default=None, help="write the measurements here (JSON)")
    p.add_argument("--images-per-sex", type=int, default=60,
                   help="the capped chest X-ray study's training and test images per sex (its --images-per-sex)")
    p.add_argument("--conditions", default="balanced_real,imbalanced_real,imbalanced_synth,imbalanced_reweight",
                   help="the capped chest X-ray study's conditions (imbalanced_synth brings the CVAE)")
    p.add_argument("--ddpm-steps", type=int, default=3, help="training steps of the capped DDPM run")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: decode, chestxray, ddpm, audit, steps")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print the extrapolation to 112,120 images from these measurement files and exit")
    p.add_argument("--gpu", metavar="JSON", help="with --report: bench/gpu_steps.py's measurements on a GPU, for "
                                                  "GPU-hours from measured rates")
    p.add_argument("--decode-child", nargs=3, metavar=("ROOT", "SIZE", "WORKERS"),
                   help="internal: what the decode measurement runs in its own process")
    args = p.parse_args()
    if args.decode_child:
        return decode_child(args.decode_child[0], int(args.decode_child[1]), int(args.decode_child[2]))
    if args.report:
        made_by = [*((r, "--report", "bench/fullscale.py --out") for r in args.report),
                   *([(args.gpu, "--gpu", "bench/gpu_steps.py --out")] if args.gpu else [])]
        for path, flag, script in made_by:
            if not Path(path).is_file():
                p.error(f"{flag} {path}: no such file (the JSON that `{script}` writes)")
        return report(args.report, args.gpu)
    if not args.root:
        p.error("--root: the folder of the simulated NIH root")
    cores = available_cpus()
    skip = set(filter(None, args.skip.split(",")))
    root = Path(args.root)
    res = {"n_requested": args.n, "cores": cores, "noise": args.noise, "git_commit": git_commit(),
           "torch": torch.__version__, "cpu": cpu_name()}
    t0 = time.time()
    res["n"], res["png_bytes"] = build_root(root, args.n, args.noise, cores)
    res["build_seconds"] = time.time() - t0
    print(f"root {root}: {res['n']} PNGs of 1024 x 1024, {res['png_bytes'] / res['n'] / 1e3:.0f} KB each "
          f"({res['build_seconds']:.0f} s)")
    work = Path(tempfile.mkdtemp(prefix="fullscale-"))
    try:
        if "decode" not in skip:
            res["decode_224"] = [decode(root, 224, w, work / f"cache{w}") for w in sorted({1, cores})]
            for r in res["decode_224"]:
                print(f"decode 224 px, {r['workers']} worker(s): {r['images_per_s']:.1f} images/s "
                      f"({r['images_per_s_per_worker']:.1f} per worker), peak RSS {r['peak_rss_gb']:.2f} GB, "
                      f"cache {r['cache_bytes'] / 1e6:.0f} MB")
        cache = work / f"cache{cores}"  # the 224 px cache stays warm for the capped study
        if "chestxray" not in skip:
            cmd = [sys.executable, "-m", "classify.chestxray_study", "--scale", "full", "--data-root", str(root),
                   "--no-pretrained", "--folds", "2", "--replicates", "1", "--images-per-sex", str(args.images_per_sex),
                   "--epochs", "1", "--batch-size", "16", "--conditions", args.conditions,
                   "--cvae-epochs", "1", "--n-boot", "50", "--out", str(work / "chestxray"),
                   "--runs", str(work / "chestxray-runs")]
            rc, wall, rss, out = measured(cmd, env={"FAIRSYNTH_CACHE": str(cache)})
            res["chestxray_capped"] = {"command": as_recorded(cmd, root, work), "exit": rc, "seconds": wall,
                                       "peak_rss_gb": rss, "summary": (work / "chestxray" / "summary.json").is_file()}
            print(f"chestxray --scale full, capped: exit {rc}, {wall:.0f} s, peak RSS {rss:.2f} GB")
            if rc:
                print(out)
        if "ddpm" not in skip:
            cmd = [sys.executable, "-m", "diffusion.train_ddpm", "--data", "nih", "--data-root", str(root),
                   "--size", "64", "--width", "64", "--mults", "1,2,2,2", "--num-res", "2", "--attn-res", "16",
                   "--steps", str(args.ddpm_steps), "--batch-size", "8", "--sample-every", "0", "--grid-per-class", "1",
                   "--grid-steps", "2", "--out-dir", str(work / "ddpm")]
            rc, wall, rss, out = measured(cmd, env={"FAIRSYNTH_CACHE": str(cache)})
            res["ddpm_capped"] = {"command": as_recorded(cmd, root, work), "exit": rc, "seconds": wall, "peak_rss_gb": rss}
            print(f"train_ddpm, fairgen's full preset, {args.ddpm_steps} steps: exit {rc}, {wall:.0f} s, peak RSS {rss:.2f} GB")
            if rc:
                print(out)
        if "audit" not in skip:
            res["audit"] = audit_at_scale(root, cache)
            print(f"memorization audit, {res['audit']['n_synth']} synthetic vs {res['audit']['n_train']} training "
                  f"images at 64 px ({res['audit']['n_train_queries']} reference queries): "
                  f"{res['audit']['seconds']:.1f} s")
        res["cache_files"] = {f.name: [f.stat().st_size, list(np.load(f, mmap_mode="r").shape)]
                              for f in sorted(cache.glob("*.npy")) if not f.name.endswith(".ok.npy")} \
            if cache.is_dir() else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "steps" not in skip:
        from bench.machine_limit import measure
        res["steps"] = {name: measure(name, True, steps=2, rounds=1) for name in ("densenet121", "unet64")}
        for name, r in res["steps"].items():
            print(f"{name}: {r['gflop_per_image']:.2f} GFLOP per image-step, {1 / r['images_per_s']:.3f} s per "
                  f"image on this CPU")
    res["seconds"] = time.time() - t0
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
