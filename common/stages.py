"""A study as the list of its stage commands. Each stage is a script run as its own process (`python -m module
argv --force`) that writes files; it is skipped when its output exists with the command that made it recorded
beside it (the stage's config.json "argv", or a samples file's "meta") and is newer than every file it depends on
(as make would: a retrained generator redoes the classifiers that use its samples), unless it ran on another torch
thread count than a stage started now would (its log line or config.json says; a CPU's sums depend on it). A
change to the code itself is not detected: use a new --runs folder, or --force there.

Two ways to run the same list, and a third to hand it to make:
    Stages()                 run each stage now, in order (one process at a time: see fork_stage)
    Stages(dry=True)         run nothing: `plan` lists every command, "# reuse: " before those a run would skip
    stages.write_makefile(p) the same stages as make rules (target: the stage's output; prerequisites: the outputs
                             it reads), so that `make -j N -f p` runs independent stages in parallel

    stages = Stages()
    stages.script("vae.train_cvae", argv, folder)                    # done: folder/metrics.json
    stages.samples("vae.sample_cvae", argv, out_npz, deps=[folder / "metrics.json"])

Where the time goes: with `stages.log` set (a study sets runs/<out>/stage_times.jsonl), every stage process, run by
Stages or by the makefile, appends one line to that file when it succeeds (common.cli.run): its module, argv, the
seconds from its process start to its main (interpreter and imports; a forked stage: from the fork) and in its main,
and torch's thread count. `stages.times()` reads back each listed stage's last line and sums them by kind; a study
writes both into stages.json, its report both into summary.json. Stages that make ran side by side (-j) each count
their own seconds, so the sums can exceed the wall time. A stage continued with --resume records the part after the
resume only; a stage two studies share (compare reuses chestxray's CVAE of the first seed) counts in both.
"""
import functools
import importlib
import json
import os
from pathlib import Path
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from common.errors import DataError
from common.stage_server import GPU_NODE, fork_allowed, one_thread

STAGE_LOG = "FAIRSYNTH_STAGE_LOG"  # environment: the file a stage process appends its times to (see log_stage_time)
TIMES_FILE = "stage_times.jsonl"  # in a study's run tree
KINDS = ("generator training", "sampling", "classifier training", "evaluation", "data preparation", "process start")


def recorded_argv(cfg):
    """The argv (without --force) a script recorded in its config.json, or None."""
    try:
        return [a for a in json.loads(Path(cfg).read_text())["argv"][1:] if a != "--force"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_threads(folder):
    """The torch threads a run's config.json (in folder) records (cpu_threads), or None."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("cpu_threads")
    except (OSError, ValueError, AttributeError):
        return None


def samples_argv(path):
    """The argv (without --force) a sampling script recorded in its .npz's meta, or None."""
    try:
        with np.load(path) as z:
            return [a for a in json.loads(str(z["meta"]))["argv"] if a != "--force"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_name(path):
    """A file name as a make target or prerequisite: ':', '#', spaces and '$' escaped (e.g. fairgen's toy:160)."""
    text = str(path)
    if any(c in text for c in "\n%=;"):
        raise DataError(f"{text!r}: make cannot name a file with a newline, '%', '=' or ';' (choose another --out or "
                        f"--runs)")
    return re.sub(r"([:# ])", r"\\\1", text).replace("$", "$$")


def log_stage_time(module, argv, start_s, run_s, forked=False):
    """Append a finished stage's times to the file named by $FAIRSYNTH_STAGE_LOG (nothing when it is unset): one
    JSON line, written with one append so that stages run in parallel by make do not interleave; forked: whether it
    started as a fork (fork_stage, common.stage_server) rather than a process of its own. Best effort: the stage has
    succeeded, so a log it cannot write costs a warning, never the stage."""
    path = os.environ.get(STAGE_LOG)
    if not path:
        return
    torch = sys.modules.get("torch")  # its thread count, where the stage used torch: CPU numbers depend on it
    line = json.dumps({"module": module, "argv": [a for a in argv if a != "--force"], "start_s": start_s,
                       "run_s": run_s, "ended": time.time(), "forked": forked,
                       "threads": torch.get_num_threads() if torch else None}) + "\n"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as e:
        print(f"warning: ${STAGE_LOG} {path}: {e.strerror or e}; this stage's time is not recorded", file=sys.stderr)


def kind_of(module):
    """A stage's kind in the time table, from its module's name."""
    name = module.rsplit(".", 1)[-1]
    if name.startswith("sample_"):
        return "sampling"
    if module.startswith("classify.train_") or name.endswith("downstream"):
        return "classifier training"
    if name.startswith("train_"):
        return "generator training"
    return "data preparation" if module == "fairness.plant" else "evaluation"


def stage_threads():
    """The torch threads a stage started from this process would run on (this environment's OMP_NUM_THREADS, or
    torch's default), or None where this process has not loaded torch (then no stage's count is checked)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch else None


def call_main(module, argv):
    """`python -m module argv` in this process: the script's main under common.cli.run, with sys.argv as that
    command would set it (scripts record it). Returns (exit status, whether main returned: what a process of its
    own logs its time after)."""
    from common.cli import run
    mod = importlib.import_module(module)
    saved = sys.argv
    sys.argv = [mod.__file__, *argv]
    try:
        run(mod.main, lambda: mod.parse_args(argv))
    except SystemExit as e:
        return exit_status(e), False
    finally:
        sys.argv = saved
    return 0, True


def exit_status(e):
    """The status an interpreter exits with on SystemExit e; sys.exit("message") prints the message, as it does."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def run_in_process(module, argv, line):
    """`python -m module argv` in this process, without an interpreter start and imports (~3 s a stage on a CPU).
    A stage that fails stops the study, as a failed process does."""
    code, _ = call_main(module, argv)
    if code:
        raise DataError(f"stage failed (exit {code}; its message is above): {line}")


SIGNALS = {signal.SIGINT, signal.SIGTERM}


def can_fork():
    """Whether a stage may be forked from this process: Linux, $FAIRSYNTH_FORK_STAGES not 0, no NVIDIA device
    (CUDA cannot start in a forked child), and one OS thread: a thread pool of OpenMP or BLAS does not survive a
    fork (torch in the child would hang), and numpy's OpenBLAS starts one at import unless OMP_NUM_THREADS=1 (make
    sets it for a study and its stages at quick and smoke scale). tqdm's monitor thread, which outlives the bars
    (the image cache's, say), is stopped here (a later bar starts another)."""
    if not fork_allowed(os.environ):
        return False
    bars = sys.modules.get("tqdm")
    if bars is not None and getattr(bars.tqdm, "monitor", None) is not None:
        bars.tqdm.monitor.exit()
        bars.tqdm.monitor = None
    return one_thread()


@functools.cache
def warm_imports():
    """Import here, once, what nearly every stage imports on first use, so that each forked stage finds it loaded:
    torch._dynamo (a torch optimizer's first call imports it: ~2 s on a CPU) and matplotlib's pyplot (~0.7 s).
    Whether that worked, remembered: where it fails, no stage forks (each starts a process)."""
    try:
        import torch._dynamo  # noqa: F401
        from common.report import pyplot
        pyplot()
        return True
    except Exception:
        return False


def fork_stage(module, argv, log):
    """Run the stage `python -m module argv` (argv ends with --force where it has one) in a forked copy of this
    process, where can_fork() allows: the study has imported torch and the script's modules once (the script is
    imported here first, so its next stages find it loaded), and the child starts in milliseconds instead of an
    interpreter start and imports (~3 s a stage on a CPU). The child is a process of its own as a fresh one
    would be: it seeds what it uses, replaces and settles its own folders, appends its times to the log (its
    start: from the fork to its main) when its main returns, and exits with its script's status through
    os._exit, never returning into the study's code; nothing it changes reaches the study. Ctrl-C and SIGTERM
    are held back across the fork. Returns that status, or None where it cannot fork (the caller then starts a
    process; so does a script that does not import here, which then reports its error itself)."""
    if not can_fork():
        return None
    try:
        importlib.import_module(module)
    except Exception:
        return None
    if not warm_imports() or not can_fork():  # importing the script or the warm-up started a thread
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    forked = time.perf_counter()
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        raise
    if pid == 0:
        from common.stage_server import child_exit, run_stage

        def become():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a signal held back arrives here, in child_exit's try
            if log:
                os.environ[STAGE_LOG] = str(log)
            return run_stage(module, argv, time.perf_counter() - forked)
        child_exit(become)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # one held back arrives here, with the child to stop
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended, but not reaped: its pid stays the child's
    except BaseException:  # Ctrl-C or a kill of the study: the stage gets SIGTERM and puts back what it replaced
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


class Stages:
    """rules: (output, dependencies, argv line, module, argv, recorded) per stage, in order; `reused`: the outputs
    this invocation took from earlier runs instead of running their stage (its wall time leaves those out).
    Stages(dry=True) only lists; run_all() then runs the list (a study's plan builds it, its main runs it);
    Stages() runs each stage as it is added."""

    def __init__(self, dry=False, log=None):
        self.dry, self.rules, self.reused, self.log = dry, [], [], log  # log: see the module's docstring
        self.changed = set()  # inputs a dry run knows will be rewritten (a split file): their stages are not fresh
        self._last = (None, {})  # (the log's mtime and size, last_lines()) when it was last read
        self.noted = False  # cpu_note said its piece

    @property
    def commands(self):
        return [rule[2] for rule in self.rules]

    @property
    def plan(self):
        return [("# reuse: " if self.fresh(rule) else "") + rule[2] for rule in self.rules]

    def fresh(self, rule):
        """Whether a stage's output exists, records the stage's argv, is newer than every file it reads, and was
        made on the torch thread count a stage run now would get (where both are known: CPU numbers depend on it)."""
        done, deps, _, _, argv, recorded, _ = rule
        if not (done.is_file() and recorded(done) == argv and not set(deps) & self.changed and all(
                not d.is_file() or d.stat().st_mtime <= done.stat().st_mtime for d in deps)):
            return False
        want, had = stage_threads(), self.threads_of(rule)
        return want is None or had is None or had == want

    def last_lines(self):
        """{(module, argv tuple): the log's last line for that stage}, read again only when the log has changed."""
        try:
            stat = Path(self.log).stat()
        except (OSError, TypeError):  # no log yet, or none set
            return {}
        key = (stat.st_mtime_ns, stat.st_size)
        if self._last[0] != key:
            last = {}
            for text in Path(self.log).read_text().splitlines():
                try:
                    rec = json.loads(text)
                    last[(rec["module"], tuple(rec["argv"]))] = rec
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a killed process
            self._last = (key, last)
        return self._last[1]

    def threads_of(self, rule):
        """The torch threads a done stage ran on: its log line's, else a training stage's config.json
        (cpu_threads); None when neither says."""
        threads = self.last_lines().get((rule[3], tuple(rule[4])), {}).get("threads")
        if threads is None and rule[0].name == "metrics.json":
            threads = config_threads(rule[0].parent)
        return threads

    def run(self, module, argv, done, recorded, deps=(), force=True):
        """Add the stage `python -m module *argv --force`; unless dry, run it now unless `done` exists,
        recorded(done) == argv, and done is newer than every file in deps. recorded: the argv (no --force) stored
        beside the output, or None. force=False: no --force (a stage that continues its run with --resume). A
        --data-root that is a file (a study's task file from a label table) is a dependency too: new labels or
        groups redo the stages that read it."""
        argv = [str(a) for a in argv]
        deps = [*deps, *(a for flag, a in zip(argv, argv[1:]) if flag == "--data-root" and a.endswith(".csv"))]
        line = " ".join(["python", "-m", module, *map(shlex.quote, argv), *(["--force"] if force else [])])
        rule = (Path(done), [Path(d) for d in deps], line, module, argv, recorded, force)
        self.rules.append(rule)
        if not self.dry:
            self.execute(rule)

    def run_all(self, start=0):
        """Run every listed stage from the start-th in order, each unless fresh when its turn comes (after the stages
        before it)."""
        for rule in self.rules[start:]:
            self.execute(rule)

    def cpu_note(self):
        """Once, before the first stage this list runs or writes into a makefile to run: on a CPU without bf16
        instructions (and no GPU), a note that every network trains in fp32 there, since the README's times were
        mostly measured on CPUs with them."""
        if self.noted or os.path.exists(GPU_NODE):
            return
        self.noted = True
        from common.runs import cpu_has_bf16
        if not cpu_has_bf16():
            print("note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so every network trains in fp32: "
                  "`make chestxray` took 85 min on such a 2-core CPU, 22 on one with them (docs/bench.md, 'How long "
                  "each study takes')", flush=True)

    def execute(self, rule):
        done, _, line, module, argv, _, force = rule
        if self.fresh(rule):
            print(f"  reuse {done.parent if done.name == 'metrics.json' else done}", flush=True)
            self.reused.append(str(done))
            return
        self.cpu_note()
        log = Path(self.log).resolve() if self.log else None
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        argv = [*argv, *(["--force"] if force else [])]
        rc = fork_stage(module, argv, log)
        if rc is None:
            child = subprocess.Popen([sys.executable, "-m", module, *argv],
                                     env={**os.environ, STAGE_LOG: str(log)} if log else None)
            try:
                rc = child.wait()
            except BaseException:  # Ctrl-C or a kill of the study: the stage gets SIGTERM, puts back what it replaced
                child.terminate()
                child.wait()
                raise
        if rc:
            raise DataError(f"stage failed (exit {rc}; its message is above): {line}")

    def script(self, module, argv, folder, deps=(), force=True):
        """A training stage: done when folder/metrics.json exists, folder/config.json recorded this argv, and it is
        newer than deps."""
        self.run(module, argv, Path(folder) / "metrics.json",
                 lambda done: recorded_argv(done.parent / "config.json"), deps, force)

    def samples(self, module, argv, out, deps=()):
        """A sampling stage: done when the .npz `out` records this argv in its meta and is newer than deps."""
        self.run(module, argv, out, samples_argv, deps)

    def output(self, module, argv, out, record=None, deps=(), force=True):
        """A stage that writes one file `out` (an evaluation's JSON or CSV) and its command into the JSON `record`
        (default: out itself, under "argv"): done when record holds this argv and out is newer than deps."""
        record = Path(record or out)
        self.run(module, argv, out, lambda done: recorded_argv(record), deps, force)

    def write_makefile(self, path):
        """The stages as make rules: each output depends on the files its stage reads; a stage that is not fresh
        (other argv recorded, or none) also depends on FORCE, so make reruns it. Recipes call $(STAGE_PYTHON) (default:
        $(PYTHON), default this interpreter; common.stage_server's client under `make <study>`) from the folder make
        runs in. Returns the path."""
        path = Path(path)
        fresh = [self.fresh(rule) for rule in self.rules]  # each reads its stage's files: once
        if not all(fresh):
            self.cpu_note()
        rules = ["# written by a study's --makefile; run with `make -j N -f " + str(path) + "`",
                 f"PYTHON ?= {sys.executable}", "# `make <study>` sets STAGE_PYTHON to common.stage_server's client",
                 "STAGE_PYTHON ?= $(PYTHON)",
                 ".PHONY: all FORCE",
                 *([f"export {STAGE_LOG} := " + str(Path(self.log).resolve()).replace("$", "$$").replace("#", "\\#")]
                   if self.log else []),
                 "all: " + " ".join(make_name(rule[0]) for rule in self.rules), "FORCE:"]
        for rule, done_already in zip(self.rules, fresh):
            done, deps, line = rule[:3]
            prereq = " ".join([make_name(d) for d in deps] + ([] if done_already else ["FORCE"]))
            recipe = line.replace("$", "$$").replace("python -m ", "$(STAGE_PYTHON) -m ", 1)  # the shell sees one $
            rules += [f"{make_name(done)}: {prereq}".rstrip(), "\t" + recipe]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rules) + "\n")
        return path

    def times(self):
        """Each listed stage's seconds and torch threads when it last ran (its process start and its main; None
        for a stage the log has no line of: one run before the log existed, or not yet run) and their sums by kind
        (KINDS: the process starts apart; "not recorded": how many stages had no line)."""
        last = self.last_lines()
        per_stage, by_kind, missing = [], dict.fromkeys(KINDS, 0.0), 0
        for rule in self.rules:
            rec = last.get((rule[3], tuple(rule[4])))
            per_stage.append(None if rec is None else {"start_s": rec["start_s"], "run_s": rec["run_s"],
                                                       "threads": rec.get("threads")})
            if rec is None:
                missing += 1
                continue
            by_kind[kind_of(rule[3])] += rec["run_s"]
            by_kind["process start"] += rec["start_s"] or 0.0
        return per_stage, {**{k: round(v, 1) for k, v in by_kind.items()},
                           "total": round(sum(by_kind.values()), 1), "not recorded": missing}

    def record(self, path, **extra):
        """stages.json: the commands, those this invocation reused, each stage's times and their sums by kind."""
        from common.runs import write_json
        per_stage, by_kind = self.times()
        write_json(path, {"stages": self.commands, "reused": self.reused, **extra, "stage_seconds": per_stage,
                          "seconds_by_kind": by_kind})


def add_study_args(p, out, scales=None):
    """The flags every study has for its stages and outputs: --device, --out, --runs, --force, --dry-run,
    --makefile; with scales ({name: {dest: value}}), --scale and --smoke too (see parse_scaled)."""
    if scales:
        p.add_argument("--scale", default="quick", choices=list(scales),
                       help="the settings of SCALES at the top of the study's file (quick: embedded data, CPU; full: "
                            "a GPU; smoke: seconds); every flag overrides its scale's value")
        p.add_argument("--smoke", action="store_true", help="the same as --scale smoke")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (passed to every stage)")
    p.add_argument("--out", default=out, help="tables, figures, preds.csv, summary.json, stages.json")
    p.add_argument("--runs", default=None, help=f"stage folders (default: runs/<--out>, e.g. runs/{out}); a stage whose "
                                                f"folder records the same command is reused")
    p.add_argument("--force", action="store_true", help="replace an existing --out (stage folders are reused)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stage commands (those a run would reuse marked '# reuse: ') and exit; writes nothing")
    p.add_argument("--makefile", default=None,
                   help="write the split files and the stages as a makefile here and exit: `make -j N -f FILE` runs "
                        "them, and the study run afterwards reuses them and writes the report")
    return p


def parse_scaled(p, scales, argv=None):
    """Parse with the chosen scale's settings as defaults (a flag on the command line wins); args.scale is the
    scale used ('smoke' under --smoke)."""
    pre, _ = p.parse_known_args(argv)
    scale = "smoke" if pre.smoke else pre.scale
    p.set_defaults(**scales[scale])
    args = p.parse_args(argv)
    args.scale = scale
    return args


def planned(stages, dry_run, makefile, then):
    """After a study listed its stages: print them (dry_run) or write them as a makefile (makefile: its path) and
    return True (the study stops there); False for a run. then: what the study does in its own process afterwards."""
    if dry_run:
        print("\n".join(stages.plan))
        print(f"# then in this process: {then}")
        return True
    if makefile:
        print(f"wrote {stages.write_makefile(makefile)}: run `make -j N -f {makefile}`, then this command without "
              f"--makefile for the rest")
        return True
    return False


def portable(path):
    """A path as a stage command records it: relative to the working folder when it lies inside it (stages run
    from the repository's root, and a committed command must not name a folder of the machine that ran it),
    else as given."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
