"""The compare study's generator stages (classify/compare_study.py is the plan): per fold and generator seed, each
family's training on the fold's pool and its samples (the CVAE: chestxray's for seed 0, its recorded command
reseeded after it), the class counts a sampler is asked for, and the ratio sweep's samples."""
from dataclasses import dataclass
from pathlib import Path

from classify.cxr_task import FEMALE, MALE
from common.errors import DataError
from common.stages import recorded_argv

SAMPLERS = {"ae": "vae.sample_conv_ae", "gan": "gan.sample_dcgan", "ddpm": "diffusion.sample_ddpm",
            "ddpm_finding": "diffusion.sample_ddpm"}  # the class-conditional families' samplers


@dataclass(frozen=True)
class Generators:
    """What every generator stage of one run shares: the run tree, seed and device, the data flags, and the
    scale's generator and sampler settings."""
    runs: Path
    seed: int
    device: str
    root_argv: tuple
    finding_only: str
    ae_epochs: int
    gan_steps: int
    gan_width: int
    ddpm_steps: int
    ddpm_size: int
    ddpm_width: int
    ddpm_mults: str
    ddpm_num_res: int
    ddpm_attn_res: int
    sample_steps: int
    guidance: float


def class_counts(n, pool_sex_finding, sex):
    """--class-counts for n images of one sex, the findings in that sex's pool proportion."""
    n_fin = int(round(n * pool_sex_finding.mean())) if len(pool_sex_finding) else n // 2
    return f"{sex}|No Finding={n - n_fin},{sex}|finding={n_fin}"


def mixed_counts(n, pool_finding, pool_sex):
    """--class-counts for n images with the findings of the pool's women and, per finding class, the sex drawn in
    the pool's proportion (a finding-only request of a sex x finding model)."""
    fem = pool_finding[pool_sex == FEMALE]
    n_fin = int(round(n * fem.mean())) if len(fem) else n // 2
    parts = []
    for label, m, is_fin in (("No Finding", n - n_fin, False), ("finding", n_fin, True)):
        share_f = (pool_sex[pool_finding == is_fin] == FEMALE).mean() if (pool_finding == is_fin).any() else 0.5
        n_f = int(round(m * share_f))
        parts += [f"{FEMALE}|{label}={n_f}", f"{MALE}|{label}={m - n_f}"]
    return ",".join(parts)


def generator_folder(r, family, gs=0):
    """A family's generator folder of fold folder r, generator seed gs: <family> for seed 0, <family>_seed<gs>
    after it (the CVAE: chestxray's cvae for seed 0)."""
    name = {"vae": "cvae"}.get(family, family)
    return r / (name if gs == 0 else f"{name}_seed{gs}")


def generator_seed(g, k, gs):
    """Fold k's generator seed gs (seed 0: the seed of a run without generator seeds)."""
    return g.seed * 100 + k + 10000 * gs


def cvae_stages(stages, r, seed, device, n, gs):
    """Generator seed gs of fold folder r's CVAE: chestxray's CVAE stage (its recorded command) with another seed,
    and its n female samples. Returns the samples file."""
    argv = recorded_argv(r / "cvae" / "config.json")
    if argv is None:
        raise DataError(f"{r / 'cvae'}: chestxray's CVAE of this fold has not run; finish the chestxray run first")
    folder = generator_folder(r, "vae", gs)
    argv = [str(seed) if i and argv[i - 1] == "--seed" else str(folder) if i and argv[i - 1] == "--out-dir" else a
            for i, a in enumerate(argv)]
    stages.script("vae.train_cvae", argv, folder, deps=[r / "sets.csv"])
    out = folder / "synth.npz"
    stages.samples("vae.sample_cvae", ["--ckpt", folder / "ckpt.pt", "--n", n, "--seed", seed, "--device", device,
                                       "--out", out], out, deps=[folder / "metrics.json"])
    return out


def generator_stages(stages, g, k, family, counts, gs=0):
    """Fold k's stages of one generator family with generator seed gs: training on the pool, female samples, and
    for the class-conditional ones male samples (counts: {F, M, mixed}: --class-counts; n: the deficit). Returns
    {what: samples file}, the classifier's under 'train' (the CVAE's: chestxray's for seed 0, female only)."""
    r = g.runs / f"fold{k}"
    seed, dev = generator_seed(g, k, gs), ["--device", g.device]
    data = ["--data", "nih", *g.root_argv, "--sets", r / "compare_sets.csv", "--train-set", "pool", "--seed", seed, *dev]
    folder = generator_folder(r, family, gs)
    if family == "vae":
        return {"train": r / "cvae" / "synth.npz" if gs == 0 else cvae_stages(stages, r, seed, g.device, counts["n"],
                                                                               gs)}
    if family == "ddpm_finding" and g.finding_only == "same":  # the ddpm row's model, sex not asked for
        ddpm = generator_folder(r, "ddpm", gs)
        out = ddpm / "samples_finding_only.npz"
        stages.samples("diffusion.sample_ddpm", ["--ckpt", ddpm / "ckpt.pt", "--class-counts", counts["mixed"],
                                                 *sampler_flags(family, g), "--seed", seed + 2, *dev, "--out", out],
                       out, deps=[ddpm / "metrics.json"])
        return {"train": out}
    sets_cmp = r / "compare_sets.csv"
    if family == "ae":
        stages.script("vae.train_conv_ae", data + ["--val-set", "val", "--epochs", g.ae_epochs, "--out-dir",
                                                   folder], folder, deps=[sets_cmp])
    elif family == "gan":
        stages.script("gan.train_dcgan", data + ["--size", 64, "--width", g.gan_width, "--steps", g.gan_steps,
                                                 "--out-dir", folder], folder, deps=[sets_cmp])
    else:
        stages.script("diffusion.train_ddpm", data + [
            "--size", g.ddpm_size, "--width", g.ddpm_width, "--mults", g.ddpm_mults, "--num-res",
            g.ddpm_num_res, "--attn-res", g.ddpm_attn_res, "--steps", g.ddpm_steps, "--batch-size", 32,
            "--lr", 5e-4, "--warmup", 100, "--ema", 0.995, "--save-every", 200, "--sample-every", 0,
            *(["--condition", "label"] if family == "ddpm_finding" else []), "--out-dir", folder],
            folder, deps=[sets_cmp])
    files = {}
    for i, (what, c) in enumerate([("train", counts[FEMALE]), (MALE, counts[MALE])]):
        if family == "ddpm_finding":  # a finding-only model: the female counts, from its finding-only classes
            if what == MALE:
                break
            c = c.replace(f"{FEMALE}|", "any|")
        files[what] = folder / f"samples_{'F' if what == 'train' else 'M'}.npz"
        stages.samples(SAMPLERS[family], ["--ckpt", folder / "ckpt.pt", "--class-counts", c,
                                          *sampler_flags(family, g), "--seed", seed + i, *dev, "--out", files[what]],
                       files[what], deps=[folder / "metrics.json"])
    return files


def sampler_flags(family, g):
    """The sampler's own flags: DDIM steps and guidance for the DDPMs, none for the AE and the DCGAN."""
    return ["--steps", g.sample_steps, "--guidance", g.guidance] if SAMPLERS[family].startswith("diffusion") else []


def sweep_file(stages, g, k, family, ratio, deficit, female_finding, gs=0):
    """Fold k's female samples of `family` (generator seed gs) at ratio x the deficit (the sweep), as a stage;
    returns the file."""
    folder = generator_folder(g.runs / f"fold{k}", family, gs)
    n = max(1, int(round(ratio * deficit)))
    seed, dev = generator_seed(g, k, gs), ["--device", g.device]
    if family == "vae":
        out = folder / f"synth_x{ratio:g}.npz"
        stages.samples("vae.sample_cvae", ["--ckpt", folder / "ckpt.pt", "--n", n, "--seed", seed + 7, *dev,
                                           "--out", out], out, deps=[folder / "metrics.json"])
        return out
    out = folder / f"samples_F_x{ratio:g}.npz"
    stages.samples(SAMPLERS[family], ["--ckpt", folder / "ckpt.pt", "--class-counts",
                                      class_counts(n, female_finding, FEMALE), *sampler_flags(family, g), "--seed",
                                      seed + 7, *dev, "--out", out], out, deps=[folder / "metrics.json"])
    return out
