"""Redis adapter for the serving path: dedupe records and per-user state.

Keys (all under the configured prefix):
  {prefix}:event:{event_id}  -> "{topic}/{partition}/{offset}\n{prediction JSON}"   (TTL dedupe_ttl_s)
  {prefix}:user:{user_id}    -> JSON of worker.features.UserState                  (TTL user_state_ttl_s)
The event record says which input record first claimed the event_id and what was predicted for it,
so a replay of that same record re-emits the same prediction and a true duplicate is dropped.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

from worker.features import UserState
from worker.settings import RedisSettings


@dataclass(frozen=True, slots=True)
class EventClaim:
    """The input record that first carried an event_id, and the prediction served for it."""

    record: str  # "topic/partition/offset"
    prediction_json: bytes

    def encode(self) -> bytes:
        return self.record.encode() + b"\n" + self.prediction_json

    @classmethod
    def decode(cls, raw: bytes) -> EventClaim:
        record, _, prediction_json = raw.partition(b"\n")
        return cls(record.decode(), prediction_json)


def connect(settings: RedisSettings) -> redis.Redis:
    return redis.Redis.from_url(settings.url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


class StateStore:
    def __init__(self, client: redis.Redis, settings: RedisSettings):
        self._client = client
        self._prefix = settings.key_prefix
        self._dedupe_ttl_s = settings.dedupe_ttl_s
        self._user_state_ttl_s = settings.user_state_ttl_s

    def _event_key(self, event_id: str) -> str:
        return f"{self._prefix}:event:{event_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self._prefix}:user:{user_id}"

    def ping(self) -> bool:
        return bool(self._client.ping())

    def load(self, event_ids: list[str], user_ids: list[str]) -> tuple[dict[str, EventClaim], dict[str, UserState]]:
        """Existing claims for these events and states of these users, in one round trip."""
        if not event_ids:
            return {}, {}
        pipe = self._client.pipeline(transaction=False)
        pipe.mget([self._event_key(e) for e in event_ids])
        pipe.mget([self._user_key(u) for u in user_ids])
        claims_raw, states_raw = pipe.execute()
        claims = {e: EventClaim.decode(raw) for e, raw in zip(event_ids, claims_raw) if raw is not None}
        states = {u: UserState.from_json(json.loads(raw)) for u, raw in zip(user_ids, states_raw) if raw is not None}
        return claims, states

    def save(self, claims: Iterable[tuple[str, EventClaim]], states: Mapping[str, UserState]) -> None:
        """Write new claims and updated user states atomically (MULTI/EXEC), with their TTLs."""
        pipe = self._client.pipeline(transaction=True)
        for event_id, claim in claims:
            pipe.set(self._event_key(event_id), claim.encode(), ex=self._dedupe_ttl_s)
        for user_id, state in states.items():
            pipe.set(self._user_key(user_id), json.dumps(state.to_json(), separators=(",", ":")), ex=self._user_state_ttl_s)
        pipe.execute()
