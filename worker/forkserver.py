"""The server the builder processes fork from: multiprocessing's forkserver, with our modules imported once.

A builder started afresh ("spawn") runs a new interpreter that imports NumPy, pydantic, redis-py and our modules
before it can build: about 0.45 s of CPU per builder, taken from the cores the worker's own start-up needs
(its first record was consumed 1.2 to 1.7 s after launch; 0.9 to 1.3 s now, BENCHMARKS.md). Forked from a
server that imported them once, a builder starts in about 10 ms. A fork of the worker itself would be quicker
still, but the worker runs threads (Kafka's, the metrics server's), and a fork copies whatever lock one of
them holds; the server runs one thread.

This module imports nothing heavy, so that `streamadapt run` can start the server first and let it import
our modules on one core while the worker imports its own on the other.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver

PRELOADED_MODULES = ["worker.builder"]


def context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context builder processes start in."""
    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(PRELOADED_MODULES)
    return forkserver


def start() -> None:
    """Start the server now, without waiting for it: the first builder to start waits until it has imported
    PRELOADED_MODULES. (Without this call, the first builder to start starts it.)"""
    context()
    try:
        multiprocessing.forkserver.ensure_running()
    except FileNotFoundError as error:  # tempfile found no writable directory for the server's socket
        raise OSError(f"the builder processes need a writable temporary directory for their fork server's socket "
                      f"(set TMPDIR, or mount one at /tmp): {error}") from error
