"""Same seed, same numbers, for each study's smoke chain, in the two parts a study is made of:
- every stage script writes the same file when its command runs again (each distinct script of the study's stage
  list is rerun, as a process of its own, into a fresh folder and its output compared with the one the study's
  run wrote, where the study forked its stages: common.stages.fork_stage), and
- the report is a function of the stage files alone (the study run again on the same stage folders reuses every
  stage and writes the same summary.json, wall times aside).
Together: a rerun of the whole study gives the same summary. Each study's test file calls it (test_chestxray.py,
test_medmnist.py, test_skintone.py), so that its smoke chain runs once, in the process that runs that file's other
tests; the fairgen study's repeat run is in test_fairgen.py."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np

from common.stages import GPU_NODE
from conftest import ROOT, SMOKE_FLAGS

STUDIES = {"chestxray": "classify.chestxray_study", "medmnist": "classify.medmnist_study",
           "skintone": "vae.skintone_study"}


def without_times(obj):
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in ("seconds", "wall_s", "stage_times")}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def same_output(a, b):
    """A stage's output files agree: preds.csv as text, a samples .npz array by array, metrics.json but times."""
    if a.suffix == ".npz":
        with np.load(a) as za, np.load(b) as zb:
            return all(np.array_equal(za[k], zb[k]) for k in za.files if k != "meta")
    if a.suffix == ".json":
        return without_times(json.loads(a.read_text())) == without_times(json.loads(b.read_text()))
    return a.read_text() == b.read_text()


def check_same_seed_same_numbers(study, smoke_study, tmp_path):
    out, runs, _ = smoke_study(STUDIES[study])
    record = json.loads((out / "stages.json").read_text())
    stages = record["stages"]
    if os.environ.get("OMP_NUM_THREADS") == "1" and sys.platform.startswith("linux") and not \
            os.path.exists(GPU_NODE):  # as `make test` runs: the study forked every stage
        starts = [t and t["start_s"] for t in record["stage_seconds"]]
        assert len(starts) == len(stages) and None not in starts and max(starts) < 0.5, starts  # (the run folder's
        # log holds other tests' stages too: compare adds chestxray's replicates there)
    rerun = {}
    for line in stages:  # the first stage of each script and condition (its --tag values), rerun elsewhere
        argv = shlex.split(line)
        key = (argv[2], *[argv[i + 1] for i, a in enumerate(argv) if a == "--tag" and "fold=" not in argv[i + 1]
                          and "repeat=" not in argv[i + 1] and "dataset=" not in argv[i + 1]])
        if key in rerun:
            continue
        module = "-".join(key)
        flag = "--out-dir" if "--out-dir" in argv else "--out"
        i = argv.index(flag) + 1
        original = argv[i]
        argv[i] = str(tmp_path / module / ("samples.npz" if flag == "--out" else ""))
        r = subprocess.run([sys.executable, "-m", *argv[2:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]  # a process of its own, as make runs a stage: the study forked
        # its stages from its own process where it could (common.stages.fork_stage), and must write the same files
        if flag == "--out":
            a, b = ROOT / original, tmp_path / module / "samples.npz"
        else:  # what the script writes: predictions, else samples, else its metrics
            name = next(n for n in ("preds.csv", "samples.npz", "metrics.json") if (ROOT / original / n).is_file())
            a, b = ROOT / original / name, tmp_path / module / name
        assert same_output(a, b), f"{line}: another run wrote other numbers"
        rerun[key] = line
    assert len(rerun) == {"chestxray": 6, "medmnist": 7, "skintone": 3}[study]  # every script and condition
    r = subprocess.run([sys.executable, "-m", STUDIES[study], "--smoke", *SMOKE_FLAGS[STUDIES[study]], "--out",
                        str(tmp_path / "again"), "--runs", str(runs)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reuse" in r.stdout and len(json.loads((tmp_path / "again/stages.json").read_text())["reused"]) == \
        len(stages)
    first, again = (without_times(json.loads((d / "summary.json").read_text())) for d in (out, tmp_path / "again"))
    assert first == again
