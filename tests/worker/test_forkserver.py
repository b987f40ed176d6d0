import multiprocessing.forkserver

import pytest

from worker import forkserver


def test_no_writable_temporary_directory_is_one_clear_error(monkeypatch):
    def no_temporary_directory():
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp']")

    monkeypatch.setattr(multiprocessing.forkserver, "ensure_running", no_temporary_directory)
    with pytest.raises(OSError, match=r"need a writable temporary directory .*\(set TMPDIR, or mount one at /tmp\)"):
        forkserver.start()
