"""The server's processes: uvicorn with a drain on SIGTERM that resets no client, listening sockets,
and ``--workers N`` processes sharing one port."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ..codecs import Limits
from ..errors import FtdeployError, ServiceError
from ..logs import showing_logs
from ..onnx_model import OnnxModel
from .app import MULTIPROC_ENV, create_app
from .batching import Lifecycle
from .providers import choose_provider

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26  # Linux <asm-generic/socket.h>


def block_new_connections(sock: socket.socket) -> bool:
    """Make a listening socket drop every new SYN, leaving the connections already in its accept
    queue alone (a one-instruction classic BPF socket filter: ``ret #0``). A client whose SYN is
    dropped retries it a second later and is then refused by the closed port: refused, never reset.
    False where the kernel has no socket filters (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    program = (ctypes.c_ubyte * 8)(*struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET | BPF_K, k = 0: drop
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(program)))
    except OSError:
        return False
    return True


HANDSHAKE_GRACE_S = 0.05  # a handshake begun before the SYN filter completes within a round trip


def take_queued_connections(listener, grace: float = HANDSHAKE_GRACE_S) -> list[socket.socket]:
    """Every connection in a listening socket's accept queue: clients that finished the TCP handshake
    (for them the connection is open, and their request may be on its way) but that the server has
    not accepted yet. Closing the listener resets those; accepting them first lets them be answered.
    New SYNs are dropped first, so the queue cannot refill between the last accept and the close,
    but a handshake already half done when the filter went in still lands in the queue one round
    trip later: the queue is emptied until it has stayed empty for ``grace`` seconds."""
    sock = socket.socket(fileno=os.dup(listener.fileno()))  # a second handle on the same listener
    try:
        block_new_connections(sock)
        sock.setblocking(False)
        queued = []
        quiet_until = time.monotonic() + grace
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                if time.monotonic() >= quiet_until:
                    return queued
                time.sleep(0.002)
                continue
            conn.setblocking(False)
            queued.append(conn)
            quiet_until = time.monotonic() + grace
    finally:
        sock.close()  # the duplicate handle only; the server closes the listener itself


class DrainingServer(uvicorn.Server):
    """uvicorn, draining on SIGTERM/SIGINT: /readyz turns 503 at once while requests are still
    answered for ``drain_seconds`` (a load balancer or Kubernetes keeps sending for a few seconds
    after the signal); then it stops accepting without resetting anyone: the connections already in
    the kernel's accept queue are accepted first and answered with ``Connection: close``, like what
    still arrives on open keep-alive connections, until they go quiet; in-flight and batched work
    finishes, and it exits. A second signal skips what is left of the drain.

    It relies on uvicorn internals (``servers``, ``server_state``, ``lifespan.state``,
    ``config.http_protocol_class``), hence uvicorn's upper bound in pyproject.toml, and
    tests/test_serve.py checks them."""

    LINGER_S = 0.25  # quiet time on open connections before closing them; a keep-alive client under
    MAX_LINGER_S = 5.0  # load sends again within milliseconds, and is told to close

    def __init__(self, config, lifecycle: Lifecycle, drain_seconds: float, stop_asked=lambda: False):
        super().__init__(config)
        self.lifecycle, self.drain_seconds, self.drain_started = lifecycle, drain_seconds, None
        self.stop_asked = stop_asked  # a stop that came before uvicorn's own signal handlers were in place

    def handle_exit(self, sig, frame) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.lifecycle.draining = True
            log.info("draining for %.1f s (signal %s)", self.drain_seconds, sig)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is None and self.stop_asked():
            self.handle_exit(signal.SIGTERM, None)
        if self.lifecycle.failed and not self.should_exit:  # nothing can be answered: no drain
            log.error("stopping: %s", self.lifecycle.failed)
            self.should_exit = True
        started = self.drain_started
        if started is not None and not self.should_exit and time.monotonic() - started >= self.drain_seconds:
            await self.stop_accepting()
            self.should_exit = True
        return await super().on_tick(counter)

    async def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        queued = [conn for server in self.servers for listener in server.sockets
                  for conn in take_queued_connections(listener)]
        for server in self.servers:
            server.close()
        life = self.lifecycle
        life.closing = True
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,
                                     server_state=self.server_state, app_state=self.lifespan.state)
        for conn in queued:
            await loop.connect_accepted_socket(protocol, conn)
        if queued:
            log.info("stopped accepting; %d queued connection(s) accepted to be answered", len(queued))
        deadline = time.monotonic() + self.MAX_LINGER_S
        while self.server_state.connections and time.monotonic() < deadline and not self.force_exit:
            if life.in_flight == 0 and time.monotonic() - life.last_answer >= self.LINGER_S:
                break
            await asyncio.sleep(0.02)


@dataclass
class ServeOptions:
    """Everything a worker process needs to build its app and server (picklable)."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    limits: Limits = field(default_factory=Limits)
    warmup_runs: int = 3
    provider: str = "cpu"
    drain_seconds: float = 5.0
    workers: int = 1
    max_queue: int = 256
    request_timeout: float | None = 30.0
    version_policy: str = "latest:1"
    poll_seconds: float = 0.0
    model_name: str | None = None
    threads_reason: str | None = None


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A socket bound to (host, port). With ``reuse_port`` (several workers) every worker binds its
    own with SO_REUSEPORT, and the kernel spreads new connections over them evenly (one shared accept
    queue lets the first to wake take a burst); without it, a port in use is an error, not a share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FtdeployError(f"cannot listen on {host}:{port} ({e.strerror})", "pick another --port or stop what uses it") from None
    return sock


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_worker(options: ServeOptions, stop=None) -> None:
    """One server process: its own onnxruntime session, batcher and event loop. A stop signal (or
    ``stop``, a multiprocessing Event the parent sets) during start-up, which can take seconds,
    ends it cleanly before it serves; once uvicorn runs, the server drains."""
    from ..machine import physical_cores

    asked: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda sig, _frame: asked.append(sig))

    def stop_asked() -> bool:
        return bool(asked) or (stop is not None and stop.is_set())

    lifecycle = Lifecycle()
    per_core = options.workers > 1 and options.workers * (options.threads or 1) >= physical_cores()
    app = None if stop_asked() else create_app(
        options.model_path, options.threads, options.max_batch_size, options.max_wait_ms, options.limits,
        options.warmup_runs, options.provider, lifecycle, per_core, options.max_queue, options.request_timeout,
        options.version_policy, options.poll_seconds, options.model_name, options.threads_reason)
    if stop_asked():
        log.info("stopped during start-up")
        return
    sock = listening_socket(options.host, options.port, reuse_port=options.workers > 1)
    sock.listen(2048)
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=30)
    DrainingServer(config, lifecycle, options.drain_seconds, stop_asked).run(sockets=[sock])
    if lifecycle.failed:
        raise ServiceError(lifecycle.failed, "see the log above; the process exits so that it is restarted")


def spawned_worker(options: ServeOptions, stop) -> None:
    """A worker process of ``--workers N``: spawned, it starts with no logging set up, so it shows
    its lines as the command line does."""
    with showing_logs():
        run_worker(options, stop)


def serve(options: ServeOptions) -> None:
    """Run the server until SIGTERM/SIGINT, then drain (see :class:`DrainingServer`).
    ``options.workers`` processes share the port, each with its own session; /metrics covers them all."""
    workers = options.workers
    if workers == 1:  # this process serves: it loads the file and binds the port itself, once
        return run_worker(options)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    stopping: list[int] = []
    procs: list = []

    def forward(sig, _frame):
        stopping.append(sig)
        stop.set()  # first: a worker still importing ignores the signal, and reads this once it can
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if len(stopping) == 1 else sig)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    metrics_dir = tempfile.mkdtemp(prefix="ftdeploy-metrics-")
    try:
        # a bad file, --provider or a busy port fails here, once, before any worker starts (a
        # repository's versions are each worker's to load, check and refuse)
        if not Path(options.model_path).is_dir():
            OnnxModel(options.model_path, 1).check_answers()
            choose_provider(options.model_path, options.provider)
        listening_socket(options.host, options.port, reuse_port=False).close()
        os.environ[MULTIPROC_ENV] = metrics_dir  # read by prometheus_client when a worker imports it
        procs += [context.Process(target=spawned_worker, args=(options, stop), name=f"ftdeploy-worker-{i}")
                  for i in range(workers)]
        # Workers inherit an ignored signal across exec: none dies of one while it imports. Here the
        # signals are blocked meanwhile (a blocked signal stays pending even while ignored), and
        # reach ``forward`` once it is back.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            for p in procs:
                p.start()
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, forward)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.info("%d workers: pids %s", workers, ", ".join(str(p.pid) for p in procs))
        while not stopping and all(p.is_alive() for p in procs):
            time.sleep(0.2)
        if not stopping:  # a worker died on its own: stop the others; the orchestrator restarts the whole
            forward(signal.SIGTERM, None)
        for p in procs:
            if p.pid is not None:
                p.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = [p for p in procs if p.pid is not None and p.exitcode != 0]
    if failed:
        raise ServiceError(f"worker {failed[0].name} exited with code {failed[0].exitcode}", "see the log above")

