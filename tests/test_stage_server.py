"""common/stage_server.py: a study's stage makefile run by make under the stage server, each stage a fork of one warm
process. A forked stage writes what a process of its own writes, byte for byte; exit statuses, output and signals
pass through as they would; where a fork would not be the same (other import-time settings, no server, the opt-out)
the stage starts a process of its own."""
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None or not sys.platform.startswith("linux"),
                                reason="needs GNU make and Linux (fork, /proc)")

TOY = '''import json, os, sys, time
from pathlib import Path
from common.cli import run

def parse_args(argv=None):
    return sys.argv[1:]

def main(argv):
    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    if "--sleep" in argv:
        (out.parent / "pid").write_text(str(os.getpid()))
        try:
            time.sleep(float(argv[argv.index("--sleep") + 1]))
        finally:
            (out.parent / "signalled").write_text("once")
    print("stdout of", out.name)
    print("stderr of", out.name, file=sys.stderr)
    if "--fail" in argv:
        sys.exit(3)
    import torch
    unseeded = torch.rand(3)  # a fresh interpreter's generator starts from torch's fixed default seed
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    x = torch.randn(64, 8)
    for _ in range(20):
        opt.zero_grad()
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step()
    out.write_text(json.dumps({"argv": sys.argv[1:], "unseeded": unseeded.tolist(), "loss": loss.item(),
                               "weights": net.weight.tolist(), "threads": torch.get_num_threads()}))

if __name__ == "__main__":
    run(main, parse_args)
'''


def setup(tmp_path, rules):
    """A package with the toy stage and a makefile of `target: command args` rules run as the studies' are."""
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "toy.py").write_text(TOY)
    lines = ["STAGE_PYTHON ?= $(PYTHON)", "all: " + " ".join(rules)]
    for target, cmd in rules.items():
        lines += [f"{target}:", f"\t{cmd.replace('STAGE', '$(STAGE_PYTHON) -m pkg.toy')}"]
    (tmp_path / "t.mk").write_text("\n".join(lines) + "\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1",
            "FAIRSYNTH_STAGE_LOG": str(tmp_path / "log.jsonl")}


def served(tmp_path, env, *make_args, **kw):
    """`python -m common.stage_server make -f t.mk ...`, as `make <study>` runs a stage makefile."""
    return subprocess.run([sys.executable, "-m", "common.stage_server", "make", "-f", str(tmp_path / "t.mk"),
                           f"PYTHON={sys.executable}", *make_args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def log(tmp_path):
    return {Path(rec["argv"][0]).name: rec for rec in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())}


def test_a_forked_stage_writes_what_a_process_writes(tmp_path):
    """Two stages side by side as forks, then the same as processes of their own (FAIRSYNTH_FORK_STAGES=0): the
    same numbers (an unseeded torch draws anew in each, as in a fresh interpreter), the output through make, the times logged with
    how each started. A stage whose import-time settings differ (OMP_NUM_THREADS=2) starts a process of its own."""
    env = setup(tmp_path, {"a": "STAGE forked/a.json", "b": "STAGE forked/b.json",
                           "c": "OMP_NUM_THREADS=2 STAGE forked/c.json"})
    r = served(tmp_path, env, "-j2")
    assert r.returncode == 0, r.stderr
    assert "stdout of a.json" in r.stdout and "stderr of b.json" in r.stderr
    got = log(tmp_path)
    assert got["a.json"]["forked"] and got["b.json"]["forked"] and got["a.json"]["threads"] == 1
    assert not got["c.json"]["forked"] and got["c.json"]["threads"] == 2  # a process of its own

    (tmp_path / "log.jsonl").unlink()
    setup(tmp_path, {"a": "STAGE alone/a.json", "b": "STAGE alone/b.json"})
    r = served(tmp_path, {**env, "FAIRSYNTH_FORK_STAGES": "0"}, "-j2")
    assert r.returncode == 0, r.stderr
    assert not any(rec["forked"] for rec in log(tmp_path).values())
    for name in ("a.json", "b.json"):
        forked, alone = (json.loads((tmp_path / d / name).read_text()) for d in ("forked", "alone"))
        assert forked["argv"] == [f"forked/{name}"] and alone["argv"] == [f"alone/{name}"]
        same = {k: v for k, v in forked.items() if k not in ("argv", "unseeded")}
        assert same == {k: v for k, v in alone.items() if k not in ("argv", "unseeded")}
    # torch seeds itself from the OS in a fresh interpreter: so in each forked stage, not once for all
    unseeded = [json.loads((tmp_path / "forked" / name).read_text())["unseeded"] for name in ("a.json", "b.json")]
    assert unseeded[0] != unseeded[1]


def test_a_failing_stage_fails_make_with_its_status(tmp_path):
    env = setup(tmp_path, {"bad": "STAGE out/bad.json --fail"})
    r = served(tmp_path, env)
    assert r.returncode == 2 and "Error 3" in r.stderr and "stderr of bad.json" in r.stderr
    assert not (tmp_path / "log.jsonl").exists()  # a stage that fails records no time


def test_the_client_without_a_server_runs_the_stage_itself(tmp_path):
    env = setup(tmp_path, {})
    r = subprocess.run([sys.executable, "-m", "common.stage_server", "run", "-m", "pkg.toy", "x/a.json"], cwd=tmp_path,
                       env={**env, "FAIRSYNTH_STAGE_SERVER": str(tmp_path / "no-such-socket")}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "stdout of a.json" in r.stdout, r.stderr
    assert not log(tmp_path)["a.json"]["forked"]


def wait_for(path, proc, seconds=120):
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.05)


def test_ctrl_c_reaches_a_forked_stage_once(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground group: server, make, client): the stage, in a group of its own, gets it
    once, from its client, and ends as a process would (exit 130 after its note); make and the server end too."""
    env = setup(tmp_path, {"slow": "STAGE out/slow.json --sleep 120"})
    proc = subprocess.Popen([sys.executable, "-m", "common.stage_server", "make", "-f", str(tmp_path / "t.mk"),
                             f"PYTHON={sys.executable}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(tmp_path / "out" / "pid", proc)
        pid = int((tmp_path / "out" / "pid").read_text())
        assert os.getpgid(pid) == pid  # the stage leads its own group: the terminal's Ctrl-C does not reach it
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and err.count("interrupted: run the same command again") == 1, err
    assert (tmp_path / "out" / "signalled").read_text() == "once" and not (tmp_path / "log.jsonl").exists()


def processes():
    """(pid, command line, working folder) of this user's processes."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append((int(p), Path(f"/proc/{p}/cmdline").read_bytes(), os.readlink(f"/proc/{p}/cwd")))
        except OSError:  # ended meanwhile, or not ours
            pass
    return out


def test_a_stage_whose_client_is_killed_is_stopped(tmp_path):
    """A client killed outright (make's recipe process, SIGKILL) cannot pass anything on: the server sees its
    connection close and stops its stage with SIGTERM."""
    env = setup(tmp_path, {"slow": "STAGE out/slow.json --sleep 120"})
    proc = subprocess.Popen([sys.executable, "-m", "common.stage_server", "make", "-f", str(tmp_path / "t.mk"),
                             f"PYTHON={sys.executable}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(tmp_path / "out" / "pid", proc)
        stage = int((tmp_path / "out" / "pid").read_text())
        clients = [p for p in processes() if b"stage_server\x00run" in p[1] and p[2] == str(tmp_path)]
        assert len(clients) == 1, clients
        os.kill(clients[0][0], signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and (tmp_path / "out" / "signalled").exists()  # SIGTERM from the server
    assert not Path(f"/proc/{stage}").exists()


def test_make_with_nothing_to_do_imports_nothing(tmp_path):
    """The server imports torch when the first stage asks, not before: a round with every stage done costs a
    make."""
    env = setup(tmp_path, {})
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "common.stage_server", "make", "-f",
                        str(tmp_path / "t.mk")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")]
    assert "selectors" in imported and "torch" not in imported  # a server was set up, and imported no torch


def test_a_parent_makes_unreachable_job_slots_are_dropped(tmp_path):
    """`make -j2 <study>`: make passes its job slots (a pipe) only to recipe lines it sees calling $(MAKE), and a
    study's stage make sits in a macro. The server drops them from MAKEFLAGS, so that the stage make runs its own -j
    instead of warning and running one stage at a time; slots it can reach stay."""
    from common.stage_server import make_env
    env = setup(tmp_path, {"a": "STAGE out/a.json", "b": "STAGE out/b.json"})
    (tmp_path / "outer.mk").write_text(f"M = $(MAKE)\nall:\n\t{sys.executable} -m common.stage_server $(M) -j2 -f "
                                       f"t.mk PYTHON={sys.executable}\n")
    r = subprocess.run(["make", "-j2", "-f", "outer.mk"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "jobserver" not in r.stderr, r.stderr
    assert all(rec["forked"] for rec in log(tmp_path).values()) and len(log(tmp_path)) == 2
    read, write = os.pipe()
    try:
        flags = f" -j2 --jobserver-auth={read},{write} -- X=a\\ b"
        assert make_env({"MAKEFLAGS": flags})["MAKEFLAGS"] == flags  # reachable: kept
        os.close(write)
        assert make_env({"MAKEFLAGS": flags})["MAKEFLAGS"] == " -j2 -- X=a\\ b"
    finally:
        os.close(read)
    assert make_env({"PATH": "x"}) == {"PATH": "x"}
