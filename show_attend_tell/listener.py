"""The network side of `sat serve`: uvicorn with a bound on the connections it holds, a deadline for a request's
headers, refusals logged once per interval, and one or several worker processes, each with its own model.

A connection costs a file descriptor whatever it sends, so a flood of connections that send part of their
headers (or of a body) and wait would use them all, and then nobody, /api/health included, is answered. So each
process holds at most `max_connections`, below its descriptor limit: when a new connection would pass it, the
least recently active connection that is not waiting for its answer (headers or body still arriving, or idle
between requests) is closed to make room, and only when every connection is waiting for an answer is the new
one refused. A client that sends its request at once, as a health check does, is never the least recently
active. Headers must arrive within `header_timeout` seconds of a request's first byte (uvicorn has no such
deadline); the body's deadline is the app's read timeout. What was closed is logged once per LOG_INTERVAL.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import resource

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds; nginx's client_header_timeout is 60, a flood's connections cost more here
LOG_INTERVAL = 10.0  # seconds between two lines about closed connections
BACKLOG = 256  # connections the kernel queues; asyncio may accept this many at once before any is refused
# Descriptors kept beside the connections: the model's files, logs, the decoding threads' and the burst above.
DESCRIPTOR_RESERVE = BACKLOG + 128
SETTINGS_VARIABLE = "SAT_SERVE_SETTINGS"  # how worker processes receive the app's settings (JSON)
ACCEPT_EXHAUSTED = "socket.accept() out of system resource"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Pillow's block size: a decoded photo's blocks are mapped and unmapped, while the encoder's activations (under
# 16 MB a photo at 448 px) stay in the heap; at 1 MB, every activation was mapped afresh and captioning slowed
# (results/load_batching/).
MMAP_THRESHOLD = 16 << 20
logger = logging.getLogger("uvicorn.error")


class ConnectionGuard:
    """The connections of one server process, least recently active first, and what was closed since the last
    log line."""

    def __init__(self, loop, *, max_connections: int, header_timeout: float, log_interval: float) -> None:
        self.loop, self.max_connections, self.header_timeout = loop, max_connections, header_timeout
        self.log_interval = log_interval
        self.connections: collections.OrderedDict[GuardedH11Protocol, None] = collections.OrderedDict()
        self.closed = collections.Counter()  # why, since the last log line
        self._log_due = False
        self._default_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._exception)

    def admit(self, protocol: GuardedH11Protocol) -> bool:
        """Make room for `protocol` (closing the least recently active idle connection) or refuse it."""
        while len(self.connections) >= self.max_connections:
            victim = next((c for c in self.connections if c.idle()), None)
            if victim is None:
                self.count("refused: every connection was waiting for its answer")
                return False
            self.leave(victim)
            victim.transport.abort()
            self.count("the least recently active idle connection, closed to make room")
        self.connections[protocol] = None
        return True

    def active(self, protocol: GuardedH11Protocol) -> None:
        if protocol in self.connections:
            self.connections.move_to_end(protocol)

    def leave(self, protocol: GuardedH11Protocol) -> None:
        self.connections.pop(protocol, None)

    def count(self, reason: str) -> None:
        """Note a closed connection; one line per log_interval says how many, and why."""
        self.closed[reason] += 1
        if not self._log_due:
            self._log_due = True
            self.loop.call_later(self.log_interval, self._log)

    def _log(self) -> None:
        self._log_due = False
        reasons = "; ".join(f"{count} {reason}" for reason, count in self.closed.most_common())
        logger.warning(
            "sat serve: %d connections closed in the last %g s (limit %d open): %s",
            sum(self.closed.values()),
            self.log_interval,
            self.max_connections,
            reasons,
        )
        self.closed.clear()

    def _exception(self, loop, context: dict) -> None:
        # The descriptors ran out anyway (another process's share of them): asyncio retries the accept a second
        # later and would log a traceback for every attempt.
        if context.get("message", "").startswith(ACCEPT_EXHAUSTED):
            self.count("not accepted: no file descriptor left")
        elif self._default_handler is not None:
            self._default_handler(loop, context)
        else:
            loop.default_exception_handler(context)


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config, with the connection guard's limits (it travels to worker processes as it is)."""

    def __init__(
        self,
        app,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        log_interval: float = LOG_INTERVAL,
        **options,
    ) -> None:
        super().__init__(app, http=GuardedH11Protocol, backlog=BACKLOG, **options)
        self.max_connections, self.header_timeout, self.log_interval = max_connections, header_timeout, log_interval


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 connection, admitted by the process's ConnectionGuard and given a deadline for its headers."""

    def __init__(self, config: GuardedConfig, server_state: ServerState, *args, **kwargs) -> None:
        super().__init__(config, server_state, *args, **kwargs)
        # one guard per uvicorn server: its state is what all of its connections share
        if not hasattr(server_state, "connection_guard"):
            server_state.connection_guard = ConnectionGuard(
                self.loop,
                max_connections=config.max_connections,
                header_timeout=config.header_timeout,
                log_interval=config.log_interval,
            )
        self.guard = server_state.connection_guard
        self.header_deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.abort()
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        self.guard.active(self)
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request has begun (or the next on a kept-alive connection)
            self._await_headers()
        elif self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def connection_lost(self, exc) -> None:
        self.guard.leave(self)
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def idle(self) -> bool:
        """Not waiting for an answer: its request's headers or body are still arriving, or it has none."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _await_headers(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.guard.header_timeout, self._headers_too_late)

    def _headers_too_late(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.guard.leave(self)
            self.transport.abort()
            self.guard.count(f"headers not received within {self.guard.header_timeout:g} s")


def descriptor_limit(max_connections: int) -> int:
    """The connections one process may hold: `max_connections`, or fewer when its descriptor limit (raised to
    the hard limit first) leaves no room for them beside DESCRIPTOR_RESERVE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(1, min(max_connections, soft - DESCRIPTOR_RESERVE))


def serve(
    settings: dict,
    *,
    host: str,
    port: int,
    workers: int = 1,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
) -> None:
    """Run `sat serve`: the app of `settings` (see app_from_settings) in this process, or in `workers` processes
    that share the listening socket, each loading its own model with cpu_count // workers torch threads."""
    limit = descriptor_limit(max_connections)
    if limit < max_connections:
        logger.warning("sat serve: at most %d connections (the file descriptor limit leaves no more)", limit)
    options = dict(host=host, port=port, max_connections=limit, header_timeout=header_timeout)
    if workers == 1:
        uvicorn.Server(GuardedConfig(app_from_settings(settings), **options)).run()
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ[SETTINGS_VARIABLE] = json.dumps({**settings, "torch_threads": threads})  # inherited by the workers
    config = GuardedConfig(f"{__name__}:app_from_environment", factory=True, workers=workers, **options)
    Multiprocess(config, sockets=[config.bind_socket()]).run()


def app_from_environment():
    """A worker process's app: the settings its parent left in SAT_SERVE_SETTINGS."""
    import torch

    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    torch.set_num_threads(settings.pop("torch_threads"))
    return app_from_settings(settings)


def app_from_settings(settings: dict):
    """Load the model of `settings` ("model", "int8", "encoder_precision", "detector"), warm it up, and build the
    app with the rest of them (server.create_app's limits; "model_threads" may be "auto": auto_model_threads)."""
    import torch

    from show_attend_tell.captioner import Captioner
    from show_attend_tell.server import auto_model_threads, create_app, warm_up

    release_large_frees()
    settings = dict(settings)
    captioner = Captioner.load(
        settings.pop("model"),
        int8=settings.pop("int8"),
        encoder_precision=settings.pop("encoder_precision"),
        detector=settings.pop("detector", None),
    )
    if settings.get("model_threads", 1) == "auto":
        settings["model_threads"] = auto_model_threads(captioner.device.type, torch.get_num_threads())
    warm_up(captioner, settings["max_batch"])
    return create_app(captioner, **settings)


def release_large_frees() -> None:
    """Have glibc give every allocation of MMAP_THRESHOLD or more its own mapping, returned to the system when it
    is freed. By default glibc raises that threshold to the largest block freed so far (up to 32 MB), after which
    a photo's decode buffers (Pillow allocates 16 MB blocks) stay in the heap of the thread that decoded it: under
    the hang-up flood of issue #31 the server's RSS grew past its memory budget (results/hostile_load.json)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator has its own ways
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
