"""An asyncio front for :class:`LLMEngine`, for the HTTP server: background stepping, one output
queue per request, abort when the consumer goes away, drain on shutdown.

One thread owns the engine and steps it; coroutines on the event loop talk to that thread
through a command queue (add, abort) and get each request's outputs back on an
``asyncio.Queue``. Validation runs on the caller's side before anything is queued, so a bad
request raises ``ValueError`` at once and the engine never sees it. Host side only: no jax here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from .llm_engine import LLMEngine
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams

logger = logging.getLogger("jaxpage")


class EngineUnavailable(RuntimeError):
    """The engine takes no new requests: it is draining, stopped or dead (the server's 503)."""


class EngineDead(RuntimeError):
    """The step loop died; requests in flight end with this error."""


class AsyncLLMEngine:
    """Steps ``engine`` in a background thread; :meth:`generate` streams a request's outputs.

    Args:
        engine: the engine to drive; nothing else may call it once :meth:`start` ran.
        idle_wait_s: how long the loop sleeps with no work before it looks again (it wakes at
            once on a new command).
    """

    def __init__(self, engine: LLMEngine, *, idle_wait_s: float = 0.05):
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _queues and the command/validate handshake
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.dead: BaseException | None = None
        self.num_steps = 0
        self._stats: dict[str, float] = dict(engine.get_stats())
        self._num_free_pages = engine.num_free_pages

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "AsyncLLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxpage-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def accepting(self) -> bool:
        return self.is_running and not self.draining

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuses new requests, lets the ones in flight finish for up to ``drain_timeout_s``,
        aborts the rest and stops the loop thread."""
        self.draining = True
        deadline = time.monotonic() + drain_timeout_s
        while self.num_in_flight and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._lock:
            left = list(self._queues)
        if left:
            self._command("abort", left)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        if self._thread is None or not self._thread.is_alive():  # the launch thread too
            self.engine.model_runner.shutdown()

    # -- requests -----------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._queues)

    def stats(self) -> dict[str, float]:
        """The engine's counters as of its last step (read without touching the engine)."""
        return dict(self._stats, num_free_pages=self._num_free_pages, num_steps=self.num_steps,
                    num_in_flight=self.num_in_flight)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling_params: SamplingParams, *, prompt: str | None = None,
                       cache_salt: str | None = None,
                       final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Queues a request and yields its cumulative outputs until the last one (``finished``);
        with ``final_only`` only that last one (non-streamed responses: the engine then builds
        no copy of the output at every step).

        Raises ``ValueError`` (with ``param`` / ``code``) for a bad request and
        :class:`EngineUnavailable` when the engine takes no new work, both before anything is
        queued. Closing the iterator early (a client that went away) aborts the request, which
        frees its pages within a step.
        """
        if not self.accepting:
            raise EngineUnavailable("the engine is shutting down" if self.draining or self._stop
                                    else "the engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use.")
            # Validated here, on the caller's side, so the error reaches this caller; the
            # engine's thread only reads the same state, so the check and the queueing agree
            # but for the queue-length cap, which a burst may overshoot by its own size.
            ids = self.engine.validate_request(prompt_token_ids, sampling_params,
                                               req_id=request_id, cache_salt=cache_salt)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._commands.append(("add", (request_id, ids, sampling_params, prompt, cache_salt,
                                           final_only)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if not finished:
                self._command("abort", [request_id])

    async def abort(self, request_id: str) -> None:
        self._command("abort", [request_id])

    # -- the engine's thread ------------------------------------------------------------------
    def _command(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._commands.append((kind, payload))
        self._wake.set()

    def _deliver(self, req_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._queues.get(req_id)
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                kind, payload = self._commands.popleft()
            if kind == "add":
                req_id, ids, params, prompt, salt, final_only = payload
                with self._lock:
                    wanted = req_id in self._queues
                if not wanted:  # its consumer left before the request was queued
                    continue
                try:
                    self.engine.add_request(req_id, ids, params, prompt=prompt, cache_salt=salt,
                                            final_only=final_only)
                except ValueError as e:  # a race the caller's validation could not see
                    self._deliver(req_id, e)
            elif kind == "abort":
                self.engine.abort_request(payload)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._run_commands()
                if not self.engine.has_unfinished_requests():
                    self._refresh_stats()
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.num_steps += 1
                self._refresh_stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
            self._run_commands()  # the last aborts of a shutdown
        except BaseException as e:  # noqa: BLE001 - the loop is dead; tell every waiter
            logger.exception("the engine loop died")
            self.dead = e
            with self._lock:
                waiting = list(self._queues)
            for req_id in waiting:
                self._deliver(req_id, EngineDead(f"the engine stopped ({type(e).__name__})"))

    def _refresh_stats(self) -> None:
        self._stats = dict(self.engine.get_stats())
        self._num_free_pages = self.engine.num_free_pages
