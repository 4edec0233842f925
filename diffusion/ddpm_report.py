"""The ddpm study's report (diffusion/ddpm_study.py is its plan): the samplers' table and README.md from the files
in --out alone (summary.json of diffusion/eval_samplers.py, the sample grids).

    python -m diffusion.ddpm_report --out results/ddpm     # rebuild the report from its files
"""
import json
from pathlib import Path

from common.report import report_command, write_readme, write_table

HEADER = ["sampler", None, "KID (mean ± std)", "n real / synthetic", "per group", "group variance (1/G)",
          "sampling time"]


def sampler_row(name, v, n_real):
    k, secs = v["kid"], v["seconds"]
    return [name, f"{v['fd']:.2f}", f"{k['mean']:.3g} ± {k['std']:.2g} (m={k['m']})", f"{n_real} / {v['n_fake']}",
            "; ".join(f"{g} {x['fd']:.2f} (n={x['n_real']}/{x['n_fake']})" for g, x in v["groups"].items()),
            f"{v['subgroup_variance']:.3f}", f"{secs:.0f} s ({secs / v['n_fake'] * 1000:.0f} ms/image)"]


def write_report(out):
    """samplers.md / .csv and README.md from out/summary.json."""
    out = Path(out)
    s = json.loads((out / "summary.json").read_text())
    label = s["metric"]
    rows = [sampler_row(name, v, s["n_real"]) for name, v in s["samplers"].items()]
    write_table(out / "samplers", [label if h is None else h for h in HEADER], rows,
                title=f"DDIM-50 (eta 0 and 1) vs DDPM-1000 ({s['data']}, {s['size']} px, step {s['step']})",
                notes=[s["kid_separation"],
                       "KID: unbiased MMD^2 with the kernel (x.y / d + 1)^3 on the same features, mean and std over "
                       "100 subsets of m images from each set (fairness/compare.py, Binkowski et al. 2018).",
                       f"{label}: Frechet distance on the penultimate features of a CNN trained on the real training "
                       "images, not Inception FID. n < 2048: biased upwards, compare only at equal n. Reference "
                       "(CIFAR-10 FID, DDIM paper Table 1): 50 steps eta 0 4.67, eta 1 8.01; 1000 steps eta 1 4.73."])
    write_readme(out, "Our conditional DDPM on NIH chest X-rays: does DDIM-50 sample as well as DDPM-1000?",
                 [s["kid_separation"]], ["samplers.md"],
                 notes=["Samples: samples_ddim50_eta0.png, samples_ddim50_eta1.png, samples_ddpm1000.png; training: "
                        "train_loss_curve.png, train_samples.png; the stage commands: stages.json."])
    print((out / "samplers.md").read_text())


if __name__ == "__main__":
    report_command(__doc__, write_report, "diffusion.ddpm_study",
                   needs=("summary.json",))
