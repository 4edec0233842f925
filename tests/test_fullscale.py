"""The full-data path at a small size: bench/fullscale.py builds an NIH root of 1024 x 1024 PNGs under official
names and folders, decodes it at 224 px, and runs the full-scale chest X-ray study (DenseNet-121 at 224 px; two
conditions without the CVAE, which the 10,000-file bench run covers, to keep CI short) and fairgen's full-preset
DDPM on it, capped to a few steps. Noise-free pixels: PNGs that encode faster (the layout is what is tested)."""
import json
from pathlib import Path
import subprocess
import sys

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_full_scale_commands_run_on_a_simulated_nih_root_of_full_resolution_files(tmp_path):
    root, out = tmp_path / "nih", tmp_path / "fullscale.json"
    r = subprocess.run([sys.executable, "bench/fullscale.py", "--root", str(root), "--n", "150",
                        "--images-per-sex", "20", "--conditions", "imbalanced_real,imbalanced_reweight",
                        "--noise", "0", "--ddpm-steps", "1", "--skip", "steps", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    # the root: whole patients from the top of the official table, in the download's folders, at full resolution
    table = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    files = sorted(root.glob("images_*/images/*.png"))
    assert len(files) == len(table) == res["n"] and 100 <= res["n"] <= 150
    assert {f.name for f in files} == set(table["Image Index"]) and table["Image Index"].iloc[0] == "00000001_000.png"
    assert {f.parent.parent.name for f in files} == {"images_001"}  # the first archive holds the first 4,999
    assert table["Patient ID"].iloc[-1] != pd.read_csv(ROOT / "data/nih_cxr14/Data_Entry_2017_v2020.csv.gz",
                                                       nrows=res["n"] + 1)["Patient ID"].iloc[res["n"]]  # whole patients
    with Image.open(files[0]) as img:
        assert img.size == (1024, 1024) and img.mode == "L"
    # every image decoded once into a cache of n x 224 x 224, with one worker and with all
    for d in res["decode_224"]:
        assert d["n"] == res["n"] and d["shape"] == [res["n"], 224, 224]
        assert d["cache_bytes"] >= res["n"] * 224 * 224
    assert [res["n"], 224, 224] in [shape for _, shape in res["cache_files"].values()]
    # the capped full-scale runs finish and report
    assert res["chestxray_capped"]["exit"] == 0 and res["chestxray_capped"]["summary"]
    assert "--scale full" in res["chestxray_capped"]["command"]
    assert res["ddpm_capped"]["exit"] == 0 and "--width 64" in res["ddpm_capped"]["command"]
    assert res["audit"]["n_train"] > 0 and res["audit"]["n_synth"] == 1000


def test_measured_gpu_hours_divide_each_stage_by_its_network_rate_as_trained(tmp_path):
    """GPU-hours from bench/gpu_steps.py's rows: each network at the arithmetic `--amp auto` gives it (the other
    row ignored), an evaluated image a third of a training step."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fullscale import measured_gpu_hours
    rows = [{"net": n, "as_trained": t, "images_per_s": r} for n, t, r in [
        ("densenet121", True, 1000.0), ("densenet121", False, 1.0), ("cvae", True, 500.0), ("cvae", False, 1.0),
        ("unet64", True, 3200.0), ("unet64", False, 1.0)]]
    (tmp_path / "g.json").write_text(json.dumps({"gpu": "X", "rows": rows}))
    plan = {"classifier_train_image_steps": 3_600_000, "classifier_eval_images": 1_080_000, "cvae_image_steps": 360_000}
    m = measured_gpu_hours(plan, tmp_path / "g.json")
    assert abs(m["chestxray_gpu_hours"] - (3600 + 360 + 720) / 3600) < 1e-9  # 3.6M/1000 + 1.08M/3000 + 0.36M/500 s
    assert abs(m["fairgen_pretrain_gpu_hours"] - 20000 * 64 / 3200 / 3600) < 1e-9


def test_report_names_a_missing_measurement_file_in_one_line(tmp_path):
    for argv, flag in ((["--report", str(tmp_path / "none.json")], "--report"),
                       (["--report", "results/bench/fullscale_200.json", "--gpu", str(tmp_path / "g.json")], "--gpu")):
        r = subprocess.run([sys.executable, "bench/fullscale.py", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"fullscale.py: error: {flag} ") and "no such file" in last
