"""A study's stages started as forks of one warm process instead of fresh interpreters.

A stage started as a process of its own spends 2-3 s (2-core CPU) starting Python and importing torch and its
modules before its main runs, and about as much again importing what a stage imports on first use (torch._dynamo at
a torch optimizer's first step, pyplot); a quick study runs 30-260 stages. `make <study>` therefore runs its stage
makefile under this server: make runs as the server's child, the server imports torch and the rest once, when the
first stage asks, and each stage's recipe is a small client that asks it for a fork. The child becomes that command:
it takes the recipe's stdin, stdout and stderr (passed over a Unix socket), process group, working folder,
environment and ignored signals, draws random's, numpy's and torch's seeds from the OS as a fresh interpreter does,
runs the script's main as `python -m` would (common.stages.call_main), appends its times to the study's log (its
start: from the client's start to its main), runs its exit handlers, and exits with the script's status, which the
client exits with (a stage killed by a signal: the client ends by the same signal). Nothing a child does reaches the
server or the next stage; each starts from the server's state after its imports and the scripts imported so far
(no script changes global state when imported: tests/same_numbers.py compares forked and fresh stages' files).

    python -m common.stage_server make -j2 -f runs/results/chestxray.mk PYTHON=python3   # what `make <study>` runs
    python -m common.stage_server run -m classify.train_chexnet --seed 0 ...            # a recipe: the client

The server runs the make command after it with STAGE_PYTHON (on make's command line) naming the client and
$FAIRSYNTH_STAGE_SERVER naming its socket, serves until make exits, and exits with make's status. Where a fork is
not safe, or not the same as a process, there is no server and make runs alone, its stages processes of their own:
no fork (not Linux), $FAIRSYNTH_FORK_STAGES=0, an NVIDIA GPU (CUDA does not survive a fork), or a server that is not
single-threaded (numpy's BLAS starts a thread pool unless OMP_NUM_THREADS=1, as make sets it at quick and smoke
scale: a fork would hang torch). A stage starts as a process of its own where the server is gone or fails, where its
recipe sets FAIRSYNTH_FORK_STAGES=0, runs in another folder or with other import-time settings (IMPORT_TIME), or
where the script does not import in the server (the process then reports the error as it would have).

Signals: the child is in its client's process group, so Ctrl-C, Ctrl-Z and a hangup from the terminal reach it as
they would reach a process of its own (its client ignores those meanwhile); the client passes on SIGTERM (make's
way of stopping a recipe). A signal sent to the client alone other than SIGTERM does not reach the stage. A child
whose server dies gets SIGTERM, and so does a child whose client dies. The children share the server's string-hash
seed (fresh interpreters draw one each): no stage's numbers may depend on the order of a set of strings.
"""
import json
import os
from pathlib import Path
import shlex
import signal
import socket
import sys
import time

SOCKET_ENV = "FAIRSYNTH_STAGE_SERVER"
# prefixes of the variables read when a module is imported, not those that libraries set for themselves when imported
# (scikit-learn sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK, torch's compiler TORCHINDUCTOR_CACHE_DIR)
IMPORT_TIME = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "TORCH_", "PYTORCH_", "ATEN_", "DNNL_", "ONEDNN_", "NUMEXPR_",
               "PYTHON", "CUDA_", "MPLBACKEND", "MPLCONFIGDIR", "TQDM_", "LC_", "LANG")
TERMINAL = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # what a terminal sends a whole process group
FORK = "FAIRSYNTH_FORK_STAGES"  # environment: 0 starts every stage as a fresh interpreter
GPU_NODE = "/dev/nvidiactl"  # present where an NVIDIA GPU is: no fork (CUDA)


def process_age():
    """Seconds since this process started (Linux: /proc; None elsewhere): what starting Python and importing the
    script's modules cost before its main ran."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return age if 0 <= age < 86400 else None  # a sandbox whose clocks disagree: no number rather than a wrong one


def import_time(env):
    """The variables of env that modules read when imported: a forked stage must have the server's. (PYTHON alone is
    make's variable, which make puts into its recipes' environment: no module reads it.)"""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k != "PYTHON"}


def run_stage(module, argv, start_s):
    """In a forked child: the stage's main (common.stages.call_main), its times appended to the study's log when the
    main returns (start_s: what its start cost), then what an interpreter does at its exit (join the threads the
    stage started, run the exit handlers it registered; those the parent registered are not the child's); its exit
    status. The parent's --force replacement is the parent's to settle, not the child's."""
    import atexit
    import threading
    import common.runs
    from common.stages import call_main, log_stage_time
    atexit._clear()
    common.runs._REPLACED.clear()
    started = time.perf_counter()
    try:
        code, returned = call_main(module, argv)
        if returned:
            log_stage_time(module, argv, start_s, time.perf_counter() - started, forked=True)
    finally:
        threading._shutdown()
        atexit._run_exitfuncs()
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
    """`python -m module argv` as a fork of the server that $FAIRSYNTH_STAGE_SERVER names: its exit status (negative:
    the signal that ended it). Without a server, or where it declines or cannot be asked, this process becomes that
    command (exec). A server that ends without saying how a stage it started ended is an error."""
    started, path = time.time() - (process_age() or 0.0), os.environ.get(SOCKET_ENV)
    ignored = [int(sig) for sig in (*TERMINAL, signal.SIGTERM) if signal.getsignal(sig) == signal.SIG_IGN]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, *TERMINAL})  # until the child's pid is known
    try:
        first = None
        if path:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(path)
                send(sock, {"module": module, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                            "started": started, "pgid": os.getpgid(0), "ignored": ignored}, (0, 1, 2))
            except OSError:  # no server, or none that read the request: nothing was started
                path = None
        if path:
            replies = answers(sock)
            try:
                first = next(replies, None)
            except OSError:
                pass
            if first is None:
                print(f"error: the stage server ({path}) ended while starting `{module}`: run make again",
                      file=sys.stderr)
                return 1
        if first and "pid" in first:
            pid = first["pid"]

            def pass_on(sig, frame):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:  # it has just ended
                    pass
            signal.signal(signal.SIGTERM, pass_on)
            for sig in TERMINAL:  # the child, in this process group, gets its own from the terminal
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, *TERMINAL})
            try:
                last = next(replies, None)
            except OSError:
                last = None
            if last is None:
                print(f"error: the stage server ({path}) ended during `{module}`: run make again", file=sys.stderr)
                return 1
            return last["code"]
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, *TERMINAL})
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
            for fd in fds:
                os.close(fd)
            raise OSError("request cut short")
        data += chunk
    return json.loads(data), fds


def child_exit(become):
    """In a forked child: become() (set the child up, run its stage) gives the exit status; an exception it raises
    prints its traceback (status 1); stdout and stderr are flushed and the child exits (os._exit): never returns."""
    code = 1
    try:
        code = become()
    except BaseException:
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def child(req, fds, server_pid, closing):
    """In the forked child: become the stage (module docstring) and exit with its status; never returns."""
    def become():
        for obj in closing:  # the server's listening socket, selector and clients' connections
            obj.close()
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: SIGTERM when the server ends
        if os.getppid() != server_pid:  # it ended before that took effect
            os._exit(1)
        try:
            os.setpgid(0, req["pgid"])  # the client's group: what the terminal sends it reaches the stage
        except OSError:  # another session: the stage stays in the server's group
            pass
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (*TERMINAL, signal.SIGTERM):  # as a fresh interpreter sets them up: ignored where inherited so
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, signal.SIG_IGN if int(sig) in req["ignored"] else default)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, *TERMINAL})
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.path[0] = req["cwd"]  # where `python -m` looks first
        import random
        import tempfile
        import numpy
        import torch
        tempfile.tempdir = None  # found again from this environment's TMPDIR
        random.seed()  # a fresh interpreter seeds these three from the OS
        numpy.random.seed()
        torch.seed()
        return run_stage(req["module"], req["argv"], time.time() - req["started"])

    child_exit(become)


def why_not_here(req, fds):
    """Why this request's stage must start as a process of its own, or None where it can be forked here."""
    import importlib
    from common.stages import can_fork
    if len(fds) != 3:
        return "stdin, stdout and stderr did not arrive"
    if req["env"].get(FORK, "1") == "0":
        return f"{FORK}=0"
    if os.path.realpath(req["cwd"]) != os.path.realpath(os.getcwd()):
        return "another working folder"
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


def fork_allowed(env):
    """What a fork needs before any thread is counted: fork itself, $FAIRSYNTH_FORK_STAGES not 0 in env, and no
    NVIDIA device (CUDA cannot start in a forked child)."""
    return hasattr(os, "fork") and env.get(FORK, "1") != "0" and not os.path.exists(GPU_NODE)


def one_thread(tries=20):
    """Whether this process has one OS thread (Linux's /proc; False elsewhere), asked up to `tries` times 10 ms apart:
    a joined thread's OS thread takes a moment to leave /proc."""
    try:
        for _ in range(tries):
            if len(os.listdir("/proc/self/task")) == 1:
                return True
            time.sleep(0.01)
    except OSError:
        pass
    return False


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
        self.stopped = {}  # pid -> when it was sent SIGTERM
        self.can_fork = None  # not known until the first stage asks (warm_up)

    def step(self):
        """Answer what arrived within 50 ms (a new stage, or a client that ended), then tell the clients of the
        children that ended how."""
        for key, _ in self.sel.select(0.05):
            if key.fileobj is self.listener:
                self.accept()
                continue
            try:
                gone = not key.fileobj.recv(1)  # a client sends nothing after its request: this is its end
            except OSError:
                gone = True
            if gone:
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                self.children[key.data] = None
                self.stop(key.data)
        for pid, conn in list(self.children.items()):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                del self.children[pid]
                self.stopped.pop(pid, None)
                if conn is not None:
                    reply(conn, {"code": os.waitstatus_to_exitcode(status)})
                    self.sel.unregister(conn)
                    conn.close()

    def accept(self):
        """A client's request: fork its stage and send the child's pid, or say why it must start a process."""
        import selectors
        conn = self.listener.accept()[0]
        fds = []
        try:
            conn.settimeout(10)
            req, fds = receive(conn)
            conn.settimeout(None)
            if self.can_fork is None:  # the first stage's request: a make with nothing to do costs no imports
                self.can_fork = warm_up()
            reason = why_not_here(req, fds) if self.can_fork else "this server cannot fork"
        except Exception as e:  # an unreadable request, or a failure here: the client starts a process
            reason = f"the server could not take it ({type(e).__name__}: {e})"
        if reason:
            for fd in fds:
                os.close(fd)
            reply(conn, {"self": reason})
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        server_pid = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, *TERMINAL})  # the child's arrive once it is set
        pid = os.fork()
        if pid == 0:
            child(req, fds, server_pid, [self.listener, self.sel, conn, *filter(None, self.children.values())])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, *TERMINAL})
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.sel.register(conn, selectors.EVENT_READ, pid)
        reply(conn, {"pid": pid})

    def stop(self, pid, grace=30.0):
        """SIGTERM to a child, once; SIGKILL where it is still running `grace` seconds later."""
        if pid not in self.stopped or time.monotonic() - self.stopped[pid] > grace:
            sig = signal.SIGTERM if pid not in self.stopped else signal.SIGKILL
            self.stopped.setdefault(pid, time.monotonic())
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # it has just ended
                pass


def with_job_slots(env, command):
    """make's environment and command line as a parent make's job slots allow. A parent make (`make -j4 <study>`)
    passes its slots (a pipe's two descriptors, or a named fifo) only to the recipe lines it sees calling $(MAKE), and
    a study's stage make is inside a macro: where they are out of reach they leave $MAKEFLAGS, so that the stage make
    runs its own -j without a warning; where they can be reached, the command's -j goes, so that it shares them."""
    def reachable(word):
        where = word.split("=", 1)[1]
        if where.startswith("fifo:"):
            return os.path.exists(where[5:])
        try:
            return all(os.fstat(int(fd)) for fd in where.split(","))
        except (ValueError, OSError):
            return False
    words = env.get("MAKEFLAGS", "").split(" ")
    slots = [w for w in words if w.startswith(("--jobserver-auth=", "--jobserver-fds="))]
    if not slots:
        return dict(env), list(command)
    if all(map(reachable, slots)):
        return dict(env), [a for a in command if not (a.startswith("-j") and a[2:].isdigit())]
    return {**env, "MAKEFLAGS": " ".join(w for w in words if w not in slots)}, list(command)


def serve(command):
    """Run command (make and its arguments) with a stage server beside it; its exit status. Where no server can run
    (module docstring), this process becomes the command. The server imports what stages import when the first
    stage asks."""
    import subprocess
    import tempfile
    env, command = with_job_slots(os.environ, command)
    if not (fork_allowed(env) and hasattr(socket, "send_fds") and one_thread(tries=1)):
        os.execvpe(command[0], command, env)
    folder = tempfile.mkdtemp(prefix="fairsynth-stages-")  # 0700: only this user may ask for a fork
    path = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(path)
        listener.listen(64)
    except OSError:  # a socket path too long for the OS (a deep TMPDIR): no server
        listener.close()
        os.rmdir(folder)
        os.execvpe(command[0], command, env)
    server = Server(listener)
    signal.signal(signal.SIGINT, lambda sig, frame: None)  # Ctrl-C reaches make and the stages: they decide
    stage_python = shlex.join([sys.executable, "-m", "common.stage_server", "run"])
    try:
        make = subprocess.Popen([*command, f"STAGE_PYTHON={stage_python}"], env={**env, SOCKET_ENV: path},
                                close_fds=False)  # make's job slots, where a parent make passed them
    except OSError as e:
        listener.close()
        os.unlink(path)
        os.rmdir(folder)
        print(f"error: {command[0]}: {e.strerror or e} (is it installed and on PATH?)", file=sys.stderr)
        return 127
    signal.signal(signal.SIGTERM, lambda sig, frame: make.send_signal(sig))
    try:
        while make.poll() is None or server.children:
            server.step()
            if make.poll() is not None:  # make has ended: a stage still running has no one to report to
                for pid in list(server.children):
                    server.stop(pid)
    except Exception as e:  # a failure of the server itself: make goes on, its next stages as processes
        print(f"warning: the stage server stopped ({type(e).__name__}: {e}); the next stages start as processes",
              file=sys.stderr)
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(folder)
    return make.wait()


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
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {-code})
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(parse_args())
