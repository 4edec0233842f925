"""FairGen's published Table 1 (ViT on Fitzpatrick-17k; docs/METHODS.md): the paper's Stable-Diffusion-based
numbers, written beside ours by diffusion.fairgen_report as table1_published.md/.csv and never mixed with them."""
from common.report import write_table

# Labels as the paper's: "Base (ViT)" is the ViT on real data only; "Stable Diffusion" the plain generator's data.
PUBLISHED = {("Fitzpatrick-17k", m): dict(zip(("ESSP", "DP", "EO", "NAR"), v)) for m, v in [
    ("Base (ViT)", (5.11, 18.22, 7.56, 0.36)), ("Stable Diffusion", (3.76, 25.04, 8.19, 0.41)),
    ("CBRS", (5.85, 15.28, 6.72, 0.30)), ("SQRS", (5.08, 18.03, 7.29, 0.35)), ("CBDM", (6.11, 13.13, 6.56, 0.28)),
    ("FairDiffusion", (11.16, 8.13, 4.52, 0.25)), ("FairGen", (15.47, 4.51, 2.70, 0.21))]}


def write_published(path):
    """table1_published.md/.csv at path (no suffix): the paper's rows, with how they differ from ours."""
    pub = [[d, m, v["ESSP"], v["DP"], v["EO"], v["NAR"]] for (d, m), v in PUBLISHED.items()]
    write_table(path, ["data", "method", "ESSP", "DP", "EO", "NAR"], pub,
                title="FairGen's published Table 1 (ViT; Stable Diffusion based): for reference only, not comparable",
                notes=["Rows as the paper labels them: 'Base (ViT)' is the ViT on real images only (our 'real only'), "
                       "'Stable Diffusion' the plain generator's synthetic data (our 'base'), 'FairDiffusion' (Luo et "
                       "al. 2025) our 'fairdiffusion' (its Fair Bayesian Perturbation on our DDPM; scikit-learn's "
                       "Gaussian process where the original uses BoTorch). Other generator (Stable Diffusion "
                       "fine-tuned on the full data), other data (real Fitzpatrick17k images), other classifier "
                       "budget. FairGen's ESSP values are hard to reconcile with the equity-scaled definition it "
                       "cites (docs/METHODS.md gives the bound); we did not tune toward them."])
