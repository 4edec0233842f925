"""Bad input to the diffusion and FID scripts (issue #17): each case runs the command a user would type, on tiny data,
and checks that it stops with exit status 2 and one last line `error: ...` naming the flag or file, without a
traceback, and that every file already there (a finished run, samples, planted files) is byte-identical afterwards
and nothing new was written."""
import os
from pathlib import Path
import pickle
import shutil

import numpy as np
import pytest
import torch

from forkserver import SERVER_ENV, python_m

TINY = ["--data", "toy:64", "--subset", "all", "--size", "16", "--width", "8", "--mults", "1,2", "--num-res", "1",
        "--attn-res", "8", "--steps", "2", "--batch-size", "8", "--grid-per-class", "2", "--grid-steps", "2",
        "--sample-every", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny DDPM run and the environment every command runs in (a private image cache, one thread)."""
    root = tmp_path_factory.mktemp("world")
    env = {**os.environ, "FAIRSYNTH_CACHE": str(root / "cache"), **SERVER_ENV}
    r = python_m("diffusion.train_ddpm", [*TINY, "--out-dir", root / "run"], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, env


def snapshot(folder):
    """{path: bytes} of every file under folder, and {path: None} of every folder (a refused command makes none)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in Path(folder).rglob("*")}


def run_refused(env, folder, module, *argv):
    """Run `python -m module argv`; assert the refusal and that nothing under `folder` changed. Returns the line."""
    before = snapshot(folder)
    r = python_m(module, argv, env=env, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, f"exit status {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    assert lines and lines[-1].startswith("error:"), r.stderr[-3000:]
    after = snapshot(folder)
    assert sorted(after) == sorted(before), f"written or removed: {set(after) ^ set(before)}"
    assert [k for k in before if after[k] != before[k]] == []
    return lines[-1]


# ---- the files the cases start from: each case gets its own copies in its tmp_path --------------------------------
def finished_run(d, world):
    shutil.copytree(world[0] / "run", d / "run")


def truncated_ckpt(d, world):
    finished_run(d, world)
    data = (d / "run/ckpt.pt").read_bytes()
    (d / "run/ckpt.pt").write_bytes(data[:len(data) // 2])  # a half-copied file


def junk_ckpt(d, world):
    (d / "ckpt.pt").write_text("this is not a checkpoint\n" * 20)


def other_checkpoint(d, world):
    torch.save({"arch": {"arch": "cnn8"}, "model": {}}, d / "other.pt")  # loads, but is no DDPM checkpoint


def not_a_run(d, world):
    (d / "mine").mkdir()
    (d / "mine/notes.txt").write_text("my own notes, not a run\n")


def run_and_results(d, world):
    finished_run(d, world)
    (d / "results").mkdir()
    (d / "results/summary.json").write_text('{"samplers": {}}\n')
    (d / "results/samplers.md").write_text("an earlier table\n")


def npz_inputs(d, world):
    rng = np.random.default_rng(0)
    for name in ("real", "fake"):
        np.savez(d / f"{name}.npz", images=rng.integers(0, 256, (6, 16, 16), dtype=np.uint8))


class RunsCode:
    """Unpickling this calls os.system: a weights file no loader may ever unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_weights(d, world):
    npz_inputs(d, world)
    (d / "evil.pth").write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": RunsCode(d / "PWNED")}))


def foreign_weights(d, world):
    npz_inputs(d, world)
    torch.save({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, d / "resnet.pth")


def corrupt_npz(d, world):
    npz_inputs(d, world)
    (d / "fake.npz").write_bytes(b"PK\x03\x04 half of a zip file")


def earlier_audit(d, world):
    npz_inputs(d, world)
    (d / "audit").mkdir()
    (d / "audit/memorization.json").write_text('{"fraction_copies": 0.0}\n')
    (d / "audit/closest_pairs.png").write_bytes(b"an earlier picture")


TRAIN, SAMPLE, DPO, EVAL = "diffusion.train_ddpm", "diffusion.sample_ddpm", "diffusion.train_dpo", \
    "diffusion.eval_samplers"
DPO_ARGS = ["--data", "toy:64", "--size", "16", "--subset", "all", "--steps", "2", "--batch-size", "8"]
# id: (setup, module, argv with {d} for the case's folder, what the error line must name)
CASES = {
    "train --batch-size 0": (None, TRAIN, TINY + ["--batch-size", "0", "--out-dir", "{d}/new"], "--batch-size"),
    "train --steps 0": (None, TRAIN, TINY + ["--steps", "0", "--out-dir", "{d}/new"], "--steps"),
    "train --grid-steps 0": (None, TRAIN, TINY + ["--grid-steps", "0", "--out-dir", "{d}/new"], "--grid-steps"),
    "train --mults 1,x": (None, TRAIN, TINY + ["--mults", "1,x", "--out-dir", "{d}/new"], "--mults"),
    "train --mults ''": (None, TRAIN, TINY + ["--mults", "", "--out-dir", "{d}/new"], "--mults"),
    "train --mults 0": (None, TRAIN, TINY + ["--mults", "0", "--out-dir", "{d}/new"], "--mults"),
    "train --attn-res at no level": (None, TRAIN, TINY + ["--attn-res", "7", "--out-dir", "{d}/new"], "--attn-res"),
    "train --resume, other --width": (finished_run, TRAIN, TINY + ["--width", "16", "--resume", "--out-dir",
                                                                    "{d}/run"], "--width 16"),
    "train --force --resume": (finished_run, TRAIN, TINY + ["--force", "--resume", "--out-dir", "{d}/run"],
                               "--force"),
    "train --force onto a folder that is no run": (not_a_run, TRAIN, TINY + ["--force", "--out-dir", "{d}/mine"],
                                                   "mine"),
    "train --resume, truncated ckpt.pt": (truncated_ckpt, TRAIN, TINY + ["--resume", "--out-dir", "{d}/run"],
                                          "ckpt.pt"),
    "train --init, no DDPM checkpoint": (other_checkpoint, TRAIN, TINY + ["--init", "{d}/other.pt", "--out-dir",
                                                                          "{d}/new"], "--init"),
    "sample --n-per-class 0": (finished_run, SAMPLE, ["--ckpt", "{d}/run/ckpt.pt", "--n-per-class", "0", "--out",
                                                      "{d}/s.npz"], "--n-per-class"),
    "sample --steps 0": (finished_run, SAMPLE, ["--ckpt", "{d}/run/ckpt.pt", "--steps", "0", "--out", "{d}/s.npz"],
                         "--steps"),
    "sample --classes unknown": (finished_run, SAMPLE, ["--ckpt", "{d}/run/ckpt.pt", "--classes", "dark|disc,pink",
                                                        "--out", "{d}/s.npz"], "--classes"),
    "sample --ckpt of another kind": (other_checkpoint, SAMPLE, ["--ckpt", "{d}/other.pt", "--out", "{d}/s.npz"],
                                      "other.pt"),
    "sample --ckpt not a checkpoint": (junk_ckpt, SAMPLE, ["--ckpt", "{d}/ckpt.pt", "--out", "{d}/s.npz"],
                                       "ckpt.pt"),
    "sample --out below a file": (finished_run, SAMPLE, ["--ckpt", "{d}/run/ckpt.pt", "--n-per-class", "1",
                                                         "--steps", "2", "--out", "{d}/run/config.json/s.npz"],
                                  "--out"),
    "dpo --pair-batch 0": (finished_run, DPO, DPO_ARGS + ["--init", "{d}/run/ckpt.pt", "--pairs", "{d}/p.csv",
                                                          "--pair-batch", "0", "--out-dir", "{d}/dpo"],
                           "--pair-batch"),
    "dpo --force, missing --pairs": (finished_run, DPO, DPO_ARGS + ["--init", "{d}/run/ckpt.pt", "--pairs",
                                                                    "{d}/missing.csv", "--force", "--out-dir",
                                                                    "{d}/run"], "missing.csv"),
    "eval --n-per-class 0": (finished_run, EVAL, ["--ckpt", "{d}/run/ckpt.pt", "--fd-ckpt", "{d}/run/ckpt.pt",
                                                  "--n-per-class", "0", "--out", "{d}/results"], "--n-per-class"),
    "eval --force, missing --fd-ckpt": (run_and_results, EVAL, ["--ckpt", "{d}/run/ckpt.pt", "--fd-ckpt",
                                                                "{d}/missing.pt", "--force", "--out",
                                                                "{d}/results"], "missing.pt"),
    "fid --weights, code-running pickle": (malicious_weights, "fairness.fid", ["{d}/real.npz", "{d}/fake.npz",
                                                                              "--weights", "{d}/evil.pth"],
                                           "--weights"),
    "fid --weights of another network": (foreign_weights, "fairness.fid", ["{d}/real.npz", "{d}/fake.npz",
                                                                          "--weights", "{d}/resnet.pth"],
                                         "--weights"),
    "fid corrupt .npz": (corrupt_npz, "fairness.fid", ["{d}/real.npz", "{d}/fake.npz", "--no-pretrained"],
                         "fake.npz"),
    "memorization --threshold 0": (npz_inputs, "fairness.memorization", ["{d}/fake.npz", "{d}/real.npz",
                                                                         "--threshold", "0", "--out", "{d}/audit"],
                                   "--threshold"),
    "memorization over an earlier audit": (earlier_audit, "fairness.memorization", ["{d}/fake.npz", "{d}/real.npz",
                                                                                   "--out", "{d}/audit"],
                                           "--force"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_gets_one_line_and_loses_nothing(case, world, tmp_path):
    setup, module, argv, names = case
    if setup:
        setup(tmp_path, world)
    line = run_refused(world[1], tmp_path, module, *[a.replace("{d}", str(tmp_path)) for a in argv])
    assert names in line, line
    assert not (tmp_path / "PWNED").exists()  # the malicious pickle was never unpickled


def test_sample_out_without_npz_is_refused_the_second_time(world, tmp_path):
    """numpy appends .npz to --out x, so the check must look at x.npz (and x.png beside it), not at x."""
    finished_run(tmp_path, world)
    cmd = ["--ckpt", tmp_path / "run/ckpt.pt", "--n-per-class", "1", "--steps", "2", "--out", tmp_path / "x"]
    r = python_m(SAMPLE, cmd, env=world[1], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "x.npz").is_file() and (tmp_path / "x.png").is_file()
    line = run_refused(world[1], tmp_path, SAMPLE, *cmd)
    assert "x.npz" in line and "--force" in line
