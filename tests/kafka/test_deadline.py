import subprocess
import sys
import time

import pytest

from streamadapt.kafka.deadline import Deadline
from streamadapt.kafka.protocol import TransactionStuck


def test_a_call_returns_its_value_or_raises_its_error_through_the_deadline():
    deadline = Deadline(5.0)
    assert deadline.call("add", lambda a, b: a + b, 1, 2) == 3
    with pytest.raises(ZeroDivisionError):
        deadline.call("divide", lambda: 1 / 0)


def test_a_call_past_its_deadline_is_stuck_and_so_is_every_call_after_it_until_it_returns():
    deadline = Deadline(0.2)
    started = time.monotonic()
    with pytest.raises(TransactionStuck, match="commit_transaction did not succeed"):
        deadline.call("commit_transaction", time.sleep, 1.0)
    assert time.monotonic() - started < 0.9
    with pytest.raises(TransactionStuck):
        deadline.call("abort_transaction", lambda: None)  # the transaction is still held by the stuck call


def test_a_stuck_call_does_not_keep_the_process_from_exiting():
    code = ("import time\nfrom streamadapt.kafka.deadline import Deadline\n"
            "try:\n    Deadline(0.1).call('x', time.sleep, 3600)\nexcept Exception as e:\n    print(type(e).__name__)\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "TransactionStuck" and time.monotonic() - started < 20
