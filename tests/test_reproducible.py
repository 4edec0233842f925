"""Same seed, same numbers: each study's smoke chain, run twice into two folders, writes the same summary.json
(wall times aside). The fairgen study's repeat run is in test_fairgen.py (it resumes from its run folders)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

STUDIES = {"skintone": ["vae.skintone_study", "--smoke", "--no-pretrained"],
           "medmnist": ["classify.medmnist_study", "--smoke"],
           "chestxray": ["classify.chestxray_study", "--smoke"]}


def without_times(obj):
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in ("seconds", "wall_s")}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_same_seed_same_numbers(study, tmp_path):
    summaries = []
    for run in ("a", "b"):
        extra = ["--runs", str(tmp_path / f"runs_{run}")] if study == "chestxray" else []
        r = subprocess.run([sys.executable, "-m", *STUDIES[study], "--out", str(tmp_path / run), *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        summaries.append(without_times(json.loads((tmp_path / run / "summary.json").read_text())))
    assert summaries[0] == summaries[1]
