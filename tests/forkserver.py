"""`python -m module argv` for the tests, without paying an interpreter start and torch's import (~3 s) per command.

A test worker starts one server process (this file) on first use. The server imports torch, the project's common
modules and what a stage imports on first use (common.stages.warm_imports), then, per command, imports the script
and forks: the child takes the command's working directory, environment, stdin from /dev/null and its own stdout and
stderr files, runs the script as `python -m` does (runpy: its code anew as __main__, with the modules it imports
already loaded) and exits with the script's status; an uncaught exception prints its traceback and exits 1, as an
interpreter would. The child cannot change the server, so every command starts from the same state. What the
modules print while the server imports them (a warning at import) is not in the command's output.

Where a fresh interpreter could behave otherwise, the command runs as a process of its own: a script that does not
import in the server (its import error is then reported as a user would see it), an environment whose import-time
settings (threads, matplotlib's backend) differ from the server's, a server that is not single-threaded (a fork
would hang torch), and everywhere when FAIRSYNTH_TEST_FORK=0. No module of the project reads the environment when
imported (tests/test_stages.py checks), so the child's environment is the command's everywhere. The children share
the server's string-hash seed, which fresh interpreters draw anew: a test that two runs give the same numbers runs
them as processes of their own (tests/same_numbers.py), so that an order that depends on hashing shows.
"""
import importlib
import json
import os
from pathlib import Path
import runpy
import signal
import subprocess
import sys
import tempfile
import time

ROOT = Path(__file__).resolve().parent.parent
IMPORT_TIME = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MPLBACKEND", "PYTHONHASHSEED",
               "PYTHONPATH")
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _child(req):
    """In the forked child: become the command, run it, exit with its status (never returns)."""
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
            f = os.open(path, flags)
            os.dup2(f, fd)
            os.close(f)
        sys.path[0] = req["cwd"]  # where `python -m` looks first
        import random
        random.seed()  # a fresh interpreter seeds these from the OS; the server's state is every child's
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.argv = [req["module"], *req["argv"]]  # runpy puts the script's path first, as `python -m` does
        sys.modules.pop(req["module"], None)  # its imports stay loaded; its own code runs anew, as __main__
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:  # the interpreter's rules for sys.exit(...)
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            import atexit
            atexit._run_exitfuncs()  # what an interpreter runs at its exit (the handlers of the modules it imported)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve_one(req):
    """The command's exit status, "timeout", or None where it must run as a process of its own."""
    from common.stages import can_fork
    if any(req["env"].get(k) != os.environ.get(k) for k in IMPORT_TIME):
        return None
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
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.005)


def serve():
    """The server's loop: one JSON request per line on stdin, one JSON answer per line on the original stdout."""
    sys.path[0] = str(ROOT)
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing printed here can garble the answers
    from common.stages import warm_imports
    import common.cache  # noqa: F401
    import pandas  # noqa: F401
    warm_imports()
    for line in sys.stdin:
        answers.write(json.dumps({"code": _serve_one(json.loads(line))}) + "\n")
        answers.flush()


class Client:
    """One server per test process, started on first use."""
    server = None

    @classmethod
    def ask(cls, req):
        if cls.server is None or cls.server.poll() is not None:
            cls.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, cwd=ROOT, text=True,
                                          env={**os.environ, **SERVER_ENV})  # it ends when this process does
        try:
            cls.server.stdin.write(json.dumps(req) + "\n")
            cls.server.stdin.flush()
            answer = cls.server.stdout.readline()
        except OSError:
            answer = ""
        return json.loads(answer)["code"] if answer else None


def python_m(module, argv, env=None, cwd=ROOT, timeout=600):
    """subprocess.CompletedProcess of `python -m module argv` (text stdout and stderr; .forked: whether the server
    ran it), through the server where it can, else as a process of its own. A command past its timeout raises
    subprocess.TimeoutExpired, as subprocess.run would."""
    argv = [str(a) for a in argv]
    cmd = [sys.executable, "-m", module, *argv]
    env = dict(os.environ if env is None else env)
    if os.environ.get("FAIRSYNTH_TEST_FORK", "1") != "0":
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            code = Client.ask({"module": module, "argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out),
                               "stderr": str(err), "timeout": timeout})
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
