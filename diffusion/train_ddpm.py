"""Train a class-conditional DDPM (Ho et al. 2020) with classifier-free guidance, from scratch, in plain PyTorch.

Class = (sensitive attribute x label) of a modality (common/modalities.py), e.g. sex x {No Finding, finding} on
NIH chest X-rays. Also the FairGen training variants of `make fairgen` (docs/METHODS.md, FairGen parts):
    --sampler cbrs | sqrs   draw batches with replacement, weight 1/n_g or 1/sqrt(n_g) per sample (base: uniform)
    --grad-alpha A          our gradient-aware factor on those weights (A = 0, the default, is the public code's)
    --cb-loss               add the class-balancing loss L_reg + gamma L_com (CBDM), on the rows that kept their
                            label (label-dropped rows get none, as CBDM applies it to conditioned batches only)
    --fair-bayes            FairDiffusion's Fair Bayesian Perturbation (diffusion/fairdiffusion.py): per-sample loss
                            weights 1 + sigma_g xi, sigma searched by GP-UCB every --fair-time-window steps
DPO fine-tuning is diffusion/train_dpo.py.

EMA weights, gradient clipping, AdamW with linear warm-up, bf16 autocast on GPU, atomic checkpoints every
--save-every steps (a killed run loses at most that much; --resume continues at the saved step with the same
EMA, optimiser and random streams), a sample grid from fixed noise every --sample-every steps.

    # full scale (one GPU; torchrun --nproc_per_node=N for more):
    python -m diffusion.train_ddpm --data nih --size 64 --width 128 --steps 100000 --batch-size 128 --ema 0.9999
    # quick CPU run (~20 min on 2 cores; docs/ddpm.md has its numbers):
    python -m diffusion.train_ddpm --data nih --size 32 --width 32 --steps 3000 --batch-size 32 --ema 0.995
    # smoke test (seconds):
    python -m diffusion.train_ddpm --data toy --size 16 --width 16 --mults 1,2 --num-res 1 --attn-res 8 --steps 20
"""
import argparse
import collections
import copy
from dataclasses import dataclass
import json
from pathlib import Path
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from common.cli import (ArgumentParser, int_list, nonneg_float, nonneg_int, positive_float, positive_int, run,
                        unit_interval)
from common.errors import DataError
from common.modalities import modality_name, training_images
from common.report import pyplot, save_grid
from common.runs import (add_common_args, check_finite, is_main_process, load_checkpoint, load_weights,
                         local_rank_zero_first, prepare_out_dir, ranks_identical, save_checkpoint, seed_everything,
                         setup_distributed, use_amp, write_config, write_json)
from diffusion.ddpm import Schedule, fixed_noise_grid, update_ema
from diffusion.fairdiffusion import FairBayes, loss_gap, plot_trajectory
from diffusion.fairgen import SAMPLER_Q, real_batch_loss
from diffusion.unet import shape_problems, unet_from_args

# what a --resume must share with the checkpoint it continues: the data, the diffusion, and (model_args) the model
RUN_KEYS = ("data", "subset", "split_seed", "sets", "train_set", "condition", "schedule", "T")
RESUME_KEYS = ("args", "model", "ema", "opt", "lr_sched", "gen", "dgen", "torch_rng", "step", "history")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="nih", type=modality_name,
                   help="modality: class = attribute x label (see common/modalities.py)")
    g.add_argument("--data-root", default=None, help="your copy of the data set (default: the embedded data); --data "
                                                     "csv: the label table")
    g.add_argument("--size", type=positive_int, default=32, help="image side in pixels (28 to 128)")
    g.add_argument("--subset", default="train", choices=["train", "all"],
                   help="train on the patient-level training split (70%%, seed --split-seed) or on everything")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
    g.add_argument("--sets", default=None, help="a study's split file (common.splits.write_sets): train on its set "
                                                "--train-set instead of --subset (e.g. one fold's training pool)")
    g.add_argument("--train-set", default="train", help="--sets: the set to train on")
    g.add_argument("--condition", default="attr_label", choices=["attr_label", "label"],
                   help="classes: attribute x label (default), or the label alone (attribute 'any': e.g. NIH "
                        "conditioned on the finding but not on sex)")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (not for chest X-rays)")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=positive_int, default=64, help="base channel width of the U-Net")
    g.add_argument("--mults", type=int_list(1), default="1,2,2", help="channel multiplier per resolution level")
    g.add_argument("--num-res", type=positive_int, default=2, help="residual blocks per level")
    g.add_argument("--attn-res", type=int_list(1, allow_empty=True), default="16",
                   help="resolutions (level sides in px) with self-attention, comma-separated; '' for none")
    g.add_argument("--dropout", type=unit_interval, default=0.0, help="dropout in residual blocks")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="beta schedule")
    g.add_argument("--T", type=positive_int, default=1000, help="diffusion steps")
    g.add_argument("--p-uncond", type=unit_interval, default=0.1, help="label dropout for classifier-free guidance")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=3000, help="training steps (batches)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per step (per GPU under torchrun)")
    g.add_argument("--lr", type=positive_float, default=2e-4, help="AdamW peak learning rate")
    g.add_argument("--warmup", type=nonneg_int, default=200, help="linear learning-rate warm-up steps")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--ema", type=unit_interval, default=0.995, help="EMA decay (0.9999 at scale; lower for short runs)")
    g.add_argument("--amp", default="auto", choices=["auto", "off"], help="bf16 autocast on GPUs that support it ('auto')")
    g = p.add_argument_group("FairGen variants")
    g.add_argument("--sampler", default="uniform", choices=list(SAMPLER_Q),
                   help="batch sampling weights per group: uniform, CBRS 1/n_g, SQRS 1/sqrt(n_g)")
    g.add_argument("--grad-alpha", type=float, default=0.0, help="gradient-aware factor exponent (ours; 0 = off)")
    g.add_argument("--grad-window", type=positive_int, default=50,
                   help="steps over which group gradient norms are averaged")
    g.add_argument("--cb-loss", action="store_true", help="add the class-balancing loss (CBDM)")
    g.add_argument("--cb-tau", type=positive_float, default=1.0, help="tau in w(t) = tau t / T")
    g.add_argument("--cb-gamma", type=nonneg_float, default=0.25, help="weight of L_com")
    g = p.add_argument_group("FairDiffusion (Fair Bayesian Perturbation)")
    g.add_argument("--fair-bayes", action="store_true",
                   help="per-sample loss weights 1 + sigma_g xi, xi ~ N(0, 1), one sigma_g in [0, 1] per attribute "
                        "value, searched by GP-UCB for the smallest loss gap between groups (FairDiffusion)")
    g.add_argument("--fair-time-window", type=positive_int, default=50,
                   help="steps between Gaussian-process updates of sigma (the public code's 50)")
    g.add_argument("--fair-beta", type=nonneg_float, default=0.1, help="UCB exploration: mean + sqrt(beta) std")
    g.add_argument("--fair-rho", type=unit_interval, default=0.95,
                   help="exploitation rate: sigma <- rho sigma + (1 - rho) U(0, 1) every step")
    g = p.add_argument_group("output")
    add_common_args(p, "runs/ddpm/nih32")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    g.add_argument("--init", default=None, help="fine-tune: start from this checkpoint's EMA weights (its model "
                   "shape wins over the model flags), with a fresh optimiser, at step 0")
    g.add_argument("--save-every", type=positive_int, default=500, help="checkpoint interval (steps)")
    g.add_argument("--sample-every", type=nonneg_int, default=1000,
                   help="sample-grid interval (steps; 0: only at the end)")
    g.add_argument("--grid-per-class", type=positive_int, default=8, help="grid images per class")
    g.add_argument("--grid-steps", type=positive_int, default=50, help="DDIM steps for the grids")
    g.add_argument("--guidance", type=nonneg_float, default=1.0, help="guidance scale w for the grids")
    g.add_argument("--grid-eta", type=nonneg_float, default=1.0, help="DDIM eta of the grids (see sample_ddpm.py)")
    args = p.parse_args(argv)
    if not args.sets and args.train_set != "train":
        p.error("--train-set names a set of a --sets file; pass one")
    if args.force and args.resume:
        p.error("--force replaces the run in --out-dir and --resume continues it: pass one of them")
    margs = model_args(args.size, args.width, args.mults, args.num_res, args.attn_res, args.dropout, 0, 1)
    problems = [] if args.init else shape_problems(margs)  # --init brings its own shape
    if problems:
        p.error("; ".join(problems))
    return args


def model_args(size, width, mults, num_res, attn_res, dropout, num_classes, channels):
    """The U-Net's args (what a checkpoint stores and unet_from_args takes) from the model flags; mults and
    attn_res as typed ('1,2,2', '16')."""
    return {"channels": channels, "size": size, "width": width, "mults": [int(m) for m in mults.split(",")],
            "num_res": num_res, "attn_res": [int(r) for r in attn_res.split(",") if r], "num_classes": num_classes,
            "dropout": dropout}


@dataclass(frozen=True)
class Grid:
    """The sample grids: per_class images per class (--grid-per-class) at size px, DDIM with `steps` steps
    (--grid-steps) and eta (--grid-eta), guidance w (--guidance), from the noise of seed (the same every time)."""
    size: int
    per_class: int
    steps: int
    eta: float
    guidance: float
    seed: int


def sample_grid(ema, sched, grid, mod, step, out, device):
    """The Grid of images per class from the same noise every time (successive grids compare)."""
    x = fixed_noise_grid(ema, sched, len(mod.class_names), mod.channels, grid.size, grid.per_class,
                         grid.guidance, grid.steps, grid.eta, grid.seed, device)
    title = f"DDPM samples, step {step}, {mod.data}" + (" (PHANTOM data)" if mod.data == "phantom" else "") + \
        f", DDIM-{grid.steps} eta={grid.eta:g}, w={grid.guidance}"
    for name in (f"samples_step{step:06d}.png", "samples.png"):
        save_grid(x, out / name, nrow=len(mod.class_names), title=title, row_labels=mod.class_names)


def init_args(init, path, margs):
    """The model args of an --init checkpoint (they win over the model flags)."""
    need = [k for k in margs if k != "dropout"]
    if not (isinstance(init, dict) and "ema" in init and isinstance(init.get("args"), dict)
            and all(k in init["args"] for k in need)):
        raise DataError(f"--init {path}: not a train_ddpm.py checkpoint (no model args and EMA weights)")
    return {k: init["args"].get(k, margs[k]) for k in margs}


def check_resume(ck, path, run_flags, margs, steps, fair_bayes):
    """A checkpoint --resume can continue: ours, at most --steps far, and trained with the same data, diffusion and
    model flags (a different shape would fail to load; different data or T would silently change the run).
    run_flags: {RUN_KEYS flag: value}; fair_bayes: {"window", "beta", "rho"} of --fair-bayes, or None without it."""
    if not isinstance(ck, dict) or any(k not in ck for k in RESUME_KEYS) or not isinstance(ck["args"], dict):
        raise DataError(f"--resume: {path} is not a train_ddpm.py checkpoint (choose another --out-dir, or move "
                        f"the file away to start afresh)")
    saved, now = ck["args"], {**run_flags, **margs}
    show = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    flag = {"channels": "--data (image channels)", "num_classes": "--data (number of classes)"}
    differ = [f"{flag.get(k, '--' + k.replace('_', '-'))} {show(v)} (checkpoint: {show(saved[k])})"
              for k, v in now.items() if k in saved and saved[k] != v]
    if differ:
        raise DataError(f"--resume {path}: these flags differ from the run being continued: {'; '.join(differ)}. "
                        f"Pass the checkpoint's values, or another --out-dir for a new run")
    if ("fair_bayes" in ck) != (fair_bayes is not None):
        had = "with" if "fair_bayes" in ck else "without"
        raise DataError(f"--resume {path}: that run was trained {had} --fair-bayes; pass the same, or another "
                        f"--out-dir for a new run")
    if fair_bayes is not None:
        fb = ck["fair_bayes"]
        differ = [f"--fair-{k.replace('window', 'time-window')} {v} (checkpoint: {fb[k]})"
                  for k, v in fair_bayes.items() if fb[k] != v]
        if differ:
            raise DataError(f"--resume {path}: these flags differ from the run being continued: {'; '.join(differ)}")
    if ck["step"] > steps:
        raise DataError(f"--steps {steps}: {path} is already at step {ck['step']}; pass --steps >= "
                        f"{ck['step']} to continue it")


def main(args):
    device, rank, world = setup_distributed(args.device)
    seed_everything(args.seed + rank)
    # everything read and checked first: bad input stops the run before its folder is made or touched
    with local_rank_zero_first():  # under torchrun: one process per machine decodes the image cache
        mod, x_all, cls_all = training_images(args.data, args.size, args.data_root, args.subset, args.split_seed,
                                              args.sets, args.train_set, args.condition == "attr_label")
    x_all, cls_all = torch.from_numpy(x_all), torch.from_numpy(cls_all)
    K, N = len(mod.class_names), len(x_all)
    if N == 0:
        raise DataError(f"--data {args.data} --subset {args.subset}: no training images (use more images, or "
                        f"--subset all)")
    counts = np.bincount(cls_all.numpy(), minlength=K)
    for name in np.array(mod.class_names)[counts == 0]:
        print(f"warning: class {name} has no training images; its grid row shows what the model guesses for it",
              file=sys.stderr)
    margs = model_args(args.size, args.width, args.mults, args.num_res, args.attn_res, args.dropout, K, mod.channels)
    init = load_checkpoint(args.init) if args.init else None
    if init is not None:
        margs = init_args(init, args.init, margs)
        if margs["num_classes"] != K or margs["size"] != args.size or margs["channels"] != mod.channels:
            raise DataError(f"--init {args.init} was trained for {margs['num_classes']} classes at "
                            f"{margs['size']} px, not {K} at {args.size}")
        if shape_problems(margs):
            raise DataError(f"--init {args.init}: its model args are inconsistent ({shape_problems(margs)[0]})")
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    ck = load_checkpoint(ckpt_path) if args.resume and ckpt_path.is_file() else None
    if ck is not None:
        fair = {"window": args.fair_time_window, "beta": args.fair_beta, "rho": args.fair_rho} \
            if args.fair_bayes else None
        check_resume(ck, ckpt_path, {k: getattr(args, k) for k in RUN_KEYS}, margs, args.steps, fair)
    out = prepare_out_dir(args.out_dir, args.force, args.resume) if is_main_process() else None
    model = unet_from_args(margs)
    if init is not None:
        load_weights(model, init["ema"], f"--init {args.init}")
    model = model.to(device, memory_format=torch.channels_last)  # ~1.6x faster convs on CPU
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    sched = Schedule(args.schedule, args.T)
    # the same streams on every rank: each draws the global batch and trains on its part (one process's numbers)
    gen = torch.Generator().manual_seed(args.seed * 1000)  # batch indices (CPU)
    dgen = torch.Generator(device=device).manual_seed(args.seed * 1000 + 1)  # t, noise, label dropout
    grad_hist = [collections.deque(maxlen=args.grad_window) for _ in range(K)]
    # the same stream on every rank, and the gap averaged over ranks: every rank keeps the same sigma
    fb = FairBayes(len(mod.attrs), args.fair_time_window, args.fair_beta, args.fair_rho, seed=args.seed + 777) \
        if args.fair_bayes else None
    step, history = 0, []
    if ck is not None:
        load_weights(model, ck["model"], ckpt_path)
        load_weights(ema, ck["ema"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        lr_sched.load_state_dict(ck["lr_sched"])
        gen.set_state(ck["gen"])
        dgen.set_state(ck["dgen"])
        torch.set_rng_state(ck["torch_rng"])
        step, history = ck["step"], ck["history"]
        for g, vals in enumerate(ck.get("grad_hist", [])):
            grad_hist[g].extend(vals)
        if fb is not None:
            fb.load_state_dict(ck["fair_bayes"])
        print(f"resumed {ckpt_path} at step {step}")
        if step == args.steps and (Path(args.out_dir) / "metrics.json").is_file():
            print(f"{args.out_dir} is already finished at --steps {args.steps}; nothing to do")
            return ema
    if is_main_process():
        write_config(out, vars(args), data=mod.data,
                     weights=f"init from {args.init}" if args.init else "none (from scratch)",
                     classes=mod.class_names, class_counts=counts.tolist(), notes=mod.notes, model=margs)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    x_all, cls_all = x_all.to(device), cls_all.to(device)
    amp = use_amp(args.amp, device)  # bf16 on GPUs that support it; fp32 on CPUs (the U-Net is slower there in bf16)
    out_weight = model.out[-1].weight
    grid = Grid(args.size, args.grid_per_class, args.grid_steps, args.grid_eta, args.guidance, args.seed + 12345)
    t0, seen = time.time(), 0
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="ddpm", disable=not is_main_process())
    for step in bar:
        loss, per, y = real_batch_loss(
            net, sched, x_all, cls_all, K, gen, dgen, args.batch_size * world, sampler=args.sampler,
            grad_means=[float(np.mean(h)) if h else np.nan for h in grad_hist], grad_alpha=args.grad_alpha,
            hflip=args.hflip, p_uncond=args.p_uncond, cb=(args.cb_tau, args.cb_gamma) if args.cb_loss else None,
            fb=fb, n_labels=len(mod.labels), amp=amp, part=slice(rank * args.batch_size, (rank + 1) * args.batch_size))
        check_finite(loss, step, args.out_dir)
        opt.zero_grad(set_to_none=True)
        if args.grad_alpha:  # our gradient-aware factor: per-group gradient norm at the output layer
            norms, has = torch.zeros(K, device=device), torch.zeros(K, device=device)
            for g in y.unique().tolist():
                norms[g] = torch.autograd.grad(per[y == g].mean(), out_weight, retain_graph=True)[0].norm()
                has[g] = 1
            if world > 1:  # every rank must keep the same history, hence the same sampling weights and batches:
                torch.distributed.all_reduce(norms)  # the mean of the norms of the ranks that saw group g
                torch.distributed.all_reduce(has)
            for g in has.nonzero().flatten().tolist():
                grad_hist[g].append((norms[g] / has[g]).item())
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        lr_sched.step()
        update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))
        if fb is not None:
            gap = torch.tensor(loss_gap(per.detach().cpu().numpy(), (y // len(mod.labels))[:, None].cpu().numpy()),
                               device=device)  # on the device: NCCL reduces CUDA tensors only
            if world > 1:
                torch.distributed.all_reduce(gap)
            fb.observe(step + 1, gap.item() / world)  # r: the mean of the ranks' batch gaps
            if world > 1:  # the same inputs give every rank the same GP; rank 0's sigma makes sure of it
                sig = torch.as_tensor(fb.sigma, device=device)
                torch.distributed.broadcast(sig, 0)
                fb.sigma = sig.cpu().numpy()
        if world > 1:  # the global batch's loss (the mean of the ranks' equal parts) in every rank's history
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        history.append([step + 1, loss.item()])
        seen += args.batch_size * world
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([h[1] for h in history[-50:]]):.4f}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
        done = step + 1
        if is_main_process() and (done % args.save_every == 0 or done == args.steps):
            save_checkpoint({"args": {**vars(args), **margs}, "model": model.state_dict(), "ema": ema.state_dict(),
                             "opt": opt.state_dict(), "lr_sched": lr_sched.state_dict(), "gen": gen.get_state(),
                             "dgen": dgen.get_state(), "torch_rng": torch.get_rng_state(), "step": done,
                             "history": history, "class_names": mod.class_names, "data": mod.data,
                             "grad_hist": [list(h) for h in grad_hist],
                             **({"fair_bayes": fb.state_dict()} if fb is not None else {})}, ckpt_path)
        if is_main_process() and args.sample_every and done % args.sample_every == 0 and done != args.steps:
            sample_grid(ema, sched, grid, mod, done, out, device)
    ddp = {"world_size": world, "ranks_identical": ranks_identical(model)} if world > 1 else {}
    if is_main_process():
        final = args.steps
        sample_grid(ema, sched, grid, mod, final, out, device)
        elapsed = time.time() - t0
        losses = [h[1] for h in history]
        metrics = {"steps": final, "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
                   "images_per_s": seen / elapsed if seen else None, "wall_s_this_session": elapsed,
                   "bf16_autocast": amp,
                   "classes": mod.class_names, "class_counts": counts.tolist(), "n_train": N, "data": mod.data,
                   **ddp}
        if fb is not None:  # the sigma trajectory and the batch loss gap per step, drawn in fair_bayes.png
            # sigma_last_step: what the last step used; sigma_next: the search's state after it (a GP update at
            # the last step, as at every multiple of the window, is used by no step of this run)
            metrics["fair_bayes"] = {"groups": mod.attrs, "sigma_last_step": fb.trajectory[-1][1:-1],
                                     "sigma_next": fb.sigma.tolist(), "gp_updates": fb.updates,
                                     "trajectory_columns": ["step", *[f"sigma_{a}" for a in mod.attrs], "gap"],
                                     "trajectory": fb.trajectory}
            plot_trajectory(fb, mod.attrs, out / "fair_bayes.png",
                            f"FairDiffusion sigma search, {mod.data}\n(GP update every {args.fair_time_window} steps)")
        write_json(out / "metrics.json", metrics)
        plot_loss(losses, out / "loss_curve.png", mod.data)
        print(json.dumps({k: v for k, v in metrics.items() if k != "fair_bayes"}))
        if fb is not None:
            last = dict(zip(mod.attrs, np.round(fb.trajectory[-1][1:-1], 3).tolist()))
            print(f"FairDiffusion sigma at the last step {last}, GP updates at steps {fb.updates} "
                  f"({out / 'fair_bayes.png'})")
    return ema


def plot_loss(losses, path, data):
    plt = pyplot()
    if not losses:
        return
    k = max(1, len(losses) // 100)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses, alpha=0.3, lw=0.5)
    ax.plot(np.arange(len(smooth)) + k - 1, smooth)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"DDPM training loss ({data})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(main, parse_args)
