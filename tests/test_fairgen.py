"""FairGen parts: resampling frequencies, the class-balancing loss, both DPO losses, the inverse-performance
weights (against hand-computed values) and the study's smoke chain; DPO moving a toy DDPM's samples toward a
preference is tested in tests/test_ddpm.py."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from classify.downstream import inverse_performance_weights
from diffusion.fairgen import cb_loss, dpo_diffusion, dpo_fairgen, sample_weights
from forkserver import python_m


@pytest.mark.parametrize("q", [1.0, 0.5])
def test_resampling_group_frequencies(q):
    """Group g is drawn with probability n_g^(1-q) / sum n^(1-q): equal for CBRS (q=1), sqrt(n_g) for SQRS."""
    counts = np.array([600, 150, 40, 10])
    cls = np.repeat(np.arange(4), counts)
    w = torch.as_tensor(sample_weights(cls, q))
    draws = 200_000
    got = np.bincount(cls[torch.multinomial(w, draws, replacement=True, generator=torch.Generator().manual_seed(0))],
                      minlength=4) / draws
    want = counts ** (1 - q) / (counts ** (1 - q)).sum()
    assert np.all(np.abs(got - want) < 4 * np.sqrt(want * (1 - want) / draws))
    assert np.allclose(sample_weights(cls, 0.0), 1.0)  # base: uniform


def test_gradient_aware_factor_is_off_by_default():
    cls = np.array([0, 0, 1])
    assert np.allclose(sample_weights(cls, 0.5, grad_norms=[1.0, 3.0], alpha=0.0), [2 ** -0.5, 2 ** -0.5, 1.0])
    w = sample_weights(cls, 0.5, grad_norms=[1.0, 3.0], alpha=1.0)  # G/mean G = 0.5, 1.5
    assert np.allclose(w, [2 ** -0.5 * 0.5, 2 ** -0.5 * 0.5, 1.5])


def test_cb_loss_by_hand():
    eps_y = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    eps_yp = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    t = torch.tensor([500, 250])
    # w = t/T = [.5, .25]; ||.||^2 (mean over pixels) = [(1+4)/2, (1+1)/2] = [2.5, 1]
    # L_reg = mean([.5*2.5, .25*1]) = .75 ; L_com is the same number (stop-gradient only changes gradients)
    assert cb_loss(eps_y, eps_yp, t, 1000, tau=1.0, gamma=0.25).item() == pytest.approx(0.75 * 1.25)
    a, b = eps_y.clone().requires_grad_(), eps_yp.clone().requires_grad_()
    cb_loss(a, b, t, 1000).backward()  # gradient to eps(x,y) from L_reg only, to eps(x,y') from gamma * L_com only
    assert torch.allclose(a.grad, (torch.tensor([.5, .25]).view(2, 1, 1, 1) * 2 * (eps_y - eps_yp) / 2 / 2))
    assert torch.allclose(b.grad, 0.25 * (torch.tensor([.5, .25]).view(2, 1, 1, 1) * 2 * (eps_yp - eps_y) / 2 / 2))


def test_cb_loss_skips_label_dropped_rows():
    """The class-balancing term of a batch is unchanged when label-dropped (null) rows are added to it, with the same
    x_t, t and y' for the labelled rows (CBDM applies the loss to conditioned samples only); averaged over the null
    rows too, it would change. A batch of null rows only has none."""
    from diffusion.fairgen import eps_and_cb_loss
    from diffusion.unet import UNet
    torch.manual_seed(0)
    K = 4
    net = UNet(1, 8, 8, (1, 2), 1, (), num_classes=K).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)  # a non-trivial eps predictor (the output layer starts at zero)
    g = torch.Generator().manual_seed(1)
    xt, t = torch.randn(7, 1, 8, 8, generator=g), torch.tensor([900, 500, 100, 700, 800, 300, 600])
    y_in, yp = torch.tensor([0, 1, 2, 3, K, K, K]), torch.tensor([3, 2, 1, 0, 1, 2, 3])
    with torch.no_grad():
        e4, cb4 = eps_and_cb_loss(net, xt[:4], t[:4], y_in[:4], yp[:4], K, 1000, 1.0, 0.25)
        e7, cb7 = eps_and_cb_loss(net, xt, t, y_in, yp, K, 1000, 1.0, 0.25)
        every_row = cb_loss(e7, net(xt, t, yp), t, 1000, 1.0, 0.25)  # what the loss was before: nulls included
        _, none = eps_and_cb_loss(net, xt[4:], t[4:], y_in[4:], yp[4:], K, 1000, 1.0, 0.25)
    assert cb4.item() > 0 and torch.allclose(cb7, cb4, rtol=1e-5, atol=1e-8)
    assert torch.allclose(e7[:4], e4, atol=1e-5)  # eps(x_t, y) of every row is still returned
    assert not torch.allclose(every_row, cb4, rtol=1e-3)
    assert none.item() == 0


def test_cxr_patient_ids_carry_their_source():
    """NIH and COVID-19 collection patients are numbered alike; in the combined cxr modality each id names its
    source, so that no two people share an id (the split and the patient bootstrap would merge them)."""
    from common.modalities import load_modality
    t = load_modality("cxr", 16).table
    nih = t["source"] == "NIH ChestX-ray14"
    assert t.loc[nih, "patient_id"].str.startswith("nih:").all()
    assert t.loc[~nih, "patient_id"].str.startswith("covid:").all() and (~nih).sum() > 0
    assert (t.groupby("patient_id")["source"].nunique() == 1).all()
    bare = lambda s: set(s.str.split(":").str[1])
    assert bare(t.loc[nih, "patient_id"]) & bare(t.loc[~nih, "patient_id"])  # the bare numbers do collide
    assert load_modality("nih", 16).table["patient_id"].str.isdigit().all()  # nih alone keeps its own ids


def test_rows_auroc_equals_auroc_ovr_on_resamples():
    """The comparisons' fast AUROC of a resample (rows repeated) equals fairness.metrics.auroc_ovr on the resampled
    rows, binary and multi-class, with ties and with a class missing from the resample."""
    from fairness.metrics import RowsAUROC
    from fairness.metrics import auroc_ovr
    rng = np.random.default_rng(0)
    for L in (2, 3, 5):
        y = rng.integers(0, L, 60)
        probs = np.round(rng.dirichlet(np.ones(L), 60), 1)  # rounded: many ties
        fast = RowsAUROC(y, probs)
        for rows in [rng.integers(0, 60, 60) for _ in range(20)] + [np.nonzero(y != 0)[0], np.arange(60)]:
            want = auroc_ovr(y[rows], probs[rows]) if len(set(y[rows])) > 1 else np.nan
            assert fast(rows) == pytest.approx(want, abs=1e-12, nan_ok=True)


def _preds(method, gen, down, wrong, rng, reweight=False, n=60):
    """Preds rows of one cell and replicate: 60 test images of two groups, a random `wrong` fraction of them
    misclassified."""
    y, g = np.arange(n) % 2, np.where(np.arange(n) < n // 2, "dark", "bright")
    pred = np.where(rng.random(n) < wrong, 1 - y, y)
    p1 = np.clip(0.5 + (2 * pred - 1) * rng.uniform(0.05, 0.45, n), 0, 1)
    return pd.DataFrame({"image": np.arange(n), "patient_id": [f"p{i}" for i in range(n)], "group": g, "label": y,
                         "pred": pred, "p_0": 1 - p1, "p_1": p1, "method": method, "reweight": reweight,
                         "generator": gen, "down_seed": down, "split_seed": 0})


def test_generators_pair_by_generator_and_vit_seed_and_are_resampled_as_a_level(tmp_path):
    """Two generators x two ViT seeds: method and base pair on (generator, seed), real only (no generator) pairs by
    seed with each generator; the bootstrap draws generators, then seeds within them: where fairgen's two generators
    differ (accuracy about 0.95 and 0.45), the same four values read as independent seeds of one generator give a
    narrower spread (about 1 / sqrt(2) of it: the mean of 4 draws of the values against 2 draws of the generators);
    a preds file from before generator replicates reads as one generator."""
    from diffusion.fairgen_compare import METHODS, _cell_arrays, comparisons_from_preds, paired_runs, read_preds
    rng = np.random.default_rng(0)
    rows = [_preds("real only", -1, d, 0.2, rng, rw) for rw in (False, True) for d in range(2)]
    rows += [_preds(m, g, d, (0.55 if g else 0.05) if m == "fairgen" else 0.2, rng, rw)
             for m in METHODS for rw in (False, True) for g in range(2) for d in range(2)]
    df = pd.concat(rows, ignore_index=True)
    runs = {m: _cell_arrays(df, m, False, 0)[3] for m in ("real only", "base", "fairgen")}
    pairs, groups = paired_runs(runs["fairgen"], runs["base"])
    assert [(a[3], b[3]) for a, b in pairs] == [((g, d), (g, d)) for g in range(2) for d in range(2)]
    assert groups == [0, 0, 1, 1]
    pairs, groups = paired_runs(runs["base"], runs["real only"])
    assert [(a[3], b[3]) for a, b in pairs] == [((g, d), (-1, d)) for g in range(2) for d in range(2)]

    def accuracy_row(frame):
        return next(c for c in comparisons_from_preds(frame, ["dark", "bright"], n_boot=400)
                    if (c["metric"], c["a"], c["b"]) == ("accuracy", "fairgen", "base"))
    nested = accuracy_row(df)
    flat = accuracy_row(df.assign(generator=np.where(df.method == "real only", -1, 0),
                                  down_seed=df.down_seed + 2 * df.generator.clip(0)))  # the same values, one generator
    assert nested["replicates"] == flat["replicates"] == 4 and nested["diff"] == pytest.approx(flat["diff"])
    assert "three-level" in nested["method"] and "two-level" in flat["method"]
    assert nested["se"] > 1.25 * flat["se"]
    df[df.generator <= 0].drop(columns="generator").to_csv(tmp_path / "preds.csv", index=False)
    old = read_preds(tmp_path / "preds.csv")
    assert set(old.loc[old.method == "real only", "generator"]) == {-1} and set(old.loc[old.method == "base",
                                                                                  "generator"]) == {0}


def test_the_report_resamples_its_cells_and_rows_in_forked_processes_with_the_plain_loops_numbers(monkeypatch):
    """Table 1, the paired comparisons and the permutation gaps (three groups) are the same, to the bit, whether
    map_forked spreads their cells and rows over two processes or one loop computes them."""
    import json
    import diffusion.fairgen_compare as fc
    rng = np.random.default_rng(1)
    rows = [_preds("real only", -1, d, 0.2, rng, rw) for rw in (False, True) for d in range(2)]
    rows += [_preds(m, g, d, 0.1 + 0.1 * g, rng, rw) for m in fc.METHODS for rw in (False, True) for g in range(2)
             for d in range(2)]
    df = pd.concat(rows, ignore_index=True)
    df["group"] = np.tile(np.repeat(["light", "medium", "dark"], 20), len(rows))

    def everything():
        return json.dumps([fc.table1_from_preds(df, 30), fc.comparisons_from_preds(df, ["light", "medium", "dark"],
                                                                                   30),
                           fc.gap_tables(df, ["light", "medium", "dark"], 30)], sort_keys=True)
    sizes = []
    real = fc.map_forked
    monkeypatch.setattr(fc, "map_forked", lambda fn, n: (sizes.append(n), real(fn, n, jobs=2))[1])
    forked = everything()
    assert sizes == [14, 4 * len(fc.PAIRS), 14]  # Table 1's cells; 4 metrics (max - min too) x pairs; the cells
    monkeypatch.setattr(fc, "map_forked", lambda fn, n: [fn(i) for i in range(n)])
    assert everything() == forked


def test_dpo_losses_by_hand():
    err_w, err_l = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.3])
    sig = lambda z: 1 / (1 + math.exp(-z))
    want = -(math.log(sig(0.5 * 0.2)) + math.log(sig(0.5 * -0.2))) / 2 + 0.35
    assert dpo_fairgen(err_w, err_l, lam=0.5).item() == pytest.approx(want, rel=1e-6)
    ref_w, ref_l = torch.tensor([0.25, 0.5]), torch.tensor([0.35, 0.2])
    # inside: -beta/2 [(err_w - ref_w) - (err_l - ref_l)] = -50 [(-0.05 - 0.05), (0 - 0.1)] = [5, 5]
    want = -math.log(sig(5.0))
    assert dpo_diffusion(err_w, err_l, ref_w, ref_l, beta=100.0).item() == pytest.approx(want, rel=1e-6)


def test_inverse_performance_weights():
    w = inverse_performance_weights({"F": 80.0, "M": 90.0})
    raw = np.array([1 / (80 + 1e-6), 1 / (90 + 1e-6)])
    assert w["F"] == pytest.approx(raw[0] / raw.sum()) and w["F"] > w["M"] and sum(w.values()) == pytest.approx(1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_vit_blocks_compute_the_transformer_layers_function(dropout):
    """The ViT runs nn.TransformerEncoderLayer's parameters through its own written-out forward (faster on a CPU):
    the same outputs and gradients as the module's forward in training and in evaluation; with dropout in training,
    the same as the module's attention with its weights returned (which draws its dropout masks in the same order),
    so every dropout sits where the module puts it. Checkpoint names are the module's."""
    from classify.nets import build

    def module_forward(net, x, masks_in_order=False):
        t = net.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([net.cls.expand(len(t), -1, -1), t], 1) + net.pos
        if not masks_in_order:
            return net.head(net.norm(net.blocks(t)[:, 0]))
        for layer in net.blocks.layers:  # the module's own parts, attention through its need_weights path
            h = layer.norm1(t)
            t = t + layer.dropout1(layer.self_attn(h, h, h, need_weights=True)[0])
            t = t + layer._ff_block(layer.norm2(t))
        return net.head(net.norm(t[:, 0]))

    torch.manual_seed(0)
    net = build("vit", 1, 3, 16, vit=dict(patch=4, dim=32, depth=2, heads=4, mlp=64, dropout=dropout)).double()
    assert {"blocks.layers.1.self_attn.in_proj_weight", "blocks.layers.0.linear2.bias"} <= set(net.state_dict())
    x = torch.randn(5, 1, 16, 16, dtype=torch.double)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        outs = []
        for forward in (lambda n, v: module_forward(n, v, dropout > 0 and mode == "train"), lambda n, v: n(v)):
            torch.manual_seed(1)
            y = forward(net, x)
            outs.append((y, torch.autograd.grad(y.square().sum(), list(net.parameters()))))
        (a, ga), (b, gb) = outs
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
        assert all(torch.allclose(u, v, atol=1e-10, rtol=0) for u, v in zip(ga, gb))
        if dropout and mode == "train":  # dropout did act
            assert not torch.allclose(b, net.eval()(x)) and net.train().training


def test_table_marks_a_gap_whose_ci_excludes_it():
    """Resampling inflates a max - min gap: two groups with equal accuracy give NAR 0 and a bootstrap CI above 0.
    Table 1 marks such a value instead of printing a CI that silently excludes it."""
    from diffusion.fairgen_report import fmt
    from fairness.metrics import bootstrap, group_accuracy, nar
    groups = np.repeat(["F", "M"], 40)
    y_true, y_pred = np.ones(80, int), np.tile([1, 0], 40)  # 50% correct in each group
    stat = lambda i: nar(group_accuracy(y_true[i], y_pred[i], groups[i]).values())
    lo, hi = bootstrap(stat, 80, n_boot=200)["value"]
    assert stat(np.arange(80)) == 0 and lo > 0
    assert fmt({"value": 0.0, "ci": [lo, hi]}, 1, 3).startswith("0.000\u2020 [")
    assert "\u2020" not in fmt({"value": 0.2, "ci": [0.1, 0.3]})


def test_fairgen_study_smoke_chain_and_resume(tmp_path):
    """The whole study on 160 toy images: summary.json holds the issue's keys with values and CIs in range; a second
    run reuses every stage (trained models, samples, the downstream classifiers) and writes the same numbers."""
    import json
    argv = ["--smoke", "--modalities", "toy:160", "--n-boot", "20", "--n-boot-compare", "40", "--out",
            str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--force"]
    first = python_m("diffusion.fairgen_study", argv, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    s1 = json.loads((tmp_path / "out/summary.json").read_text())
    assert s1["scale"] == "smoke" and "not physicians" in s1["judge"]
    t1 = s1["table1"]["toy:160"]
    assert set(t1) >= {"real only", "base", "fairgen", "fairgen + reweighting"}
    for metric in ("essp_acc", "dp", "eo", "nar", "accuracy"):
        v, (lo, hi) = t1["fairgen"][metric]["value"], t1["fairgen"][metric]["ci"]
        assert np.isfinite(v) and lo <= v + 1e-9 and v <= hi + 1e-9
    assert 0 <= t1["real only"]["accuracy"]["value"] <= 1
    down, gens = s1["preset"]["down_seeds"], s1["preset"]["gen_seeds"]
    assert down == 2 and gens == 2 and len(t1["fairgen"]["accuracy"]["seeds"]) == gens * down
    assert len(t1["real only"]["accuracy"]["seeds"]) == down  # no generator: its ViT seeds alone
    # per-image predictions: one row per test image, cell, generator and downstream seed; the comparisons come from
    # that file
    from diffusion.fairgen_compare import PAIRS, comparisons_from_preds, read_preds
    preds = read_preds(tmp_path / "out" / s1["preds"]["toy:160"])
    n_test = s1["modalities"]["toy:160"]["seed0"]["n_test"]
    assert len(preds) == (2 + 12 * gens) * down * n_test  # (real only + 6 methods x generators) x reweighting
    assert set(preds["down_seed"]) == set(range(down)) and set(preds["generator"]) == {-1, *range(gens)}
    # the generators differ in their images only (same ViT seeds): their predictions differ
    fg = preds[(preds.method == "fairgen") & ~preds.reweight & (preds.down_seed == 0)]
    assert not np.array_equal(*(fg[fg.generator == g].sort_values("image")["p_0"].to_numpy() for g in (0, 1)))
    assert {"image", "patient_id", "group", "label", "pred", "p_0", "p_1", "method", "reweight",
            "split_seed"} <= set(preds.columns)
    comps = s1["comparisons"]
    assert len(comps) == 3 * len(PAIRS) and {c["metric"] for c in comps} == \
        {"accuracy", "ESSP (accuracy)", "AUROC gap dark - bright"}
    for c in comps:
        assert {"metric", "a", "b", "diff", "ci", "p", "p_holm", "mde", "n_units", "replicates", "modality"} <= set(c)
        assert c["replicates"] == gens * down and c["n_units"] == n_test  # toy rows: no patient id, each its own unit
        assert c["method"].startswith("three-level bootstrap: 2 groups (generator seeds)")
        assert not np.isfinite(c["p"]) or c["p_holm"] >= c["p"] - 1e-12
    assert {("fairgen + reweighting", "base"), ("fairgen + reweighting", "fairdiffusion + reweighting"),
            ("fairdiffusion", "base")} <= {(c["a"], c["b"]) for c in comps}
    # the declared family: the signed gap of FairGen + reweighting vs base and vs FairDiffusion + reweighting
    assert {(c["metric"], c["a"], c["b"]) for c in comps if c["primary"]} == {
        ("AUROC gap dark - bright", "fairgen + reweighting", "base"),
        ("AUROC gap dark - bright", "fairgen + reweighting", "fairdiffusion + reweighting")}
    assert s1["primary_families"]["toy:160"]["primary_family_size"] == 2
    fb = s1["fair_bayes"]["toy:160"]  # FairDiffusion's sigma search, its figure beside the tables
    assert fb["groups"] == ["dark", "bright"] and all(0 <= v <= 1 for v in fb["sigma_last_step"] + fb["sigma_next"])
    assert fb["gp_updates"] == [2, 4] and (tmp_path / "out/fair_bayes_toy:160.png").stat().st_size > 10_000
    again = comparisons_from_preds(preds, ["dark", "bright"], 40)
    assert [(c["diff"], c["p_holm"]) for c in again] == [(c["diff"], c["p_holm"]) for c in comps]
    assert set(s1["answers"]["toy:160"]) == {"question", "essp", "gap", "question_fairdiffusion",
                                             "essp_vs_fairdiffusion", "gap_vs_fairdiffusion"}
    # KID and FD per subgroup at one n per modality
    kid = s1["kid"]["toy:160"]
    ms = {v["m"] for m in kid.values() for v in m.values()}
    assert set(kid) == {"base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "fairgen"} and len(ms) == 1
    assert all(set(m) == {"dark", "bright"} and all(v["n"] == v["m"] and np.isfinite(v["mean"]) for v in m.values())
               for m in kid.values())
    fd = s1["modalities"]["toy:160"]["seed0"]["fd"]
    assert ms == {fd["n_equal"]} and all(v["n"] == fd["n_equal"] for v in fd["base"]["groups_equal_n"].values())
    assert (tmp_path / "out/comparisons.md").is_file() and (tmp_path / "out/subgroup_fidelity.md").is_file()
    secs = s1["modalities"]["toy:160"]["seed0"]["seconds"]  # per phase, for the README's time budget
    assert {"generators", "sampling", "downstream", "downstream_table1", "downstream_sweep_vit", "total"} <= set(secs)
    phases = [v for k, v in secs.items() if not k.startswith("downstream_") and k != "total"]  # this process's
    assert 0 < secs["generators"] < secs["total"] and sum(phases) <= secs["total"] + 1e-6
    assert all(np.isfinite(s1["fid"]["toy:160"][m]) and s1["fid_var"]["toy:160"][m] >= 0
               for m in ("base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "fairgen"))
    from diffusion.annotate import load_pair_set  # the blinded expert evaluation's pair set, ready to serve
    bp = load_pair_set(tmp_path / "out/blinded_pairs/toy:160")
    assert bp["kind"] == "blinded" and {p["left_source"] for p in bp["pairs"]} | \
        {p["right_source"] for p in bp["pairs"]} == {"real", "base", "cbrs", "sqrs", "cbdm", "fairdiffusion", "fairgen"}
    assert all(p["left_source"] != p["right_source"] for p in bp["pairs"])
    second = python_m("diffusion.fairgen_study", argv, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    # fdnet; per generator its judge, pretrain, 6 fine-tunes, fairgen (DPO), 6 samples; the downstream classifiers
    # (generator 0's stage, and one for the further generators), the evaluation
    n_stages = 3 + 15 * gens + 1
    assert second.stdout.count("reuse ") == n_stages
    s2 = json.loads((tmp_path / "out/summary.json").read_text())
    assert s2["stages"] == s1["stages"] and len(s1["stages"]) == n_stages
    ft1 = [c for c in s1["stages"] if "diffusion.train_ddpm" in c and "--init" in c and "/gen1/" in c]
    assert len(ft1) == 6 and all("gen1/pretrain/ckpt.pt" in c for c in ft1)  # generator 1's own pretraining
    assert sum("diffusion.train_dpo" in c and "gen1/judge/ckpt.pt" in c for c in s1["stages"]) == 1  # and judge
    assert s1["stage_times"]["by_kind"]["not recorded"] == 0  # each stage's seconds, kept when it is reused
    assert s2["stage_times"] == s1["stage_times"] and s1["stage_times"]["by_kind"]["generator training"] > 0
    # --dry-run prints the stage commands the run executed, each a script of its own, and touches nothing
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    dry = python_m("diffusion.fairgen_study", [*argv, "--dry-run"], timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = [x for x in dry.stdout.splitlines() if "python -m " in x]
    assert [x.removeprefix("# reuse: ") for x in plan] == s1["stages"]
    assert all(x.startswith("# reuse: ") for x in plan)  # after a finished run, every stage would be reused
    assert all(c.split()[2] in {"classify.train_classifier", "diffusion.train_ddpm", "diffusion.train_dpo",
                                "diffusion.sample_ddpm", "diffusion.fairgen_downstream",
                                "diffusion.fairgen_eval"} for c in s1["stages"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert s2["table1"] == s1["table1"] and s2["fid"] == s1["fid"]
    assert s1["reused"] == [] and len(s2["reused"]) == n_stages
    # the two downstream stages write, together, the rows one stage for every generator writes, byte for byte
    down = [c.split()[3:] for c in s1["stages"] if "diffusion.fairgen_downstream" in c]
    assert len(down) == 2 and "--table-only" in down[1] and "--table-only" not in down[0]
    more = [f"{a} {b}" for a, b in zip(down[1], down[1][1:]) if a == "--samples"]
    assert more and all(x.split("=")[0].endswith("@1") for x in more)
    one = down[0][:down[0].index("--out-dir")] + " ".join(more).split() + ["--out-dir", str(tmp_path / "one")]
    single = python_m("diffusion.fairgen_downstream", one, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    parts = [Path(down[k][down[k].index("--out-dir") + 1]) / "preds.csv" for k in (0, 1)]
    a, b = (p.read_text().splitlines(keepends=True) for p in parts)
    assert a[0] == b[0] and "".join(a + b[1:]) == (tmp_path / "one/preds.csv").read_text()
    assert json.loads((tmp_path / "one/metrics.json").read_text())["sweep"] == \
        json.loads((parts[0].parent / "metrics.json").read_text())["sweep"]


def test_more_than_two_groups_get_a_signed_gap_first_minus_last_and_max_minus_min_as_exploratory():
    from diffusion.fairgen_compare import metric_functions, primary_keys
    f = metric_functions(["light", "medium", "dark"])
    assert list(f) == ["accuracy", "ESSP (accuracy)", "AUROC gap light - dark", "AUROC gap max - min"]
    g = np.array(["light"] * 3 + ["medium"] * 3 + ["dark"] * 3)
    auc = {0.9: [0, 1, 2], 0.5: [3, 4, 5], 0.7: [6, 7, 8]}  # a run's AUROC, here by the rows it is given

    def run_auc(rows):
        return next(v for v, r in auc.items() if set(rows) <= set(r))
    run = (None, None, run_auc)
    i = np.arange(9)
    assert f["AUROC gap light - dark"](None, g, run, i) == pytest.approx(0.9 - 0.7)
    assert f["AUROC gap max - min"](None, g, run, i) == pytest.approx(0.9 - 0.5)
    assert primary_keys(["light", "medium", "dark"])[0] == ("AUROC gap light - dark", "fairgen + reweighting", "base")
    # a declared group absent from the test set: the declared gap is undefined, never light - medium instead
    f = metric_functions(["light", "medium"], declared=["light", "medium", "dark"])
    assert "AUROC gap light - dark" in f and "AUROC gap light - medium" not in f
    assert np.isnan(f["AUROC gap light - dark"](None, g[:6], run, np.arange(6)))
