"""Workarounds for kafka-python bugs, each for the release it was written against (WRITTEN_FOR).

They patch kafka-python's private internals, so each is applied only to that release: on any other,
`apply_*` leaves the client as it is and logs a warning once, and tests/kafka/test_workarounds.py fails until
someone checks, for each workaround, whether the new release still needs it.
"""
from __future__ import annotations

import logging

import kafka
from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport

WRITTEN_FOR = "3.0."  # kafka-python 3.0.x

log = logging.getLogger(__name__)
_warned: set[str] = set()


def applies(version: str = kafka.__version__) -> bool:
    """Whether the installed kafka-python is the release these workarounds were written for."""
    if version.startswith(WRITTEN_FOR):
        return True
    if version not in _warned:
        _warned.add(version)
        log.warning("kafka-python %s is not the %sx the workarounds in %s were written for: they are not applied",
                    version, WRITTEN_FOR, __name__)
    return False


def apply_to_transports() -> None:
    """Hand over the bytes a transport read just before the peer closed the connection (once per process).

    kafka-python 3.0's transports lose them: `_sock_recv` returns them together with the close, and the
    reader aborts without passing them on. A broker that refuses SASL credentials answers "Authentication
    failed: Invalid username or password" and then closes, so a wrong password was reported as a bare
    "socket disconnected" most of the time (and a start-up whose every attempt lost it said only "Unable
    to bootstrap"). The bytes now go to the protocol first, and the close is reported by the next read: a
    closed socket stays readable, so that read comes at once."""
    if not applies():
        return
    for transport_class in (KafkaTCPTransport, KafkaSSLTransport):  # each defines its own _sock_recv
        sock_recv = transport_class.__dict__["_sock_recv"]
        if getattr(sock_recv, "streamadapt_original", None) is not None:
            continue  # applied already

        def sock_recv_bytes_first(transport, sock_recv=sock_recv):
            held_error = transport.__dict__.pop("_streamadapt_held_error", None)
            if held_error is not None:
                return b"", held_error
            data, error = sock_recv(transport)
            if data and error is not None:
                transport._streamadapt_held_error = error
                return data, None
            return data, error

        sock_recv_bytes_first.streamadapt_original = sock_recv
        transport_class._sock_recv = sock_recv_bytes_first


def apply_to_consumer(consumer: kafka.KafkaConsumer) -> None:
    """Both consumer workarounds below, on one consumer, before it subscribes."""
    if applies():
        rejoin_until_joined(consumer._coordinator)
        drain_fetches_that_land_late(consumer._fetcher)


def rejoin_until_joined(coordinator) -> None:
    """Do not lose a rebalance that the topic's metadata started. The leader rebalances when the partitions it
    assigned differ from the metadata: the first metadata after subscribing came after the first join (a poll
    right after subscribing), or partitions were added. kafka-python 3.0 does not mark such a rejoin as
    needed; the coordinator rejoins only while the two differ. Our revoke callback first finishes the
    batches in flight, which can outlast the poll: the join then goes on between two polls, the leader's new
    assignment makes the two equal, and the next poll finds nothing to do and never completes the join. The
    partitions stay revoked and the consumer reads nothing more, for good (tests/integration/test_rebalance.py
    stalls every time without this). As the Java client does since KAFKA-9815, the rejoin is now marked as
    needed when it begins, so the next poll sees it through (with a second JoinGroup if the first finished
    between the polls)."""
    need_rejoin = coordinator.need_rejoin

    def need_rejoin_marked() -> bool:
        needed = need_rejoin()
        if needed:
            coordinator.rejoin_needed = True  # cleared by kafka-python once the join completes
        return needed

    coordinator.need_rejoin = need_rejoin_marked


def drain_fetches_that_land_late(fetcher) -> None:
    """Return the records of a fetch response that lands while `Fetcher.fetch_records` looks idle. In kafka-python
    3.0, when a response lands after it has drained its buffer but before it looks for fetches in flight, it
    finds none in flight and reports the consumer idle, and `poll` then sleeps `retry_backoff_ms` (100 ms)
    while the response's records wait in the buffer. A second call drains them at once; a consumer idle in
    truth is idle again and sleeps."""
    fetch_records = fetcher.fetch_records

    def fetch_records_again_when_idle(*args, **kwargs):
        records, idle = fetch_records(*args, **kwargs)
        if idle and not records:
            records, idle = fetch_records(*args, **kwargs)
        return records, idle

    fetcher.fetch_records = fetch_records_again_when_idle
