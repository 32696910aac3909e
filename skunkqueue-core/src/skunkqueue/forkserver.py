"""The pool's fork server: worker processes forked from a clean process that has the imports done.

A worker started as a fresh interpreter spends 0.2-0.35 s of CPU before it can connect, nearly
all of it importing the store's driver and SkunkQueue, and a pool restarts workers all its life
(``--max-jobs-per-child``, crashes, kills). So ``skunq work`` (:mod:`skunkqueue.command`) forks
one helper process first thing, before it imports the command line, a job module or anything
else a fresh worker would not import, opens a connection or starts a thread. The helper then
imports what every worker imports before its jobs (this module's imports, the store's backend,
the async worker where it is used) and does nothing but fork workers on request.

What a worker forked from it is, and why that keeps the fresh-interpreter guarantee:

* its modules are the ones a fresh worker has when it reads its configuration, and no others:
  the server was forked before the pool imported more, and never imports a job module, so a
  job's changes to its modules still die with its worker, and a job module named like one the
  pool uses (``click.py``) is found as it is by a fresh worker;
* it holds no connection, thread, lock or pipe of the pool: none existed when the server was
  forked, and a worker keeps only stdin, stdout, stderr and the three pipes of its own
  :class:`~skunkqueue.channel.PoolEnd` (closed everywhere else, as ``subprocess`` does);
* it has the signal dispositions, environment, working directory, ``sys.argv``, ``__main__``
  and ``sys.path`` of a fresh worker (:func:`skunkqueue.interpreter.command`'s rules: the entry
  the interpreter put first on the path is gone, and a server whose process had imported a
  module from there gives up), and its own ``random`` state (the module reseeds after a fork);
  its ``hash()`` seed is the server's, shared with the other workers of the pool;
* it is the pool's child: the pool is a child subreaper and the worker is forked twice, so the
  pool waits for it, signals it and reads its exit status as it does a ``subprocess.Popen``, it
  is in the pool's process group, and it dies with the pool (``PR_SET_PDEATHSIG``);
* it runs only once the pool has taken it: a worker the server forked for a request the pool
  gave up on (the server stalled) finds its pipes closed and exits before it does anything.

The server ignores the signals a terminal sends the whole group (the pool decides what the
workers do) and exits when the pool closes its end or dies. If it is gone, the pool logs one
warning and starts fresh interpreters, as it does where there is no fork server: off Linux,
with ``SKUNQ_WORKER_START=spawn``, when the pool was started otherwise than through ``skunq``
(``python -m skunkqueue.cli work``), or when ``WorkerPool`` is used inside a process of its own.
"""

from __future__ import annotations

import atexit
import builtins
import ctypes
import fcntl
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Sequence

from skunkqueue.interpreter import BOOT

log = logging.getLogger("skunkqueue.pool")

# What a worker runs, by name, as a fresh interpreter is given it (interpreter.command): the server
# imports it before its first fork, as a fresh worker does first.
WORKER_MODULE = "skunkqueue.worker_main"
START_ENV = "SKUNQ_WORKER_START"   # "spawn": a fresh interpreter per worker, no fork server
NAME = b"skunq-forksrv"            # the server's process name (/proc/PID/comm), at most 15 bytes
# Largest request: the worker's config (routes, paths, plugins) and the pool's environment.
MAX_REQUEST = 1 << 20
REPLY_TIMEOUT = 5.0                # seconds; a server that takes longer is treated as gone
TAKEN_WITHIN = 60.0                # seconds a forked worker waits for the pool's first pulse
# What a terminal sends the whole group, and the pool's interrupt: the pool's to act on, so the
# server ignores them. A worker it forks holds them back (blocked, not ignored) until it has the
# pool's dispositions, so that one sent meanwhile acts as on a fresh interpreter, not lost.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT,
                    signal.SIGUSR1, signal.SIGUSR2)

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_GET_NAME = 16
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int | bytes | ctypes.Array[ctypes.c_char]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0))


def die_with_parent() -> None:
    """Be sent SIGKILL when the parent dies (PR_SET_PDEATHSIG; Linux only)."""
    if sys.platform.startswith("linux"):
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _process_name() -> bytes:
    buffer = ctypes.create_string_buffer(16)
    _prctl(_PR_GET_NAME, buffer)
    return buffer.value


def stopped(pid: int) -> bool:
    """True if the process is stopped (SIGSTOP, a debugger): its leases must not be renewed."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class Forked:
    """A worker forked by the server: the part of ``subprocess.Popen`` the pool uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost, so it counts as a crash
                self.returncode = 255
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The pool's end of the server: :meth:`spawn` a worker, :meth:`close` at the pool's exit."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._sock.settimeout(REPLY_TIMEOUT)

    @classmethod
    def start(cls) -> ForkServer | None:
        """Fork the server; None where workers start as fresh interpreters.

        Call it before anything starts a thread, opens a connection or imports a module a fresh
        worker would not (:mod:`skunkqueue.command` does, first thing): what this process holds
        now, every worker inherits.
        """
        if not sys.platform.startswith("linux") or os.environ.get(START_ENV, "fork") == "spawn":
            return None
        if threading.active_count() > 1:  # a fork would copy another thread's locks, held or not
            return None
        if _prctl(_PR_SET_CHILD_SUBREAPER, 1) != 0:
            return None
        pool_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pool = os.getpid()
        for stream in (sys.stdout, sys.stderr):  # or the server would write the pool's buffered lines again
            stream.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the server process; it ends in os._exit
            code = 1
            try:
                pool_end.close()
                _serve(server_end, pool)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        server_end.close()
        return cls(pid, pool_end)

    def preload(self, modules: Sequence[str]) -> None:
        """Have the server import ``modules`` (the store's backend...), while the pool goes on
        starting: every worker imports them before its jobs. A failure is the workers' to report."""
        try:
            self._sock.send(json.dumps({"preload": list(modules)}).encode())
        except OSError:
            pass  # the next spawn finds the server gone

    def spawn(self, config_json: str, pass_fds: Sequence[int]) -> Forked:
        """Fork a worker that runs ``skunkqueue.worker_main`` with ``config_json``, holding ``pass_fds``.

        Raises OSError if the server is gone, stopped or does not answer; it is then of no more use.
        """
        if stopped(self.pid):  # SIGSTOPped on its own: waiting for its answer would hold the pool's loop
            self._give_up()
            raise OSError("the fork server is stopped")
        request = json.dumps({"config": config_json, "env": dict(os.environ), "cwd": os.getcwd(),
                              "fds": list(pass_fds)}).encode()
        try:
            socket.send_fds(self._sock, [request], list(pass_fds))
            reply = json.loads(self._sock.recv(4096) or b"{}")
        except (OSError, ValueError) as exc:
            self._give_up()
            raise OSError(f"the fork server did not answer: {exc}") from None
        if "pid" not in reply:
            self._give_up()
            raise OSError(f"the fork server could not start a worker: {reply.get('error', 'it is gone')}")
        return Forked(int(reply["pid"]))

    def close(self) -> None:
        """Let the server go (it exits when it reads the end of its socket) and reap it; one that
        does not exit within a second (stopped on its own) is killed."""
        self._sock.close()
        deadline = time.monotonic() + 1.0
        try:
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() >= deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    return
                time.sleep(0.01)
        except (ChildProcessError, ProcessLookupError):
            pass

    def _give_up(self) -> None:
        self._sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


_for_pool: ForkServer | None = None


def start_for_pool() -> None:
    """Start the server of the pool this process is about to become (see :mod:`skunkqueue.command`)."""
    global _for_pool
    _for_pool = ForkServer.start()


def take() -> ForkServer | None:
    """The server :func:`start_for_pool` started, once; None if it started none."""
    global _for_pool
    server, _for_pool = _for_pool, None
    return server


def reap_strays(known: set[int]) -> None:
    """Reap the children of this process (a pool that started a fork server) but ``known``: as a
    subreaper it adopts orphans (a job's daemon whose worker died), for as long as it runs, and
    each would stay a zombie until it exits."""
    for pid in _children() - known:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            found.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            pass
    return found


# -- inside the server -------------------------------------------------------------------------

def _serve(sock: socket.socket, pool: int) -> None:  # pragma: no cover - a child
    die_with_parent()
    if os.getppid() != pool:
        return
    pool_name = _process_name()
    _prctl(_PR_SET_NAME, NAME)
    dispositions = {int(sig): handler for sig in signal.valid_signals()
                    if (handler := _getsignal(sig)) is not None}
    for sig in TERMINAL_SIGNALS:  # the pool's to act on; it stops the workers
        signal.signal(sig, signal.SIG_IGN)
    importlib.import_module(WORKER_MODULE)
    shadowed = _drop_interpreter_path_entry()
    # A fresh worker would import the installed module: a fork would carry this one. Every request
    # is refused (the pool then starts fresh interpreters).
    refusal = shadowed and f"the pool imported {shadowed} from the folder it started in, which a worker never does"
    gc.freeze()  # what is imported stays shared pages in every worker: a collection would copy them
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 16)
        except InterruptedError:
            continue
        if not data:
            return  # the pool closed its end: it is stopping
        request = json.loads(data)
        if "preload" in request:
            for module in request["preload"]:
                try:
                    importlib.import_module(module)
                except Exception:
                    pass  # the worker's own import reports it
            gc.freeze()
            continue
        try:
            if refusal:
                raise OSError(refusal)
            reply: dict[str, Any] = {"pid": _fork_worker(request, fds, sock, pool, pool_name, dispositions)}
        except Exception as exc:
            reply = {"error": str(exc) if exc.args and exc.args[0] == refusal else f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def _getsignal(sig: int) -> Callable[..., Any] | int | None:
    try:
        return signal.getsignal(sig)  # type: ignore[return-value]
    except (OSError, ValueError):
        return None


def _drop_interpreter_path_entry() -> str | None:
    """Take off ``sys.path`` the entry the interpreter put first for how it was started, as
    :data:`skunkqueue.interpreter.BOOT` does for a fresh worker: the script's folder for
    ``skunq``, the working directory for ``python -m``. (A pool started as the kit starts it,
    through ``BOOT``, has none left.) The file of a module imported from there, if any."""
    if getattr(sys.flags, "safe_path", False) or not sys.path:
        return None
    added: str | None = None
    args = iter(getattr(sys, "orig_argv", [])[1:])
    for arg in args:
        if arg in ("-W", "-X"):
            next(args, None)
        elif arg == "-c":
            added = ""
            break
        elif arg == "-m":
            added = os.getcwd()
            break
        elif not arg.startswith("-") or arg == "-":
            added = os.path.dirname(os.path.realpath(arg))
            break
    if added is None or sys.path[0] != added:
        return None
    del sys.path[0]
    folder = os.path.realpath(added or os.getcwd())
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if "." in name or not where:
            continue
        found = os.path.realpath(where)
        if found in (os.path.join(folder, name + ".py"), os.path.join(folder, name, "__init__.py")):
            return found
    return None


def _fork_worker(request: dict[str, Any], fds: list[int], sock: socket.socket, pool: int, pool_name: bytes,
                 dispositions: dict[int, Any]) -> int:  # pragma: no cover - runs in the server
    """Fork twice, so that the worker's parent is the pool (the subreaper); its pid."""
    read_pid, write_pid = os.pipe()
    # Blocked from the fork on (the worker inherits the mask): the pool may signal the worker as
    # soon as it has the pid, before the worker has the pool's dispositions in place of SIG_IGN.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
    middle = os.fork()
    if middle != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    else:
        code = 1
        try:
            os.close(read_pid)
            _prctl(_PR_SET_NAME, pool_name)  # only the server goes by its name, never a worker being made
            me = os.getpid()
            worker = os.fork()
            if worker == 0:
                os.close(write_pid)
                _become_worker(me, request, fds, sock, pool, pool_name, dispositions, held)
            os.write(write_pid, str(worker).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_pid)
    try:
        answer = os.read(read_pid, 64)
    finally:
        os.close(read_pid)
        os.waitpid(middle, 0)  # once it is reaped, its child is the pool's
    if not answer:
        raise OSError("fork failed")
    return int(answer)


def _become_worker(middle: int, request: dict[str, Any], fds: list[int], sock: socket.socket, pool: int,
                   pool_name: bytes, dispositions: dict[int, Any],
                   mask: set[int | signal.Signals]) -> None:  # pragma: no cover - never returns
    code: object = 1
    try:
        # Not os.getppid() read here: the middle process may be gone already.
        while os.getppid() == middle:  # until the middle process is gone and the pool adopted this one
            os.sched_yield()
        die_with_parent()
        if os.getppid() != pool:
            os._exit(1)  # the pool died meanwhile
        sock.close()
        _install_fds(fds, request["fds"])
        # The pool's first pulse says it took this worker; the end of the pipe, that it gave up on
        # the request (the server stalled) and started another: then this one must not run.
        pulse = request["fds"][2]
        if not select.select([pulse], [], [], TAKEN_WITHIN)[0] or not os.read(pulse, 1):
            os._exit(0)
        for sig, handler in dispositions.items():
            try:
                signal.signal(sig, handler)
            except (OSError, ValueError, TypeError):
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a stop sent meanwhile acts now
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        logging.root.handlers.clear()  # the worker sets up its log as a fresh one does
        sys.argv = [WORKER_MODULE, request["config"]]
        sys.orig_argv = [sys.executable, "-c", BOOT, *sys.argv]
        # A fresh worker's __main__ is the -c program: no file, so multiprocessing's spawn re-imports nothing.
        main = types.ModuleType("__main__")
        main.__builtins__ = builtins  # type: ignore[attr-defined]
        sys.modules["__main__"] = main
        code = importlib.import_module(WORKER_MODULE).main([request["config"]])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _exit(code)


def _install_fds(received: list[int], wanted: list[int]) -> None:  # pragma: no cover - the worker
    """Give the received fds the numbers the config names, and close every other one but 0-2."""
    above = max([*received, *wanted]) + 1
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, above) for fd in received]  # out of the way of those wanted
    for fd in received:
        os.close(fd)
    for fd, number in zip(parked, wanted):
        os.dup2(fd, number)
    keep = sorted({0, 1, 2, *wanted})
    start = 0
    for fd in keep:
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))
    for fd in wanted:
        os.set_inheritable(fd, True)


def _exit(code: object) -> None:  # pragma: no cover - the worker
    """End as an interpreter ends: wait for threads, run atexit, flush, then leave without
    unwinding into the server's loop."""
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        for stream in {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}:
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (a job's printf): exit() flushes them, _exit does not
    finally:
        os._exit(status)
