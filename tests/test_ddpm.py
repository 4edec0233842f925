"""The DDPM core: forward process, DDIM = DDPM at eta 1, resume after a kill, and a tiny model that learns (and that
DPO then moves toward a preference)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.runs import load_checkpoint
from diffusion.ddpm import Schedule, ddim_sample, ddim_sigma, ddpm_sample, q_sample
from diffusion.unet import Attention, UNet
from conftest import ROOT, shape_classifier
from forkserver import python_m

TINY = ["--data", "toy", "--size", "16", "--width", "16", "--mults", "1,2", "--num-res", "1", "--attn-res", "8",
        "--batch-size", "16", "--grid-per-class", "2", "--grid-steps", "5", "--sample-every", "0", "--subset", "all"]


def run_train(out, *extra, check=True):
    r = python_m("diffusion.train_ddpm", [*TINY, "--out-dir", out, *extra])
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_closed_form_q_matches_iterated_noising(kind):
    s = Schedule(kind, 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(600):  # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in (0, 99, 599):
            mean, var = s.abar[t].sqrt() * 0.7, 1 - s.abar[t]
            se = (var / len(x)).sqrt()
            assert abs(x.mean() - mean) < 5 * se and abs(x.var() / var - 1) < 0.02
            closed = q_sample(s, x0[:1000].view(-1, 1), torch.full((1000,), t), torch.zeros(1000, 1))
            assert torch.allclose(closed, mean.expand(1000, 1))


def test_ddim_eta1_every_step_is_ddpm():
    s = Schedule("linear", 50)
    for t in range(1, 50):  # sigma^2 of DDIM(eta=1) between consecutive steps = the posterior variance beta_tilde
        assert ddim_sigma(s, t, t - 1, 1.0) ** 2 == pytest.approx(s.post_var[t].item(), rel=1e-10)
    torch.manual_seed(0)
    model = UNet(1, 8, 8, (1, 2), 1, (), num_classes=2).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)  # a non-trivial eps predictor
    y = torch.tensor([0, 1, 1])
    a = ddpm_sample(model, s, (3, 1, 8, 8), y, w=1.0, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, s, (3, 1, 8, 8), y, w=1.0, steps=50, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-4)  # same noise, same trajectory
    c = ddim_sample(model, s, (3, 1, 8, 8), y, w=1.0, steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_attention_is_multi_head_softmax_attention_over_pixels(fmt):
    """The block against its definition written out: 1x1-conv q, k, v per head, softmax(q k^T / sqrt(d)) v, 1x1-conv
    output, residual; in both memory formats."""
    torch.manual_seed(0)
    att = Attention(32, heads=4)
    torch.nn.init.normal_(att.proj.weight, std=0.1)
    x = torch.randn(2, 32, 6, 6)
    h = torch.nn.functional.conv2d(att.norm(x), att.qkv.weight, att.qkv.bias).flatten(2)  # (B, 3C, HW)
    q, k, v = (h[:, i * 32:(i + 1) * 32].reshape(2, 4, 8, 36) for i in range(3))  # (B, heads, d, HW)
    w = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 8 ** 0.5, dim=-1)
    o = torch.einsum("bhij,bhdj->bhdi", w, v).reshape(2, 32, 6, 6)
    want = x + torch.nn.functional.conv2d(o, att.proj.weight, att.proj.bias)
    got = att(x.contiguous(memory_format=fmt))
    assert torch.allclose(got, want, atol=1e-5)


def test_resume_continues_at_the_saved_step_with_identical_ema(tmp_path):
    run_train(tmp_path / "straight", "--steps", "20", "--save-every", "10")
    run_train(tmp_path / "split", "--steps", "10", "--save-every", "10")
    r = run_train(tmp_path / "split", "--steps", "20", "--save-every", "10", "--resume")
    assert "at step 10" in r.stdout
    a, b = load_checkpoint(tmp_path / "straight/ckpt.pt"), load_checkpoint(tmp_path / "split/ckpt.pt")
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # a real kill: SIGKILL once the first checkpoint is on disk, then --resume
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "diffusion.train_ddpm", *TINY, "--out-dir", str(out), "--steps",
                          "20", "--save-every", "5"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    saved = load_checkpoint(out / "ckpt.pt")["step"]  # never a torn file: the write is temp + rename
    r = run_train(out, "--steps", "20", "--save-every", "5", "--resume")
    assert f"at step {saved}" in r.stdout
    c = load_checkpoint(out / "ckpt.pt")
    assert all(torch.equal(a["ema"][k], c["ema"][k]) for k in a["ema"])


def test_existing_run_is_not_overwritten(tmp_path):
    run_train(tmp_path / "r", "--steps", "2", "--save-every", "2")
    r = run_train(tmp_path / "r", "--steps", "2", check=False)
    assert r.returncode == 2 and "--resume" in r.stderr and "--force" in r.stderr


@pytest.fixture(scope="module")
def toy_ddpm(tmp_path_factory):
    """A tiny conditional DDPM trained for 250 steps on discs vs squares (16 px, ~2 min on a CPU core): the learning
    test and the DPO test share it (at 150 steps its guided samples showed the requested shape 76% of the time)."""
    out = tmp_path_factory.mktemp("toy_ddpm") / "toy"
    run_train(out, "--steps", "250", "--batch-size", "64", "--lr", "2e-3", "--warmup", "30", "--ema", "0.99",
              "--save-every", "250")
    return out / "ckpt.pt"


def test_tiny_conditional_ddpm_learns_the_requested_class(toy_ddpm, tmp_path):
    """A classifier trained on real images must find the requested shape in >= 90% of the guided samples."""
    from diffusion.sample_ddpm import main as sample_main, parse_args as sample_args
    clf = shape_classifier(16)
    sample_main(sample_args(["--ckpt", str(toy_ddpm), "--n-per-class", "20", "--sampler", "ddim", "--steps", "50",
                             "--guidance", "2", "--out", str(tmp_path / "s.npz")]))
    z = np.load(tmp_path / "s.npz")
    requested_shape = z["labels"] % 2  # classes are attr x {disc, square}
    with torch.no_grad():
        pred = clf(torch.from_numpy(z["images"]).float()[:, None] / 127.5 - 1).argmax(1).numpy()
    assert (pred == requested_shape).mean() >= 0.9


def test_dpo_moves_samples_toward_a_toy_preference(toy_ddpm, tmp_path):
    """Pairs from a CSV (the physicians' format) that always prefer the brighter of two samples: after DPO the same
    seeds give brighter samples."""
    from diffusion.sample_ddpm import generate, load_model
    model, ck = load_model(toy_ddpm, "cpu")
    sched, names = Schedule("linear", 1000), ck["class_names"]
    classes = np.repeat(np.arange(len(names)), 24)
    imgs = generate(model, sched, classes, 16, 1, "ddim", 20, 0.0, 1.0, 256, 0, "cpu", progress=False)
    rows = []
    (tmp_path / "pairs").mkdir()
    for i in range(0, len(imgs), 2):
        a, b = (i, i + 1) if imgs[i].mean() >= imgs[i + 1].mean() else (i + 1, i)
        for j, k in ((a, "w"), (b, "l")):
            Image.fromarray(imgs[j]).save(tmp_path / "pairs" / f"{i}_{k}.png")
        rows.append({"condition": names[classes[i]], "preferred_path": str(tmp_path / "pairs" / f"{i}_w.png"),
                     "rejected_path": str(tmp_path / "pairs" / f"{i}_l.png")})
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    r = python_m("diffusion.train_dpo", ["--init", str(toy_ddpm), "--pairs", str(tmp_path / "pairs.csv"), "--data",
                                         "toy", "--size", "16", "--subset", "all", "--sampler", "uniform", "--steps",
                                         "80", "--lr", "2e-4", "--dpo-weight", "5", "--batch-size", "16",
                                         "--grid-per-class", "2", "--grid-steps", "5", "--out-dir",
                                         str(tmp_path / "dpo")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tuned, ck2 = load_model(tmp_path / "dpo/ckpt.pt", "cpu")
    assert "pairs CSV" in ck2["judge"]
    probe = np.repeat(np.arange(len(names)), 32)
    before = generate(model, sched, probe, 16, 1, "ddim", 20, 0.0, 1.0, 256, 99, "cpu", progress=False)
    after = generate(tuned, sched, probe, 16, 1, "ddim", 20, 0.0, 1.0, 256, 99, "cpu", progress=False)
    assert after.astype(float).mean() > before.astype(float).mean() + 1.0  # grey levels, same seeds


def test_eval_samplers_reports_kid_and_whether_it_separates(tmp_path):
    """The sampler table has KID (mean, std, m) beside FD on the same features, and a sentence on whether the KID
    intervals (mean +- 2 std) of the samplers separate at this n."""
    import json
    run_train(tmp_path / "toy", "--data", "toy:200", "--steps", "4", "--save-every", "4", "--T", "60")  # DDPM-60
    r = python_m("classify.train_classifier", ["--data", "toy:200", "--size", "16", "--epochs", "1", "--target",
                                               "label", "--out-dir", str(tmp_path / "fd")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = python_m("diffusion.eval_samplers", ["--ckpt", str(tmp_path / "toy/ckpt.pt"), "--fd-ckpt",
                                             str(tmp_path / "fd/ckpt.pt"), "--n-per-class", "2", "--out",
                                             str(tmp_path / "ev")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ev/summary.json").read_text())
    assert len(s["samplers"]) == 3
    for v in s["samplers"].values():
        assert v["kid"]["m"] == 8 and np.isfinite(v["kid"]["mean"]) and v["kid"]["std"] >= 0
    assert "KID intervals" in s["kid_separation"] and ("separate" in s["kid_separation"] or
                                                       "cannot be told apart" in s["kid_separation"])
    from diffusion.ddpm_report import write_report  # the table is the report's, from summary.json alone
    write_report(tmp_path / "ev")
    assert s["kid_separation"] in (tmp_path / "ev/samplers.md").read_text()
    assert s["kid_separation"] in (tmp_path / "ev/README.md").read_text()
