"""Process lifecycle: whether the server is shutting down, the drain on SIGTERM, and the workers.

- The flag (``begin_shutdown``/``is_shutting_down``) is set once, on SIGTERM, before the listener
  closes. While it is set the HTTP protocol (``service.server.httpproto``) answers every new request
  ``503`` with ``Connection: close``, so that load balancers and clients move on while in-flight
  requests finish; the app may read it too (for instance to report not-ready). A threading.Event,
  so that it can be read from any thread.
- ``GracefulServer``: uvicorn's server with that drain (the single process, and each worker).
- ``Supervisor``: the parent of ``--workers N``: starts the workers on one shared listening socket,
  restarts those that die, and on SIGTERM has every worker drain as the single process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Process

__all__ = ["GracefulServer", "Supervisor", "begin_shutdown", "is_shutting_down", "reset"]

log = logging.getLogger("service")

_shutting_down = threading.Event()


def begin_shutdown() -> None:
    """Mark the process as shutting down (idempotent)."""
    _shutting_down.set()


def is_shutting_down() -> bool:
    return _shutting_down.is_set()


def reset() -> None:
    """Clear the flag (for tests that run an app in-process more than once)."""
    _shutting_down.clear()


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a clean stop on SIGTERM.

    - Draining: first the process is marked as shutting down, and for ``drain`` seconds the listener
      stays open: every new request, readiness probes included, is answered 503 with
      ``Connection: close`` (by the protocol, service.server.httpproto), so load balancers take the
      instance out and clients retry elsewhere, while requests in flight go on. Then the listener
      stops completing new handshakes (``_refuse_new_handshakes``), the connections already waiting
      in its queue are accepted (so that they are answered rather than reset when it closes), and it
      closes (later clients are refused); uvicorn's shutdown follows: in-flight requests finish.
    - uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies with 143; a SIGTERM
      that was handled gracefully is a clean stop here, and the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, *, drain: float = 0.0) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            begin_shutdown()
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin_shutdown()
        if self.drain > 0 and not self.force_exit:
            log.info("shutting down: new requests get 503 for %.1f s, then the listener closes", self.drain)
            await asyncio.sleep(self.drain)
        if not self.force_exit:
            await self._accept_queued_connections()
            for server in getattr(self, "servers", []):
                server.close()  # at once: a handshake completed from now on would be reset
        await super().shutdown(sockets)

    async def _accept_queued_connections(self) -> None:
        """Accept what waits in the listen queue and hand it to the protocol (which answers 503):
        closing a listener resets the connections still queued on it. New handshakes are refused
        first, so that none completes between the last accept and the close."""
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        for server in getattr(self, "servers", []):
            for listener in server.sockets or ():
                with socket.socket(fileno=os.dup(listener.fileno())) as sock:
                    sock.setblocking(False)
                    if _refuse_new_handshakes(sock):
                        # a handshake under way when the filter came completes with the client's
                        # next packet (on loopback at once): give it a moment to reach the queue
                        await asyncio.sleep(HANDSHAKE_GRACE_SECONDS)
                    while True:
                        try:
                            conn, _ = sock.accept()
                        except OSError:  # BlockingIOError: the queue is empty
                            break
                        conn.setblocking(False)
                        try:
                            await loop.connect_accepted_socket(protocol, conn)
                        except OSError:
                            conn.close()


#: after new handshakes are refused, how long those under way get to complete before the last accept
HANDSHAKE_GRACE_SECONDS = 0.05

# A classic BPF socket filter that drops a TCP segment with SYN set and ACK clear (a new connection's
# first packet) and keeps every other: offset 13 of the TCP header (where a socket filter on a TCP
# socket starts) holds the flags.
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]: the flags
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: next (drop), else skip one (keep)
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole packet
)


def _refuse_new_handshakes(sock: socket.socket) -> bool:
    """Have the kernel drop new connections' SYNs to the listener ``sock`` (Linux), so that its
    accept queue only shrinks from now on: a client retries its SYN a second later and then finds the
    listener closed (refused), instead of completing a handshake into a queue that is about to be
    reset. False where it cannot (another system, or a sandbox that forbids socket filters)."""
    if not sys.platform.startswith("linux") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    program = (ctypes.c_ubyte * (8 * len(_DROP_SYN)))()
    for i, (code, jt, jf, k) in enumerate(_DROP_SYN):
        struct.pack_into("HBBI", program, 8 * i, code, jt, jf, k)
    fprog = struct.pack("HL", len(_DROP_SYN), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def _stop_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux's ``PR_SET_PDEATHSIG``), so that a
    parent killed without its own stop (SIGKILL, the OOM killer) leaves no worker serving on: the
    workers drain and exit as on a SIGTERM. A parent already gone by now: SIGTERM at once."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


class _Worker(Process):
    """One worker: uvicorn's worker process, serving with ``GracefulServer`` (it is pickled into the
    spawned process, hence a class of an importable module)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], drain: float) -> None:
        self.drain = drain
        self.parent_pid = os.getpid()
        super().__init__(config, sockets)

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover (in the child)
        _stop_with_parent(self.parent_pid)
        super().target(sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = GracefulServer(config=self.config, drain=self.drain)
        return self._server


class Supervisor:
    """The parent of ``--workers N``.

    - Starts ``config.workers`` workers (spawned; each serves ``config.app`` with ``GracefulServer``
      on the one listening socket bound here), checks them every half second (uvicorn's health
      check: a worker that died or stopped answering is killed and replaced), and calls
      ``on_worker_gone(live_pids)`` after each check, so that what the dead ones left behind (their
      live gauges) can be dropped. A worker that fails to start stops the server (exit status 3).
    - SIGTERM or SIGINT (at once, not at the next check): the parent closes its own copy of the
      listening socket and passes SIGTERM on to every worker; each drains as the single process does
      (503 for ``drain`` seconds, then its listener closes and its requests in flight finish). When
      the last worker has closed the listener, new connections are refused. The parent exits when
      every worker has (those still running ``drain + timeout_graceful_shutdown + 10`` s later are
      killed). Other signals (SIGHUP, SIGQUIT, SIGTTIN, ...) are logged and ignored.
    """

    def __init__(self, config: uvicorn.Config, *, drain: float,
                 on_worker_gone: Callable[[set[int]], object] | None = None) -> None:
        self.config = config
        self.drain = drain
        self.on_worker_gone = on_worker_gone
        self.sockets: list[socket.socket] = []
        self.workers: list[_Worker] = []
        self.signals: list[int] = []
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._stopping and sig in (signal.SIGTERM, signal.SIGINT):
            # while the workers drain: passed on (a second SIGINT makes uvicorn stop at once)
            for pid in [w.pid for w in self.workers]:  # (no waitpid in a signal handler)
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            return
        self.signals.append(sig)
        with contextlib.suppress(OSError):  # the pipe is full: a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status (0, or 3 if a worker failed to start)."""
        handled = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2")
        for name in handled:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._on_signal)
        self.sockets = [self.config.bind_socket()]
        log.info("started parent process [%d]", os.getpid())
        code = 0
        try:
            for _ in range(self.config.workers):
                self._start()
            while True:
                self._sleep(0.5)
                if self._stop_requested():
                    break
                code = self._check_workers()
                if code:
                    break
        finally:
            self._stop()
        return code

    # -- the loop -------------------------------------------------------------------------------
    def _start(self, index: int | None = None) -> None:
        worker = _Worker(self.config, self.sockets, self.drain)
        worker.start()
        if index is None:
            self.workers.append(worker)
        else:
            self.workers[index] = worker

    def _sleep(self, seconds: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], seconds)
        except InterruptedError:  # pragma: no cover (PEP 475 retries)
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _stop_requested(self) -> bool:
        stop = False
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: the workers drain, then stop", signal.Signals(sig).name)
                stop = True
            else:
                log.info("received %s: ignored", signal.Signals(sig).name)
        return stop

    def _check_workers(self) -> int:
        for i, worker in enumerate(self.workers):
            if worker.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            worker.kill()  # dead, or hung
            worker.join()
            if worker.exitcode == STARTUP_FAILURE:
                log.error("worker [%s] failed to start; stopping", worker.pid)
                self._forget_dead()
                return STARTUP_FAILURE
            log.warning("worker [%s] died (exit status %s); starting another", worker.pid, worker.exitcode)
            self._start(i)
        self._forget_dead()
        return 0

    def _forget_dead(self) -> None:
        if self.on_worker_gone is not None:
            self.on_worker_gone({w.pid for w in self.workers if w.pid is not None and w.exitcode is None})

    # -- the stop -------------------------------------------------------------------------------
    def _stop(self) -> None:
        self._stopping = True
        # the listener stays open only in the workers, each closing its copy after its drain
        for sock in self.sockets:
            sock.close()
        for worker in self.workers:
            if worker.exitcode is None and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.drain + (self.config.timeout_graceful_shutdown or 0) + 10
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.exitcode is None:
                log.error("worker [%s] did not stop in time; killed", worker.pid)
                worker.kill()
                worker.process.join()
        self._forget_dead()
        log.info("stopping parent process [%d]", os.getpid())
