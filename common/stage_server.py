"""A study's stages started as forks of one warm process instead of fresh interpreters.

A stage started as a process of its own spends 2-3 s (2-core CPU) starting Python and importing torch and its
modules before its main runs, and a quick study runs 30-260 stages. `make <study>` therefore runs its stage makefile
under this server: one process imports torch and what stages import on first use, once; each stage's recipe is a
small client that asks it for a fork, and the child becomes that command: it takes the recipe's stdin, stdout and
stderr (passed over a Unix socket), working folder and environment, draws random's and numpy's seeds from the OS and
torch's too, as a fresh interpreter does, runs the script's main as `python -m`
would (common.stages.call_main), appends its times to the study's log (its start: from the client's start to its
main) and exits with the script's status, which the client exits with. Nothing a child does reaches the server or
the next stage: each starts from the server's state after its imports.

    python -m common.stage_server make -j2 -f runs/results/chestxray.mk PYTHON=python3   # what `make <study>` runs
    python -m common.stage_server run -m classify.train_chexnet --seed 0 ...            # a recipe: the client

The server runs the make command after it with STAGE_PYTHON (on make's command line) naming the client and
$FAIRSYNTH_STAGE_SERVER naming its socket, serves until make exits, and exits with make's status. Where a fork is
not safe, or not the same as a process, there is no server and make runs alone, its stages as processes of their
own: no fork (not Linux), $FAIRSYNTH_FORK_STAGES=0, an NVIDIA GPU (CUDA does not survive a fork), or a server that
is not single-threaded after its imports (numpy's BLAS starts a thread pool unless OMP_NUM_THREADS=1, as make sets it
at quick and smoke scale: a fork would hang torch). A client starts its stage as a process of its own where there is
no server, where the command's import-time settings (IMPORT_TIME) differ from the server's, or where the script does
not import in the server (the process then reports the error as it would have).

Signals: a child runs in a process group of its own, and its client passes on each signal it gets (Ctrl-C, make's
SIGTERM), so the stage gets each once, as a process of its own would, and puts back what it replaced. A child whose
server dies gets SIGTERM, and so does a child whose client dies. The children share the server's string-hash seed
(fresh interpreters draw one each): no stage's numbers may depend on the order of a set of strings.
"""
import json
import os
import shlex
import signal
import socket
import sys
import time

SOCKET_ENV = "FAIRSYNTH_STAGE_SERVER"
# prefixes of the variables read when a module is imported, not those that libraries set for themselves when imported
# (scikit-learn sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK, torch's compiler TORCHINDUCTOR_CACHE_DIR)
IMPORT_TIME = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "TORCH_", "PYTHON", "CUDA_", "MPLBACKEND", "MPLCONFIGDIR", "TQDM_",
               "LC_", "LANG")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def import_time(env):
    """The variables of env that modules read when imported: a forked stage must have the server's. (PYTHON alone is
    make's variable, which make puts into its recipes' environment: no module reads it.)"""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k != "PYTHON"}


def run_stage(module, argv, start_s):
    """In a forked child: the stage's main (common.stages.call_main), its times appended to the study's log when the
    main returns (start_s: what its start cost), and its exit status. The parent's --force replacement is the
    parent's to settle, not the child's."""
    import common.runs
    from common.stages import call_main, log_stage_time
    common.runs._REPLACED.clear()
    started = time.perf_counter()
    code, returned = call_main(module, argv)
    if returned:
        log_stage_time(module, argv, start_s, time.perf_counter() - started, forked=True)
    return code


# ---- the client: a stage recipe's process (imports nothing heavy) ----------------------------------------------------
def send(sock, obj, fds=()):
    """obj as JSON behind its 4-byte length, fds (SCM_RIGHTS) with the first bytes."""
    data = json.dumps(obj).encode()
    data = len(data).to_bytes(4, "big") + data
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):  # (sendall of nothing raises where the server has answered and closed)
        sock.sendall(data[sent:])


def answers(sock):
    """The server's answers to one request, one JSON object a line, until it closes the connection."""
    buf = b""
    while chunk := sock.recv(4096):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def client(module, argv):
    """`python -m module argv` as a fork of the server that $FAIRSYNTH_STAGE_SERVER names, signals passed on: its exit
    status (negative: the signal that ended it). Without a server, or where it declines, this process becomes that
    command (exec). A server that ends without saying how the stage ended is an error (the stage may have run)."""
    started, path = time.time(), os.environ.get(SOCKET_ENV)
    first = None
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # until the child's pid is known: then passed on
    try:
        if path:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(path)
            except OSError:
                path = None
        if path:
            try:
                send(sock, {"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                            "started": started}, (0, 1, 2))
                replies = answers(sock)
                first = next(replies, None)
            except OSError:
                first = None
            if first is None:
                print(f"error: the stage server ({path}) ended before starting `{module}`: run make again",
                      file=sys.stderr)
                return 1
        if first and "pid" in first:
            pid = first["pid"]

            def pass_on(sig, frame):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:  # it has just ended
                    pass
            for sig in FORWARDED:
                signal.signal(sig, pass_on)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            last = next(replies, None)
            if last is None:
                print(f"error: the stage server ({path}) ended during `{module}`: run make again", file=sys.stderr)
                return 1
            return last["code"]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


# ---- the server ------------------------------------------------------------------------------------------------------
def receive(conn):
    """One request and the three file descriptors sent with it."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    n, data = int.from_bytes(msg[:4], "big"), msg[4:]
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("request cut short")
        data += chunk
    return json.loads(data), fds


def child(req, fds, server_pid, closing):
    """In the forked child: become the stage (module docstring) and exit with its status; never returns."""
    code = 1
    try:
        for obj in closing:  # the server's listening socket, selector and clients' connections
            obj.close()
        os.setpgid(0, 0)
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: SIGTERM when the server ends
        if os.getppid() != server_pid:  # it ended before that took effect
            os._exit(1)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
        for sig in FORWARDED[1:]:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
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
        code = run_stage(req["module"], req["argv"], time.time() - req["started"])
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def why_not_here(req, fds):
    """Why this request's stage must start as a process of its own, or None where it can be forked here."""
    import importlib
    from common.stages import can_fork
    if len(fds) != 3:
        return "stdin, stdout and stderr did not arrive"
    if import_time(req["env"]) != import_time(os.environ):
        return "other import-time settings"
    try:
        importlib.import_module(req["module"])  # loaded once, here: its next stages find it
    except Exception:
        return "the script does not import here"
    return None if can_fork() else "this server is no longer single-threaded"


def reply(conn, obj):
    try:
        conn.sendall((json.dumps(obj) + "\n").encode())
    except OSError:  # the client is gone: the loop stops its stage
        pass


def can_serve():
    """The checks that need no import: fork, Linux's /proc, no opt-out, no NVIDIA device."""
    from common.stages import FORK, GPU_NODE
    return (hasattr(os, "fork") and hasattr(socket, "send_fds") and os.path.isdir("/proc/self/task")
            and os.environ.get(FORK, "1") != "0" and not os.path.exists(GPU_NODE))


def warm_up():
    """Import what stages import (torch, pandas, the image cache, common.stages.warm_imports); whether this process
    may still fork afterwards (no thread started)."""
    import torch  # noqa: F401
    import pandas  # noqa: F401
    import common.cache  # noqa: F401
    from common.stages import can_fork, warm_imports
    return warm_imports() and can_fork()


class Server:
    """The server's state: its listening socket, the running children and their clients' connections."""

    def __init__(self, listener):
        import selectors
        self.listener, self.sel = listener, selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ)
        self.children = {}  # pid -> its client's connection (None once the client is gone)
        self.stopped = set()  # the children sent SIGTERM after make ended
        self.can_fork = None  # not known until the first stage asks (warm_up)

    def step(self):
        """Answer what arrived within 50 ms (a new stage, or a client that ended), then tell the clients of the
        children that ended how."""
        for key, _ in self.sel.select(0.05):
            if key.fileobj is self.listener:
                self.accept()
            elif not key.fileobj.recv(1):  # its client ended (it sends nothing else): stop its stage
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                self.children[key.data] = None
                self.stop(key.data)
        for pid, conn in list(self.children.items()):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                del self.children[pid]
                if conn is not None:
                    reply(conn, {"code": os.waitstatus_to_exitcode(status)})
                    self.sel.unregister(conn)
                    conn.close()

    def accept(self):
        """A client's request: fork its stage and send the child's pid, or say why it must start a process."""
        import selectors
        conn = self.listener.accept()[0]
        try:
            conn.settimeout(10)
            req, fds = receive(conn)
            conn.settimeout(None)
        except (OSError, ValueError):
            conn.close()
            return
        if self.can_fork is None:  # the first stage's request: a make with nothing to do costs no imports
            self.can_fork = warm_up()
        reason = why_not_here(req, fds) if self.can_fork else "this server cannot fork"
        if reason:
            for fd in fds:
                os.close(fd)
            reply(conn, {"self": reason})
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # the child's arrive once it has its own handlers
        pid = os.fork()
        if pid == 0:
            child(req, fds, os.getppid(),
                  [self.listener, self.sel, conn, *filter(None, self.children.values())])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.sel.register(conn, selectors.EVENT_READ, pid)
        reply(conn, {"pid": pid})

    def stop(self, pid):
        """SIGTERM to a child, once."""
        if pid not in self.stopped:
            self.stopped.add(pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # it has just ended
                pass


def make_env(env):
    """make's environment: env with $MAKEFLAGS's jobserver left out where this process cannot reach it. A parent
    make (`make -j4 <study>`) passes its job slots only to the recipe lines it sees calling $(MAKE), and a study's
    stage make is inside a macro: without this, it would warn and run one stage at a time; with it, its own -j holds."""
    def reachable(word):
        where = word.split("=", 1)[1]
        if where.startswith("fifo:"):
            return os.path.exists(where[5:])
        try:
            return all(os.fstat(int(fd)) for fd in where.split(","))
        except (ValueError, OSError):
            return False
    words = env.get("MAKEFLAGS", "").split(" ")
    kept = [w for w in words if not (w.startswith(("--jobserver-auth=", "--jobserver-fds=")) and not reachable(w))]
    return {**env, "MAKEFLAGS": " ".join(kept)} if "MAKEFLAGS" in env else dict(env)


def serve(command):
    """Run command (make and its arguments) with a stage server beside it; its exit status. Where no server can run
    (module docstring), this process becomes the command. The server imports what stages import when the first
    stage asks."""
    env = make_env(os.environ)
    if not can_serve():
        os.execvpe(command[0], command, env)
    import subprocess
    import tempfile
    folder = tempfile.mkdtemp(prefix="fairsynth-stages-")  # 0700: only this user may ask for a fork
    path = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(path)
        listener.listen(64)
        server = Server(listener)
        signal.signal(signal.SIGINT, lambda sig, frame: None)  # Ctrl-C reaches make and the clients: they decide
        stage_python = shlex.join([sys.executable, "-m", "common.stage_server", "run"])
        try:
            make = subprocess.Popen([*command, f"STAGE_PYTHON={stage_python}"], env={**env, SOCKET_ENV: path},
                                    close_fds=False)  # make's jobserver pipe, where a parent make passed one
        except OSError as e:
            print(f"error: {command[0]}: {e.strerror or e} (is it installed and on PATH?)", file=sys.stderr)
            return 127
        signal.signal(signal.SIGTERM, lambda sig, frame: make.send_signal(sig))
        while make.poll() is None or server.children:
            server.step()
            if make.poll() is not None:  # make has ended: a stage still running has no one to report to
                for pid in list(server.children):
                    server.stop(pid)
        return make.returncode
    finally:
        listener.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


def parse_args(argv=None):
    """`run -m MODULE ARGS...` (the client) or `COMMAND...` (the server, COMMAND: make and its arguments); by hand,
    not argparse: the arguments after the module are the stage's, passed on as they are."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    if argv[0] == "run":
        if len(argv) < 3 or argv[1] != "-m":
            print("error: usage: python -m common.stage_server run -m MODULE [ARGS...] (see --help)", file=sys.stderr)
            sys.exit(2)
        return {"module": argv[2], "argv": argv[3:]}
    return {"command": argv}


def main(args):
    code = client(args["module"], args["argv"]) if "module" in args else serve(args["command"])
    if code < 0:  # the stage ended by a signal: end the same way, so that make reports it as it would
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(parse_args())
