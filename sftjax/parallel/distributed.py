"""Joining a multi-process run (`sftjax train --distributed`) and leaving it cleanly when a process is lost.

How a process joins: with SFTJAX_COORDINATOR, SFTJAX_NUM_PROCESSES and SFTJAX_PROCESS_ID set
(launch/local.sh sets them) it joins that run; otherwise `jax.distributed.initialize()` detects the
cluster itself (SLURM via srun, Cloud TPU pods, Open MPI). The log says which way it joined.

Why there is more here than one `jax.distributed.initialize` call: when a process dies, jax's own
reaction is a C++ `LOG(FATAL)` from a background thread (a SIGABRT with a stack trace, and no
process named at all when the run never fully joined), and a NCCL collective waiting for the dead
process simply hangs until then. So sftjax keeps its own watch, with one timeout T
(SFTJAX_TIMEOUT_S, default 300 s):

- joining: a process that has not joined after T s prints which process it waited for and exits;
- running: every process writes a heartbeat to jax's key-value store (held by process 0) from a
  background thread; process 0 declares a process dead after T s without a new beat and posts a
  verdict that every process reads, prints and exits on;
- a process that fails on its own posts its error, so the others stop instead of waiting in a
  collective for it.

Every such exit prints one `error: ...` line naming the process and exits with status 75
(`LOST`, sysexits' EX_TEMPFAIL: running the same command again resumes from the last checkpoint).
jax's own timeouts are set to 2*T + 10 s, a backstop behind this watch. One case stays jax's: if
process 0 itself dies, the key-value store dies with it and jax aborts the others at once (status
134, "Failed to send RPC to coordination service ... the leader task", the leader being process 0).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from typing import NoReturn

from sftjax.errors import UserError

log = logging.getLogger("sftjax")

DEFAULT_TIMEOUT_S = 300
LOST = 75  # exit status when another process of the run was lost (or never joined)
_NS = "sftjax/watch"
# Words in a collective's error when its peer went away (gloo: "Connection closed by peer").
_PEER_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "connection refused", "socket", "peer",
               "unavailable", "deadline_exceeded")


def timeout_s(environ=os.environ) -> int:
    """SFTJAX_TIMEOUT_S: how long a process waits for the others to join, and how long a process may
    go without a heartbeat before the run declares it dead."""
    raw = environ.get("SFTJAX_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        t = int(raw)
    except ValueError:
        t = 0
    if t <= 0:
        raise UserError(f"SFTJAX_TIMEOUT_S={raw!r}: expected a whole number of seconds > 0")
    return t


def _explicit(environ) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the SFTJAX_* variables, or None when unset."""
    if "SFTJAX_COORDINATOR" not in environ:
        return None
    try:
        n, pid = int(environ["SFTJAX_NUM_PROCESSES"]), int(environ["SFTJAX_PROCESS_ID"])
    except (KeyError, ValueError):
        raise UserError("--distributed: SFTJAX_COORDINATOR is set, so SFTJAX_NUM_PROCESSES and "
                        "SFTJAX_PROCESS_ID must be integers too") from None
    if not 0 <= pid < n:
        raise UserError(f"--distributed: SFTJAX_PROCESS_ID={pid} must be in 0..{n - 1} "
                        f"(SFTJAX_NUM_PROCESSES={n})")
    return environ["SFTJAX_COORDINATOR"], n, pid


def _cluster(environ) -> str:
    """Which cluster jax's auto-detection will find, for the log line (it checks the same variables)."""
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ:
        return f"SLURM (job {environ['SLURM_JOB_ID']}, SLURM_PROCID={environ['SLURM_PROCID']})"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "Open MPI"
    return "jax's cluster auto-detection"


def _die(message: str | None, status: int = LOST) -> NoReturn:
    """Print one error line and leave now, from any thread: the main thread may be stuck in a collective,
    and a normal exit would wait at jax's shutdown barrier for a process that is gone."""
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    sys.stdout.flush()
    os._exit(status)


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def _join_timed_out(t: int, explicit: tuple[str, int, int] | None, environ) -> NoReturn:
    """Name the missing process as exactly as this process can know it (jax's timeout names none)."""
    hint = "start all processes within SFTJAX_TIMEOUT_S of each other, or raise it"
    if explicit is None:
        who = (f"process {environ['SLURM_PROCID']} of {environ['SLURM_NTASKS']}"
               if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ else "this process")
        _die(f"{who}: timed out after {t} s waiting for the other processes of the {_cluster(environ)} run to "
             f"join; the processes whose logs show no 'joined via' line are missing ({hint})")
    address, n, pid = explicit
    if pid == 0:
        missing = "process 1" if n == 2 else f"at least one of processes 1-{n - 1}"
        _die(f"process 0: timed out after {t} s waiting for {missing} to join at {address} "
             f"(SFTJAX_NUM_PROCESSES={n}; {hint})")
    if not _reachable(address):
        _die(f"process {pid}: timed out after {t} s: process 0 (the coordinator) does not answer at {address}; "
             f"it is not running or SFTJAX_COORDINATOR is wrong ({hint})")
    _die(f"process {pid}: timed out after {t} s: process 0 answers at {address}, but not all {n} processes "
         f"joined (SFTJAX_NUM_PROCESSES={n}; {hint})")


def initialize(environ=os.environ) -> Watch:
    """Join the run (see the module docstring), log how, and start the watch.

    Must run before anything else touches jax's devices. Returns the Watch; the caller ends it with
    `done()` after training (or a signal stop), or `fail(exc)` on an error.
    """
    import jax

    t = timeout_s(environ)
    explicit = _explicit(environ)
    backstop = 2 * t + 10
    timeouts = dict(initialization_timeout=backstop, heartbeat_timeout_seconds=backstop,
                    shutdown_timeout_seconds=backstop)
    guard = threading.Timer(t, _join_timed_out, args=(t, explicit, environ))
    guard.daemon = True
    guard.start()  # jax.distributed.initialize releases the GIL while it waits, so this fires on time
    try:
        if explicit:
            address, n, pid = explicit
            jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid, **timeouts)
        else:
            jax.distributed.initialize(**timeouts)
    except ValueError as e:
        if "must be defined" in str(e) or "should be defined" in str(e):
            raise UserError("--distributed: no cluster found (SLURM srun task, Cloud TPU pod, Open MPI) and "
                            "SFTJAX_COORDINATOR is not set; use launch/local.sh, launch/slurm.sbatch, "
                            "launch/tpu_pod.sh or set SFTJAX_COORDINATOR/SFTJAX_NUM_PROCESSES/SFTJAX_PROCESS_ID"
                            ) from None
        raise
    finally:
        guard.cancel()
    if explicit:
        how = f"explicit settings (SFTJAX_COORDINATOR={explicit[0]})"
    elif jax.devices()[0].platform == "tpu":
        how = "Cloud TPU pod auto-detection"
    else:
        how = _cluster(environ)
    log.info("process %d of %d joined via %s; %d local / %d global devices; SFTJAX_TIMEOUT_S=%d",
             jax.process_index(), jax.process_count(), how, jax.local_device_count(), jax.device_count(), t)
    from jax._src import distributed as jax_distributed  # the key-value client: no public accessor in jax 0.10

    watch = Watch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(), t)
    watch.start()
    return watch


class Watch:
    """Heartbeats through jax's key-value store, judged by process 0; see the module docstring.

    Two daemon threads per process: one beats (and, on process 0, judges), one notices when this
    process has not reached the store for T s (process 0 gone silent without its socket closing).
    """

    def __init__(self, client, pid: int, n: int, t: int):
        self.client, self.pid, self.n, self.t = client, pid, n, t
        self.interval = min(max(t / 10, 0.5), 10.0)
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="sftjax-beat", daemon=True),
                         threading.Thread(target=self._guard, name="sftjax-guard", daemon=True)]

    def start(self) -> None:
        for th in self._threads:
            th.start()

    def _beat(self) -> None:
        seen = {p: (None, time.monotonic()) for p in range(self.n) if p != self.pid}  # last beat, when it changed
        count = 0
        while not self._stop.is_set():
            try:
                self.client.key_value_set(f"{_NS}/beat/{self.pid}", str(count), allow_overwrite=True)
                news = [v for k, v in self.client.key_value_dir_get(f"{_NS}/news/")
                        if k.rsplit("/", 1)[1] != str(self.pid)]
                beats, done = {}, set()
                if self.pid == 0:
                    beats = dict(self.client.key_value_dir_get(f"{_NS}/beat/"))
                    done = {k.rsplit("/", 1)[1] for k, _ in self.client.key_value_dir_get(f"{_NS}/done/")}
            except Exception as e:  # the store is unreachable: the guard thread decides when that is fatal
                log.debug("heartbeat failed: %s", e)
            else:
                self.last_ok = time.monotonic()
                if self._stop.is_set():
                    return
                if news:
                    self._mark("read")
                    self._leave(news[0], LOST)
                if self.pid == 0:
                    self._judge(seen, beats, done)
            count += 1
            self._stop.wait(self.interval)

    def _judge(self, seen: dict, beats: dict, done: set) -> None:
        now = time.monotonic()
        for p, (last, since) in seen.items():
            beat = beats.get(f"{_NS}/beat/{p}")
            if str(p) in done:
                continue
            if beat != last:
                seen[p] = (beat, now)
            elif now - since > self.t:
                message = (f"process {p} stopped responding: no heartbeat for {self.t} s (SFTJAX_TIMEOUT_S); it "
                           f"died, was killed or preempted, or its host is unreachable; its own log says which. "
                           f"All {self.n} processes stop (exit {LOST}); run the same command again to resume "
                           "from the last checkpoint")
                self._post(message)
                self._leave(message, LOST, gone=p)

    def _guard(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self.last_ok > self.t:
                _die(f"process {self.pid}: no answer from process 0 (the coordinator) for {self.t} s "
                     f"(SFTJAX_TIMEOUT_S); it died or its host is unreachable")

    def _post(self, message: str) -> None:
        """Put `message` where every process's beat thread reads it within one beat."""
        try:
            self.client.key_value_set(f"{_NS}/news/{self.pid}", message, allow_overwrite=True)
        except Exception as e:
            log.debug("could not post %r: %s", message, e)

    def _mark(self, what: str) -> None:
        """Record in the store that this process has read the news, or finished (`what`: read|done)."""
        try:
            self.client.key_value_set(f"{_NS}/{what}/{self.pid}", "1", allow_overwrite=True)
        except Exception as e:
            log.debug("could not mark %s: %s", what, e)

    def _leave(self, message: str | None, status: int, gone: int | None = None) -> NoReturn:
        """Print `message` (if any) and exit. Process 0 holds the key-value store, so it first waits
        until every other process (but the `gone` one) has read the news, posted its own or finished,
        for at most two beats and a second: leaving at once would cut them off. (The message comes
        after that wait, so it is the last line of the log.)"""
        if self.pid == 0:
            deadline = time.monotonic() + 2 * self.interval + 1
            while time.monotonic() < deadline:
                try:
                    heard = {k.rsplit("/", 1)[1] for d in ("news", "read", "done")
                             for k, _ in self.client.key_value_dir_get(f"{_NS}/{d}/")}
                except Exception:
                    break
                if heard >= {str(p) for p in range(1, self.n) if p != gone}:
                    break
                time.sleep(0.1)
        _die(message, status)

    def done(self) -> None:
        """Training ended normally or on a signal: stop beating without being declared dead."""
        self._mark("done")
        self._stop.set()
        for th in self._threads:
            th.join(timeout=self.interval + 5)

    def fail(self, exc: BaseException) -> NoReturn:
        """This process failed with `exc`: print it as the CLI would, tell the others, and exit now.

        An error from a collective usually means a peer died, and it reaches this process before the
        heartbeat verdict does; then wait for the verdict (at most T plus three beats), so the message
        names the dead process rather than this one.
        """
        line = str(exc).splitlines()[0][:300] if str(exc) else ""
        if not isinstance(exc, UserError | KeyboardInterrupt) and any(w in str(exc).lower() for w in _PEER_WORDS):
            log.error("process %d: %s: %s; waiting up to %d s for the heartbeat verdict on the other processes",
                      self.pid, type(exc).__name__, line, self.t)
            time.sleep(self.t + 3 * self.interval)  # the beat thread exits the process if a peer was lost
        self._stop.set()
        if isinstance(exc, UserError):
            status, what = 2, str(exc)
            print(f"error: {exc}", file=sys.stderr, flush=True)
        elif isinstance(exc, KeyboardInterrupt):
            status, what = 130, "stopped by a second signal"
            print(f"interrupted: {what}", file=sys.stderr, flush=True)
        else:
            status, what = 1, f"{type(exc).__name__}: {line}"
            traceback.print_exception(exc, file=sys.stderr)
        self._post(f"process {self.pid} failed ({what}); its log has the details. All {self.n} processes stop")
        self._leave(None, status)
