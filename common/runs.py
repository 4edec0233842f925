"""Run bookkeeping every script shares: seeding, the run folder and its config.json, atomic checkpoints, JSON, and
the one rank helper that keeps scripts torchrun-ready (only rank 0 logs, saves and samples)."""
import contextlib
import datetime
import gc
import hashlib
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

from common.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def device_from(arg="auto"):
    """--device as a torch.device: 'auto' (the GPU where there is one), 'cpu', 'cuda' or 'cuda:i'."""
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, TypeError) as e:
        raise DataError(f"--device {arg}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DataError(f"--device {arg}: no such CUDA device here ({torch.cuda.device_count()} visible; use "
                        f"--device auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise DataError(f"--device {arg}: only cpu and cuda are supported (use auto, cpu, cuda or cuda:N)")
    return device


def setup_distributed(device_arg="auto"):
    """(device, rank, world size). Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) this joins the process group
    and takes this rank's GPU; otherwise it is an ordinary single-process run."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return device_from(device_arg), 0, 1
    # a long timeout: the other ranks wait at a barrier while each machine's first rank decodes the image cache
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                         timeout=datetime.timedelta(hours=3))
    rank, local = torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def finish_distributed():
    """Under torchrun, once a rank's work is done: wait for the other ranks, leave the process group, and exit at
    once. A rank that exits while another still talks to it (rank 0 writing the test predictions) can abort inside
    gloo ('terminate called without an active exception'); so can one whose process group is only destroyed during
    interpreter shutdown, which happens when a DistributedDataParallel wrapper in a reference cycle still holds it
    (seen once in CI after every output was written). So: collect the cycles, pass a barrier, destroy the group,
    flush, and leave with os._exit(0) before Python's own teardown. Nothing in an ordinary run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cpu_has_bf16():
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), where CPU bf16 autocast can be faster than fp32
    (docs/bench.md: cnn8 1.8x per step on a 2-core AMD EPYC with AVX512-BF16); False where it cannot tell."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_amp(choice, device, cpu_checked=False, flag="--amp", gpu_checked=True):
    """--amp auto | bf16 | off as a bool. auto: bf16 autocast on GPUs that support it (unless gpu_checked is False:
    a network whose bf16 training was checked on CPUs only, such as the CVAE and the conv AE), and on CPUs with bf16
    instructions only for a network whose bf16 training was checked against fp32 there (cpu_checked: the chest
    X-ray cnn8, results/bench/bf16, the skintone ResVAE, results/bench/bf16_resvae, compare's conv AE,
    results/bench/bf16_convae, the CVAE, results/bench/bf16_cvae30, MedMNIST's MLP cGAN, results/bench/bf16_mlpcgan,
    and compare's DCGAN, results/bench/bf16_dcgan; the ViT, for one, is slower under it, and the MLP AE and cVAE
    agree but are no faster);
    bf16: on any device, an error on a CPU without bf16 instructions (there it is slower); off: fp32."""
    if choice == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise DataError(f"{flag} bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast "
                        f"is slower than fp32; use {flag} auto")
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DataError(f"{flag} bf16: this GPU does not support bf16; use {flag} auto or off")
    if choice != "auto":
        return choice == "bf16"
    if device.type == "cuda":
        return gpu_checked and torch.cuda.is_bf16_supported()
    return cpu_checked and cpu_has_bf16()


@contextlib.contextmanager
def local_rank_zero_first():
    """Under torchrun: the first process of each machine runs the block (decoding the image cache) before the
    machine's other processes, which then map its cache instead of decoding the same images at the same time.
    Every rank passes one barrier; an ordinary run just runs the block."""
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if ddp and not first:
        torch.distributed.barrier()
    yield
    if ddp and first:
        torch.distributed.barrier()


def is_main_process():
    """True on rank 0 of a torchrun job, and in every ordinary run."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def ranks_identical(model):
    """Under torchrun: whether every rank holds bit-identical parameters (DDP starts them from rank 0's and
    averages the gradients, so they stay so; False means the ranks trained different models). Every rank must call
    it. Buffers (BatchNorm running statistics: DDP copies rank 0's to the others before each forward) are not
    compared."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


OUTPUT_TREES = ("results", "results-full", "smoke")  # what runs write, not code


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        # the code is what a result depends on: tracked results being rewritten (by this run or another) is not
        # a dirty tree (commit the code, then run, then commit the results)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *[f":(exclude){d}" for d in OUTPUT_TREES]], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (commit or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Run folders that --force moved aside in this process: (where it was, where it is now). The top-level handler
# (common.cli.run) deletes them when the command succeeds and puts them back when it fails.
_REPLACED = []
CONFIG_KEYS = {"args", "argv", "git_commit"}  # what write_config writes


def is_run_folder(path):
    """True for a folder this project wrote a run into: its config.json is write_config's (args, argv, git commit),
    or it is a report folder of this repository (results*/, smoke/, runs/ under it) with a summary.json."""
    path = Path(path)
    try:
        if CONFIG_KEYS <= set(json.loads((path / "config.json").read_text())):
            return True
    except (OSError, ValueError, TypeError):
        pass
    try:
        inside = path.resolve().is_relative_to(ROOT) and path.resolve() != ROOT
        return inside and isinstance(json.loads((path / "summary.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def prepare_out_dir(out_dir, force=False, resume=False, flag="--out-dir"):
    """Create out_dir; nothing already written is lost. An existing, non-empty folder is an error unless --resume
    (continue it) or --force, which replaces only a run folder of ours (is_run_folder), never another folder, never
    one holding clinicians' answers (answers.csv of diffusion/annotate.py), and never a link or the folder you are
    in. The replaced run is moved aside and deleted only when the command succeeds: a command that fails leaves it
    as it was (settle_replaced). --force with --resume is refused (one continues a run, the other replaces it)."""
    out = Path(os.path.abspath(out_dir))
    if force and resume:
        raise DataError(f"{flag} {out_dir}: --force replaces the run and --resume continues it (pass one of them)")
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out_dir}: is a file, not a folder (choose another {flag})")
    stale = sorted(out.parent.glob(f".{out.name}.replaced-*")) if out.name else []
    if stale:
        print(f"note: {', '.join(map(str, stale))}: a run that --force had moved aside when its command was killed; "
              f"move it back to {out} or delete it", file=sys.stderr)
    if resume and out.is_dir() and any(out.iterdir()) and not is_run_folder(out):
        raise DataError(f"{flag} {out_dir}: --resume continues a run of ours, and this folder holds files but no run "
                        f"(no config.json); choose another {flag}")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not force:
            raise DataError(f"{flag} {out_dir}: already holds files (pass --resume to continue a run, --force to "
                            f"replace it, or choose another {flag})")
        if out.is_symlink() or Path.cwd().resolve().is_relative_to(out.resolve()):
            raise DataError(f"{flag} {out_dir}: is a link or holds the current folder; --force does not replace it "
                            f"(choose another {flag})")
        if not is_run_folder(out):
            raise DataError(f"{flag} {out_dir}: holds files but no run of ours (no config.json written by this "
                            f"project); --force replaces only run folders (choose another {flag}, or delete it "
                            f"yourself)")
        answers = next(out.rglob("answers.csv"), None)
        if answers is not None:
            raise DataError(f"{flag} {out_dir}: holds clinicians' answers ({answers}); --force never deletes them "
                            f"(move them elsewhere first, or choose another {flag})")
        aside = out.with_name(f".{out.name}.replaced-{os.getpid()}-{len(_REPLACED)}")
        try:
            os.replace(out, aside)
        except OSError as e:
            raise DataError(f"{flag} {out_dir}: cannot replace it ({e.strerror}); check its permissions") from e
        _REPLACED.append((out, aside))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"{flag} {out_dir}: cannot write there ({e.strerror}); choose a folder you may write to") \
            from e
    return Path(out_dir)


def settle_replaced(ok):
    """Settle the runs --force replaced in this process, newest first. ok: delete the old runs. Not
    ok: put each old run back; the new, unfinished run is deleted when it holds no more than its config.json (a
    run stopped by bad input), else kept beside it as <name>.failed-<time> (a long run that failed late or was
    interrupted keeps its checkpoints), and both places are printed."""
    while _REPLACED:
        out, aside = _REPLACED.pop()
        try:
            if ok:
                shutil.rmtree(aside)
                continue
            kept = None
            if out.is_dir() and {p.name for p in out.iterdir()} - {"config.json"}:
                kept = out.with_name(f"{out.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(out, kept)
            else:
                shutil.rmtree(out, ignore_errors=True)
            os.replace(aside, out)
            print(f"note: {out}: the earlier run is back in place" +
                  (f"; this command's unfinished run is in {kept}" if kept else ""), file=sys.stderr)
        except OSError as e:
            print(f"note: {aside}: could not settle it ({e.strerror}); the earlier run of {out} lies there",
                  file=sys.stderr)


@contextlib.contextmanager
def written_together(*paths):
    """Temporary names (same folder and suffix, so numpy appends nothing) for files that belong together, e.g. a
    samples .npz and its grid PNG; renamed into place only when the block succeeds, so a failure leaves what was
    there before (what --force was replacing) untouched."""
    paths = [Path(p) for p in paths]
    tmps = [p.with_name(f".{p.stem}.tmp-{os.getpid()}{p.suffix}") for p in paths]
    try:
        yield tmps
        for t, p in zip(tmps, paths):
            os.replace(t, p)
    finally:
        for t in tmps:
            t.unlink(missing_ok=True)


def npz_out(path, force=False, flag="--out", beside=()):
    """The .npz file an output flag names, checked before any work: numpy adds '.npz' to a name without it, so the
    suffix is added here and the existence check sees the file that will be written. An existing file (or one of
    the `beside` suffixes next to it, e.g. '.png') is refused without --force; the folder must take files."""
    out = Path(path)
    if out.is_dir():
        raise DataError(f"{flag} {out}: is a folder; {flag} names the .npz file to write (e.g. {out / 'samples.npz'})")
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    files = [out] + [out.with_suffix(s) for s in beside]
    for f in files:
        if f.is_dir():
            raise DataError(f"{flag} {path}: {f} is a folder; choose another {flag}")
    existing = [str(f) for f in files if f.exists() or f.is_symlink()]
    if existing and not force:
        raise DataError(f"{flag} {path}: {' and '.join(existing)} already exist (pass --force to replace them, or "
                        f"choose another {flag})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.write-test-{os.getpid()}")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write in {out.parent} ({e.strerror}); choose a path you may write "
                        f"to") from e
    return out


def default_runs(out):
    """The run tree of a study writing to `out`: runs/<out as a path under this folder> (results/chestxray ->
    runs/results/chestxray, smoke/chestxray -> runs/smoke/chestxray), so that no two --out share one; an --out
    elsewhere gets runs/<its name>-<hash of its absolute path>."""
    out = Path(out).resolve()
    try:
        return Path("runs") / out.relative_to(Path.cwd().resolve())
    except ValueError:
        return Path("runs") / f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:8]}"


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


def recorded_command():
    """sys.argv as a record may keep it: the script's path relative to the working folder when it lies inside it
    (a committed config.json names no folder of the machine that ran it)."""
    argv = list(sys.argv)
    if argv:
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            pass
    return argv


def write_config(out_dir, settings, data, weights="none", **extra):
    """config.json: the command's settings (under "args"), argv, git commit, versions, and which data and weights
    were used. settings: the flags as parsed, a dict (a script's main passes vars(args)); a Namespace is read as its
    vars(). Like common.cli.as_argv, a serializer of a parser's values: nothing here reads a setting."""
    cfg = {"args": vars(settings) if hasattr(settings, "__dict__") else dict(settings), "argv": recorded_command(),
           "git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
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


def load_checkpoint(path, map_location="cpu", flag="--ckpt"):
    """A checkpoint of ours, loaded with weights_only=True (a pickle that would run code is refused, never run)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: checkpoint not found (train first, or check {flag})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... for a file it refuses
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(f"{flag} {path}: cannot load checkpoint ({type(e).__name__}: {first}); it is damaged, "
                        f"cut short, or not a checkpoint of this project") from e


def resume_differences(ck, **recorded):
    """How a checkpoint's recorded settings differ from this run's: one 'key: checkpoint X, this run Y' per differing
    key of each dict passed (name=this run's dict, compared with ck[name]); empty: it may be resumed. A checkpoint
    from before --amp has no "bf16" and was trained in fp32."""
    if not isinstance(ck, dict):
        return ["not a checkpoint of this script"]
    out = []
    for name, now in recorded.items():
        then = ck.get(name)
        then = {"bf16": False, **then} if isinstance(then, dict) and "bf16" in now else then
        if not isinstance(then, dict):
            out.append(f"{name}: not recorded")
            continue
        for k in sorted(set(now) | set(then)):
            if k in then and k in now and then[k] == now[k]:
                continue
            shown = [repr(d[k]) if k in d else "(none)" for d in (then, now)]
            hint = f" (--amp {'bf16' if then[k] else 'off'} continues it)" if k == "bf16" and k in then else ""
            out.append(f"{k}: checkpoint {shown[0]}, this run {shown[1]}{hint}")
    return out


def load_weights(model, state, source):
    """model.load_state_dict(state), with a state that does not fit the network (a checkpoint of another model or
    shape, a damaged file) reported as bad input naming `source`, instead of load_state_dict's traceback."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{source}: holds a {type(state).__name__}, not a state dict of tensors (save weights with "
                        f"torch.save(model.state_dict(), PATH))")
    want = model.state_dict()
    missing, extra = [k for k in want if k not in state], [k for k in state if k not in want]
    wrong = [k for k in want if k in state and state[k].shape != want[k].shape]
    if missing or extra or wrong:
        raise DataError(f"{source}: its weights do not fit {type(model).__name__} ({len(missing)} missing, "
                        f"{len(extra)} unexpected, {len(wrong)} of another shape, e.g. {(missing + extra + wrong)[0]}); "
                        f"it is a checkpoint of another model, or the file is damaged")
    model.load_state_dict(state)
    return model


def load_state_dict_file(path, module, flag="--weights"):
    """Load a weights file (e.g. a VGG19 or Inception state dict a user saved) into `module`, with
    weights_only=True, so that a pickle that would run code is refused; keys and shapes must fit the module."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... for a file it refuses
        raise DataError(f"{flag} {path}: not a plain state-dict file, or damaged ({type(e).__name__}); save the "
                        f"weights with torch.save(model.state_dict(), PATH)") from e
    return load_weights(module, state, f"{flag} {path}")


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
