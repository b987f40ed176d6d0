"""Model registry and trainer lease in Redis (no shared filesystem between hosts is assumed).

Keys under `{prefix}:{registry}:models:{name}:` (one hash tag for all, streamadapt.state.keys: the promote script
reads the lease and writes the champion and the versions)
  seq                 version counter
  versions            hash: version -> ModelVersion JSON: the champion, the source, the newest promoted ones
                      and recent rejected candidates (the trainer drops the rest: versions_to_drop)
  artifact:{version}  the weights (numpy .npz bytes); its sha256 is in the version record
  champion            the version every replica should serve
  unannounced         set: versions stored but not yet published on the model-versions topic
Trainer lease: `{prefix}:{registry}:trainer:lease` holds "{fence}:{uuid}" with a TTL; `...:trainer:fence`
counts acquisitions. Renewing and promoting are Lua scripts that act only while the caller still holds
the lease, so a trainer that lost it (paused, partitioned, killed) cannot promote. `...:trainer:progress` is a
hash of the leading trainer's TrainerProgress, which serving reads to pace a replay (streamadapt.core.pacing).
"""
from __future__ import annotations

import hashlib
import io
import math
import uuid
import zipfile
from datetime import datetime

import numpy as np
import redis

from streamadapt.core.pacing import TrainerProgress
from streamadapt.model.checkpoint import Parameters
from streamadapt.schemas import ModelVersion
from streamadapt.state.keys import registry_base

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_PROMOTE_IF_LEADER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return 1
"""


class ArtifactError(ValueError):
    """An artifact that must not be served: missing, tampered with, or of another shape."""


def encode_parameters(parameters: Parameters) -> bytes:
    """A version's artifact: a numpy .npz of its weights (`arr_0`, `arr_1`, ...) and its calibration."""
    buffer = io.BytesIO()
    calibrated = {} if parameters.calibration is None else {"calibration": np.asarray(parameters.calibration, np.float64)}
    np.savez(buffer, *parameters.weights, **calibrated)
    return buffer.getvalue()


def decode_parameters(raw: bytes, expected_sha256: str) -> Parameters:
    """A version's parameters from artifact bytes, after checking their sha256. Never unpickles."""
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected_sha256:
        raise ArtifactError(f"artifact sha256 {actual[:12]}… does not match {expected_sha256[:12]}…")
    try:
        _check_declared_sizes(raw)
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            weights = [archive[f"arr_{i}"] for i in range(sum(name.startswith("arr_") for name in archive.files))]
            return Parameters(weights, archive["calibration"] if "calibration" in archive.files else None)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise ArtifactError(f"artifact is not a weights archive: {error}") from error


def _check_declared_sizes(raw: bytes) -> None:
    """NumPy allocates an array as its header declares before reading its data: refuse an archive whose arrays
    declare more bytes than it holds (we write them uncompressed, so a true one never does)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
                declared = math.prod(shape) * dtype.itemsize
                if dtype.hasobject or declared > len(raw):
                    raise ArtifactError(f"array {name} of the artifact declares {declared} bytes of {dtype}, "
                                        f"in an artifact of {len(raw)}")


def versions_to_drop(records: list[ModelVersion], keep: set[str], keep_promoted: int, keep_rejected_s: float,
                     now: datetime) -> list[str]:
    """The versions a bounded registry lets go: all but those in `keep` (the champion, the source), the
    `keep_promoted` newest promoted ones, and rejected ones created less than `keep_rejected_s` ago."""
    promoted = sorted((r for r in records if r.promoted and r.version not in keep), key=lambda r: r.created_at)
    kept = keep | {r.version for r in promoted[-keep_promoted:]}
    kept |= {r.version for r in records if not r.promoted and (now - r.created_at).total_seconds() < keep_rejected_s}
    return sorted(r.version for r in records if r.version not in kept)


class Registry:
    def __init__(self, client: redis.Redis | redis.RedisCluster, key_prefix: str, model_name: str):
        self._client = client
        root = registry_base(key_prefix)
        base = f"{root}:models:{model_name}"
        self._seq, self._versions, self._champion = f"{base}:seq", f"{base}:versions", f"{base}:champion"
        self._unannounced = f"{base}:unannounced"
        self._artifact_prefix = f"{base}:artifact:"
        self._lease, self._fence = f"{root}:trainer:lease", f"{root}:trainer:fence"
        self._progress = f"{root}:trainer:progress"
        self._renew = client.register_script(_RENEW)
        self._promote = client.register_script(_PROMOTE_IF_LEADER)

    # versions and artifacts
    def next_version_number(self) -> int:
        return int(self._client.incr(self._seq))

    def artifact_ref(self, version: str) -> str:
        return self._artifact_prefix + version

    def put(self, record: ModelVersion, artifact: bytes) -> None:
        """Store the artifact, then its record (a record never points at a missing artifact), together with
        a note that it is still to be announced."""
        self._client.set(self.artifact_ref(record.version), artifact)
        with self._client.pipeline() as transaction:
            transaction.hset(self._versions, record.version, record.model_dump_json())
            transaction.sadd(self._unannounced, record.version)
            transaction.execute()

    def unannounced_versions(self) -> set[str]:
        """The versions not yet announced on the model-versions topic (a version deleted by hand may linger)."""
        return {version.decode() for version in self._client.smembers(self._unannounced)}

    def unannounced(self) -> list[ModelVersion]:
        """The records not yet announced on the model-versions topic, as they stand now, oldest first."""
        records = []
        for version in self.unannounced_versions():
            record = self.get(version)
            if record is None:  # deleted by hand: nothing left to announce
                self.mark_announced(version)
            else:
                records.append(record)
        return sorted(records, key=lambda r: r.created_at)

    def mark_announced(self, version: str) -> None:
        self._client.srem(self._unannounced, version)

    def mark_unannounced(self, version: str) -> None:
        self._client.sadd(self._unannounced, version)

    def get(self, version: str) -> ModelVersion | None:
        raw = self._client.hget(self._versions, version)
        return ModelVersion.model_validate_json(raw) if raw else None

    def all(self) -> list[ModelVersion]:
        records = [ModelVersion.model_validate_json(v) for v in self._client.hvals(self._versions)]
        return sorted(records, key=lambda r: r.created_at)

    def parameters(self, record: ModelVersion) -> Parameters:
        """The version's weights and calibration, verified against its sha256. Raises ArtifactError."""
        raw = self._client.get(self.artifact_ref(record.version))
        if raw is None:
            raise ArtifactError(f"artifact of {record.version} is missing")
        return decode_parameters(raw, record.artifact_sha256)

    def drop(self, versions: list[str]) -> None:
        """Forget `versions`: records, artifacts and announcement notes."""
        if versions:
            with self._client.pipeline() as transaction:
                transaction.hdel(self._versions, *versions)
                transaction.delete(*(self.artifact_ref(v) for v in versions))
                transaction.srem(self._unannounced, *versions)
                transaction.execute()

    def champion(self) -> str | None:
        raw = self._client.get(self._champion)
        return raw.decode() if raw else None

    def set_champion(self, version: str) -> None:
        """Operator action (rollback): make `version` champion, whoever holds the trainer lease."""
        if self.get(version) is None:
            raise KeyError(version)
        self._client.set(self._champion, version)

    # the trainer lease
    def acquire_lease(self, ttl_s: float) -> str | None:
        """A fencing token when the lease was free, else None."""
        token = f"{int(self._client.incr(self._fence))}:{uuid.uuid4().hex}"
        return token if self._client.set(self._lease, token, nx=True, px=int(ttl_s * 1000)) else None

    def renew_lease(self, token: str, ttl_s: float) -> bool:
        return bool(self._renew(keys=[self._lease], args=[token, int(ttl_s * 1000)]))

    def release_lease(self, token: str) -> None:
        self._client.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                          1, self._lease, token)

    def publish_progress(self, progress: TrainerProgress) -> None:
        """The leading trainer's progress, for serving to pace a replay by."""
        self._client.hset(self._progress, mapping={"through_s": repr(float(progress.through_s)),
                                                   "next_round_examples": int(progress.next_round_examples),
                                                   "running": int(progress.running)})

    def trainer_state(self) -> tuple[TrainerProgress | None, bool, str | None]:
        """In one round trip: the trainer's published progress (None if none yet, or unreadable), whether the
        lease is held, and the champion."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._progress)
        pipe.exists(self._lease)
        pipe.get(self._champion)
        raw, leased, champion = pipe.execute()
        try:
            progress = TrainerProgress(float(raw[b"through_s"]), int(raw[b"next_round_examples"]),
                                       raw[b"running"] == b"1")
        except (KeyError, ValueError):
            progress = None
        return progress, bool(leased), champion.decode() if champion else None

    def promote_if_leader(self, token: str, record: ModelVersion) -> bool:
        """Make `record` champion (and store it as promoted) only while `token` holds the lease."""
        return bool(self._promote(keys=[self._lease, self._champion, self._versions],
                                  args=[token, record.version, record.model_dump_json()]))
