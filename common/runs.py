"""Run bookkeeping every script shares: seeding, the run folder and its config.json, atomic checkpoints, JSON, and
the one rank helper that keeps scripts torchrun-ready (only rank 0 logs, saves and samples)."""
import json
import os
from pathlib import Path
import platform
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from common.data import DataError

ROOT = Path(__file__).resolve().parent.parent


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def device_from(arg="auto"):
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


def setup_distributed(device_arg="auto"):
    """(device, rank, world size). Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) this joins the process group
    and takes this rank's GPU; otherwise it is an ordinary single-process run."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return device_from(device_arg), 0, 1
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local = torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def is_main_process():
    """True on rank 0 of a torchrun job, and in every ordinary run."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (commit or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_out_dir(out_dir, force=False, resume=False):
    """Create out_dir. An existing, non-empty folder is an error unless --resume (keep it) or --force (wipe it):
    nothing already written is lost silently."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise DataError(f"{out} already holds a run. Pass --resume to continue it, --force to replace it, "
                            f"or choose another --out-dir.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path, obj):
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_config(out_dir, args, data, weights="none", **extra):
    """config.json: the args, argv, git commit, versions, and which data and weights were used."""
    cfg = {"args": vars(args) if hasattr(args, "__dict__") else dict(args),
           "argv": sys.argv, "git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "cpu_threads": torch.get_num_threads(),  # float summation order, hence CPU results, depend on it
           "data": data, "weights": weights, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    if is_main_process():
        write_json(Path(out_dir) / "config.json", cfg)
    return cfg


def save_checkpoint(state, path):
    """torch.save to a temp file in the same folder, then rename: a killed run never leaves a torn checkpoint."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}. Train first, or check --ckpt.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise DataError(f"cannot load checkpoint {path}: {e}") from e


def check_finite(loss, step, out_dir=None):
    """Stop with a clear message on a NaN/inf loss instead of training on garbage."""
    if not torch.isfinite(loss).all():
        where = f"; the last good checkpoint is in {out_dir}" if out_dir else ""
        raise DataError(f"loss is {loss.item()} at step {step}: lower --lr, check the input scaling, "
                        f"or resume from an earlier checkpoint{where}")


def add_common_args(p, out_dir, seed=0):
    """The flags every train script has, with the same meaning everywhere."""
    p.add_argument("--out-dir", default=out_dir, help="run folder: config.json, ckpt.pt, metrics.json, PNGs")
    p.add_argument("--seed", type=int, default=seed, help="seeds python, numpy and torch")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    return p
