"""Every study is a plan and a report: the plan lists every stage it would run (--dry-run writes nothing), the report
reads only the files in --out, no study imports another, and the code stays within the sizes the project allows
itself (no product file over 500 lines, no report function over 60)."""
import ast
import json

import pytest

from conftest import ROOT
from forkserver import python_m

STUDIES = {"chestxray": "classify.chestxray_study", "compare": "classify.compare_study",
           "skintone": "vae.skintone_study", "medmnist": "classify.medmnist_study",
           "fairgen": "diffusion.fairgen_study", "ddpm": "diffusion.ddpm_study"}
PRODUCT = ["classify", "common", "diffusion", "fairness", "gan", "vae"]
# the two functions whose job is the whole args object: writing it back as flags, and recording it in config.json
SERIALISERS = {"as_argv", "write_config"}


def product_files():
    return sorted(f for d in PRODUCT for f in (ROOT / d).glob("*.py"))


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_study_imports_another_study():
    for path in product_files():
        own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        study = own.removesuffix("_report").removesuffix("_study")
        for module in imported_modules(path):
            if module.endswith(("_study", "_report")):
                assert module.removesuffix("_report").removesuffix("_study") == study, (own, module)


def test_fairness_imports_nothing_from_classify():
    for path in (ROOT / "fairness").glob("*.py"):
        assert not [m for m in imported_modules(path) if m.startswith("classify")], path


def test_sizes_the_project_allows_itself():
    for path in product_files():
        text = path.read_text()
        assert len(text.splitlines()) <= 500, f"{path.name}: {len(text.splitlines())} lines"
        assert "FORMULAS" not in text, path  # methods are cited from docs/METHODS.md, in the repository
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and "report" in node.name:
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"
            if isinstance(node, ast.FunctionDef) and node.name not in {"main", "parse_args", *SERIALISERS}:
                assert "args" not in [a.arg for a in node.args.args], f"{path.name}: {node.name} takes args"
    assert (ROOT / "docs" / "METHODS.md").is_file()


@pytest.mark.parametrize("study", [s for s in STUDIES if s != "compare"])
def test_dry_run_lists_every_stage_and_writes_nothing(study, tmp_path):
    r = python_m(STUDIES[study], ["--smoke", "--dry-run", "--out", str(tmp_path / "out"),
                                  "--runs", str(tmp_path / "runs")], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("python -m")]
    assert lines and all(" --force" in line or " --resume" in line for line in lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_compare_plans_from_a_chestxray_run_and_refuses_without_one(smoke_study, tmp_path):
    cx_out, _, _ = smoke_study("classify.chestxray_study")
    r = python_m(STUDIES["compare"], ["--smoke", "--dry-run", "--chestxray", str(cx_out),
                                      "--out", str(tmp_path / "out")], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith(("python -m", "# reuse: python -m"))]
    for module in ("vae.train_conv_ae", "gan.train_dcgan", "diffusion.train_ddpm", "classify.generator_audit"):
        assert any(f"-m {module} " in line for line in lines), module
    assert not any("condition=imbalanced_real" in line for line in lines)  # chestxray's cell: read, never rerun
    r = python_m(STUDIES["compare"], ["--smoke", "--chestxray", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "out")], timeout=600)
    assert r.returncode == 2 and "no plan.json" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ddpm_study_smoke_chain_and_its_report_from_files(tmp_path):
    """`make ddpm SMOKE=1` as stages: the report's table is made from summary.json, and remade from the files."""
    out = tmp_path / "out"
    r = python_m(STUDIES["ddpm"], ["--smoke", "--size", "16", "--width", "8", "--n-per-class", "1", "--out", str(out),
                                   "--runs", str(tmp_path / "runs")], timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    table = (out / "samplers.md").read_text()
    for name, v in s["samplers"].items():
        assert f"| {name} | {v['fd']:.2f} |" in table
    readme = (out / "README.md").read_text()
    assert readme.startswith("# ") and s["kid_separation"] in readme and "| sampler |" in readme
    (out / "samplers.md").unlink()
    r = python_m("diffusion.ddpm_report", ["--out", str(out)], timeout=300)
    assert r.returncode == 0 and (out / "samplers.md").read_text().split("Made by")[0] == table.split("Made by")[0]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert [line.split()[2] for line in stages] == ["diffusion.train_ddpm", "classify.train_classifier",
                                                    "diffusion.eval_samplers"]
