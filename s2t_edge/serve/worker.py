"""The engine thread: it alone touches the llama.cpp context, running one continuous batch.

HTTP handlers `submit()` a `Job` (already tokenized) and read its events from their own queue;
the worker admits jobs into free slots of a `BatchScheduler` between steps, so a new request
joins the batch at the next step and a finished, stopped or abandoned one frees its slot at once.
Beyond `parallel` running jobs, up to `queue_size` wait; more are refused (HTTP 503).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from s2t_edge.batch import BatchScheduler, SlotToken
from s2t_edge.decode import DecodeStats
from s2t_edge.engine import Engine
from s2t_edge.policy import Policy
from s2t_edge.serve.protocol import APIError
from s2t_edge.serve.textstream import Piece, TextStream

log = logging.getLogger("s2t_edge.serve")


@dataclass(frozen=True)
class Done:
    """The answer ended: why, how many tokens it took, and the decode loop's counters."""

    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    completion_tokens: int
    stats: dict


@dataclass(frozen=True)
class Failed:
    """The answer could not be finished (server shutting down, engine error)."""

    error: APIError


Event = Piece | Done | Failed


def _closing_error() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


@dataclass(eq=False)
class Job:
    prompt: list[int]
    max_tokens: int
    policy: Policy
    emit: Callable[[Event], None]  # must be safe to call from the worker thread
    stops: list[str] = field(default_factory=list)
    cancelled: bool = False  # set by the handler when its client goes away
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    batch: int = 0  # the most requests its steps were batched with (itself included)
    text: TextStream = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextStream(self.stops)


class Worker:
    """Owns the engine: call `start()`, `submit()` from any thread, `shutdown()` at the end."""

    def __init__(self, engine: Engine, policy: Policy, *, parallel: int, queue_size: int, ctx: int) -> None:
        if engine.n_seq < parallel:
            raise ValueError(f"the engine has {engine.n_seq} sequences, {parallel} wanted")
        self.engine, self.parallel, self.queue_size, self.ctx = engine, parallel, queue_size, ctx
        self.sched = BatchScheduler(engine, policy)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[int, Job] = {}  # seq id -> running job
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not yet finished
        self._closing = False
        self.failed = False  # the engine thread died (the health check says so)
        self._deadline = float("inf")  # after it, running jobs are ended with an error
        self._thread = threading.Thread(target=self._run, name="s2t-edge-engine", daemon=False)

    # ---- any thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def load(self) -> dict[str, int]:
        with self._lock:
            pending = self._pending
        running = len(self._jobs)
        return {"running": running, "queued": max(0, pending - running)}

    def submit(self, *jobs: Job) -> None:
        """Queue `jobs` (a request's choices) together, or refuse them all at once (503) when the
        queue has no room for them or the server is closing."""
        with self._lock:
            if self._closing:
                raise _closing_error()
            if self._pending + len(jobs) > self.parallel + self.queue_size:
                raise APIError(
                    503,
                    f"server busy: {self.parallel} answers running and {self.queue_size} queued "
                    "(each of a request's n choices is one); retry later",
                    type="server_error",
                    code="queue_full",
                )
            self._pending += len(jobs)
            for job in jobs:
                self._inbox.put(job)  # under the lock: the engine thread's last drain cannot miss it

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs; running ones get `grace` seconds to finish, then end with an error.
        Returns at once; `join()` waits for the thread."""
        with self._lock:
            self._closing = True
            self._deadline = min(self._deadline, time.monotonic() + grace)
        self._inbox.put(None)  # wake the thread if it sleeps

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine thread to end (true when it has, or never started)."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._intake(block=not self._jobs and not self._waiting)
                if self._closing:
                    while self._waiting:  # not started: end them now, the running ones may finish
                        self._finish(self._waiting.popleft(), Failed(_closing_error()))
                    if time.monotonic() >= self._deadline or not self._jobs:
                        break
                self._admit()
                self._reap()
                if self._jobs:
                    self._step()
        except Exception:  # never leave a client hanging: whatever broke, every job gets an answer
            log.exception("engine thread failed")
            self.failed = True
        finally:
            with self._lock:  # from here on `submit` refuses: nobody would read the inbox
                self._closing = True
            err = _closing_error()
            for job in [*self._jobs.values(), *self._waiting]:
                self._finish(job, Failed(err))
            self._jobs.clear()
            self._waiting.clear()
            while True:  # jobs submitted before `_closing` was set (none can come after)
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._finish(job, Failed(err))
            self.sched.close()

    def _intake(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        last: tuple[list[int], int] | None = None  # the prompt admitted last and its slot
        while self._waiting and self.sched.free_slots and not self._closing:
            job = self._waiting.popleft()
            if job.cancelled:
                self._finish(job, None)
                continue
            job.started = time.perf_counter()
            try:
                like = last[1] if last is not None and last[0] is job.prompt else None  # the same request's
                seq = self.sched.add(
                    job.prompt, max_tokens=job.max_tokens, policy=job.policy, limit=self.ctx, like=like
                )
            except Exception as e:
                log.exception("prefill failed")
                self._finish(job, Failed(APIError(500, f"prefill failed: {e}", type="server_error")))
                continue
            self._jobs[seq] = job
            last = (job.prompt, seq)

    def _reap(self) -> None:
        """Free the slots of jobs whose clients went away; drop such jobs still waiting."""
        for seq, job in list(self._jobs.items()):
            if job.cancelled:
                self.sched.cancel(seq)
                del self._jobs[seq]
                self._finish(job, None)
        if any(j.cancelled for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled]:
                self._finish(job, None)
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)

    def _step(self) -> None:
        for job in self._jobs.values():
            job.batch = max(job.batch, len(self._jobs))
        try:
            events = self.sched.step()
        except Exception as e:
            log.exception("batched decode failed")
            err = APIError(500, f"decoding failed: {e}", type="server_error")
            for seq, job in list(self._jobs.items()):
                self.sched.cancel(seq)
                self._finish(job, Failed(err))
            self._jobs.clear()
            return
        for ev in events:
            self._route(ev)

    def _route(self, ev: SlotToken) -> None:
        job = self._jobs[ev.seq]
        if ev.token is not None:
            for piece in job.text.push(self.engine.token_bytes(ev.token), ev.flipped):
                job.emit(piece)
            if job.text.stopped:  # a stop string: the slot is not needed any more
                self.sched.cancel(ev.seq)
                del self._jobs[ev.seq]
                self._finish(job, self._done(job, "stop", len(ev.out), ev.stats))
                return
        if ev.done:
            for piece in job.text.finish():
                job.emit(piece)
            del self._jobs[ev.seq]
            self._finish(job, self._done(job, ev.stats.finish_reason, len(ev.out), ev.stats))

    def _done(self, job: Job, reason: str, n: int, stats: DecodeStats) -> Done:
        d = stats.as_dict()
        info = {k: d[k] for k in ("steps", "triggers", "flips", "trigger_rate", "flip_rate", "tokens_per_s")}
        info.update(
            policy=job.policy.name,
            prefill_s=round(stats.prefill_s, 4),
            cached_tokens=stats.cached_tokens,
            batch=job.batch,
            queue_s=round(job.started - job.submitted, 4),
            total_s=round(time.perf_counter() - job.submitted, 4),
        )
        return Done(reason, n, info)

    def _finish(self, job: Job, event: Event | None) -> None:
        with self._lock:
            self._pending -= 1
        if event is not None:
            try:
                job.emit(event)
            except Exception:  # the handler's event loop is gone (server stopping)
                log.debug("could not deliver the end of a job", exc_info=True)
