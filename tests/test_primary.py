"""Tests that can reject: declared primary families with Holm over them alone, an MDE at the first Holm step, a
smallest attainable Holm p below 0.01 for every declared family; and the planted positive control's data."""
import json
import sys

import numpy as np
from PIL import Image
import pytest

from classify import chestxray_report, chestxray_study
from common.data import read_nih
from fairness.compare import answer, family_facts, holm, mde, min_holm_p, with_holm
from fairness.plant import affected_patients, parse_plant
from conftest import ROOT
from forkserver import python_m


def row(metric, a, p, se=0.01):
    return {"metric": metric, "a": a, "b": "base", "diff": 0.1, "ci": [0.0, 0.2], "p": p, "mde": mde(se), "se": se}


def test_holm_runs_over_the_declared_family_alone():
    rows = [row("x", "a", 0.01), row("y", "a", 0.02), row("x", "b", 0.001), row("y", "b", 0.5)]
    out = with_holm(rows, primary=[("x", "a", "base"), ("y", "a", "base")])
    assert [r["primary"] for r in out] == [True, True, False, False]
    assert [r["p_holm"] for r in out[:2]] == pytest.approx(holm([0.01, 0.02]))  # not diluted by the other rows
    assert [r["p_holm"] for r in out[2:]] == pytest.approx(holm([0.001, 0.5]))
    assert all(r["family_size"] == 2 for r in out)
    # the MDE is taken at the family's first Holm step: alpha 0.05 / 2, so larger than the unadjusted one
    assert out[0]["mde"] == pytest.approx((2.241403 + 0.841621) * 0.01, rel=1e-5) and out[0]["mde"] > mde(0.01)
    facts = family_facts(out, 1000)
    assert facts == {"primary_family_size": 2, "n_boot": 1000, "min_holm_p": pytest.approx(4 / 1001)}
    with pytest.raises(AssertionError, match="missing"):
        with_holm(rows, primary=[("z", "a", "base")])
    # undeclared: one family of every row, as before
    assert [r["p_holm"] for r in with_holm(rows)] == pytest.approx(holm([r["p"] for r in rows]))


@pytest.mark.parametrize("scale", ["quick", "full"])
def test_declared_primary_families_can_reject(scale):
    """The smallest Holm p each declared family can reach with its scale's resamples is below 0.01, and the fairness
    outcome among its primaries is the signed gap, never |gap|."""
    from classify import compare_report, compare_study
    families = {"chestxray": ([key for key, _ in chestxray_report.QUESTIONS], chestxray_study.SCALES),
                "compare": (compare_report.primary_keys(list(compare_report.ROWS)), compare_study.SCALES)}
    for study, (keys, scales) in families.items():
        assert min_holm_p(len(keys), scales[scale]["n_boot"]) < 0.01, study
        metrics = {key[0] for key in keys}
        assert "AUROC gap (M - F)" in metrics and "|AUROC gap|" not in metrics, study


def test_sign_flip_p_is_exact_and_skintone_has_the_repeats_to_reject():
    """The exact sign-flip p over repeats, by hand; skintone's quick and full families (p over repeats, not
    resamples) reach a Holm p below 0.01, which 6 repeats could not."""
    from fairness.compare import family_facts, sign_flip_p
    from vae import skintone_report, skintone_study
    assert sign_flip_p([0.1] * 10) == pytest.approx(2 / 1024)  # only all-plus and all-minus reach |mean| 0.1
    assert sign_flip_p([1.0, -1.0]) == 1.0
    # [3, 1, 1]: only (+ + +) and (- - -) of the 8 sign patterns reach |mean| 5/3; [3, -1, -1]: all 8 reach 1/3
    assert sign_flip_p([3.0, 1.0, 1.0]) == pytest.approx(2 / 8) and sign_flip_p([3.0, -1.0, -1.0]) == 1.0
    rng = np.random.default_rng(0)
    v = rng.normal(0.3, 1, 8)  # against brute force over the 256 patterns
    brute = np.mean([abs(np.mean(v * s)) >= abs(v.mean()) - 1e-12
                     for s in np.array(np.meshgrid(*[[1, -1]] * 8)).reshape(8, -1).T])
    assert sign_flip_p(v) == pytest.approx(brute)
    # the CI inverts the same test: it excludes 0 exactly when p <= 0.05, and holds the shifts the test keeps
    from fairness.compare import sign_flip_test
    for v in (rng.normal(0.01, 0.01, 10), rng.normal(0.004, 0.01, 10), rng.normal(0, 0.01, 10)):
        d = sign_flip_test(v)
        assert (d["ci"][0] > 0 or d["ci"][1] < 0) == (d["p"] <= 0.05) and d["df"] == 9
        assert sign_flip_p(v - d["ci"][0]) > 0.05 and sign_flip_p(v - (d["ci"][0] - 0.001)) <= 0.05
    assert sign_flip_test([0.1, 0.2, 0.3])["ci"] == [-np.inf, np.inf]  # 3 values: p >= 1/4, nothing is rejected
    rows = [{**row(m, a, 0.01), "b": b} for m, a, b in skintone_report.PRIMARY]
    for scale in ("quick", "full"):
        repeats = skintone_study.SCALES[scale]["repeats"]
        facts = family_facts(with_holm(rows, primary=skintone_report.PRIMARY), 1000, sign_flip_units=repeats)
        assert facts["primary_family_size"] == 4 and facts["min_holm_p"] < 0.01, scale
    assert family_facts(with_holm(rows, primary=skintone_report.PRIMARY), 1000, sign_flip_units=6)["min_holm_p"] \
        == pytest.approx(0.125)
    six = with_holm([{**r, "df": 5} for r in rows], primary=skintone_report.PRIMARY)  # 6 repeats: MDE infinite
    assert all(r["mde"] == np.inf for r in six) and "too few replicates" in answer(six[0], "x")
    ten = with_holm([{**r, "df": 9} for r in rows], primary=skintone_report.PRIMARY)  # t(9) quantiles, not z
    assert ten[0]["mde"] == pytest.approx((3.1109 + 0.8834) * 0.01, rel=1e-3)


def test_fairgen_declares_two_signed_gap_rows_per_modality_that_can_reject():
    from diffusion import fairgen_compare, fairgen_study
    keys = fairgen_compare.primary_keys(["F", "M"])
    assert len(keys) == 2 and {k[0] for k in keys} == {"AUROC gap F - M"}
    for argv in ([], ["--scale", "full"]):
        assert min_holm_p(len(keys), fairgen_study.parse_args(argv).n_boot_compare) < 0.01, argv
    # the smoke chain resamples 50 times (a check that the chain runs, not an answer); a flag still wins
    smoke = fairgen_study.parse_args(["--smoke"])
    assert (smoke.n_boot, smoke.n_boot_compare) == (50, 50) and min_holm_p(len(keys), 50) > 0.01
    assert fairgen_study.parse_args(["--smoke", "--n-boot-compare", "999"]).n_boot_compare == 999


def test_resampling_p_has_the_plus_one_and_a_nan_cannot_shrink_a_family():
    from fairness.compare import _p_two_sided
    assert _p_two_sided(np.ones(999)) == pytest.approx(2 / 1000)  # no resample crosses 0: 2 (1 + 0) / (n + 1)
    assert _p_two_sided(np.r_[np.ones(99), -np.ones(1)]) == pytest.approx(2 * 2 / 101)
    rows = [row("x", "a", 0.01), row("y", "a", float("nan"))]
    out = with_holm(rows, primary=[("x", "a", "base"), ("y", "a", "base")])
    assert out[0]["family_size"] == 2 and out[0]["p_holm"] == pytest.approx(0.02) and np.isnan(out[1]["p_holm"])
    assert np.isnan(min_holm_p(0, 1000))


def test_parse_plant_refuses_what_it_cannot_plant():
    assert parse_plant("invert:0.5") == ("invert", 0.5) and parse_plant("blur:2") == ("blur", 2.0)
    for bad in ("invert", "invert:x", "invert:1.5", "sharpen:1", "noise:-0.1"):
        with pytest.raises(Exception):
            parse_plant(bad)


def test_plant_writes_what_it_says_and_strength_zero_changes_nothing(tmp_path):
    src = ROOT / "data" / "nih_cxr14"
    t = read_nih(src)
    women = t[t["sex"] == "F"]
    for spec in ("invert:0", "invert:0.5", "noise:0.1", "lesion:0.3"):
        r = python_m("fairness.plant", ["--data-root", str(src), "--plant", spec, "--out",
                                        str(tmp_path / spec)], timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    null, inv, noise, spot = (tmp_path / s for s in ("invert:0", "invert:0.5", "noise:0.1", "lesion:0.3"))
    facts = json.loads((inv / "plant.json").read_text())
    chosen = set(affected_patients(women["patient_id"], 0.5, 0))
    assert facts["affected_patients"] == sorted(chosen) and len(chosen) == round(0.5 * women["patient_id"].nunique())
    for image, patient, sex, healthy in zip(t["image"], t["patient_id"], t["sex"], t["label:No Finding"]):
        name = image.split("/")[-1]
        a = np.asarray(Image.open(image))
        c = np.asarray(Image.open(spot / "images" / name), float)  # a dark spot on women with a finding, only there
        if sex == "F" and not healthy:
            assert 0.05 * 255 < (a - c).max() <= 0.3 * 255 + 1 and (c <= a).all()
        else:
            assert np.array_equal(c, a)
        assert (null / "images" / name).read_bytes() == (src / "images" / name).read_bytes()  # the planted null
        b = np.asarray(Image.open(inv / "images" / name))
        assert np.array_equal(b, 255 - a) if (sex == "F" and patient in chosen) else np.array_equal(b, a)
        if sex == "M":  # the other group's images are the originals, byte for byte
            assert (noise / "images" / name).read_bytes() == (src / "images" / name).read_bytes()
    noisy = [np.abs(np.asarray(Image.open(noise / "images" / i.split("/")[-1]), float) -
                    np.asarray(Image.open(i), float)).mean() for i in women["image"][:20]]
    assert 10 < np.mean(noisy) < 40  # sd 0.1 x 255 ~ 25 grey levels: mean |noise| ~ 20 before clipping
    assert (null / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()


def test_chestxray_planted_dry_run_plants_first_and_reads_the_copy(tmp_path):
    r = python_m("classify.chestxray_study", ["--smoke", "--plant", "invert:1", "--dry-run", "--out",
                                              str(tmp_path / "out"), "--runs", str(tmp_path / "runs")], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("python -m")]
    copy = str(tmp_path / "runs" / "planted_data")
    assert lines[0].startswith("python -m fairness.plant") and "--plant invert:1 --group F" in lines[0]
    assert all(f"--data-root {copy} " in l for l in lines[1:] if "train_" in l)
    assert not (tmp_path / "out").exists()


def test_planted_power_counts_yes_by_its_rule_and_states_the_monte_carlo_error():
    """bench/planted_power.py's summary: a repeat says yes on a planted row only with Holm p < 0.05 and a positive
    female AUROC difference, on the null row with either sign; the rate comes with its exact binomial CI."""
    sys.path.insert(0, str(ROOT / "bench"))
    import planted_power
    args = planted_power.parse_args(["--strengths", "0.2"])
    yes, no_small, no_neg = [0.05, 0.01, 0.02, 0.02], [0.05, 0.03, 0.06, 0.02], [-0.05, 0.01, 0.02, 0.02]
    gap = [0.0, 0.5, 1.0, 0.03]
    records = [{"null": [no_neg, gap], "0": [no_small, gap], "0.2": [yes, gap]} for _ in range(8)]
    records += [{"null": [no_small, gap], "0": [no_neg, gap], "0.2": [no_small, gap]}]
    records += [{"null": [no_small, no_neg], "0": [no_neg, gap], "0.2": [no_small, no_neg]}]  # the gap row alone
    rows = {r["run"]: r for r in planted_power.summarise(records, args)}
    assert rows["0.2"]["yes"] == 8 and rows["0.2"]["rate"] == 0.8 and rows["0"]["yes"] == 0
    assert rows["null"]["yes"] == 9  # on the null either row, either sign, counts (the family-wise rate)
    assert rows["0.2"]["ci"] == pytest.approx([0.4439, 0.9748], abs=1e-3)  # Clopper-Pearson for 8 of 10
    assert rows["0.2"]["mc_se"] == pytest.approx(np.sqrt(0.8 * 0.2 / 10))
    for bad in (["--strengths", "0,0.2"], ["--strengths", "a"], ["--kind", "blur", "--strengths", "30"]):
        with pytest.raises(SystemExit):
            planted_power.parse_args(bad)
