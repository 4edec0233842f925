"""common/stages.py and the command-line helpers the studies build their stage commands with."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from common.cli import as_argv, key_values
from common.errors import DataError
from common.splits import read_sets, write_sets
from common.stages import Stages
from conftest import ROOT


def test_as_argv_gives_back_what_the_parser_reads():
    def add(p):
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--name", default=None)
        p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--hflip", action="store_true")
        return p
    args = add(argparse.ArgumentParser()).parse_args(["--epochs", "7", "--no-pretrained", "--hflip"])
    argv = as_argv(add, args)
    assert argv == ["--epochs", "7", "--no-pretrained", "--hflip"]  # --name None is left out
    assert vars(add(argparse.ArgumentParser()).parse_args(argv)) == vars(args)

    def many(p):
        p.add_argument("--tag", action="append", default=[])
        return p
    with pytest.raises(TypeError, match="--tag"):  # what it cannot pass on it refuses, never writes "['a']"
        as_argv(many, many(argparse.ArgumentParser()).parse_args(["--tag", "a"]))


def test_key_files_keep_commas_in_file_names():
    """Your data's run folders hold the labels asked (sex-F-finding,covid): a file list is a repeated flag."""
    from common.cli import key_files
    assert key_files(["gan=runs/a,b/s0.npz", "ae=x.npz", "gan=runs/a,b/s1.npz"], "--samples") == {
        "gan": ["runs/a,b/s0.npz", "runs/a,b/s1.npz"], "ae": ["x.npz"]}
    for bad in (["gan"], ["=x.npz"], ["gan="]):
        with pytest.raises(DataError, match="KEY=FILE"):
            key_files(bad, "--samples")


def test_key_values_and_their_reserved_names():
    assert key_values(["fold=0", "condition=balanced_real"]) == {"fold": 0, "condition": "balanced_real"}
    for bad in (["fold"], ["=1"], ["seed=3"], ["p_any=1"]):
        with pytest.raises(DataError):
            key_values(bad, reserved=("seed",))


def test_split_files_round_trip_keep_order_and_duplicates(tmp_path):
    names = ["a.png", "b.png", "c.png"]
    sets = {"train": ["c.png", "a.png", "c.png"], "test": ["b.png"]}
    assert write_sets(tmp_path / "s.csv", sets)
    mtime = (tmp_path / "s.csv").stat().st_mtime_ns
    assert not write_sets(tmp_path / "s.csv", sets)  # unchanged: not rewritten, its time stamp kept
    assert (tmp_path / "s.csv").stat().st_mtime_ns == mtime
    assert write_sets(tmp_path / "s.csv", {**sets, "test": ["a.png"]}, dry=True)  # would change; nothing written
    assert (tmp_path / "s.csv").stat().st_mtime_ns == mtime
    got = read_sets(tmp_path / "s.csv", names, ["train", "test"])
    assert got["train"].tolist() == [2, 0, 2] and got["test"].tolist() == [1]
    with pytest.raises(DataError, match="no set named 'val'"):
        read_sets(tmp_path / "s.csv", names, ["val"])
    with pytest.raises(DataError, match="not in the data"):
        read_sets(tmp_path / "s.csv", names[:2], ["train"])
    with pytest.raises(DataError, match="empty"):
        write_sets(tmp_path / "e.csv", {"train": []})


def test_a_stage_is_reused_only_with_its_recorded_command_and_newer_than_its_inputs(tmp_path):
    out, dep = tmp_path / "run", tmp_path / "sets.csv"
    dep.write_text("x")
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "config.json").write_text(json.dumps({"argv": ["prog", "--epochs", "2", "--force"]}))
    s = Stages(dry=True)
    s.script("m", ["--epochs", 2], out, deps=[dep])
    s.script("m", ["--epochs", 3], out, deps=[dep])
    assert s.plan[0].startswith("# reuse: ") and not s.plan[1].startswith("#")
    s.changed.add(dep)  # a dry run that would rewrite the split file
    s.script("m", ["--epochs", 2], out, deps=[dep])
    assert not s.plan[2].startswith("#")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_names_files_with_colons_spaces_and_dollars(tmp_path):
    """fairgen's toy:160 folders, an --out with a space, an argument with a $: make parses the rules and the
    shell receives each argument as written."""
    folder = tmp_path / "runs dir" / "toy:160-seed0"
    s = Stages(dry=True)
    s.script("json.tool", ["--sort-keys", "a$b", "--out-dir", folder / "stage"], folder / "stage",
             deps=[folder / "sets.csv"])
    (folder).mkdir(parents=True)
    (folder / "sets.csv").write_text("set,image\n")
    mk = s.write_makefile(tmp_path / "stages.mk")
    r = subprocess.run(["make", "-n", "-f", str(mk)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if "json.tool" in x][0]
    assert line.startswith(sys.executable) and "'a$b'" in line and f"'{folder / 'stage'}'" in line


STAGE_MODULE = '''import json, sys, time
from pathlib import Path
from common.cli import run

def parse_args(argv=None):
    return sys.argv[1:]

def main(argv):
    out = Path(argv[argv.index("--out-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    time.sleep(float(argv[argv.index("--sleep") + 1]))
    (out / "config.json").write_text(json.dumps({"argv": sys.argv}))
    (out / "metrics.json").write_text("{}")

if __name__ == "__main__":
    run(main, parse_args)
'''


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_each_stage_records_its_times_run_here_or_by_make(tmp_path, monkeypatch):
    """A stage process appends its seconds to the study's log, whether Stages or the written makefile runs it (a
    path with a space and a '#'); times() gives each listed stage its last line and sums them by kind."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "train_toy.py").write_text(STAGE_MODULE)
    (tmp_path / "pkg" / "sample_toy.py").write_text(STAGE_MODULE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    monkeypatch.setenv("FAIRSYNTH_FORK_STAGES", "0")  # processes of their own, as make starts them
    runs = tmp_path / "runs dir#1"
    s = Stages(log=runs / "stage_times.jsonl")
    s.script("pkg.train_toy", ["--sleep", "0.5", "--out-dir", runs / "gen"], runs / "gen")
    per_stage, by_kind = s.times()
    assert per_stage[0]["run_s"] >= 0.5 and by_kind["generator training"] >= 0.5
    if sys.platform.startswith("linux"):  # process start measured from /proc
        assert 0 < per_stage[0]["start_s"] < 60 and by_kind["process start"] == round(per_stage[0]["start_s"], 1)

    d = Stages(dry=True, log=runs / "stage_times.jsonl")
    d.script("pkg.train_toy", ["--sleep", "0.5", "--out-dir", runs / "gen"], runs / "gen")  # done: reused by make
    d.samples("pkg.sample_toy", ["--sleep", "0.2", "--out-dir", runs / "samples"], runs / "samples" / "metrics.json")
    assert d.times()[1]["not recorded"] == 1 and d.times()[0][1] is None
    r = subprocess.run(["make", "-f", str(d.write_makefile(tmp_path / "stages.mk"))], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    per_stage, by_kind = d.times()
    assert per_stage[0] == s.times()[0][0]  # the reused stage keeps the time it took when it ran
    assert per_stage[1]["threads"] == 1  # torch's thread count in the stage (make ran it with OMP_NUM_THREADS=1)
    assert per_stage[1]["run_s"] >= 0.2 and by_kind["sampling"] >= 0.2 and by_kind["not recorded"] == 0
    kinds = [v for k, v in by_kind.items() if k not in ("total", "not recorded")]  # each rounded to 0.1 s
    assert by_kind["total"] == pytest.approx(sum(kinds), abs=0.05 * (len(kinds) + 1))
    lines = (runs / "stage_times.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("--force" not in json.loads(x)["argv"] for x in lines)


def test_stage_kinds():
    from common.stages import kind_of
    assert [kind_of(m) for m in ("vae.train_cvae", "diffusion.train_dpo", "classify.train_chexnet", "gan.sample_dcgan",
                                 "diffusion.fairgen_downstream", "classify.generator_audit", "fairness.plant")] == [
        "generator training", "generator training", "classifier training", "sampling", "classifier training",
        "evaluation", "data preparation"]


def test_stage_times_table_reads_each_studys_summary(tmp_path):
    from common.stages import KINDS
    by_kind = {**dict.fromkeys(KINDS, 0.0), "classifier training": 120.0, "process start": 6.0, "total": 126.0,
               "not recorded": 1}
    (tmp_path / "chestxray").mkdir()
    (tmp_path / "chestxray/stages.json").write_text(json.dumps({
        "stages": ["python -m a"] * 2, "seconds_by_kind": by_kind,
        "stage_seconds": [{"start_s": 3.0, "run_s": 60.0}] * 2}))
    (tmp_path / "skintone").mkdir()
    (tmp_path / "skintone/stages.json").write_text('{"stages": []}')
    r = subprocess.run([sys.executable, "bench/stage_times.py", "--results", str(tmp_path), "--studies",
                        "chestxray,skintone,medmnist"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [line.split(" | ") for line in r.stdout.splitlines()[2:]]
    assert rows[0][1:3] == ["2", "0.0"] and rows[0][4] == "2.0" and rows[0][-2:] == ["2.1", "1 |"]
    assert "not recorded" in rows[1][1] and "no stages.json" in rows[2][1]


def test_stage_times_by_module_names_each_loop_its_share_bf16_speed_and_check(tmp_path):
    from common.stages import KINDS
    (tmp_path / "chestxray").mkdir()
    (tmp_path / "chestxray/stages.json").write_text(json.dumps({
        "stages": ["python -m classify.train_chexnet --seed 0", "python -m classify.train_chexnet --seed 1",
                   "python -m vae.train_cvae --seed 0", "python -m vae.train_cvae --seed 1"],
        "seconds_by_kind": {**dict.fromkeys(KINDS, 0.0), "total": 0.0, "not recorded": 1},
        "stage_seconds": [{"start_s": 3.0, "run_s": 60.0}, {"start_s": 3.0, "run_s": 60.0},
                                                 {"start_s": 3.0, "run_s": 40.0}, None]}))
    (tmp_path / "bench/bf16").mkdir(parents=True)
    (tmp_path / "bench/bf16/summary.json").write_text('{"agrees": true, "seconds_per_run": {"off": 39, "bf16": 23}}')
    (tmp_path / "bench/bf16_mlpae").mkdir()
    (tmp_path / "bench/bf16_mlpae/summary.json").write_text('{"agrees": true, "seconds_per_run": {"off": 20, '
                                                            '"bf16": 20.5}}')
    (tmp_path / "bench/machine_limit_all.md").write_text("| loop | variant | images/s | x fp32 eager |\n"
                                                         "| cnn8 | bf16 | 803 | 1.65 |\n| cvae | bf16 | 377 | 1.61 |\n"
                                                         "| unet | bf16 | 211 | 0.79 |\n")
    r = subprocess.run([sys.executable, "bench/stage_times.py", "--results", str(tmp_path), "--studies", "chestxray"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [line.strip("| ").split(" | ") for line in r.stdout.split("stage module")[1].splitlines()[2:]]
    assert rows == [["chestxray", "classify.train_chexnet", "2", "2.0", "75%", "cnn8", "1.65", "agrees"],
                    ["chestxray", "vae.train_cvae", "1", "0.7", "25%", "cvae", "1.61", "not checked"]]
    sys.path.insert(0, str(ROOT / "bench"))
    from stage_times import check_verdict  # a loop slower under bf16 needs no check: it stays fp32
    assert check_verdict(tmp_path / "bench", "unet", "0.79") == "none: slower in bf16 (loop table)"
    assert check_verdict(tmp_path / "bench", "cnn8", "1.65") == "agrees"
    assert check_verdict(tmp_path / "bench", "mlpae", "1.33") == "agrees, not faster per run (0.98x): stays fp32"
    assert check_verdict(tmp_path / "bench", "resnet18", "1.25").startswith("not checked: ")  # left, with its reason


def test_bf16_default_follows_each_committed_check():
    """Each network with a committed bf16 check (results/bench/<check>/summary.json) trains in bf16 under --amp auto
    (its BF16_CHECKED) exactly when its check agreed and its runs were at least FASTER quicker; and the words a
    report uses for a set of runs' arithmetic."""
    import importlib
    sys.path.insert(0, str(ROOT / "bench"))
    from stage_times import CHECKS, FASTER, LOOPS
    from common.report import arithmetic
    module_of = {loop: m for m, loop in LOOPS.items() if isinstance(loop, str)}
    checked = 0
    for loop, folder in CHECKS.items():
        s = json.loads((ROOT / "results/bench" / folder / "summary.json").read_text())
        mod = importlib.import_module(module_of[loop])
        if hasattr(mod, "BF16_CHECKED"):  # the chest X-ray classifier's --amp auto predates the flag (it agreed)
            ratio = s["seconds_per_run"]["off"] / s["seconds_per_run"]["bf16"]
            assert mod.BF16_CHECKED == (s["agrees"] and ratio >= FASTER), (loop, s["agrees"], ratio)
            checked += 1
    assert checked >= 7
    assert [arithmetic(f) for f in ([True], [False], [False, True], [None], [])] == [
        "bf16 autocast", "fp32", "mixed (bf16 and fp32 runs)", "not recorded", "not recorded"]


def test_make_cannot_name_a_file_with_an_equals_sign_or_a_semicolon():
    from common.stages import make_name
    for bad in ("runs/a=b", "runs/a;b", "runs/100%"):
        with pytest.raises(DataError, match="make cannot name a file"):
            make_name(bad)
    assert make_name("runs/sex-F-finding,covid/toy:160 x") == "runs/sex-F-finding,covid/toy\\:160\\ x"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_runs_a_studys_stages_side_by_side_on_one_thread_each_on_a_cpu():
    """Quick and smoke scale: the study and its stage makefile run with OMP_NUM_THREADS=1, the makefile under -j
    (the cores as nproc counts them, at most 8); full scale one stage at a time with torch's default threads;
    JOBS and THREADS set either; under a parent make -jN still JOBS at a time."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOBS", "THREADS", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def lines(*flags):
        r = subprocess.run(["make", "-n", "chestxray", "PYTHON=true", *flags], cwd=ROOT, capture_output=True,
                           text=True, env=env)
        assert r.returncode == 0, r.stderr
        study = [line for line in r.stdout.splitlines() if "true -m classify.chestxray_study" in line]
        return study, next(line for line in r.stdout.splitlines() if "if [ -f" in line)
    cores = subprocess.run("env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc", shell=True, capture_output=True,
                           text=True).stdout.strip()
    cores = min(int(cores), 8) if cores.isdigit() else None
    study, stages = lines("SMOKE=1")
    # two rounds of makefile + make (the second adds stages chosen on the first's results), then the study itself
    assert len(study) == 3 and all(line.startswith("OMP_NUM_THREADS=1 true -m") for line in study)
    assert study[0] == study[1] and study[1].endswith("--makefile runs/smoke/chestxray.mk")
    # make runs the stage makefile under the stage server (common/stage_server.py), which passes its arguments on
    assert "then OMP_NUM_THREADS=1 true -m common.stage_server make -j" in stages
    assert cores is None or f" -j{cores} -f" in stages
    assert "then true -m common.stage_server make -j1 -f runs/results-full/chestxray.mk" in lines("SCALE=full")[1]
    study, stages = lines("SMOKE=1", "JOBS=3", "THREADS=")
    assert study[0].startswith("true -m") and "common.stage_server make -j3 -f runs/smoke/chestxray.mk" in stages
    # under make -jN too, JOBS at a time (common.stage_server drops the job slots make does not pass on)
    assert cores is None or f"common.stage_server make -j{cores} -f runs/smoke/chestxray.mk" in lines("-j3", "SMOKE=1")[1]


def test_a_stage_made_on_another_thread_count_is_redone(tmp_path, monkeypatch):
    """A done stage is reused only on the torch thread count it ran on (its log line, else its config.json), where
    both are known."""
    import common.stages
    gen = tmp_path / "gen"
    gen.mkdir()
    argv = ["--out-dir", str(gen)]
    (gen / "config.json").write_text(json.dumps({"argv": ["train_toy.py", *argv], "cpu_threads": 2}))
    (gen / "metrics.json").write_text("{}")
    s = Stages(dry=True, log=tmp_path / "stage_times.jsonl")
    s.script("pkg.train_toy", argv, gen)
    for threads, reused in ((2, True), (1, False), (None, True)):
        monkeypatch.setattr(common.stages, "stage_threads", lambda: threads)
        assert s.plan[0].startswith("# reuse: ") == reused, threads
    (tmp_path / "stage_times.jsonl").write_text(json.dumps({"module": "pkg.train_toy", "argv": argv, "start_s": 1.0,
                                                            "run_s": 2.0, "threads": 1}) + "\n")
    monkeypatch.setattr(common.stages, "stage_threads", lambda: 1)
    assert s.plan[0].startswith("# reuse: ")  # the log's line says where it last ran


FORKING_STUDY = """import json, os, sys, threading, time
from pathlib import Path
import torch  # loaded before the stages, as a study has it
from common.errors import DataError
from common.runs import prepare_out_dir, settle_replaced
from common.stages import Stages
import pkg.marker  # a stage forked from this process finds it loaded; one started fresh does not

base = Path(sys.argv[1])
if sys.argv[2] == "threaded":  # a thread pool alive while the stage starts: no fork
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
out = prepare_out_dir(base / "report", force=True)  # the study replaces its report: the old one set aside
from tqdm import tqdm
list(tqdm(range(2)))  # a bar (the image cache's): its monitor thread outlives it, and must not stop the fork
stages = Stages(log=base / "times.jsonl")
stages.script("pkg.stage", ["--out-dir", base / "ok", "--mode", "ok"], base / "ok")
sys.stdout.write("study: unflushed line\\n")  # printed once, not once more by the next child
seen = {"aside_kept": any(p.name.startswith(".report.replaced") for p in base.iterdir())}
try:
    stages.script("pkg.stage", ["--out-dir", base / "bad", "--mode", "bad"], base / "bad")
except DataError as e:
    seen["failed"] = str(e)
try:
    stages.script("pkg.stage", ["--out-dir", base / "msg", "--mode", "msg"], base / "msg")
except DataError as e:
    seen["exited"] = str(e)
settle_replaced(ok=True)
seen["torch_seed"] = torch.initial_seed()
print(json.dumps(seen))
"""

FORKED_STAGE = """import json, os, sys
from pathlib import Path
import torch
from common.cli import run
from common.errors import DataError
from common.runs import prepare_out_dir

def parse_args(argv=None):
    return sys.argv[1:]

def main(argv):
    out = prepare_out_dir(argv[argv.index("--out-dir") + 1], True)
    if argv[argv.index("--mode") + 1] == "bad":
        raise DataError("error: --mode bad: this stage refuses it")
    if argv[argv.index("--mode") + 1] == "msg":
        sys.exit("stage exits with a message")
    torch.manual_seed(5)  # nothing a stage does reaches the study
    (out / "config.json").write_text(json.dumps({"argv": sys.argv}))
    (out / "metrics.json").write_text(json.dumps({"forked": "pkg.marker" in sys.modules, "ppid": os.getppid(),
                                                  "threads": torch.get_num_threads(),
                                                  "warm": "torch._dynamo" in sys.modules}))

if __name__ == "__main__":
    run(main, parse_args)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks where /proc/self/task counts threads")
@pytest.mark.parametrize("mode", ["single", "threaded"])
def test_a_single_threaded_study_forks_its_stages_and_a_threaded_one_starts_them(tmp_path, mode):
    """A study whose process has one thread (OMP_NUM_THREADS=1, as quick-scale studies run) forks each stage
    from itself instead of starting an interpreter: the stage runs as its script's own process would (its exit
    status, its message, its log line with a start of milliseconds), and nothing it does reaches the study: not
    its random seed, and not the study's own replaced report, which the stage's success must not delete. With
    another thread alive the study starts a fresh process, as before."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "marker.py").write_text("")
    (tmp_path / "pkg" / "stage.py").write_text(FORKED_STAGE)
    (tmp_path / "study.py").write_text(FORKING_STUDY)
    base = tmp_path / "b"
    (base / "report").mkdir(parents=True)
    (base / "report" / "config.json").write_text(json.dumps({"args": {}, "argv": [], "git_commit": None}))  # an
    # earlier run, which the study replaces (--force)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("FAIRSYNTH_FORK_STAGES", None)
    env.pop("PYTHONUNBUFFERED", None)  # (make exports it) so that the study's unflushed line sits in its buffer
    r = subprocess.run([sys.executable, str(tmp_path / "study.py"), str(base), mode], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["aside_kept"] and seen["torch_seed"] != 5
    assert seen["failed"].startswith("error: stage failed (exit 2;") and r.stderr.count("this stage refuses it") == 1
    assert seen["exited"].startswith("error: stage failed (exit 1;") and r.stderr.count("exits with a message") == 1
    assert r.stdout.count("study: unflushed line") == 1
    done = json.loads((base / "ok" / "metrics.json").read_text())
    assert done["forked"] == done["warm"] == (mode == "single") and done["threads"] == 1  # (common.stages.warm_imports)
    line, = [json.loads(x) for x in (base / "times.jsonl").read_text().splitlines()]  # the failed stage: none
    assert line["module"] == "pkg.stage" and line["argv"] == ["--out-dir", str(base / "ok"), "--mode", "ok"]
    assert (line["start_s"] < 0.5) == (mode == "single")
    assert not (base / "bad").exists() or not (base / "bad" / "metrics.json").exists()


def test_a_cpu_without_bf16_is_named_before_its_stages_run(tmp_path, monkeypatch, capsys):
    """The README's times were mostly measured on CPUs with bf16 instructions: where stages are to run on one
    without them, the study says so once, before the first stage runs or is written into a makefile to run (not
    when every stage is reused, not on a dry run)."""
    import common.runs
    import common.stages
    from common.stages import planned
    monkeypatch.setattr(common.stages, "fork_stage", lambda module, argv, log: 0)  # a stage that succeeds at once
    done = tmp_path / "gen"
    done.mkdir()
    (done / "config.json").write_text(json.dumps({"argv": ["train_toy.py", "--out-dir", str(done)]}))
    (done / "metrics.json").write_text("{}")
    gpu = os.path.exists(common.stages.GPU_NODE)
    argv = ["--out-dir", str(done)]
    for bf16 in (False, True):
        monkeypatch.setattr(common.runs, "cpu_has_bf16", lambda: bf16)
        for extra in ([], [[*argv, "--again"], [*argv, "--more"]]):  # every stage reused; two more to run
            def listed():
                s = Stages(dry=True)
                for a in [argv, *extra]:
                    s.script("pkg.train_toy", a, done)
                return s
            note = bool(extra) and not bf16 and not gpu
            assert planned(listed(), True, None, "") and "note:" not in capsys.readouterr().out
            assert planned(listed(), False, tmp_path / "s.mk", "")
            assert capsys.readouterr().out.count("note: this CPU has no bf16 instructions") == note
            listed().run_all()
            out = capsys.readouterr().out
            assert out.count("note: this CPU has no bf16 instructions") == note and out.startswith("  reuse")


def test_no_module_reads_the_environment_when_imported():
    """A forked stage (and a test's command through tests/forkserver.py) runs in a process that imported the
    script's modules before the command's environment was set: a setting read at import would be the parent's.
    Checked in the code that runs at import (module and class bodies, decorators, default arguments; not function
    bodies, nor the `if __name__ == "__main__":` block); a function called at import that reads the environment
    would escape this check."""
    import ast

    def at_import(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return [*node.decorator_list, *node.args.defaults, *[d for d in node.args.kw_defaults if d]]
        if isinstance(node, ast.Lambda):
            return [*node.args.defaults, *[d for d in node.args.kw_defaults if d]]
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", "'__main__' == __name__"):
            return node.orelse
        return list(ast.iter_child_nodes(node))

    found = []
    for path in sorted(p for d in ("common", "classify", "vae", "gan", "diffusion", "fairness", "bench")
                       for p in (ROOT / d).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # a name bound to the environment anywhere would hide reads from this check
            if isinstance(node, ast.ImportFrom) and node.module == "os" and \
                    {a.name for a in node.names} & {"environ", "getenv", "getenvb", "environb"}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports the environment by name")
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            text = ast.unparse(node) if isinstance(node, (ast.Attribute, ast.Call)) else ""
            if text.startswith(("os.environ", "os.getenv")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            todo.extend(at_import(node))
    assert found == []
