"""fairness/compare.py by simulation: coverage of the paired CIs for an AUROC difference and a two-group gap at known
true values, a uniform permutation p under the null, Holm by hand, and KID against torch-fidelity."""
import numpy as np
import pytest
from scipy.stats import kstest, norm

from fairness.compare import (gap_permutation, holm, kid, mde, paired_difference, paired_difference_replicates)
from fairness.metrics import auroc


def patients(rng, n_patients, shift_a, shift_b, group_shift=None):
    """Images of n_patients (1-3 each) with a patient effect shared by their images; scores of two conditions
    s = y * shift + u + e with var(u) + var(e) = 1, so the population AUROC is Phi(shift / sqrt(2)). group_shift:
    per-group shifts of condition A (a patient-level group), overriding shift_a."""
    sizes = rng.integers(1, 4, n_patients)
    pid = np.repeat(np.arange(n_patients), sizes)
    n = len(pid)
    y = rng.random(n) < 0.4
    u = rng.normal(0, np.sqrt(0.5), n_patients)[pid]
    group = np.repeat(rng.integers(0, 2, n_patients), sizes)
    shift = np.where(group == 1, group_shift[1], group_shift[0]) if group_shift else shift_a
    s_a = y * shift + u + rng.normal(0, np.sqrt(0.5), n)
    s_b = y * shift_b + u + rng.normal(0, np.sqrt(0.5), n)
    return pid, y, group, s_a, s_b


def true_auc(shift):
    return norm.cdf(shift / np.sqrt(2))


@pytest.mark.parametrize("shift_a,shift_b", [(1.0, 1.0), (1.2, 0.6)])
def test_paired_auroc_difference_covers_the_truth(shift_a, shift_b):
    rng = np.random.default_rng(1)
    truth, hits, widths = true_auc(shift_a) - true_auc(shift_b), [], []
    for _ in range(150):  # the percentile CI covers ~0.93 at 120 patients, ~0.95 at 240 (400 runs each)
        pid, y, _, s_a, s_b = patients(rng, 200, shift_a, shift_b)
        d = paired_difference(lambda i: auroc(y[i], s_a[i]), lambda i: auroc(y[i], s_b[i]), clusters=pid,
                              n_boot=300, seed=int(rng.integers(1 << 30)))
        hits.append(d["ci"][0] <= truth <= d["ci"][1])
        widths.append(d["ci"][1] - d["ci"][0])
    assert np.mean(hits) >= 0.9, np.mean(hits)
    assert np.median(widths) < 0.3  # informative, not a CI that covers by being huge


@pytest.mark.parametrize("shifts", [(1.0, 1.0), (1.4, 0.8)])
def test_signed_group_gap_covers_the_truth(shifts):
    """AUROC_F - AUROC_M, a signed gap between two groups, by the paired bootstrap (both groups in each resample)."""
    rng = np.random.default_rng(2)
    truth, hits = true_auc(shifts[1]) - true_auc(shifts[0]), []
    for _ in range(120):
        pid, y, g, s_a, _ = patients(rng, 160, None, 0.0, group_shift=shifts)
        d = paired_difference(lambda i: auroc(y[i][g[i] == 1], s_a[i][g[i] == 1]),
                              lambda i: auroc(y[i][g[i] == 0], s_a[i][g[i] == 0]), clusters=pid, n_boot=300,
                              seed=int(rng.integers(1 << 30)))
        hits.append(d["ci"][0] <= truth <= d["ci"][1])
    assert np.mean(hits) >= 0.9, np.mean(hits)


def test_permutation_p_is_uniform_under_the_null_and_small_under_an_effect():
    rng = np.random.default_rng(3)
    ps = []
    for _ in range(150):
        pid, y, g, s, _ = patients(rng, 80, None, 0.0, group_shift=(1.0, 1.0))
        r = gap_permutation(lambda i: auroc(y[i], s[i]), g, clusters=pid, n_perm=99, seed=int(rng.integers(1 << 30)))
        ps.append(r["p"])
    assert kstest(ps, "uniform").pvalue > 0.01
    assert 0.01 <= np.mean(np.array(ps) < 0.1) <= 0.2
    pid, y, g, s, _ = patients(rng, 300, None, 0.0, group_shift=(2.0, 0.2))
    r = gap_permutation(lambda i: auroc(y[i], s[i]), g, clusters=pid, n_perm=199, seed=0)
    assert r["p"] < 0.02 and r["excess"] > 0.2


def test_replicates_widen_the_ci():
    """Replicates that disagree (a seed effect) make the two-level CI wider than one replicate's."""
    rng = np.random.default_rng(4)
    reps = []
    for k in range(5):
        pid, y, _, s_a, s_b = patients(rng, 100, 1.0 + 0.3 * (k % 2), 1.0)
        reps.append((lambda i, y=y, s=s_a: auroc(y[i], s[i]), lambda i, y=y, s=s_b: auroc(y[i], s[i]), pid))
    two = paired_difference_replicates(reps, n_boot=300)
    one = paired_difference(reps[0][0], reps[0][1], clusters=reps[0][2], n_boot=300)
    assert two["replicates"] == 5 and two["se"] > 0 and np.isfinite(two["diff"])
    assert two["ci"][0] <= two["diff"] <= two["ci"][1]
    assert one["mde"] == pytest.approx((1.959964 + 0.841621) * one["se"], rel=1e-4) == mde(one["se"])


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_kid_equals_torch_fidelity():
    torch = pytest.importorskip("torch")
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 64)).astype(np.float32)
    b = (rng.normal(size=(260, 64)) * 1.2 + 0.1).astype(np.float32)
    ref = metric_kid.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20,
                                            kid_subset_size=100, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                            rng_seed=2020, verbose=False)
    ours = kid(a, b, n_subsets=20, subset_size=100, seed=2020)
    assert ours["mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-3) and ours["m"] == 100
    same = kid(a[:150], a[150:], n_subsets=20, subset_size=100)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3  # unbiased: about 0 for one distribution
