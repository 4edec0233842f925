"""What the three MLP generator scripts of the MedMNIST study share (vae/train_mlp_ae.py, vae/train_mlp_cvae.py,
gan/train_mlp_cgan.py): their command line, the flattened training subset, and the checkpoint + sample grid at the
end. Each script keeps its own model, loss, loop and hyperparameters."""
import argparse

import torch

from common.cli import ArgumentParser, positive_float, positive_int
from common.data import medmnist_subset
from common.report import save_samples
from common.runs import add_common_args, device_from, prepare_out_dir, save_checkpoint, seed_everything, \
    use_amp, write_config, write_json


def parse_args(doc, out_dir, epochs, lr, extra, check, argv=None):
    """extra(p) adds the script's own flags (code or noise size); check: the script's bench/bf16_agreement.py loop,
    named in --amp's help."""
    p = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", required=True, help="official MedMNIST .npz")
    p.add_argument("--per-class", type=positive_int, default=150, help="subset size per class (train:val 9:1)")
    extra(p)
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epochs")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size")
    p.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    p.add_argument("--n-per-class", type=positive_int, default=150, help="images to generate per class")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the training steps (the losses and sampling in fp32). auto: bf16 on a CPU "
                        f"with bf16 instructions once bench/bf16_agreement.py --loop {check} has agreed "
                        "(BF16_CHECKED), fp32 elsewhere; bf16: always (refused on a device without bf16); off: fp32")
    add_common_args(p, out_dir)
    return p.parse_args(argv)


def amp_of(choice, device, checked):
    """--amp (choice) on --device as a bool (common.runs.use_amp; checked: the script's BF16_CHECKED), decided
    before anything is written, so a refused --amp bf16 leaves no run folder."""
    return use_amp(choice, device_from(device), cpu_checked=checked, gpu_checked=False)


def start(npz, per_class, seed, device, out_dir, force, settings):
    """Run folder, seeds and the training subset (--npz, --per-class, drawn by --seed), config.json recording
    settings (the flags, vars(args)): (out, device, x (N, D) in [0, 1], y (N,), image shape, names)."""
    device = device_from(device)
    out = prepare_out_dir(out_dir, force)
    seed_everything(seed)
    images, labels, _, _, names = medmnist_subset(npz, per_class, seed)
    write_config(out, settings, data=npz, weights="none (from scratch)")
    x, y = torch.from_numpy(images).float().flatten(1) / 255, torch.from_numpy(labels).long()
    return out, device, x, y, images.shape[1:], names


def finish(out, model, model_args, gx, gy, shape, names, title, metrics):
    """Checkpoint (state dict + the args that rebuild the model), samples.npz + grid, metrics.json."""
    save_checkpoint({"model": model.state_dict(), "args": model_args}, out / "ckpt.pt")
    save_samples(out, (gx.view(-1, *shape) * 255).round().byte().numpy(), gy.numpy(), names, title)
    write_json(out / "metrics.json", metrics)
