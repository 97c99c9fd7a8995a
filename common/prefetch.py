"""Batches made ahead in a background thread, so a GPU does not wait for patch sampling and augmentation.

On a CPU the same cores would do both, so fedseg prefetches only for CUDA
(``train.prefetch_batches``). The producer thread runs the source iterator in
order, so the batches, and the training, are the same as without it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
POLL_S = 0.1
JOIN_S = 10.0


class _End:
    """The source is exhausted."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate ``source`` at most ``depth`` items ahead of the consumer, in a daemon thread.

    An exception in the source is raised at the consumer's next ``next()``; use it
    as a context manager (or call ``close``) so the thread stops with the consumer.
    """

    def __init__(self, source: Iterator[T], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(source,), name="fedseg-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_End())
        except Exception as err:  # handed to the consumer, who decides
            self._put(_Failure(err))

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if isinstance(item, _End):
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer (it finishes the item in hand) and wait for it."""
        self._stopped.set()
        self._thread.join(JOIN_S)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
