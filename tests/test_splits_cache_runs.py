"""Patient-level splits, the image cache, run bookkeeping and the table/grid writers."""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common.cache
from common.cache import load_images
from common.data import PROJECT_DATA, read_nih
from common.errors import DataError
from common.report import mean_std, save_grid, write_table
from common.runs import (check_finite, load_checkpoint, prepare_out_dir, save_checkpoint, seed_everything,
                         write_config)
from common.splits import assert_disjoint, patient_kfold, patient_split
from conftest import write_png


def test_nih1000_own_split_leaks_and_ours_does_not():
    t = read_nih()
    own = pd.read_csv(PROJECT_DATA / "nih_cxr14/labels.csv").set_index("Image Index").loc[
        t["image"].str.rsplit("/", n=1).str[1], "split"].to_numpy()
    with pytest.raises(AssertionError, match="more than one split"):
        assert_disjoint(t, own)  # the source's split column puts patients in two splits: never use it
    for seed in range(3):
        split = patient_split(t, seed=seed, stratify="sex")
        assert_disjoint(t, split)
        for name, frac in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
            n_pat = t["patient_id"][split == name].nunique()
            assert abs(n_pat / 264 - frac) < 0.03
            pat = t[split == name].drop_duplicates("patient_id")
            assert abs((pat["sex"] == "F").mean() - 0.5) < 0.1  # stratified: about half the patients female


def test_split_is_seeded_and_stratified():
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"patient_id": np.repeat([f"p{i}" for i in range(200)], 3),
                      "sex": np.repeat(rng.choice(["F", "M"], 200, p=[0.2, 0.8]), 3)})
    a, b, c = (patient_split(t, seed=s, stratify="sex") for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()
    for name in ("train", "val", "test"):
        pf = t["patient_id"][(a == name) & (t["sex"] == "F").to_numpy()].nunique()
        pall = t["patient_id"][a == name].nunique()
        assert abs(pf / pall - 0.2) < 0.05  # each split keeps the 20% female patient mix


def test_kfold_tests_every_row_once_and_keeps_patients_whole():
    t = read_nih()
    fold = patient_kfold(t, k=5, seed=0, stratify="sex")
    assert set(fold) == set(range(5))
    assert_disjoint(t, fold)
    sizes = np.bincount(fold)
    assert sizes.min() > 100  # reasonably even
    no_id = pd.DataFrame({"patient_id": [None] * 10})
    assert sorted(np.bincount(patient_kfold(no_id, k=5))) == [2] * 5  # rows without ids are their own groups


def test_cache_decodes_once(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    arrays = [write_png(p, size=40, seed=i) for i, p in enumerate(paths)]
    x, ok = load_images(paths, 40)
    assert ok.all() and all((x[i] == arrays[i]).all() for i in range(4))
    small, _ = load_images(paths, 20)  # another size is another cache entry
    assert small.shape == (4, 20, 20) and len(list(common.cache.CACHE_DIR.glob("*.ok.npy"))) == 2
    assert isinstance(x, np.memmap)  # mapped from the cache file, not read into memory
    monkeypatch.setattr(common.cache, "decode_file", lambda job: pytest.fail("re-read a PNG"))
    x2, _ = load_images(paths, 40)  # from the cache: the PNGs are never opened again
    assert (x2 == x).all()


def test_cache_decodes_in_worker_processes_as_in_one(tmp_path):
    """Above pool_min files the images are decoded by a process pool and written into the memory map as they
    arrive: the same array as one process decodes, unreadable files flagged at their own rows."""
    paths = [tmp_path / f"{i}.png" for i in range(12)]
    for i, p in enumerate(paths):
        write_png(p, size=24 + i, seed=i)
    paths[5].write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="1 of 12"):
        one, ok1 = load_images(paths, 16, cache_dir=tmp_path / "one", workers=1)
        pool, ok2 = load_images(paths, 16, cache_dir=tmp_path / "pool", workers=2, pool_min=3)
    assert np.array_equal(one, pool) and ok1.tolist() == ok2.tolist() == [i != 5 for i in range(12)]
    assert one[0].std() > 10 and not one[5].any()


def test_cache_resize_crop_and_rgb(tmp_path):
    from PIL import Image
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, 15:45] = 200  # the centre square is bright, the sides dark
    Image.fromarray(a).save(tmp_path / "wide.png")
    x, _ = load_images([tmp_path / "wide.png"], 10, "RGB")
    assert x.shape == (1, 10, 10, 3) and (x == 200).all()  # centre-cropped, then box-filtered


def test_unreadable_images_are_counted_or_fatal(tmp_path):
    good = tmp_path / "good.png"
    write_png(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match=r"1 of 3 images could not be read.*bad.png"):
        x, ok = load_images([good, bad, good], 16)
    assert ok.tolist() == [True, False, True]
    with pytest.raises(DataError, match="bad.png"):
        load_images([good, bad], 16, strict=True)


def test_checkpoint_atomic_and_weights_only(tmp_path):
    state = {"model": {"w": torch.randn(3)}, "args": {"lr": 0.1, "name": "x"}, "step": 7}
    path = tmp_path / "run" / "ckpt.pt"
    save_checkpoint(state, path)
    assert not list(path.parent.glob("*.tmp"))
    back = load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], state["model"]["w"])
    torch.save({"obj": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")  # weights_only refuses arbitrary pickles
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_run_folder_is_never_silently_overwritten(tmp_path):
    from common.runs import settle_replaced
    out = prepare_out_dir(tmp_path / "r")
    (out / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match="--force"):
        prepare_out_dir(out)
    with pytest.raises(DataError, match="no run"):  # --resume continues only runs of ours
        prepare_out_dir(out, resume=True)
    with pytest.raises(DataError, match="no run of ours"):  # --force replaces only folders holding config.json
        prepare_out_dir(out, force=True)
    with pytest.raises(DataError, match="--resume"):
        prepare_out_dir(out, force=True, resume=True)
    assert (out / "metrics.json").read_text() == "{}"
    (out / "config.json").write_text('{"args": {}, "argv": [], "git_commit": "x"}')
    prepare_out_dir(out, resume=True)
    assert (out / "metrics.json").exists()
    prepare_out_dir(out, force=True)  # the old run is moved aside ...
    assert not (out / "metrics.json").exists()
    (out / "config.json").write_text('{"args": {"new": 1}, "argv": [], "git_commit": "x"}')
    settle_replaced(ok=False)  # ... and put back when the command fails (here on bad input: nothing new to keep)
    assert (out / "metrics.json").read_text() == "{}" and '"new"' not in (out / "config.json").read_text()
    prepare_out_dir(out, force=True)
    settle_replaced(ok=True)  # ... or deleted when it succeeds
    assert not any(out.iterdir()) and [p.name for p in tmp_path.iterdir()] == ["r"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare_out_dir(tmp_path / "f", force=True)


def test_default_run_trees_differ_per_out(tmp_path, monkeypatch):
    from common.runs import default_runs
    monkeypatch.chdir(tmp_path)
    trees = {default_runs(o) for o in ("results/chestxray", "smoke/chestxray", "results-full/chestxray",
                                       "/elsewhere/chestxray", "/other/chestxray")}
    assert len(trees) == 5 and Path("runs/smoke/chestxray") in trees


def test_config_and_seeding(tmp_path):
    cfg = write_config(tmp_path, argparse.Namespace(lr=0.1), data="nih1000", weights="none")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["args"] == {"lr": 0.1} and saved["data"] == "nih1000" and saved["torch"] == torch.__version__
    assert saved["git_commit"] and cfg["weights"] == "none"
    seed_everything(3)
    a = (np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert a == (np.random.rand(), torch.rand(1).item())
    with pytest.raises(DataError, match="loss is nan at step 5"):
        check_finite(torch.tensor(float("nan")), 5)


def test_table_and_grid_writers(tmp_path):
    md = write_table(tmp_path / "t", ["a", "b"], [[1, mean_std([0.5, 0.7])]], title="T", notes=["a note"],
                     command="make x")
    text = md.read_text()
    assert "| a | b |" in text and "0.600 ± 0.141 (n=2)" in text and "Made by `make x` at commit" in text
    assert pd.read_csv(tmp_path / "t.csv").shape == (1, 2)
    img = torch.rand(6, 1, 8, 8) * 2 - 1
    from PIL import Image
    save_grid(img, tmp_path / "g.png", nrow=2)
    assert Image.open(tmp_path / "g.png").size == (3 * 10 + 2, 2 * 10 + 2)
    save_grid(img, tmp_path / "g2.png", nrow=2, title="phantom grid")
    assert Image.open(tmp_path / "g2.png").size[0] > 100


def test_readme_shows_each_paragraph_once(tmp_path):
    """A table note that is also an answer, and the footer every table shares with the page, appear once; a table's
    own notes and a footer that differs (another command) stay."""
    from common.report import footer, write_readme
    write_table(tmp_path / "a", ["x"], [[1]], title="A", notes=["the answer.", "a note of A."])
    write_table(tmp_path / "b", ["x"], [[2]], title="B", notes=["a note of A.", "a note of B."], command="make b")
    (tmp_path / "c.md").write_text("the answer.\n\n" + footer() + "\n")  # nothing new: no empty section for it
    text = write_readme(tmp_path, "Q?", ["the answer."], ["a.md", "b.md", "c.md"], notes=["a note of B.", "closing."]
                        ).read_text()
    assert "\n\n\n" not in text
    assert [text.count(s) for s in ("the answer.", "a note of A.", "a note of B.", "closing.", "## A", "## B")] == \
        [1] * 6
    assert text.count(footer()) == 1 and text.rstrip().endswith(footer()) and text.count("Made by `make b`") == 1


def test_a_rebuilt_report_names_the_run_that_made_its_predictions(tmp_path, monkeypatch):
    """A report rebuilt from a finished run's files (python -m <study>_report --out DIR) names, beside its own
    command and commit, the study command and commit in DIR/config.json, in every footer it writes."""
    from common import report
    monkeypatch.setattr(report, "RAN", {})
    (tmp_path / "config.json").write_text(json.dumps({"argv": ["classify/compare_study.py", "--out", "results/x y"],
                                                      "git_commit": "3a20132"}))
    assert "from the run" not in report.footer()
    report.rebuilt_from(tmp_path)
    made = report.footer("python -m classify.compare_report --out results/x")
    assert made.startswith("Made by `python -m classify.compare_report --out results/x` at commit ")
    assert made.endswith(", from the run of `python -m classify.compare_study --out 'results/x y'` at commit 3a20132.")
    assert report.write_table(tmp_path / "t", ["x"], [[1]]).read_text().rstrip().endswith("at commit 3a20132.")


def test_failed_forced_run_keeps_its_work(tmp_path, capsys):
    """A long run that fails late under --force gets the old run back and keeps its own checkpoints aside;
    clinicians' answers are never replaced. (A study's stages are processes of their own: each settles its own.)"""
    from common.runs import settle_replaced
    run_config = '{"args": {}, "argv": [], "git_commit": "x"}'
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(run_config)
    (out / "ckpt.pt").write_text("old")
    prepare_out_dir(out, force=True)
    (out / "config.json").write_text(run_config)
    (out / "ckpt.pt").write_text("new, 10 hours of training")
    settle_replaced(ok=False)
    assert (out / "ckpt.pt").read_text() == "old"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.failed-")]
    assert len(kept) == 1 and (kept[0] / "ckpt.pt").read_text() == "new, 10 hours of training"
    assert "unfinished run is in" in capsys.readouterr().err
    (out / "pairs").mkdir()
    (out / "pairs/answers.csv").write_text("time,annotator\n")
    with pytest.raises(DataError, match="clinicians' answers"):
        prepare_out_dir(out, force=True)
    (tmp_path / "notours").mkdir()
    (tmp_path / "notours/config.json").write_text('{"model_type": "bert"}')  # another tool's config.json
    (tmp_path / "notours/weights.bin").write_text("x")
    with pytest.raises(DataError, match="no run of ours"):
        prepare_out_dir(tmp_path / "notours", force=True)
