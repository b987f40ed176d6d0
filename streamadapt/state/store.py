"""Redis adapter for the worker's state: dedupe claims, user state, the label join and example windows.

Keys (all under the configured prefix):
  {p}:event:{event_id}   JSON array: the input record "{topic}/{partition}/{offset}" that first carried it and
                         what was predicted (EventClaim, ~150 bytes); TTL dedupe_ttl_s
  {p}:profile:{user_id}  the user's state (JSON, as the feature plug-in writes it), a newline, then their last
                         served prediction while it waits for its label (Example, label -1); TTL user_state_ttl_s
  {p}:deadlines:{topic}/{partition}   zset user_id -> repurchase deadline (event time), by the input
                         partition of the user's pending prediction: its consumer owns them
  {p}:event_time         zset "{topic}/{partition}" -> newest event time seen there (ZADD GT = atomic max)
  {p}:event_time_at      zset "{topic}/{partition}" -> when (wall clock) a batch last brought events from there
  {p}:window:{start_s}   list of labelled Examples of one event-time window;  {p}:windows  zset of starts
  {p}:examples_total     resolved examples ever;  {p}:drift  set when the drift detector alarms
  {p}:regime_since_ts    event time where the last alarm estimated the current regime began
  {p}:observed_since     event time from which user states have been kept: the oldest event of the first
                         batch ever built, stale ones left out (plan.first_event_time; SET NX, so every
                         replica agrees); a feature
The event record says which input record first claimed the event_id and what was predicted for it, so a
replay of that same record re-emits the same prediction and a true duplicate is dropped. It keeps the
prediction's values, not its JSON: a claim lives as long as the dedupe TTL (a week by default), once per
event, and the JSON is three times the size.

A profile that cannot be read (written by other feature code, or damaged) counts as a user never seen, and is
replaced at the user's next purchase: a worker must not stop on stored state any more than on input.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import redis
from pydantic_core import from_json, to_json
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamadapt.core.examples import Example, expired_windows, window_start
from streamadapt.core.labels import active_partitions, watermark
from streamadapt.core.plugin import Features, State
from streamadapt.settings import RedisSettings, TrainingSettings

log = logging.getLogger(__name__)

# Errors of a Redis that cannot answer now: the worker builds the batch again, the trainer tries its round again,
# once Redis answers. A Redis at its maxmemory (noeviction) refuses a batch's whole transaction (its ZADDs and
# RPUSHes are refused when queued, so EXEC applies nothing): the worker pauses until memory is freed or raised,
# rather than crash again and again.
REDIS_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                       redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)

# SET with a TTL for many keys in one command: KEYS are the keys, ARGV[1] the TTL in seconds and
# ARGV[i + 1] the value of KEYS[i]. One command instead of one per key is what makes the batch write cheap.
# Sent with EVAL, not EVALSHA: a pipeline of registered scripts costs a SCRIPT EXISTS round trip per batch,
# and EVAL keeps working after a Redis restart empties the script cache.
_SET_MANY = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) end
return #KEYS
"""


class EventClaim(NamedTuple):
    """The input record that first carried an event_id, and what was predicted for it: enough for
    streamadapt.serving.plan.replayed_prediction to write the same prediction again, byte for byte."""

    record: str  # "topic/partition/offset"
    model_version: str
    predicted_at: str  # ISO 8601, as the prediction carries it
    label: int  # class index
    score: float
    ranked_classes: list[int] | None  # the classes of the prediction's ranked list, best first (None: binary task)
    ranked_probabilities: list[float] | None

    def encode(self) -> bytes:
        return to_json(self)  # a JSON array; floats are written so that they read back exactly

    @staticmethod
    def decode(raw: bytes) -> EventClaim:
        return EventClaim(*from_json(raw))


@dataclass
class StateWrites:
    """Everything one batch writes to Redis, applied at once by StateStore.save(). A user's profile is
    written whole: a user with a pending prediction belongs in `states` too (else their state is dropped)."""

    claims: list[tuple[str, EventClaim]] = field(default_factory=list)  # (event_id, claim)
    states: Mapping[str, State] = field(default_factory=dict)
    pendings: dict[str, Example] = field(default_factory=dict)
    deadlines: dict[str, dict[str, float]] = field(default_factory=dict)  # "{topic}/{partition}" -> user -> time
    settled_deadlines: dict[str, list[str]] = field(default_factory=dict)  # "{topic}/{partition}" -> users
    cleared_pendings: dict[str, State | None] = field(default_factory=dict)  # user -> the state to keep
    examples: list[Example] = field(default_factory=list)
    newest_by_partition: dict[str, float] = field(default_factory=dict)  # "{topic}/{partition}" -> event time

    def profiles(self) -> dict[str, tuple[State | None, Example | None]]:
        """Every profile the batch writes, whole: user -> (state, pending prediction)."""
        states = {**self.cleared_pendings, **self.states}
        states.update({user: None for user in self.pendings if user not in states})
        pendings = self.pendings
        return {user: (state, pendings.get(user)) for user, state in states.items()}


@dataclass(frozen=True)
class WindowPolicy:
    window_s: int
    max_examples: int
    max_age_s: int = 30 * 86400  # after their labels are all known

    @classmethod
    def of(cls, training: TrainingSettings) -> WindowPolicy:
        return cls(training.window_s, training.window_max_examples, training.window_max_age_s)


def connect(settings: RedisSettings) -> redis.Redis:
    tls = {}
    url = settings.url.get_secret_value()
    if url.startswith("rediss://"):
        tls = {"ssl_ca_certs": settings.tls_ca_file and str(settings.tls_ca_file),
               "ssl_certfile": settings.tls_certfile and str(settings.tls_certfile),
               "ssl_keyfile": settings.tls_keyfile and str(settings.tls_keyfile)}
    # No retry inside redis-py: a MULTI/EXEC retried after a timeout may have landed already, and a batch's
    # RPUSH and INCRBY are not idempotent. The caller's own retry builds the batch again from what Redis holds,
    # and a transaction that landed makes that a replay.
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30,
                                retry=Retry(NoBackoff(), 0), **tls)


def drop_keys(client: redis.Redis, key_prefix: str) -> int:
    """Delete every key under `key_prefix` (a benchmark's or a test's own state), a thousand at a time; how
    many. The prefix may be a glob: `demo-[0-9]*` is every demo run's."""
    batch, dropped = [], 0
    for key in client.scan_iter(f"{key_prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            dropped += client.unlink(*batch)
            batch.clear()
    if batch:
        dropped += client.unlink(*batch)
    return dropped


class StateStore:
    def __init__(self, client: redis.Redis, settings: RedisSettings, windows: WindowPolicy | None = None,
                 features: Features | None = None):
        """`features` reads and writes the users' states; without it (the trainer) a profile gives its pending
        prediction only."""
        self._client = client
        self._features = features
        self._p = settings.key_prefix
        self._dedupe_ttl_s = settings.dedupe_ttl_s
        self._user_state_ttl_s = settings.user_state_ttl_s
        self._windows = windows or WindowPolicy(window_s=86400, max_examples=20000)

    def ping(self) -> bool:
        return bool(self._client.ping())

    def load(self, event_ids: list[str], user_ids: list[str], first_ts_s: float
             ) -> tuple[dict[str, EventClaim], dict[str, State], dict[str, Example], float]:
        """Existing claims for these events, states and pending predictions of these users, and the event time
        from which states have been kept (`first_ts_s`, this batch's, if no batch came before): one round trip."""
        if not event_ids:
            return {}, {}, {}, first_ts_s
        pipe = self._client.pipeline(transaction=False)
        pipe.mget([f"{self._p}:event:{e}" for e in event_ids])
        pipe.mget([f"{self._p}:profile:{u}" for u in user_ids])
        pipe.set(f"{self._p}:observed_since", repr(float(first_ts_s)), nx=True, get=True)
        claims_raw, profiles_raw, observed_since = pipe.execute()
        claims = {e: EventClaim.decode(raw) for e, raw in zip(event_ids, claims_raw) if raw is not None}
        states, pendings = self._profiles(user_ids, profiles_raw)
        return claims, states, pendings, first_ts_s if observed_since is None else float(observed_since)

    def load_profiles(self, user_ids: list[str]) -> tuple[dict[str, State], dict[str, Example]]:
        """States and pending predictions of these users."""
        if not user_ids:
            return {}, {}
        return self._profiles(user_ids, self._client.mget([f"{self._p}:profile:{u}" for u in user_ids]))

    def _profiles(self, user_ids: list[str], raws: list[bytes | None]
                  ) -> tuple[dict[str, State], dict[str, Example]]:
        states, pendings = {}, {}
        for user, raw in zip(user_ids, raws):
            if raw is None:
                continue
            try:
                state_json, _, pending = raw.partition(b"\n")
                state = None if state_json == b"null" or self._features is None else (
                    self._features.state_from_json(from_json(state_json)))
                example = Example.decode(pending) if pending else None
            except (ValueError, TypeError) as error:
                log.warning("the profile of user %r cannot be read (%s): the user counts as new", user[:64], error)
                continue
            if state is not None:
                states[user] = state
            if example is not None:
                pendings[user] = example
        return states, pendings

    def newest_by_partition(self) -> dict[str, float]:
        """Newest event time seen on each input partition, across the fleet."""
        return {member.decode(): score for member, score in self._client.zrange(f"{self._p}:event_time", 0, -1, withscores=True)}

    def watermark(self, allowed_lateness_s: float, idle_timeout_s: float,
                  unsaved: Mapping[str, float] | None = None) -> float | None:
        """The event-time watermark over the input partitions that brought events within `idle_timeout_s`
        (streamadapt.core.labels: active_partitions, watermark); `unsaved` are the newest event times of a
        batch not saved yet, by partition."""
        pipe = self._client.pipeline(transaction=False)
        pipe.zrange(f"{self._p}:event_time", 0, -1, withscores=True)
        pipe.zrange(f"{self._p}:event_time_at", 0, -1, withscores=True)
        newest, seen_at = ({member.decode(): score for member, score in pairs} for pairs in pipe.execute())
        now_s = time.time()
        for partition, ts_s in (unsaved or {}).items():
            newest[partition] = max(newest.get(partition, ts_s), ts_s)
            seen_at[partition] = now_s
        return watermark(active_partitions(newest, seen_at, now_s, idle_timeout_s), allowed_lateness_s)

    def due_deadlines(self, partitions: Iterable[str], watermark_s: float, limit: int = 5000) -> dict[str, list[str]]:
        """Per input partition: users whose repurchase deadline the watermark has passed.

        They stay in the index until the batch that settles them removes them in its transaction
        (StateWrites.settled_deadlines), so a crash in between loses none. Only the consumer that owns
        a partition reads its deadlines, so no two replicas settle the same user.
        """
        partitions = list(partitions)
        pipe = self._client.pipeline(transaction=False)
        for partition in partitions:
            pipe.zrangebyscore(f"{self._p}:deadlines:{partition}", "-inf", watermark_s, start=0, num=limit)
        return {partition: [u.decode() for u in users] for partition, users in zip(partitions, pipe.execute()) if users}

    def save(self, writes: StateWrites) -> None:
        """Apply one batch's writes atomically (MULTI/EXEC), with their TTLs."""
        p, pipe = self._p, self._client.pipeline(transaction=True)
        if writes.claims:
            pipe.eval(_SET_MANY, len(writes.claims), *(f"{p}:event:{event_id}" for event_id, _ in writes.claims),
                      self._dedupe_ttl_s, *(claim.encode() for _, claim in writes.claims))
        profiles = writes.profiles()
        if profiles:
            pipe.eval(_SET_MANY, len(profiles), *(f"{p}:profile:{user}" for user in profiles), self._user_state_ttl_s,
                      *(self._profile(user, state, pending) for user, (state, pending) in profiles.items()))
        for partition, users in writes.settled_deadlines.items():  # before the ZADDs: a user may be settled and re-added
            pipe.zrem(f"{p}:deadlines:{partition}", *users)
        for partition, deadlines in writes.deadlines.items():
            if deadlines:
                pipe.zadd(f"{p}:deadlines:{partition}", deadlines)
        if writes.examples:
            by_window: dict[int, list[bytes]] = {}
            for example in writes.examples:
                by_window.setdefault(window_start(example.ts_s, self._windows.window_s), []).append(example.encode())
            for start, encoded in by_window.items():
                pipe.rpush(f"{p}:window:{start}", *encoded)
                pipe.ltrim(f"{p}:window:{start}", -self._windows.max_examples, -1)
                pipe.zadd(f"{p}:windows", {str(start): start})
            pipe.incrby(f"{p}:examples_total", len(writes.examples))
        if writes.newest_by_partition:
            pipe.zadd(f"{p}:event_time", writes.newest_by_partition, gt=True)
            now_s = time.time()
            pipe.zadd(f"{p}:event_time_at", {partition: now_s for partition in writes.newest_by_partition}, gt=True)
        pipe.execute()

    def _profile(self, user: str, state: State | None, pending: Example | None) -> bytes:
        """A profile's value: the state's JSON (null when unknown), a newline, the pending prediction if any. A
        state whose JSON outgrows the plug-in's max_state_bytes is dropped: the user counts as new."""
        state_json = b"null"
        if state is not None:
            state_json = to_json(self._features.state_to_json(state))
            if len(state_json) > self._features.max_state_bytes:
                log.warning("the state of user %r is %d bytes, over the %d of feature plug-in %s: it is dropped, and "
                            "the user counts as new", user[:64], len(state_json), self._features.max_state_bytes,
                            self._features.name)
                state_json = b"null"
        return state_json + b"\n" + (b"" if pending is None else pending.encode())

    # read by the trainer
    def examples_total(self) -> int:
        return int(self._client.get(f"{self._p}:examples_total") or 0)

    def raise_drift_alarm(self, regime_since_ts: float) -> None:
        """Ask the trainer for a fine-tune (it takes the alarm with take_drift_alarm), on the examples from
        `regime_since_ts` on (kept, so a trainer that takes over later trains on the same regime)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(f"{self._p}:regime_since_ts", repr(float(regime_since_ts)))
        pipe.set(f"{self._p}:drift", "1")
        pipe.execute()

    def take_drift_alarm(self) -> bool:
        return self._client.getdel(f"{self._p}:drift") is not None

    def regime_since_ts(self) -> float | None:
        """Where the last drift alarm estimated the current regime began (event time), if any alarmed."""
        raw = self._client.get(f"{self._p}:regime_since_ts")
        return float(raw) if raw is not None else None

    def recent_examples(self, max_examples: int, until_ts_s: float = math.inf) -> list[Example]:
        """The newest `max_examples` labelled examples of event time up to `until_ts_s`, oldest first."""
        highest = "+inf" if until_ts_s == math.inf else until_ts_s  # windows start at or before it
        starts = [int(s) for s in self._client.zrevrangebyscore(f"{self._p}:windows", highest, "-inf")]
        collected: list[Example] = []
        for start in starts:
            raws = self._client.lrange(f"{self._p}:window:{start}", 0, -1)
            collected.extend(e for e in map(Example.decode, raws) if e.ts_s <= until_ts_s)
            if len(collected) >= max_examples:
                break
        collected.sort(key=lambda e: e.ts_s)
        return collected[-max_examples:]

    def unsettled_examples(self, since_ts_s: float, max_examples: int) -> list[Example]:
        """Repurchase: purchases after `since_ts_s` (the watermark less the horizon) whose horizon is still running,
        oldest first, at most the newest `max_examples`: the repurchased ones from the windows (labelled 1 at the
        repurchase) and the others from the users' profiles, as pending predictions (label -1), found through the
        deadline index of every input partition (deadlines after the watermark)."""
        positives = [e for e in self.recent_examples(max_examples) if e.ts_s > since_ts_s and e.label == 1]
        partitions = [partition for partition, _ in self.newest_by_partition().items()]
        pipe = self._client.pipeline(transaction=False)
        for partition in partitions:
            pipe.zrevrangebyscore(f"{self._p}:deadlines:{partition}", "+inf", f"({since_ts_s}", start=0, num=max_examples)
        users = list({user.decode() for found in pipe.execute() for user in found})
        _, pendings = self.load_profiles(users) if users else ({}, {})
        recent = positives + [e for e in pendings.values() if e.ts_s > since_ts_s]
        recent.sort(key=lambda e: e.ts_s)
        return recent[-max_examples:]

    def window_sizes(self) -> dict[int, int]:
        starts = [int(s) for s in self._client.zrange(f"{self._p}:windows", 0, -1)]
        pipe = self._client.pipeline(transaction=False)
        for start in starts:
            pipe.llen(f"{self._p}:window:{start}")
        return dict(zip(starts, pipe.execute()))

    def expire_windows(self, known_until_s: float | None) -> dict[int, int]:
        """Drop the windows whose labels have all been known for longer than the policy's max_age_s (event
        time: a replay ages them as fast as it replays); the sizes of those left, by start."""
        sizes = self.window_sizes()
        if known_until_s is not None:
            old = expired_windows(list(sizes), known_until_s, self._windows.window_s, self._windows.max_age_s)
            self.drop_windows(old)
            sizes = {start: n for start, n in sizes.items() if start not in old}
        return sizes

    def drop_windows(self, starts: Iterable[int]) -> None:
        starts = list(starts)
        if starts:
            self._client.delete(*[f"{self._p}:window:{s}" for s in starts])
            self._client.zrem(f"{self._p}:windows", *[str(s) for s in starts])
