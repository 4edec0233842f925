"""Train an image classifier on a modality's real images: the DPO judge of `make fairgen` and the network behind
the domain feature distance (FD-<network>) for runs without ImageNet weights.

Targets: `cls` (attribute x label, the generator's conditioning class; the judge), `label` (the diagnosis) or
`attr` (the sensitive attribute). Patient-level split 70/10/20 (seed --split-seed, stratified by the attribute):
it trains on the training split, keeps a copy of the weights with the best validation AUROC (one-vs-rest mean),
and reports test accuracy and AUROC.

    python -m classify.train_classifier --data nih --size 32 --arch cnn8 --target cls --out-dir runs/judge/nih32
"""
import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from classify.nets import check_size, arch_spec, build
from common.cli import ArgumentParser, nonneg_int, positive_float, positive_int, run
from common.data import to_signed
from common.errors import DataError
from common.modalities import load_modality, modality_name
from common.runs import (add_common_args, device_from, prepare_out_dir, save_checkpoint, seed_everything,
                         write_config, write_json)
from common.splits import patient_split
from fairness.metrics import auroc_ovr


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="nih", type=modality_name,
                   help="modality (common/modalities.py; csv: your label table as --data-root)")
    p.add_argument("--data-root", default=None, help="your copy of the data (default: embedded data / phantom); "
                                                     "--data csv: the label table")
    p.add_argument("--size", type=positive_int, default=32, help="image side in pixels")
    p.add_argument("--target", default="cls", choices=["cls", "label", "attr"], help="what to predict")
    p.add_argument("--arch", default="cnn8", choices=["cnn8", "resnet18_28", "vit", "resnet50", "densenet121"],
                   help="network (classify/nets.py)")
    p.add_argument("--width", type=positive_int, default=32, help="cnn8 base width")
    p.add_argument("--epochs", type=positive_int, default=30, help="maximum epochs")
    p.add_argument("--patience", type=nonneg_int, default=8, help="early stopping: epochs without a better val AUROC")
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (not for chest X-rays)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
    add_common_args(p, "runs/classifier/nih32")
    args = p.parse_args(argv)
    check_size(args.arch, args.size)  # before anything is read or written
    return args


def augment(x, gen, hflip):
    """Random 2-pixel translation (reflect padding), brightness/contrast jitter, optional flips."""
    B, _, H, W = x.shape
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = pad[:, :, dy:dy + H, dx:dx + W]
    x = x * (1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=gen) - 0.5)) + 0.1 * (torch.rand(B, 1, 1, 1, generator=gen) - 0.5)
    if hflip:
        x = torch.where(torch.rand(B, 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
    return x


@torch.no_grad()
def predict(net, x, device, batch_size=256):
    net.eval()
    return torch.cat([F.softmax(net(x[i:i + batch_size].to(device)), 1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()


def main(args):
    device = device_from(args.device)
    out = prepare_out_dir(args.out_dir, args.force)
    seed_everything(args.seed)
    mod = load_modality(args.data, args.size, args.data_root)
    names = {"cls": mod.class_names, "label": mod.labels, "attr": mod.attrs}[args.target]
    t = mod.table
    y_all = {"cls": t["cls"].to_numpy(), "label": t["cls"].to_numpy() % len(mod.labels),
             "attr": t["cls"].to_numpy() // len(mod.labels)}[args.target]
    split = patient_split(t, seed=args.split_seed, stratify="attr")
    x_all = to_signed(mod.images)
    data = {s: (x_all[split == s], torch.from_numpy(y_all[split == s]).long()) for s in ("train", "val", "test")}
    present = np.unique(data["train"][1].numpy())
    if len(present) < 2:
        raise DataError(f"--target {args.target}: the training split of {mod.data} holds only "
                        f"{[names[i] for i in present] if len(present) else 'no image'}; a classifier needs at least two classes "
                        f"(choose another --target or data with both)")
    spec = arch_spec(args.arch, mod.channels, len(names), args.size, args.width)
    net = build(**spec).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    counts = np.bincount(data["train"][1].numpy(), minlength=len(names))
    class_w = torch.tensor(len(counts) * counts.sum() / np.maximum(counts, 1) / len(counts) ** 2, dtype=torch.float)
    write_config(out, vars(args), data=mod.data, weights="none (from scratch)", classes=names, notes=mod.notes)
    gen = torch.Generator().manual_seed(args.seed)
    best, best_auc, bad, history = None, -1.0, 0, []
    t0 = time.time()
    for epoch in tqdm(range(args.epochs), desc="classifier"):
        net.train()
        x, y = data["train"]
        for idx in torch.randperm(len(x), generator=gen).split(args.batch_size):
            logits = net(augment(x[idx], gen, args.hflip).to(device))
            loss = F.cross_entropy(logits, y[idx].to(device), weight=class_w.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        p_val = predict(net, data["val"][0], device)
        auc = auroc_ovr(data["val"][1].numpy(), p_val)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_auroc": auc})
        if best is None or auc > best_auc:  # a copy, not a reference; a NaN AUROC never wins later
            best, best_auc, bad = copy.deepcopy(net.state_dict()), auc, 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    net.load_state_dict(best)
    p_test = predict(net, data["test"][0], device)
    y_test = data["test"][1].numpy()
    metrics = {"val_auroc": best_auc, "test_auroc": auroc_ovr(y_test, p_test),
               "test_accuracy": float((p_test.argmax(1) == y_test).mean()), "epochs": len(history),
               "n": {s: len(v[1]) for s, v in data.items()}, "classes": names, "data": mod.data,
               "seconds": time.time() - t0, "history": history}
    save_checkpoint({"arch": spec, "model": net.state_dict(), "classes": names, "target": args.target,
                     "data": mod.data, "split_seed": args.split_seed}, out / "ckpt.pt")
    write_json(out / "metrics.json", metrics)
    print(f"{args.arch} on {mod.data} ({args.target}): val AUROC {best_auc:.3f}, test AUROC "
          f"{metrics['test_auroc']:.3f}, test accuracy {metrics['test_accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    run(main, parse_args)
