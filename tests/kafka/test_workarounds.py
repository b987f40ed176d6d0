"""The kafka-python workarounds: each does its job, and each is still needed by the installed release."""
import socket

import kafka
import pytest
from kafka.errors import KafkaConnectionError
from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport

from streamadapt.kafka import workarounds
from streamadapt.kafka.kafka_python import client_options
from streamadapt.kafka.protocol import TopicPartition
from streamadapt.kafka.workarounds import drain_fetches_that_land_late
from streamadapt.settings import KafkaSettings


@pytest.fixture(autouse=True, scope="module")
def transports_patched():
    client_options(KafkaSettings())  # applies the transport workaround, as building any client does


def test_the_installed_kafka_python_is_the_release_the_workarounds_were_written_for():
    """On an upgrade this fails: check each workaround here against the new release, keep the ones it still
    needs (the tests below say which), delete the others, and move WRITTEN_FOR on."""
    assert workarounds.applies(), (f"kafka-python {kafka.__version__}: re-check streamadapt.kafka.workarounds "
                                   f"(written for {workarounds.WRITTEN_FOR}x)")


def test_another_release_is_left_unpatched():
    assert not workarounds.applies("3.1.0")


def test_kafka_pythons_own_transport_still_returns_the_last_bytes_together_with_the_close():
    """The bug the transport workaround is for, on the unpatched method: when this fails, the release no longer
    needs it."""
    original = KafkaTCPTransport._sock_recv.streamadapt_original
    ours, brokers = socket.socketpair()
    with ours:
        brokers.sendall(b"Authentication failed")
        brokers.close()
        data, error = original(SocketEnd(ours))
    assert data == b"Authentication failed" and isinstance(error, KafkaConnectionError)


class RacedFetcher:
    """kafka-python 3.0's `Fetcher.fetch_records` contract, (records, idle): the first call reports idle although
    a response landed meanwhile, as in the race; later calls drain what landed."""

    def __init__(self, landed: dict):
        self.landed, self.calls = landed, 0

    def fetch_records(self, max_records=None, update_offsets=True, timeout_ms=None):
        self.calls += 1
        if self.calls == 1:
            return {}, True
        landed, self.landed = self.landed, {}
        return landed, not landed


def test_records_that_land_while_a_poll_looks_idle_are_returned_at_once():
    landed = {TopicPartition("t", 0): ["record"]}
    fetcher = RacedFetcher(landed)
    drain_fetches_that_land_late(fetcher)
    assert fetcher.fetch_records(2000, timeout_ms=200) == (landed, False)
    assert fetcher.calls == 2


def test_a_consumer_idle_in_truth_is_still_reported_idle():
    fetcher = RacedFetcher({})
    drain_fetches_that_land_late(fetcher)
    assert fetcher.fetch_records(2000, timeout_ms=200) == ({}, True)  # so that kafka-python's poll sleeps


class SocketEnd:
    """What a kafka-python transport's `_sock_recv` reads through: its `_sock`, a non-blocking socket."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self._sock = sock


def test_bytes_read_just_before_the_broker_closes_reach_the_protocol_before_the_close():
    for transport_class in (KafkaTCPTransport, KafkaSSLTransport):
        ours, brokers = socket.socketpair()
        with ours:
            brokers.sendall(b"Authentication failed: Invalid username or password")
            brokers.close()  # the answer and the close arrive together, as from a broker refusing credentials
            transport = SocketEnd(ours)
            assert transport_class._sock_recv(transport) == (b"Authentication failed: Invalid username or password", None)
            data, error = transport_class._sock_recv(transport)
            assert data == b"" and isinstance(error, KafkaConnectionError)


def test_a_close_with_no_bytes_before_it_is_reported_at_once():
    ours, brokers = socket.socketpair()
    with ours:
        brokers.close()
        data, error = KafkaTCPTransport._sock_recv(SocketEnd(ours))
        assert data == b"" and isinstance(error, KafkaConnectionError)


def test_bytes_of_an_open_connection_pass_as_they_come():
    ours, brokers = socket.socketpair()
    with ours, brokers:
        brokers.sendall(b"response")
        transport = SocketEnd(ours)
        assert KafkaTCPTransport._sock_recv(transport) == (b"response", None)
        assert KafkaTCPTransport._sock_recv(transport) == (b"", None)  # nothing more yet, and still open
