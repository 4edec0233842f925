"""Image grids and the Markdown + CSV table writer every results table goes through."""
import csv
import json
from pathlib import Path
import shlex
import sys
import textwrap
import time

import numpy as np

from common.runs import git_commit


def to_uint8(images):
    """torch/numpy (N, C, H, W) floats in [-1, 1], or uint8 (N, H, W[, C]) -> uint8 (N, H, W, C)."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.dtype != np.uint8:
        x = np.clip((x + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        if x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
    if x.ndim == 3:
        x = x[..., None]
    return x


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), imported where a figure is drawn: a stage that draws
    none never pays the ~0.7 s its import costs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def tile(images, nrow, pad=2):
    x = to_uint8(images)
    n, h, w, c = x.shape
    ncol = int(np.ceil(n / nrow))
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return out[..., 0] if c == 1 else out


def fit_title(ax, title, fontsize):
    """Set a title wrapped to the figure's width, so that a long one (with its PHANTOM label) is never cut off."""
    chars = int((ax.figure.get_figwidth() - 0.8) * 72 / (0.6 * fontsize))  # ~0.6 em per character, y-axis margin
    ax.set_title(textwrap.fill(title, max(20, chars)), fontsize=fontsize)


def save_grid(images, path, nrow=None, title=None, row_labels=None):
    """A PNG grid of images; with a title or row labels it is drawn with matplotlib so the labels are in the
    picture (a grid from phantom data must say so in its title)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(images)
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    grid = tile(images, nrow)
    if title is None and row_labels is None:
        from PIL import Image
        Image.fromarray(grid).save(path)
        return path
    plt = pyplot()
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(4, w / 60 + 1.5), max(3, h / 60 + 0.8)), dpi=100)
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        step = h / nrow
        ax.set_yticks([step * (i + 0.5) for i in range(len(row_labels))], labels=row_labels, fontsize=8)
    else:
        ax.set_yticks([])
    if title:
        fit_title(ax, title, 9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def command_line(argv=None):
    """This process's command (or argv's) as a user would type it in the repository: `python -m package.module
    flags` for a module under the working folder (sys.argv[0] is then the module's path on this machine)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        rel = Path(argv[0]).resolve().relative_to(Path.cwd().resolve())
        if rel.suffix == ".py":
            argv[0:1] = ["python", "-m", ".".join(rel.with_suffix("").parts)]
    except (ValueError, IndexError):
        pass
    return " ".join(shlex.quote(a) for a in argv)


RAN = {}  # a report rebuilt from a finished run's files: the study command and commit whose stages made them


def footer(command=None):
    made = f"Made by `{command or command_line()}` at commit {git_commit()}, {time.strftime('%Y-%m-%d')}"
    return made + (f", from the run of `{RAN['command']}` at commit {RAN['commit']}." if RAN else ".")


def rebuilt_from(out):
    """Name, in every footer this process writes, the study run that last wrote the folder a report is rebuilt from
    (out/config.json: its argv and commit; stages it reused may be older, their own config.json say), so a page
    rebuilt at a later commit still names the run behind its predictions."""
    RAN.clear()
    path = Path(out) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("argv") and "git_commit" in config:
        RAN.update(command=command_line(config["argv"]), commit=config["git_commit"])
    return RAN


def markdown_table(header, rows):
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def write_table(path, header, rows, title=None, notes=(), command=None):
    """Write <path>.md (title, table, notes, the command and commit that made it) and <path>.csv (same cells)."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"## {title}\n" if title else "", markdown_table(header, rows), ""]
    parts += [f"{n}\n" for n in notes]
    parts.append(footer(command))
    path.with_suffix(".md").write_text("\n".join(parts) + "\n")
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path.with_suffix(".md")


def mean_std(values, digits=3):
    """'0.712 ± 0.021 (n=3)'; std is the sample std (ddof=1); NaNs are left out and counted in n only if finite."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (n=1)"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f} (n={len(v)})"


def with_ci(est, ci, digits=3):
    lo, hi = ci
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def save_samples(out_dir, images, labels, class_names, title, per_row=10, name="samples"):
    """Generated images as <name>.npz (images uint8, labels) and a PNG grid with one row per class."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = np.asarray(images), np.asarray(labels)
    np.savez_compressed(out_dir / f"{name}.npz", images=images, labels=labels, class_names=np.array(class_names))
    rows = [np.nonzero(labels == c)[0][:per_row] for c in range(len(class_names))]
    rows = [r for r in rows if len(r)]
    pick = np.concatenate([np.pad(r, (0, per_row - len(r)), mode="edge") for r in rows])
    return save_grid(images[pick], out_dir / f"{name}.png", nrow=len(rows), title=title,
                     row_labels=[class_names[c][:18] for c in range(len(class_names)) if (labels == c).any()])


def write_readme(out, title, answers, tables, notes=()):
    """out/README.md, the page a reader opens first: the title (the study's question), the answers in words, then
    each table's Markdown (files under out, written by write_table, each with its own notes and footer), then notes
    and the footer of the report that wrote them. A paragraph the page already shows (a table note that is also an
    answer, a table footer equal to the page's own) is shown once."""
    out, own = Path(out), footer()
    shown = {a.strip() for a in answers} | {own}

    def once(text):
        paragraphs = [p for p in text.strip().split("\n\n") if p.strip() not in shown]
        shown.update(p.strip() for p in paragraphs)
        return "\n\n".join(paragraphs)

    texts = [(out / t).read_text() for t in tables if (out / t).is_file()] + list(notes)
    parts = [f"# {title}", "", *[f"{a}\n" for a in answers], *[f"{t}\n" for t in map(once, texts) if t], own]
    (out / "README.md").write_text("\n".join(parts) + "\n")
    return out / "README.md"


def arithmetic(flags):
    """How a set of training runs computed, in words, from the bf16_autocast flags their metrics.json recorded
    (None: a run that recorded none, from before the flag)."""
    kinds = set(flags)
    if not kinds or None in kinds:
        return "not recorded"
    return "bf16 autocast" if kinds == {True} else "fp32" if kinds == {False} else "mixed (bf16 and fp32 runs)"


def stage_times(out):
    """summary.json's record of where a study's time went, from its stages.json: each stage's seconds (process start,
    main; in the order of stages.json's commands, None where not recorded) and their sums by kind; None for a run
    that predates stage timing."""
    path = Path(out) / "stages.json"
    stages = json.loads(path.read_text()) if path.is_file() else {}
    if "seconds_by_kind" not in stages:
        return None
    return {"by_kind": stages["seconds_by_kind"], "per_stage": stages["stage_seconds"]}


def report_command(doc, write_report, study, needs, n_boot=False):
    """The command line of a study's report module, `python -m <package>.<study>_report --out DIR [--n-boot N]`:
    rebuilds the report of a finished run from the files in DIR alone. needs: the files it reads there (a missing
    one is refused in one line that names it and the study command that writes it); n_boot: whether the report
    takes --n-boot (bootstrap resamples, default the run's). Call it under `if __name__ == "__main__":`."""
    import argparse
    from common.cli import ArgumentParser, positive_int, run
    from common.errors import DataError

    def parse_args(argv=None):
        p = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--out", required=True, help=f"a finished run's folder (it holds {', '.join(needs)}); its "
                                                    "tables, figures, summary and README.md are rewritten there")
        if n_boot:
            p.add_argument("--n-boot", type=positive_int, default=None, help="bootstrap resamples (default: the run's)")
        return p.parse_args(argv)

    def main(args):
        for f in needs:  # "a|b": either file
            if not any((Path(args.out) / g).is_file() for g in f.split("|")):
                raise DataError(f"--out {args.out}: no {' or '.join(f.split('|'))} here; the report rebuilds a finished run's report (run "
                                f"`python -m {study} --out {args.out}` first)")
        rebuilt_from(args.out)
        write_report(args.out, args.n_boot) if n_boot else write_report(args.out)
    run(main, parse_args)
