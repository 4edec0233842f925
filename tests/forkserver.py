"""`python -m module argv` for the tests, without paying an interpreter start and torch's import (3-6 s) per command.

A test worker starts one server process (this file) on first use. The server imports torch, the project's common
modules and what a stage imports on first use (common.stages.warm_imports), then, per command, imports the script
and forks: the child takes stdin from /dev/null, its own stdout and stderr files, the command's working directory and
environment, torch's, numpy's and random's seeds as a fresh interpreter has them, runs the script as `python -m`
does (runpy: its code anew as __main__, with the modules it imports already loaded) and exits with the script's
status; an uncaught exception prints its traceback and exits 1, and threads and exit handlers are wound up as an
interpreter would at its exit. A child cannot change the server: each command starts from the server's state (the
modules imported so far). What modules print while the server imports them (a warning at import) is not in the
command's output.

Where a fresh interpreter could behave otherwise, the command runs as a process of its own: another working
directory than the repository's, an environment whose import-time settings (threads, torch's and Python's own
variables, matplotlib's backend, the locale) differ from the server's, a script that does not import in the server
(its import error is then reported as a user would see it), a server that is not single-threaded (a fork would hang
torch), and everywhere when FAIRSYNTH_TEST_FORK=0. (Under a plain `pytest`, which leaves OMP_NUM_THREADS unset, the
commands that inherit the test's environment all start processes: `make test` sets it to 1, as the server does.) No
module of the project reads the environment when imported (tests/test_stages.py checks), so the child's environment
is the command's everywhere. The children share the server's string-hash seed, which fresh interpreters draw anew: a
test that two runs give the same numbers runs them as processes of their own (tests/same_numbers.py), so that an
order that depends on hashing shows.
"""
import atexit
import importlib
import json
import os
from pathlib import Path
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.stage_server import import_time  # noqa: E402  (the settings a fork must share: the product's list)
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ANSWERS = None  # the server's answer pipe, which no child keeps open


def _child(req):
    """In the forked child: become the command, run it, exit with its status (never returns)."""
    code = 1
    try:
        ANSWERS.close()  # this child's copy of the answer pipe
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
            f = os.open(path, flags)
            os.dup2(f, fd)
            os.close(f)
        os.setpgid(0, 0)  # a timeout stops the command and whatever it started
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: the command ends with the server
        if os.getppid() != req["server"]:  # the server ended before that took effect
            os._exit(1)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[0] = req["cwd"]  # where `python -m` looks first
        import random
        import numpy
        import torch
        random.seed()  # a fresh interpreter seeds these three from the OS
        numpy.random.seed()
        torch.seed()
        sys.argv = [req["module"], *req["argv"]]  # runpy puts the script's path first, as `python -m` does
        sys.modules.pop(req["module"], None)  # its imports stay loaded; its own code runs anew, as __main__
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        from common.stages import exit_status
        code = exit_status(e)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            import threading
            threading._shutdown()  # what an interpreter does at its exit: join its threads, then the exit handlers
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve_one(req):
    """The command's exit status, "timeout", or None where it must run as a process of its own."""
    from common.stages import can_fork
    try:
        importlib.import_module(req["module"])
    except BaseException:
        return None
    if not can_fork():
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(req)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # it had not yet made its group
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.005)


def serve():
    """The server's loop: one JSON request per line on stdin, one JSON answer (with the request's id) per line on
    the original stdout."""
    global ANSWERS
    sys.path[0] = str(ROOT)
    ANSWERS = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing printed here can garble the answers
    os.close(devnull)
    import torch  # noqa: F401
    from common.stages import warm_imports
    import common.cache  # noqa: F401
    import pandas  # noqa: F401
    warm_imports()
    for line in sys.stdin:
        req = {**json.loads(line), "server": os.getpid()}
        ANSWERS.write(json.dumps({"id": req["id"], "code": _serve_one(req)}) + "\n")
        ANSWERS.flush()


class Client:
    """One server per test process, started on first use."""
    server = env = log = None
    asked = 0

    @classmethod
    def start(cls):
        cls.env = {**os.environ, **SERVER_ENV}
        cls.log = Path(tempfile.gettempdir()) / f"fairsynth-forkserver-{os.getpid()}.log"
        with open(cls.log, "w") as log:
            cls.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=log, cwd=ROOT, text=True, env=cls.env)
        atexit.register(cls.stop)

    @classmethod
    def stop(cls):
        """End the server; its log goes too where it is empty."""
        if cls.server is not None:
            cls.server.kill()
            cls.server.wait()
            if cls.log.is_file() and cls.log.stat().st_size == 0:
                cls.log.unlink()
        cls.server = None

    @classmethod
    def ask(cls, req, timeout):
        """The server's answer, or None where the command must run as a process of its own. A server that dies or
        stops answering during a command raises: its command may have run."""
        now = import_time({**os.environ, **SERVER_ENV})  # what a server started now would have
        if import_time(req["env"]) != now:
            return None
        if cls.server is not None and (cls.server.poll() is not None or import_time(cls.env) != now):
            cls.stop()  # it died between commands, or this process's environment changed
        if cls.server is None:
            cls.start()
        cls.asked += 1
        try:
            cls.server.stdin.write(json.dumps({**req, "id": cls.asked, "timeout": timeout}) + "\n")
            cls.server.stdin.flush()
            ready, _, _ = select.select([cls.server.stdout], [], [], timeout + 120)
            line = cls.server.stdout.readline() if ready else ""
        except BaseException:
            cls.stop()
            raise
        answer = json.loads(line) if line else {}
        if answer.get("id") != cls.asked:
            cls.stop()
            raise RuntimeError(f"the tests' fork server stopped answering during {req['module']} (its log: {cls.log})")
        return answer["code"]


def python_m(module, argv, env=None, cwd=ROOT, timeout=600):
    """subprocess.CompletedProcess of `python -m module argv` (text stdout and stderr; .forked: whether the server
    ran it), through the server where it can, else as a process of its own. A command past its timeout raises
    subprocess.TimeoutExpired, as subprocess.run would."""
    argv = [str(a) for a in argv]
    cmd = [sys.executable, "-m", module, *argv]
    env = dict(os.environ if env is None else env)
    if os.environ.get("FAIRSYNTH_TEST_FORK", "1") != "0" and Path(cwd).resolve() == ROOT:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            code = Client.ask({"module": module, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out),
                               "stderr": str(err)}, timeout)
            if code == "timeout":
                raise subprocess.TimeoutExpired(cmd, timeout)
            if code is not None:
                r = subprocess.CompletedProcess(cmd, code, *(f.read_text(errors="replace") for f in (out, err)))
                r.forked = True
                return r
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    r.forked = False
    return r


if __name__ == "__main__":
    serve()
