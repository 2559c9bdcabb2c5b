"""Micro-batching: concurrent requests of a category are scored together, up to ``max_batch``
images or ``max_wait`` seconds after the first one, in one ONNX Runtime call. A batch waits only
while other requests of its category are still being decoded (:meth:`MicroBatcher.expect`): a
lone request is scored at once instead of waiting ``max_wait`` for company that is not coming.

Two stages run one after the other per batch but overlap across batches: scoring (one thread for
every category, so ORT sessions never fight over the cores they were given) and recording (the
ledger transaction and the image store; one thread). A request's future is resolved only after its
record is committed. Queues are bounded: a full queue raises :class:`Overloaded` at once (the
service answers 503 with Retry-After) instead of letting memory or latency grow without bound.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class Overloaded(RuntimeError):
    pass


@dataclass
class Job:
    model: Any  # the ServedModel the request started with
    image: np.ndarray  # 3 x S x S float32
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


Score = Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray]]
Record = Callable[[list[Job], np.ndarray, np.ndarray], list[Any]]


class MicroBatcher:
    def __init__(self, score: Score, record: Record, max_batch: int, max_wait_s: float, queue_size: int, in_flight_batches: int = 4,
                 observe: Callable[[str, int, float], None] | None = None) -> None:
        self.score, self.record = score, record
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_s, queue_size
        self.in_flight_batches = in_flight_batches
        self.observe = observe or (lambda category, size, seconds: None)
        self.queues: dict[str, asyncio.Queue[Job]] = {}
        self.arriving: dict[str, int] = {}  # requests being decoded that will be submitted soon
        self.workers: list[asyncio.Task] = []
        self.score_pool = ThreadPoolExecutor(1, thread_name_prefix="urd-score")
        self.record_pool = ThreadPoolExecutor(1, thread_name_prefix="urd-record")

    def start(self, categories: list[str]) -> None:
        for category in categories:
            self.queues[category] = asyncio.Queue(self.queue_size)
            self.workers.append(asyncio.create_task(self._work(category), name=f"batcher-{category}"))

    async def stop(self) -> None:
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.score_pool.shutdown(wait=True)
        self.record_pool.shutdown(wait=True)

    def depth(self, category: str) -> int:
        return self.queues[category].qsize()

    @contextmanager
    def expect(self, category: str):
        """Around the work before :meth:`submit` (decoding): while inside, a forming batch of the
        category waits (up to ``max_wait``) for this request."""
        self.arriving[category] = self.arriving.get(category, 0) + 1
        try:
            yield
        finally:
            self.arriving[category] -= 1

    async def submit(self, category: str, model: Any, image: np.ndarray, payload: Any) -> Any:
        job = Job(model, image, payload, asyncio.get_running_loop().create_future())
        try:
            self.queues[category].put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue_size} requests of {category} are already waiting") from None
        return await job.future

    async def _work(self, category: str) -> None:
        queue = self.queues[category]
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.in_flight_batches)
        carry: Job | None = None
        while True:
            first = carry or await queue.get()
            carry = None
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if queue.empty() and not self.arriving.get(category):
                    break  # nobody else is on the way
                try:
                    job = queue.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if job.model is not first.model:  # a swap happened: the next batch runs on the new model
                    carry = job
                    break
                batch.append(job)
            await slots.acquire()
            try:
                started = time.perf_counter()
                maps, scores = await loop.run_in_executor(self.score_pool, self.score, first.model, np.stack([j.image for j in batch]))
                self.observe(category, len(batch), time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the worker goes on
                slots.release()
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            asyncio.create_task(self._finish(batch, maps, scores, slots))

    async def _finish(self, batch: list[Job], maps: np.ndarray, scores: np.ndarray, slots: asyncio.Semaphore) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.record_pool, self.record, batch, maps, scores)
        except Exception as exc:  # noqa: BLE001
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
        else:
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            slots.release()
