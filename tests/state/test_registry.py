"""Registry and lease against the real Redis of the dev stack, single and cluster."""
import hashlib
import io
import zipfile
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from streamadapt.model.checkpoint import Parameters
from streamadapt.schemas import ModelVersion, TrainedOn
from streamadapt.state.registry import (
    ArtifactError,
    Registry,
    decode_parameters,
    encode_parameters,
    versions_to_drop,
)
from tests.conftest import new_names


@pytest.fixture
def registry(each_redis):
    client = each_redis.redis_client()
    yield Registry(client, new_names().key_prefix, "purchases")  # its keys go at the end of the run
    client.close()


def record(version: str, artifact: bytes, promoted=False) -> ModelVersion:
    import hashlib

    return ModelVersion(model="purchases", version=version, task="repurchase", source_checkpoint_sha256="s" * 64,
                        created_at=datetime.now(timezone.utc), trained_on=TrainedOn(examples=1), promoted=promoted,
                        artifact_sha256=hashlib.sha256(artifact).hexdigest(), artifact_ref=f"ref/{version}")


def test_parameters_round_trip_and_tampering_is_refused():
    import hashlib

    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, np.float32)]
    for fitted in (None, np.array([1.2, 0.0, -0.3])):
        raw = encode_parameters(Parameters(weights, fitted))
        back = decode_parameters(raw, hashlib.sha256(raw).hexdigest())
        assert len(back.weights) == 2 and all(np.array_equal(a, b) for a, b in zip(weights, back.weights))
        assert (back.calibration is None) if fitted is None else np.array_equal(back.calibration, fitted)
    with pytest.raises(ArtifactError, match="sha256"):
        decode_parameters(raw[:10] + bytes([raw[10] ^ 0xFF]) + raw[11:], hashlib.sha256(raw).hexdigest())


def test_put_get_and_champion(registry):
    artifact = encode_parameters(Parameters([np.ones(2, np.float32)]))
    registry.put(record("v1", artifact), artifact)
    assert registry.get("v1").version == "v1" and registry.get("nope") is None
    assert [r.version for r in registry.all()] == ["v1"]
    assert registry.champion() is None
    registry.set_champion("v1")
    assert registry.champion() == "v1"
    with pytest.raises(KeyError):
        registry.set_champion("v9")


def test_a_stale_trainer_cannot_promote(registry):
    artifact = encode_parameters(Parameters([np.ones(2, np.float32)]))
    registry.put(record("v1", artifact), artifact)
    first = registry.acquire_lease(ttl_s=0.3)
    assert first is not None and registry.acquire_lease(ttl_s=5) is None
    assert registry.renew_lease(first, ttl_s=0.3)
    import time

    deadline = time.monotonic() + 5
    second = None
    while second is None and time.monotonic() < deadline:  # the first lease lapses unrenewed
        second = registry.acquire_lease(ttl_s=10)
    assert second is not None and int(second.split(":")[0]) > int(first.split(":")[0])
    assert not registry.renew_lease(first, ttl_s=10)
    assert not registry.promote_if_leader(first, record("v1", artifact, promoted=True))
    assert registry.champion() is None
    assert registry.promote_if_leader(second, record("v1", artifact, promoted=True))
    assert registry.champion() == "v1" and registry.get("v1").promoted


def test_missing_artifact_is_refused(registry):
    artifact = encode_parameters(Parameters([np.ones(2, np.float32)]))
    registry.put(record("v1", artifact), artifact)
    registry._client.delete(registry.artifact_ref("v1"))
    with pytest.raises(ArtifactError, match="missing"):
        registry.parameters(registry.get("v1"))


def test_a_stored_version_is_unannounced_until_marked_and_is_read_as_it_stands(each_redis, names):
    client = each_redis.redis_client()
    registry = Registry(client, names.key_prefix, "purchases")
    artifact = encode_parameters(Parameters([np.ones(2, np.float32)]))
    registry.put(record("v1", artifact), artifact)
    registry.put(record("v2", artifact), artifact)
    assert [r.version for r in registry.unannounced()] == ["v1", "v2"]  # oldest first
    token = registry.acquire_lease(ttl_s=10)
    assert registry.promote_if_leader(token, record("v2", artifact, promoted=True))
    assert [r.promoted for r in registry.unannounced()] == [False, True]
    registry.mark_announced("v1")
    assert [r.version for r in registry.unannounced()] == ["v2"]
    registry.mark_unannounced("v1")
    client.hdel(registry._versions, "v2")
    assert [r.version for r in registry.unannounced()] == ["v1"]  # a record deleted by hand is dropped
    registry.mark_announced("v1")
    assert registry.unannounced() == []
    client.close()


def test_an_artifact_whose_arrays_declare_more_bytes_than_it_holds_is_refused_before_any_allocation():
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("arr_0.npy", header.getvalue() + b"\0" * 64)
    raw = archive.getvalue()
    with pytest.raises(ArtifactError, match="declares 4000000000000 bytes"):
        decode_parameters(raw, hashlib.sha256(raw).hexdigest())


def _version(name: str, promoted: bool, hours_ago: float) -> ModelVersion:
    now = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
    return ModelVersion(model="m", version=name, parent_version=None, task="next_category", source_checkpoint_sha256="0" * 64,
                        created_at=now - timedelta(hours=hours_ago), trained_on=TrainedOn(examples=0), metrics={},
                        promoted=promoted, artifact_sha256="0" * 64, artifact_ref=f"ref/{name}")


def test_a_bounded_registry_keeps_the_champion_the_source_the_newest_promoted_and_recent_rejections():
    now = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
    records = ([_version("src", True, 500)] + [_version(f"p{i}", True, 100 - i) for i in range(6)]
               + [_version("r-old", False, 48), _version("r-new", False, 2), _version("champ", True, 300)])
    dropped = versions_to_drop(records, keep={"src", "champ"}, keep_promoted=3, keep_rejected_s=86400, now=now)
    assert dropped == ["p0", "p1", "p2", "r-old"]


def test_dropped_versions_leave_no_record_artifact_or_announcement_and_rollback_to_a_kept_one_works(registry):
    artifact = encode_parameters(Parameters([np.ones(2, np.float32)]))
    for name in ("v1", "v2"):
        registry.put(_version(name, True, 1).model_copy(update={"artifact_sha256": hashlib.sha256(artifact).hexdigest()}),
                     artifact)
    registry.drop(["v1"])
    assert registry.get("v1") is None and "v1" not in registry.unannounced_versions()
    with pytest.raises(ArtifactError, match="missing"):
        registry.parameters(_version("v1", True, 1))
    registry.set_champion("v2")
    assert registry.champion() == "v2" and registry.parameters(registry.get("v2")).weights[0].tolist() == [1.0, 1.0]
    with pytest.raises(KeyError):
        registry.set_champion("v1")
