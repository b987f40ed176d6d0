"""Start-up against a Redis of the other kind than the settings say: one line that names the setting."""
import dataclasses

import pytest

from tests.integration.conftest import WorkerProcess, run_expecting_failure

pytestmark = pytest.mark.integration


def test_a_redis_of_the_other_kind_stops_start_up_with_one_line_naming_the_setting(each_redis, names, checkpoint,
                                                                                  tmp_path):
    wrong = dataclasses.replace(each_redis, redis_cluster=not each_redis.redis_cluster)
    stderr = run_expecting_failure(WorkerProcess(wrong, names, checkpoint, tmp_path / "unused.log").env)
    if each_redis.redis_cluster:
        assert "is a Redis Cluster: set STREAMADAPT_REDIS_CLUSTER=true" in stderr, stderr[-2000:]
    else:
        assert "cannot reach Redis" in stderr and "unset STREAMADAPT_REDIS_CLUSTER" in stderr, stderr[-2000:]
