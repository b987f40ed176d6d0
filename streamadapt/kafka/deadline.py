"""Transactional calls with a deadline of our own.

Both client libraries have transactional calls that can wait without end while a broker is away: kafka-python's
`commit_transaction`, `abort_transaction` and `send_offsets_to_transaction` take no timeout, and librdkafka's
`send_offsets_to_transaction` can outlive its timeout once the group coordinator's broker left the metadata
(librdkafka issue 5511). Such a call runs on a helper thread here, and the serving thread stops waiting after
the deadline: the call still holds the producer's transaction, which only a new producer with the same
transactional id can resolve, so the caller raises TransactionStuck and the process restarts.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from streamadapt.kafka.protocol import TransactionStuck

T = TypeVar("T")


class Deadline:
    """Runs one call at a time on a helper thread, and gives up waiting for it after `timeout_s`. The thread
    is a daemon: a call that never returns must not keep the process from exiting (a ThreadPoolExecutor's
    threads are joined at exit)."""

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._stuck: Future | None = None
        threading.Thread(target=self._serve, name="kafka-transaction", daemon=True).start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function, args = call
            try:
                future.set_result(function(*args))
            except BaseException as error:  # handed to the caller
                future.set_exception(error)

    def call(self, what: str, function: Callable[..., T], *args) -> T:
        if self._stuck is not None and not self._stuck.done():
            raise TransactionStuck(what, self._timeout_s)
        future: Future = Future()
        self._calls.put((future, function, args))
        try:
            return future.result(timeout=self._timeout_s)
        except FutureTimeout:
            self._stuck = future
            raise TransactionStuck(what, self._timeout_s) from None

    def close(self) -> None:
        self._calls.put(None)
