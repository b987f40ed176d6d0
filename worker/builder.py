"""The builder process: builds batches (worker.batch) beside the serving loop.

Python runs one thread of Python at a time, and a worker spends about as much of it in the Kafka client as in
building batches. With the building in a process of its own, building batch N+1 overlaps producing batch N,
so a worker uses two cores. The serving loop hands a batch over with `submit` and takes it back with
`collect`, one batch in flight at a time.

A Redis error in the builder comes back from `collect` as the same exception: the loop waits the outage out
and submits the batch again. Any other error, or the builder's death, ends the worker, as a bug in-process
would. The builder ignores SIGINT and SIGTERM (the worker stops it after its last batch) and exits when the
worker's end of the pipe closes, so it never outlives a killed worker.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import traceback
from multiprocessing.connection import Connection

from worker.batch import REDIS_OUTAGE_ERRORS, BatchBuilder, Built
from worker.model import ServingModel
from worker.pipeline import InputRecord
from worker.settings import Settings
from worker.state import StateStore, WindowPolicy, connect

log = logging.getLogger(__name__)


class BuilderFailed(RuntimeError):
    """The builder process died or hit a bug; the worker stops and its uncommitted batch is replayed."""


class BuilderProcess:
    def __init__(self, settings: Settings, model: ServingModel):
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads (Kafka, TensorFlow)
        self._conn, child_end = context.Pipe()
        self._process = context.Process(target=_serve, name="streamadapt-builder",
                                        args=(child_end, settings, model, logging.getLogger().level))
        self._process.start()
        child_end.close()
        self.in_flight = False
        log.info("batch builder process started (pid %d)", self._process.pid)

    @property
    def pid(self) -> int:
        return self._process.pid

    def submit(self, records: list[InputRecord], with_quality: bool = False) -> None:
        if self.in_flight:
            raise RuntimeError("the builder already has a batch in flight")
        try:
            self._conn.send(("build", [tuple(record) for record in records], with_quality))
        except OSError as error:
            raise self._died() from error
        self.in_flight = True

    def collect(self) -> Built:
        """The batch in flight, built and saved to Redis; raises the Redis error that stopped it."""
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as error:
            raise self._died() from error
        finally:
            self.in_flight = False
        if kind == "built":
            return payload
        if kind == "outage":
            raise payload
        raise BuilderFailed(f"the batch builder process failed:\n{payload}")

    def _died(self) -> BuilderFailed:
        self._process.join(timeout=5)  # its end of the pipe closes a moment before it can be reaped
        return BuilderFailed(f"the batch builder process died (exit code {self._process.exitcode})")

    def swap(self, weights, version: str) -> None:
        """Build with these weights from the next batch on (the caller has checked they fit)."""
        self._conn.send(("swap", weights, version))

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self._conn.send(("stop",))
        except OSError:
            pass  # it is gone already
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _serve(conn: Connection, settings: Settings, model: ServingModel, log_level: int) -> None:
    """The builder process's main: build what the serving loop submits until it says stop or goes away."""
    from worker.cli import LOG_FORMAT

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    client = connect(settings.redis)
    builder = BatchBuilder(settings, StateStore(client, settings.redis, WindowPolicy.of(settings.training)), model)
    gc.freeze()  # as in the serving process: what exists now lives as long as the process
    gc.set_threshold(50_000)
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return  # the worker is gone
            if message[0] == "stop":
                return
            if message[0] == "swap":
                builder.swap(message[1], message[2])
                continue
            records = [InputRecord(*record) for record in message[1]]
            try:
                reply = ("built", builder.build(records, message[2]))
            except REDIS_OUTAGE_ERRORS as error:
                reply = ("outage", error)
            except Exception:  # a bug: say which records, so that they can be looked at
                reply = ("failed", f"batch of {len(records)} records from {records[0].ref} to {records[-1].ref}:\n"
                                   f"{traceback.format_exc()}")
            conn.send(reply)
    finally:
        client.close()
