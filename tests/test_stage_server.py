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
    if "--kill" in argv:
        os.kill(os.getpid(), 9)
    import torch
    unseeded = torch.rand(3)  # torch seeds itself from the OS in a fresh interpreter
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
    """A package with the toy stage and a makefile of `target: command` rules (TOY: the stage, as a study's stage
    makefile calls it)."""
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "toy.py").write_text(TOY)
    lines = ["STAGE_PYTHON ?= $(PYTHON)", "all: " + " ".join(rules)]
    for target, cmd in rules.items():
        lines += [f"{target}:", f"\t{cmd.replace('TOY', '$(STAGE_PYTHON) -m pkg.toy')}"]
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
    env = setup(tmp_path, {"a": "TOY forked/a.json", "b": "TOY forked/b.json > b.out 2> b.err",
                           "c": "OMP_NUM_THREADS=2 TOY forked/c.json", "d": "FAIRSYNTH_FORK_STAGES=0 TOY x/d.json"})
    r = served(tmp_path, env, "-j2")
    assert r.returncode == 0, r.stderr
    assert "stdout of a.json" in r.stdout and "stderr of a.json" in r.stderr
    # the recipe's own stdout and stderr (passed over the socket), not the server's
    assert "of b.json" not in r.stdout + r.stderr and "stdout of b.json" in (tmp_path / "b.out").read_text()
    assert "stderr of b.json" in (tmp_path / "b.err").read_text()
    got = log(tmp_path)
    assert got["a.json"]["forked"] and got["b.json"]["forked"] and got["a.json"]["threads"] == 1
    assert not got["c.json"]["forked"] and got["c.json"]["threads"] == 2  # a process of its own
    assert not got["d.json"]["forked"]

    (tmp_path / "log.jsonl").unlink()
    setup(tmp_path, {"a": "TOY alone/a.json", "b": "TOY alone/b.json"})
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


def test_a_failing_stage_fails_make_with_its_status_or_signal(tmp_path):
    """make sees what it would see of a process: the exit status, or the signal that ended the stage."""
    env = setup(tmp_path, {"bad": "TOY out/bad.json --fail", "killed": "TOY out/killed.json --kill"})
    for forked in ("1", "0"):
        r = served(tmp_path, {**env, "FAIRSYNTH_FORK_STAGES": forked}, "-k")
        assert r.returncode == 2 and "bad] Error 3" in r.stderr and "stderr of bad.json" in r.stderr, r.stderr
        assert "killed] Killed" in r.stderr, r.stderr
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


def start(tmp_path, env, *make_args, **popen):
    """The server and make in a session of their own (as a terminal's foreground job would be)."""
    return subprocess.Popen([sys.executable, "-m", "common.stage_server", "make", "-f", str(tmp_path / "t.mk"),
                             f"PYTHON={sys.executable}", *make_args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def finish(proc, timeout=60):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def clients(tmp_path):
    return [p for p in processes() if b"stage_server\x00run" in p[1] and p[2] == str(tmp_path)]


def test_ctrl_c_reaches_a_forked_stage_once(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground group: server, make, client): the stage, in its client's group, gets it
    from the terminal, once (its client ignores it meanwhile), and ends as a process would (exit 130 after its
    note); make and the server end too."""
    env = setup(tmp_path, {"slow": "TOY out/slow.json --sleep 120"})
    proc = start(tmp_path, env)
    try:
        wait_for(tmp_path / "out" / "pid", proc)
        pid = int((tmp_path / "out" / "pid").read_text())
        (client,) = clients(tmp_path)
        assert os.getpgid(pid) == os.getpgid(client[0]) != pid
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        _, err = finish(proc)
    assert proc.returncode != 0 and err.count("interrupted: run the same command again") == 1, err
    assert (tmp_path / "out" / "signalled").read_text() == "once" and not (tmp_path / "log.jsonl").exists()


def test_a_hangup_ignored_as_under_nohup_stays_ignored(tmp_path):
    """`nohup make chestxray`: SIGHUP is ignored in make and its recipes, and so in a fresh stage process; a forked
    stage ignores it too (the server's own state does not decide)."""
    env = setup(tmp_path, {"slow": "TOY out/slow.json --sleep 120"})
    proc = start(tmp_path, env, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        wait_for(tmp_path / "out" / "pid", proc)
        pid = int((tmp_path / "out" / "pid").read_text())
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(1)
        assert Path(f"/proc/{pid}").exists() and not (tmp_path / "out" / "signalled").exists()
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        finish(proc)
    assert (tmp_path / "out" / "signalled").exists()


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
    connection close and stops its stage with SIGTERM, while make (-k) goes on with another stage."""
    env = setup(tmp_path, {"slow": "TOY out/slow.json --sleep 120", "other": "TOY other/o.json --sleep 120"})
    proc = start(tmp_path, env, "-k", "-j2")
    try:
        wait_for(tmp_path / "out" / "pid", proc)
        wait_for(tmp_path / "other" / "pid", proc)
        stage = int((tmp_path / "out" / "pid").read_text())
        (client,) = [c for c in clients(tmp_path) if b"out/slow.json" in c[1]]
        os.kill(client[0], signal.SIGKILL)
        wait_for(tmp_path / "out" / "signalled", proc, 30)
        assert proc.poll() is None and not (tmp_path / "other" / "signalled").exists()  # make goes on meanwhile
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        finish(proc)
    end = time.monotonic() + 10
    while Path(f"/proc/{stage}").exists() and time.monotonic() < end:  # reaped by the server as it ends
        time.sleep(0.05)
    assert not Path(f"/proc/{stage}").exists()


def test_make_with_nothing_to_do_imports_nothing(tmp_path):
    """The server imports torch when the first stage asks, not before: a round with every stage done costs a
    make."""
    env = setup(tmp_path, {})
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "common.stage_server", "make", "-f",
                        str(tmp_path / "t.mk")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time")]
    assert "selectors" in imported and not {"torch", "numpy"} & set(imported)  # a server was set up, imported neither


def test_a_parent_makes_job_slots_are_shared_where_reachable_and_dropped_where_not(tmp_path):
    """`make -j2 <study>`: make passes its job slots (a pipe) only to recipe lines it sees calling $(MAKE), and a
    study's stage make sits in a macro. Out of reach, the server drops them from MAKEFLAGS, so that the stage make runs
    its own -j without a warning; within reach ('+'), it drops the -j, so that the stage make shares them."""
    from common.stage_server import with_job_slots
    env = setup(tmp_path, {"a": "TOY out/a.json", "b": "TOY out/b.json"})
    for prefix in ("", "+"):
        (tmp_path / "outer.mk").write_text(f"M = $(MAKE)\nall:\n\t{prefix}{sys.executable} -m common.stage_server "
                                           f"$(M) -j2 -f t.mk PYTHON={sys.executable}\n")
        r = subprocess.run(["make", "-j2", "-f", "outer.mk"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "jobserver" not in r.stderr, r.stderr
        assert all(rec["forked"] for rec in log(tmp_path).values()) and len(log(tmp_path)) == 2
        shutil.rmtree(tmp_path / "out")
        (tmp_path / "log.jsonl").unlink()
    read, write = os.pipe()
    try:
        flags = f" -j2 --jobserver-auth={read},{write} -- X=a\\ b"
        cmd = ["make", "-j4", "-f", "x.mk", "-jobs"]
        assert with_job_slots({"MAKEFLAGS": flags}, cmd) == ({"MAKEFLAGS": flags}, ["make", "-f", "x.mk", "-jobs"])
        os.close(write)
        assert with_job_slots({"MAKEFLAGS": flags}, cmd) == ({"MAKEFLAGS": " -j2 -- X=a\\ b"}, cmd)
    finally:
        os.close(read)
    assert with_job_slots({"PATH": "x"}, cmd) == ({"PATH": "x"}, cmd)
