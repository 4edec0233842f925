"""DPO fine-tuning of a conditional DDPM on preference pairs (FairGen; Wallace et al. 2023). docs/METHODS.md.

Preference pairs (x_w preferred, x_l rejected, same condition) come from
- a CSV `condition, preferred_path, rejected_path` (what physicians would supply; condition = a class name such
  as 'F|finding'); `python -m diffusion.annotate --export` writes one from clinicians' answers on a local page,
  with an `annotator` column, and the outputs then name them as judge ("2 clinicians (A, B)"); or
- an automatic judge (--judge CKPT, a classify/train_classifier.py checkpoint trained on real images with
  --target cls): for each condition it samples 2 x --pairs-per-class images from the model being tuned and, of
  each two, prefers the one it scores higher for that condition. The pairs it made are written as images plus a
  pairs.csv in the physicians' format, so they can be inspected or replaced. Every output names the judge.
Losses (--dpo):
  fairgen    FairGen code: L_pref = -mean log sigmoid(lambda (L_l - L_w)), L_DPO = L_pref + mean L_w (lambda 0.5)
  diffusion  Diffusion-DPO with a frozen reference (the --init model): -mean log sigmoid(-beta/2 [(L_w - Lref_w)
             - (L_l - Lref_l)]) (beta 2500)
The total is L_ddpm + L_CB (on real batches, with --sampler / --cb-loss as in train_ddpm.py) + --dpo-weight x L_DPO.
The same t and noise are used for the two images of a pair.

    python -m diffusion.train_dpo --init runs/fairgen/nih/sqrs_cb/ckpt.pt --judge runs/fairgen/nih/judge/ckpt.pt \
        --data nih --size 32 --sampler sqrs --cb-loss --steps 200 --out-dir runs/fairgen/nih/fairgen
"""
import argparse
import copy
import json
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from common.cache import load_images
from common.cli import ArgumentParser, nonneg_float, positive_float, positive_int, run, unit_interval
from common.data import read_csv_checked, to_signed
from common.errors import DataError
from common.modalities import modality_name, training_images
from common.runs import (add_common_args, check_finite, device_from, prepare_out_dir, save_checkpoint,
                         seed_everything, write_config, write_json)
from common.report import save_grid
from diffusion.ddpm import Schedule, fixed_noise_grid, q_sample, update_ema
from diffusion.fairgen import SAMPLER_Q, dpo_diffusion, dpo_fairgen, real_batch_loss
from diffusion.sample_ddpm import generate, load_model


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="train_ddpm.py checkpoint to fine-tune (also the DPO reference)")
    pref = p.add_mutually_exclusive_group(required=True)
    pref.add_argument("--pairs", help="CSV with columns condition, preferred_path, rejected_path")
    pref.add_argument("--judge", help="classifier checkpoint (target cls) that makes the pairs automatically")
    p.add_argument("--keep-disagreements", action="store_true", help="--pairs: keep the rows its `disagreement` "
                   "column marks (pairs on which two clinicians chose opposite images; left out by default)")
    p.add_argument("--pairs-per-class", type=positive_int, default=16, help="pairs per condition the judge makes")
    p.add_argument("--pair-steps", type=positive_int, default=25, help="DDIM steps for the judge's candidate samples")
    p.add_argument("--dpo", default="fairgen", choices=["fairgen", "diffusion"], help="DPO loss form")
    p.add_argument("--lam", type=positive_float, default=0.5, help="lambda of the FairGen form")
    p.add_argument("--beta", type=positive_float, default=2500.0, help="beta of the Diffusion-DPO form")
    p.add_argument("--dpo-weight", type=nonneg_float, default=1.0, help="weight of L_DPO in the total")
    p.add_argument("--pair-batch", type=positive_int, default=16, help="preference pairs per step")
    # the real-data part, as train_ddpm.py
    p.add_argument("--data", default="nih", type=modality_name,
                   help="modality (common/modalities.py; csv: your label table as --data-root)")
    p.add_argument("--data-root", default=None, help="your copy of the data (default: embedded / phantom); --data csv: "
                                                     "the label table")
    p.add_argument("--size", type=positive_int, default=32, help="image side (must match --init)")
    p.add_argument("--subset", default="train", choices=["train", "all"], help="real images: training split or all")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips of real images")
    p.add_argument("--sampler", default="sqrs", choices=list(SAMPLER_Q), help="real-batch sampling weights")
    p.add_argument("--cb-loss", action="store_true", help="add the class-balancing loss on real batches")
    p.add_argument("--cb-tau", type=positive_float, default=1.0, help="tau of the CB loss")
    p.add_argument("--cb-gamma", type=nonneg_float, default=0.25, help="gamma of the CB loss")
    p.add_argument("--p-uncond", type=unit_interval, default=0.1, help="label dropout on real batches")
    p.add_argument("--batch-size", type=positive_int, default=32, help="real images per step")
    p.add_argument("--steps", type=positive_int, default=200, help="fine-tuning steps")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--ema", type=unit_interval, default=0.99, help="EMA decay")
    p.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--grid-per-class", type=positive_int, default=8, help="final grid images per class")
    p.add_argument("--grid-steps", type=positive_int, default=50, help="DDIM steps of the final grid")
    p.add_argument("--guidance", type=nonneg_float, default=1.0, help="guidance of grids and judge samples")
    add_common_args(p, "runs/fairgen/dpo")
    return p.parse_args(argv)


def load_judge(judge_ckpt, names):
    """(classifier, its checkpoint): a --judge that predicts exactly this model's classes."""
    from classify.nets import load_classifier
    judge, jck = load_classifier(judge_ckpt)
    if list(jck.get("classes", [])) != list(names):
        raise DataError(f"--judge {judge_ckpt} predicts {jck.get('classes')}, not this model's classes {names} "
                        f"(train it with --target cls on the same --data)")
    return judge, jck


def judge_pairs(model, sched, a, names, judge, jck, device, out, *, n, steps, guidance, seed):
    """Sample 2 x n images per condition (DDIM with `steps` steps, guidance w, from seed), let the judge prefer the
    higher-scoring of each two; write them as PNGs + pairs.csv (the physicians' format). Returns (x_w, x_l uint8
    arrays, class indices)."""
    classes = np.repeat(np.arange(len(names)), 2 * n)
    imgs = generate(model, sched, classes, a["size"], a["channels"], "ddim", steps, 1.0, guidance, None, seed,
                    device, progress=False)
    x = to_signed(imgs)
    jsize = jck["arch"]["size"]
    if x.shape[-1] != jsize:
        x = torch.nn.functional.interpolate(x, size=(jsize, jsize), mode="bilinear", align_corners=False)
    with torch.no_grad():
        score = torch.softmax(judge(x), 1)[torch.arange(len(x)), torch.as_tensor(classes)].numpy()
    first, second = np.arange(0, len(classes), 2), np.arange(1, len(classes), 2)
    win = np.where(score[first] >= score[second], first, second)
    lose = np.where(score[first] >= score[second], second, first)
    folder = out / "pairs"
    folder.mkdir(exist_ok=True)
    rows = []
    for i, (w, l) in enumerate(zip(win, lose)):
        pw, pl = folder / f"{i:05d}_preferred.png", folder / f"{i:05d}_rejected.png"
        Image.fromarray(imgs[w]).save(pw)
        Image.fromarray(imgs[l]).save(pl)
        rows.append({"condition": names[classes[w]], "preferred_path": str(pw), "rejected_path": str(pl),
                     "judge_score_preferred": score[w], "judge_score_rejected": score[l]})
    pd.DataFrame(rows).to_csv(out / "pairs.csv", index=False)
    return imgs[win], imgs[lose], classes[win]


def csv_pairs(path, names, size, channels, keep_disagreements=False):
    """The pairs of a --pairs CSV as uint8 arrays. Rows that diffusion.annotate's export marks as `disagreement`
    (two clinicians chose opposite images of that pair) are left out unless keep_disagreements."""
    df = read_csv_checked(path, ["condition", "preferred_path", "rejected_path"])
    if "disagreement" in df.columns and not keep_disagreements:
        split = df["disagreement"].astype(str).str.lower().isin(["true", "1"])
        if split.any():
            print(f"--pairs {path}: {int(split.sum())} rows on pairs where clinicians disagree are left out "
                  f"(--keep-disagreements keeps them)")
        df = df[~split]
        if df.empty:
            raise DataError(f"--pairs {path}: every row is on a pair where clinicians disagree; nothing to train "
                            f"on (--keep-disagreements keeps them)")
    if df.empty:
        raise DataError(f"--pairs {path}: no pairs (a header and no rows)")
    df["condition"] = df["condition"].astype(str)
    unknown = sorted(set(df["condition"]) - set(names))
    if unknown:
        raise DataError(f"--pairs {path}: unknown conditions {unknown}; this model's classes are {names}")
    mode = "L" if channels == 1 else "RGB"
    xw, okw = load_images(df["preferred_path"], size, mode, strict=True)
    xl, okl = load_images(df["rejected_path"], size, mode, strict=True)
    return xw, xl, np.array([names.index(c) for c in df["condition"]]), pairs_judge(df, path)


def pairs_judge(df, path):
    """Who made the pairs of a --pairs CSV, for every output: the clinicians named in its `annotator` column (what
    diffusion/annotate.py --export writes), else the file, saying the judge is not named in it."""
    if "annotator" in df.columns and df["annotator"].notna().all():
        names = sorted(df["annotator"].astype(str).unique())
        return f"{len(names)} clinician{'s' if len(names) > 1 else ''} ({', '.join(names)})"
    return f"pairs CSV ({path}; judge not named in it)"


def to_model_input(u8, device):
    return to_signed(u8, device).contiguous(memory_format=torch.channels_last)


def pair_errors(net, sched, xw, xl, c, t, eps):
    """||eps - eps_theta(x_t, t, c)||^2 per pair for the preferred and the rejected image (same t and noise)."""
    e = net(torch.cat([q_sample(sched, xw, t, eps), q_sample(sched, xl, t, eps)]), torch.cat([t, t]),
            torch.cat([c, c])).float()
    return (e - torch.cat([eps, eps])).pow(2).flatten(1).mean(1).chunk(2)


def main(args):
    device = device_from(args.device)
    seed_everything(args.seed)
    # every input read and checked first: bad input stops the run before its folder is made or replaced
    model, ck = load_model(args.init, device)  # the EMA weights of --init
    a, names = ck["args"], ck["class_names"]
    if a["size"] != args.size:
        raise DataError(f"--size {args.size} differs from the --init model's {a['size']}")
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # frozen reference (Diffusion-DPO)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = Schedule(a["schedule"], a["T"])
    if args.judge:
        judge, jck = load_judge(args.judge, names)
        judge_name = f"classifier ({args.judge})"
    else:
        xw, xl, c, judge_name = csv_pairs(args.pairs, names, a["size"], a["channels"],
                                                   args.keep_disagreements)
    mod, x_all, cls_all = training_images(args.data, args.size, args.data_root, args.subset, args.split_seed)
    x_all, cls_all = torch.from_numpy(x_all), torch.from_numpy(cls_all)
    if mod.class_names != names:
        raise DataError(f"--data {args.data} has classes {mod.class_names}; the --init model has {names}")
    if len(x_all) == 0:
        raise DataError(f"--data {args.data} --subset {args.subset}: no training images (use more images, or "
                        f"--subset all)")
    out = prepare_out_dir(args.out_dir, args.force)
    if args.judge:
        xw, xl, c = judge_pairs(ema, sched, a, names, judge, jck, device, out, n=args.pairs_per_class,
                                steps=args.pair_steps, guidance=args.guidance, seed=args.seed + 7)
    write_config(out, vars(args), data=mod.data, weights=f"init from {args.init}", judge=judge_name, dpo=args.dpo,
                 n_pairs=len(c), classes=names, notes=mod.notes)
    x_all, cls_all = x_all.to(device), cls_all.to(device)
    xw, xl, c = to_model_input(xw, device), to_model_input(xl, device), torch.as_tensor(c, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen, dgen = torch.Generator().manual_seed(args.seed), torch.Generator(device=device).manual_seed(args.seed + 1)
    pgen = torch.Generator(device=device).manual_seed(args.seed + 2)
    K, history, t0 = len(names), [], time.time()
    cb = (args.cb_tau, args.cb_gamma) if args.cb_loss else None
    for step in tqdm(range(args.steps), desc=f"dpo ({args.dpo})"):
        model.train()
        loss_real, _, _ = real_batch_loss(model, sched, x_all, cls_all, K, gen, dgen, args.batch_size, args.sampler,
                                          hflip=args.hflip, p_uncond=args.p_uncond, cb=cb)
        pick = torch.randint(0, len(c), (min(args.pair_batch, len(c)),), device=device, generator=pgen)
        t = torch.randint(0, sched.T, (len(pick),), device=device, generator=pgen)
        eps = torch.randn((len(pick),) + xw.shape[1:], device=device, generator=pgen)
        err_w, err_l = pair_errors(model, sched, xw[pick], xl[pick], c[pick], t, eps)
        if args.dpo == "fairgen":
            l_dpo = dpo_fairgen(err_w, err_l, args.lam)
        else:
            with torch.no_grad():
                ref_w, ref_l = pair_errors(ref, sched, xw[pick], xl[pick], c[pick], t, eps)
            l_dpo = dpo_diffusion(err_w, err_l, ref_w, ref_l, args.beta)
        loss = loss_real + args.dpo_weight * l_dpo
        check_finite(loss, step, args.out_dir)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))
        history.append({"step": step + 1, "loss": loss.item(), "dpo": l_dpo.item(), "err_w": err_w.mean().item(),
                        "err_l": err_l.mean().item()})
    state = {"args": {**a, "dpo": args.dpo, "judge": judge_name}, "model": model.state_dict(), "ema": ema.state_dict(),
             "step": ck["step"] + args.steps, "history": history, "class_names": names, "data": mod.data,
             "judge": judge_name}
    save_checkpoint(state, out / "ckpt.pt")
    x = fixed_noise_grid(ema, sched, K, a["channels"], a["size"], args.grid_per_class, args.guidance,
                         args.grid_steps, 1.0, args.seed + 12345, device)  # as train_ddpm's grids: DDIM eta 1
    title = f"DDPM samples, step {state['step']}, {mod.data}" + (" (PHANTOM data)" if mod.data == "phantom" else "") \
        + f", DDIM-{args.grid_steps} eta=1, w={args.guidance}, after DPO ({args.dpo})"
    for name in (f"samples_step{state['step']:06d}.png", "samples.png"):
        save_grid(x, out / name, nrow=K, title=title, row_labels=names)
    metrics = {"steps": args.steps, "judge": judge_name, "dpo": args.dpo, "n_pairs": int(len(c)),
               "final_dpo_loss": float(np.mean([h["dpo"] for h in history[-20:]])), "seconds": time.time() - t0}
    write_json(out / "metrics.json", {**metrics, "history": history})
    print(json.dumps(metrics))


if __name__ == "__main__":
    run(main, parse_args)
