"""The builder processes: build batches (worker.batch) beside the serving loop.

Python runs one thread of Python at a time, and building a batch (validation, Redis state, features,
inference, prediction JSON) costs a worker more than consuming and producing it. So batches are built in
processes of their own: building overlaps producing, and `Builders` splits each batch over several builder
processes by record key. The input's key is the user id (DESIGN.md), so all of a user's events go to one
builder, which reads and writes that user's state in order, as it would alone. The serving loop hands batches
over with `submit`, several at a time, and takes each back with `collect`, in order.

In the builder, a batch's Redis transaction is applied on a thread of its own while the next batch is built,
reading the writes still on their way as Redis will hold them; the batch's reply goes back once its
transaction has landed. A batch built on top of one whose transaction failed is never saved: it comes back as
the same error, and the serving loop reads both again.

A Redis error in the builder comes back from `collect` as the same exception: the loop waits the outage out
and submits the batch again. Any other error, or the builder's death, ends the worker, as a bug in-process
would. The builder ignores SIGINT and SIGTERM (the worker stops it after its last batch) and exits when the
worker's end of the pipe closes, so it never outlives a killed worker. Builders fork from the server of
worker.forkserver, which has imported their modules already: they start in milliseconds.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import socket
import threading
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection

from worker import forkserver
from worker.batch import BatchBuilder, Built, Unsaved
from worker.model import ServingModel
from worker.pipeline import InputRecord, builder_of
from worker.settings import Settings
from worker.state import REDIS_OUTAGE_ERRORS, StateStore, StateWrites, WindowPolicy, connect

log = logging.getLogger(__name__)


class BuilderFailed(RuntimeError):
    """The builder process died or hit a bug; the worker stops and its uncommitted batch is replayed."""


START_TIMEOUT_S = 120.0  # a builder process's start: Python, our modules, a Redis connection


class BuilderProcess:
    def __init__(self, settings: Settings, model: ServingModel, index: int = 0):
        """Builder `index` of `settings.builders`: when a batch is split, it is handed the records whose key is
        its own (`builder_of`); the first builder is handed the batches that are not split."""
        context = forkserver.context()
        self._conn, child_end = context.Pipe()
        for end in (self._conn, child_end):
            _widen(end)
        self._process = context.Process(target=_serve, name=f"streamadapt-builder-{index}",
                                        args=(child_end, settings, index, logging.getLogger().level))
        self._process.start()
        child_end.close()
        # The model goes down the widened pipe rather than with the arguments, which pass through a 64-kB OS
        # pipe: started afresh, a builder read them only once it had imported our modules, and each start
        # waited ~0.3 s for that. This way the builders start side by side.
        self._conn.send(model)
        self._index = index
        self.in_flight = 0  # batches submitted and not yet collected

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the process has the model and a Redis connection (its first message, which nothing
        else reads: call this once, before handing it a batch); raise BuilderFailed if it died or took
        longer than `timeout_s`."""
        try:
            if not self._conn.poll(timeout_s):
                raise BuilderFailed(f"the batch builder process did not start within {timeout_s:.0f} s")
            kind = self._conn.recv()[0]
        except (EOFError, OSError) as error:
            raise self._died() from error
        if kind != "started":
            raise BuilderFailed(f"the batch builder process said {kind!r} before it started")
        log.info("batch builder process %d started (pid %d)", self._index, self._process.pid)

    @property
    def pid(self) -> int:
        return self._process.pid

    def submit(self, records: list[InputRecord], builders: int = 1) -> None:
        """Hand a batch over: this builder's share of a batch split over `builders` builders (by `builder_of`).
        With batches already in flight, this one is built on top of them: while their transactions land, and
        only saved if they do."""
        try:
            self._conn.send(("build", [tuple(record) for record in records], self.in_flight > 0, builders))
        except OSError as error:
            raise self._died() from error
        self.in_flight += 1

    def ready(self) -> bool:
        """Whether `collect` would return without waiting."""
        return self.in_flight > 0 and self._conn.poll(0)

    def collect(self) -> Built:
        """The oldest batch in flight, built and saved to Redis; raises the Redis error that stopped it, or
        that stopped the batch it was built on."""
        if not self.in_flight:
            raise RuntimeError("no batch in flight")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as error:
            raise self._died() from error
        finally:
            self.in_flight -= 1
        if kind == "built":
            return payload
        if kind == "outage":
            raise payload
        raise BuilderFailed(f"the batch builder process failed:\n{payload}")

    def check_alive(self) -> None:
        """Raise BuilderFailed if the builder process has died."""
        if not self._process.is_alive():
            raise self._died()

    def _died(self) -> BuilderFailed:
        self._process.join(timeout=5)  # its end of the pipe closes a moment before it can be reaped
        return BuilderFailed(f"the batch builder process died (exit code {self._process.exitcode})")

    def swap(self, parameters, version: str) -> None:
        """Build with these parameters from the next batch on (the caller has checked they fit)."""
        self._conn.send(("swap", parameters, version))

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


class Builders:
    """`settings.builders` builder processes used as one. A batch is split by record key: a share per
    builder, built and saved by it while the others build theirs, and joined again by `collect`. A key's
    builder is fixed (CRC-32 of the key), so each user's events are built in order by one process, whose
    Redis reads see its own writes (worker.batch); repurchase deadlines are settled by the builder of their user.

    That holds only if the input is keyed by user_id, as DESIGN.md asks. So batches are split only once
    SPLIT_AFTER_EVENTS valid events came back all keyed by their user_id, and never again once a record keyed
    otherwise (or not at all) came back. And only batches of some size are split: a backlog's, where the split
    doubles the rate, and a steady stream's once a stall has let a few hundred records gather, which then take
    half as long to build (whether 150 rather than 500 as the threshold pays at 10,000 events/s, a proper A/B
    could not tell: BENCHMARKS.md); a small batch is built by the first builder alone, sooner than two shares
    would be. Between the two, a switch waits until every batch handed over before it has come back (its
    writes are in Redis): later batches are held until then, so no builder reads a user's state while another
    still writes it."""

    def __init__(self, settings: Settings, model: ServingModel):
        self._keyed = "waiting"  # whether the input is keyed by user: "waiting" for enough events, "yes", "no"
        self._keyed_events = 0
        self._split = False  # whether the batches out were split
        self._processes: list[BuilderProcess] = []
        try:
            for index in range(settings.builders):
                self._processes.append(BuilderProcess(settings, model, index))
            for process in self._processes:  # they start side by side
                process.wait_started()
        except BaseException:
            self.close()
            raise
        self._batches: deque[_Batch] = deque()  # in flight, oldest first

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    @property
    def in_flight(self) -> int:
        return len(self._batches)

    @property
    def splitting(self) -> bool:
        """Whether the last batch handed over was split over the builders."""
        return self._split

    def submit(self, records: list[InputRecord]) -> None:
        """Hand a batch over, each builder its share (or hold it while a switch waits)."""
        self._batches.append(_Batch(records))
        self._hand_over()

    def ready(self) -> bool:
        """Whether `collect` would return without waiting."""
        self._hand_over()
        return (bool(self._batches) and self._batches[0].holders is not None
                and all(self._processes[index].ready() for index in self._batches[0].holders))

    def collect(self) -> Built:
        """The oldest batch in flight, every share built and saved; raises the Redis error that stopped a
        share (after taking back the other shares, so that every builder stays in step)."""
        self._hand_over()  # a held batch is the oldest only once every batch before it came back
        parts, outage = [], None
        for index in self._batches.popleft().holders:
            try:
                parts.append(self._processes[index].collect())
            except REDIS_OUTAGE_ERRORS as error:
                outage = outage or error
        if outage is not None:
            raise outage
        built = Built.joined(parts)
        self._check_keys(built)
        self._hand_over()
        return built

    def _hand_over(self) -> None:
        """Hand the held batches over, oldest first; one that needs a switch waits for the batches out."""
        for batch in self._batches:
            if batch.holders is not None:
                continue
            split = self._wants_split(len(batch.records))
            if split != self._split:
                if any(other.holders is not None for other in self._batches):
                    return  # held until the batches out come back
                self._split = split
            builders = len(self._processes) if split else 1
            shares = key_shares(batch.records, builders)
            for index, share in shares.items():
                self._processes[index].submit(share, builders)
            batch.holders = list(shares)

    def _wants_split(self, records: int) -> bool:
        if self._keyed != "yes":
            return False
        if records >= SPLIT_FROM_RECORDS:
            return True
        return self._split and records > BUILD_ALONE_UP_TO_RECORDS  # in between: as the batches before

    def _check_keys(self, built: Built) -> None:
        if self._keyed == "no" or len(self._processes) == 1:
            return
        if not built.keyed_by_user:
            log.warning("input records not keyed by their user_id: one builder process builds every batch from now on, "
                        "so that each user's state is read and written in order (key the input by user_id, as the "
                        "contract asks, to use all %d --builders)", len(self._processes))
            self._keyed = "no"
            return
        self._keyed_events += built.predicted + built.duplicates
        if self._keyed == "waiting" and self._keyed_events >= SPLIT_AFTER_EVENTS:
            log.info("input keyed by user_id: batches of %d records or more are split over %d builder processes",
                     SPLIT_FROM_RECORDS, len(self._processes))
            self._keyed = "yes"

    def check_alive(self) -> None:
        for process in self._processes:
            process.check_alive()

    def swap(self, parameters, version: str) -> None:
        for process in self._processes:
            process.swap(parameters, version)

    def close(self, timeout_s: float = 10.0) -> None:
        for process in self._processes:
            process.close(timeout_s)


SPLIT_AFTER_EVENTS = 1000  # valid events keyed by their user_id before any batch is split
SPLIT_FROM_RECORDS = 150  # a batch this big is split (a backlog, or a stream after a stall) ...
BUILD_ALONE_UP_TO_RECORDS = 100  # ... and one this small is built by one builder (a steady stream)


@dataclass
class _Batch:
    records: list[InputRecord]
    holders: list[int] | None = None  # the builders with a share; None while held back by a switch


def key_shares(records: list[InputRecord], builders: int) -> dict[int, list[InputRecord]]:
    """builder index -> its records, in their order; a record's builder is fixed by its key (`builder_of`)."""
    if builders == 1:
        return {0: records}
    shares: dict[int, list[InputRecord]] = {}
    for record in records:
        shares.setdefault(builder_of(record.key, builders), []).append(record)
    return shares


# A batch share is a few hundred kB each way. With the socket's default buffers (208 kB) the serving
# thread's send waited for the builder's pipe reader, which shares its process's GIL with the build; with
# these, the drain of 150k events was 18.75k against 17.95k events/s (medians of 6 alternating runs).
# Linux caps them at net.core.wmem_max / rmem_max.
PIPE_BUFFER_BYTES = 4 << 20


def _widen(end: Connection) -> None:
    """Ask for PIPE_BUFFER_BYTES of socket buffer on one end of the pipe (a socket pair on Linux)."""
    try:
        with socket.socket(fileno=os.dup(end.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
    except OSError as error:  # not a socket on this platform: the default buffers do
        log.debug("pipe buffers left as they are: %s", error)


def _serve(conn: Connection, settings: Settings, index: int, log_level: int) -> None:
    """The builder process's main: take the model, then build what the serving loop submits until it says
    stop or goes away."""
    from worker.cli import LOG_FORMAT

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        model: ServingModel = conn.recv()
    except (EOFError, OSError):
        return  # the worker is gone before this process started
    client = connect(settings.redis)
    store = StateStore(client, settings.redis, WindowPolicy.of(settings.training))
    builds = _Builds(conn, BatchBuilder(settings, store, model, index))
    conn.send(("started",))
    inbox = _inbox(conn)
    gc.freeze()  # as in the serving process: what exists now lives as long as the process
    gc.set_threshold(50_000)
    try:
        while True:
            message = inbox.get()
            if message is None:
                return  # the worker is gone
            if message[0] == "stop":
                builds.settle()
                return
            if message[0] == "swap":
                builds.builder.swap(message[1], message[2])
            else:
                builds.build([InputRecord(*record) for record in message[1]], on_top=message[2], builders=message[3])
    finally:
        builds.close()
        client.close()


def _inbox(conn: Connection) -> queue.SimpleQueue:
    """What the serving loop sends, read from the pipe as it comes. The serving loop can then always hand a
    batch over, even while this process waits for it to take a reply back (else each would wait for the other
    once both directions of the pipe are full). None once the pipe is closed."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                inbox.put(None)
                return
            inbox.put(message)
            if message[0] == "stop":
                return

    threading.Thread(target=read, name="pipe-reader", daemon=True).start()
    return inbox


class _Builds:
    """Builds batches in order, each one's transaction on the saving thread while the next is built; every
    batch gets one reply, sent once its transaction has landed or failed. Replies go out in order: this
    thread sends only once the saving thread is done with the batch before."""

    def __init__(self, conn: Connection, builder: BatchBuilder):
        self._conn = conn
        self.builder = builder
        self._saving = ThreadPoolExecutor(1, thread_name_prefix="redis-save")
        self._last: Unsaved | None = None  # the last batch handed to the saving thread, until settled
        self._failure: Exception | None = None  # what stopped the last batch; None if it went through

    def build(self, records: list[InputRecord], on_top: bool, builders: int = 1) -> None:
        writes = failure = None
        try:
            built, writes = self.builder.build(records, self._last if on_top else None, builders)
        except REDIS_OUTAGE_ERRORS as error:
            reply, failure = ("outage", error), error
        except Exception as error:  # a bug: say which records, so that they can be looked at
            reply, failure = ("failed", f"{_describe(records)}:\n{traceback.format_exc()}"), error
        below = self.settle()
        if on_top and below is not None:  # built on writes that did not land: read again, after the batch below
            reply, writes, failure = ("outage", below), None, below
        if writes is None:
            self._failure = failure
            self._send(reply)
        else:
            self._last = Unsaved(writes, self._saving.submit(self._save, built, writes, records))

    def settle(self) -> Exception | None:
        """Wait until the last batch's reply is sent; the error that stopped it, or None if it went through."""
        if self._last is not None:
            self._failure, self._last = self._last.landed.result(), None
        return self._failure

    def _save(self, built: Built, writes: StateWrites, records: list[InputRecord]) -> Exception | None:
        """On the saving thread: apply the batch's transaction, then send its reply."""
        try:
            reply, failure = ("built", self.builder.save(built, writes)), None
        except REDIS_OUTAGE_ERRORS as error:
            reply, failure = ("outage", error), error
        except Exception as error:
            reply, failure = ("failed", f"saving the {_describe(records)}:\n{traceback.format_exc()}"), error
        self._send(reply)
        return failure

    def _send(self, reply: tuple) -> None:
        try:
            self._conn.send(reply)
        except OSError:
            pass  # the worker is gone: the next read of the pipe ends this process

    def close(self) -> None:
        self._saving.shutdown(wait=True)


def _describe(records: list[InputRecord]) -> str:
    return f"batch of {len(records)} records from {records[0].ref} to {records[-1].ref}"
