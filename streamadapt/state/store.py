"""Redis adapter for the worker's state: dedupe claims, user state, the label join and example windows.

Keys (streamadapt.state.keys places them; {s} is the hash tag of the user's shard, {meta} the fleet's):
  {p}:{s}:event:{event_id}   JSON array: the input record "{topic}/{partition}/{offset}" that first carried it and
                         what was predicted (EventClaim, ~150 bytes); TTL dedupe_ttl_s
  {p}:{s}:profile:{user_id}  the user's state (JSON, as the feature plug-in writes it), a newline, then their last
                         served prediction while it waits for its label (Example, label -1); TTL user_state_ttl_s
  {p}:{s}:deadlines:{topic}/{partition}   zset user_id -> repurchase deadline (event time), by the input
                         partition of the user's pending prediction: its consumer owns them
  {p}:{s}:window:{start_s}   list of labelled Examples of one event-time window;  {p}:{s}:windows  zset of starts
  {p}:{s}:examples_total     resolved examples ever, of the shard
  {p}:{meta}:event_time      zset "{topic}/{partition}" -> newest event time seen there (ZADD GT = atomic max)
  {p}:{meta}:event_time_at   zset "{topic}/{partition}" -> when (wall clock) a batch last brought events from there
  {p}:{meta}:labels_through  zset "{topic}/{partition}" -> the watermark up to which its repurchase deadlines are settled
  {p}:{meta}:drift           set when the drift detector alarms
  {p}:{meta}:regime_since_ts event time where the last alarm estimated the current regime began
  {p}:{meta}:observed_since  event time from which user states have been kept: the oldest event of the first
                         batch ever built, stale ones left out (plan.first_event_time; SET NX, so every
                         replica agrees); a feature
  {p}:{meta}:layout          the shard count the data was written with
The event record says which input record first claimed the event_id and what was predicted for it, so a
replay of that same record re-emits the same prediction and a true duplicate is dropped. It keeps the
prediction's values, not its JSON: a claim lives as long as the dedupe TTL (a week by default), once per
event, and the JSON is three times the size. A claim lives in its user's shard, so an event_id is unique
per user.

A batch writes one script per shard (atomic, as a MULTI/EXEC is), holding everything it changes for the users
of that shard; on a single Redis the whole batch is one MULTI/EXEC. On a cluster, a batch that fails half way
has landed for some shards only: built again, it finds the claims of those shards' events, so they replay,
and the other shards' users are served as the first time.

A profile that cannot be read (written by other feature code, or damaged) counts as a user never seen, and is
replaced at the user's next purchase: a worker must not stop on stored state any more than on input.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import redis
from pydantic_core import from_json, to_json
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from streamadapt.core.examples import Example, expired_windows, window_start
from streamadapt.core.labels import active_partitions, watermark
from streamadapt.core.plugin import Features, State
from streamadapt.settings import RedisSettings, TrainingSettings
from streamadapt.state.keys import KeyLayout

log = logging.getLogger(__name__)

# Errors of a Redis that cannot answer now: the worker builds the batch again, the trainer tries its round again,
# once Redis answers. A Redis at its maxmemory (noeviction) refuses a batch's whole transaction (its commands
# are refused when queued, so EXEC applies nothing; a script outside MULTI is refused before it runs): the
# worker pauses until memory is freed or raised, rather than crash again and again. A cluster adds its own:
# a slot moved or not served yet, a failover under way, a node unreachable.
REDIS_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                       redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError,
                       redis.exceptions.ClusterError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
                       RedisClusterException)

# One shard's writes of a batch, atomic. ARGV holds operations in turn: a command, how many of KEYS it takes
# (in order), how many arguments, then the arguments. 'SET*' sets each of its keys to one value with a TTL
# (its first argument): one command for many keys is what makes the batch write cheap. The shebang makes a
# Redis over its maxmemory refuse the script before it runs, not half way. Sent with EVAL, not EVALSHA: a
# pipeline of registered scripts costs a SCRIPT EXISTS round trip per batch, and EVAL keeps working after a
# restart empties the script cache.
_APPLY = """#!lua
local k, a = 1, 1
while a <= #ARGV do
  local command, nkeys, nargs = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  if command == 'SET*' then
    for i = 0, nkeys - 1 do redis.call('SET', KEYS[k + i], ARGV[a + 1 + i], 'EX', ARGV[a]) end
  else
    redis.call(command, KEYS[k], unpack(ARGV, a, a + nargs - 1))
  end
  k = k + nkeys
  a = a + nargs
end
return k - 1
"""
_UNPACK_MAX_ARGS = 4000  # Lua's unpack stops at its C stack (8000 values): longer commands go in pieces


class _Script:
    """What one batch writes to one shard, sent as one _APPLY script."""

    def __init__(self):
        self.keys: list[str] = []
        self.args: list = []

    def set_many(self, keys: list[str], values: list[bytes], ttl_s: int) -> None:
        self.keys += keys
        self.args += ["SET*", len(keys), len(values) + 1, ttl_s, *values]

    def command(self, name: str, key: str, args: list, step: int = 1) -> None:
        """`name` on `key` with `args`, in pieces of whole `step`s (ZADD: score and member) if they are many."""
        size = _UNPACK_MAX_ARGS - _UNPACK_MAX_ARGS % step
        for start in range(0, max(len(args), 1), size):
            piece = args[start:start + size]
            self.keys.append(key)
            self.args += [name, 1, len(piece), *piece]

    def send(self, pipe) -> None:
        # execute_command: redis-py's cluster pipeline has no eval(), but routes an EVAL by its keys
        pipe.execute_command("EVAL", _APPLY, len(self.keys), *self.keys, *self.args)


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

    claims: list[tuple[str, str, EventClaim]] = field(default_factory=list)  # (user_id, event_id, claim)
    states: Mapping[str, State] = field(default_factory=dict)
    pendings: dict[str, Example] = field(default_factory=dict)
    deadlines: dict[str, dict[str, float]] = field(default_factory=dict)  # "{topic}/{partition}" -> user -> time
    settled_deadlines: dict[str, list[str]] = field(default_factory=dict)  # "{topic}/{partition}" -> users
    cleared_pendings: dict[str, State | None] = field(default_factory=dict)  # user -> the state to keep
    examples: list[tuple[str, Example]] = field(default_factory=list)  # (user_id, labelled example)
    newest_by_partition: dict[str, float] = field(default_factory=dict)  # "{topic}/{partition}" -> event time
    # "{topic}/{partition}" -> the watermark up to which its repurchase deadlines are now settled
    labels_through: dict[str, float] = field(default_factory=dict)

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


def connect(settings: RedisSettings) -> redis.Redis | RedisCluster:
    """A client of the configured Redis; of a cluster, found from any of its nodes, with `settings.cluster`."""
    tls = {}
    url = settings.url.get_secret_value()
    if url.startswith("rediss://"):
        tls = {"ssl_ca_certs": settings.tls_ca_file and str(settings.tls_ca_file),
               "ssl_certfile": settings.tls_certfile and str(settings.tls_certfile),
               "ssl_keyfile": settings.tls_keyfile and str(settings.tls_keyfile)}
    # No retry inside redis-py: a script or MULTI/EXEC retried after a timeout may have landed already, and a
    # batch's RPUSH and INCRBY are not idempotent. The caller's own retry builds the batch again from what Redis
    # holds, and a write that landed makes that a replay. On a cluster that includes a slot that moved: the
    # client learns the new owner from the refusal, and the batch built again goes there.
    options = dict(socket_timeout=10, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0), **tls)
    if settings.cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, health_check_interval=30, **options)


def drop_keys(client: redis.Redis | RedisCluster, key_prefix: str) -> int:
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


DUE_LIMIT = 5000  # repurchase deadlines settled per partition and batch, at most


class LayoutError(ValueError):
    """The data in Redis was written with another key layout than the settings give."""


class StateStore:
    def __init__(self, client: redis.Redis | RedisCluster, settings: RedisSettings, windows: WindowPolicy | None = None,
                 features: Features | None = None):
        """`features` reads and writes the users' states; without it (the trainer) a profile gives its pending
        prediction only."""
        self._client = client
        self._features = features
        self.keys = KeyLayout(settings.key_prefix, settings.shards)
        self._transactions = not settings.cluster  # one MULTI/EXEC per batch; a cluster runs one script per shard
        self._dedupe_ttl_s = settings.dedupe_ttl_s
        self._user_state_ttl_s = settings.user_state_ttl_s
        self._windows = windows or WindowPolicy(window_s=86400, max_examples=20000)
        # each shard keeps its share of a window's examples
        self._window_max_examples = math.ceil(self._windows.max_examples / self.keys.shards)

    def ping(self) -> bool:
        return bool(self._client.ping())

    def check_layout(self) -> None:
        """Record the key layout at the first start; LayoutError if the data was written with another."""
        stored = self._client.set(self.keys.meta("layout"), self.keys.describe(), nx=True, get=True)
        if stored is not None and stored.decode() != self.keys.describe():
            raise LayoutError(f"the keys under prefix {self.keys.prefix} were written with {stored.decode()}, and the "
                              f"settings give {self.keys.describe()}: set --redis-cluster-shards back, or use "
                              f"another --redis-key-prefix")

    def _by_shard(self, items: Iterable, user_of=lambda item: item) -> dict[int, list]:
        shards: dict[int, list] = defaultdict(list)
        for item in items:
            shards[self.keys.shard_of(user_of(item))].append(item)
        return shards

    def load(self, events: list[tuple[str, str]], first_ts_s: float
             ) -> tuple[dict[str, EventClaim], dict[str, State], dict[str, Example], float]:
        """Existing claims of these (user_id, event_id) events, states and pending predictions of their users,
        and the event time from which states have been kept (`first_ts_s`, this batch's, if no batch came
        before): one round trip (one per node, on a cluster; MGET through execute_command, which redis-py's
        cluster pipeline routes by the keys' slot where it refuses mget())."""
        if not events:
            return {}, {}, {}, first_ts_s
        keys = self.keys
        user_ids = list(dict.fromkeys(user for user, _ in events))
        pipe = self._client.pipeline(transaction=False)
        pipe.set(keys.meta("observed_since"), repr(float(first_ts_s)), nx=True, get=True)
        claim_groups = list(self._by_shard(events, lambda e: e[0]).values())
        user_groups = list(self._by_shard(user_ids).values())
        for group in claim_groups:
            pipe.execute_command("MGET", *(keys.claim(user, event_id) for user, event_id in group))
        for group in user_groups:
            pipe.execute_command("MGET", *(keys.profile(user) for user in group))
        observed_since, *found = pipe.execute()
        claims = {event_id: EventClaim.decode(raw)
                  for group, raws in zip(claim_groups, found) for (_, event_id), raw in zip(group, raws) if raw is not None}
        users = [user for group in user_groups for user in group]
        states, pendings = self._profiles(users, [raw for raws in found[len(claim_groups):] for raw in raws])
        return claims, states, pendings, first_ts_s if observed_since is None else float(observed_since)

    def load_profiles(self, user_ids: list[str]) -> tuple[dict[str, State], dict[str, Example]]:
        """States and pending predictions of these users."""
        if not user_ids:
            return {}, {}
        groups = list(self._by_shard(dict.fromkeys(user_ids)).values())
        pipe = self._client.pipeline(transaction=False)
        for group in groups:
            pipe.execute_command("MGET", *(self.keys.profile(user) for user in group))
        raws = [raw for found in pipe.execute() for raw in found]
        return self._profiles([user for group in groups for user in group], raws)

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
        pairs = self._client.zrange(self.keys.meta("event_time"), 0, -1, withscores=True)
        return {member.decode(): score for member, score in pairs}

    def watermark(self, allowed_lateness_s: float, idle_timeout_s: float,
                  unsaved: Mapping[str, float] | None = None) -> float | None:
        """The event-time watermark over the input partitions that brought events within `idle_timeout_s`
        (streamadapt.core.labels: active_partitions, watermark); `unsaved` are the newest event times of a
        batch not saved yet, by partition."""
        active, _ = self._active_partitions(idle_timeout_s, unsaved)
        return watermark(active, allowed_lateness_s)

    def _active_partitions(self, idle_timeout_s: float, unsaved: Mapping[str, float] | None = None,
                           also: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """The newest event time of each active input partition (see watermark), and in the same round trip the
        {meta} zset `also` (empty without it)."""
        pipe = self._client.pipeline(transaction=False)
        for name in ("event_time", "event_time_at", *([also] if also else [])):
            pipe.zrange(self.keys.meta(name), 0, -1, withscores=True)
        newest, seen_at, *rest = ({member.decode(): score for member, score in pairs} for pairs in pipe.execute())
        now_s = time.time()
        for partition, ts_s in (unsaved or {}).items():
            newest[partition] = max(newest.get(partition, ts_s), ts_s)
            seen_at[partition] = now_s
        return active_partitions(newest, seen_at, now_s, idle_timeout_s), (rest[0] if rest else {})

    def _deadline_query(self, partitions: list[str], query) -> dict[str, list[str]]:
        """`query(pipe, key)` on the deadline index of each partition in every shard: users, by partition."""
        pipe = self._client.pipeline(transaction=False)
        for partition in partitions:
            for shard in range(self.keys.shards):
                query(pipe, self.keys.shard_key(shard, f"deadlines:{partition}"))
        found = iter(pipe.execute())
        return {partition: [user.decode() for _ in range(self.keys.shards) for user in next(found)]
                for partition in partitions}

    def due_deadlines(self, partitions: Iterable[str], watermark_s: float, limit: int = DUE_LIMIT) -> dict[str, list[str]]:
        """Per input partition: at most `limit` users whose repurchase deadline the watermark has passed.

        They stay in the index until the batch that settles them removes them in its transaction
        (StateWrites.settled_deadlines), so a crash in between loses none. Only the consumer that owns
        a partition reads its deadlines, so no two replicas settle the same user.
        """
        per_shard = math.ceil(limit / self.keys.shards)
        due = self._deadline_query(list(partitions), lambda pipe, key: pipe.zrangebyscore(
            key, "-inf", watermark_s, start=0, num=per_shard))
        return {partition: users for partition, users in due.items() if users}

    def listed_every_due(self, users: list[str]) -> bool:
        """Whether `users`, what due_deadlines gave for one partition, are every user due there (not a page)."""
        return len(users) < math.ceil(DUE_LIMIT / self.keys.shards)

    def save(self, writes: StateWrites) -> None:
        """Apply one batch's writes with their TTLs: one MULTI/EXEC on a single Redis, one script per shard on
        a cluster."""
        keys, scripts = self.keys, defaultdict(_Script)
        for shard, claims in self._by_shard(writes.claims, lambda c: c[0]).items():
            scripts[shard].set_many([keys.claim(user, event_id) for user, event_id, _ in claims],
                                    [claim.encode() for _, _, claim in claims], self._dedupe_ttl_s)
        profiles = writes.profiles()
        for shard, users in self._by_shard(profiles).items():
            scripts[shard].set_many([keys.profile(user) for user in users],
                                    [self._profile(user, *profiles[user]) for user in users], self._user_state_ttl_s)
        for partition, users in writes.settled_deadlines.items():  # before the ZADDs: a user may be settled and re-added
            for shard, settled in self._by_shard(users).items():
                scripts[shard].command("ZREM", keys.shard_key(shard, f"deadlines:{partition}"), settled)
        for partition, deadlines in writes.deadlines.items():
            for shard, users in self._by_shard(deadlines).items():
                scripts[shard].command("ZADD", keys.shard_key(shard, f"deadlines:{partition}"),
                                       [x for user in users for x in (deadlines[user], user)], step=2)
        for shard, examples in self._by_shard(writes.examples, lambda e: e[0]).items():
            by_window: dict[int, list[bytes]] = defaultdict(list)
            for _, example in examples:
                by_window[window_start(example.ts_s, self._windows.window_s)].append(example.encode())
            script = scripts[shard]
            for start, encoded in by_window.items():
                window = keys.shard_key(shard, f"window:{start}")
                script.command("RPUSH", window, encoded)
                script.command("LTRIM", window, [-self._window_max_examples, -1])
                script.command("ZADD", keys.shard_key(shard, "windows"), [start, start])
            script.command("INCRBY", keys.shard_key(shard, "examples_total"), [len(examples)])
        pipe = self._client.pipeline(transaction=self._transactions)
        for script in scripts.values():
            script.send(pipe)
        if writes.newest_by_partition:  # an atomic max: written again by a batch built again, it changes nothing
            pipe.zadd(keys.meta("event_time"), writes.newest_by_partition, gt=True)
            now_s = time.time()
            pipe.zadd(keys.meta("event_time_at"), {partition: now_s for partition in writes.newest_by_partition}, gt=True)
        if writes.labels_through:
            pipe.zadd(keys.meta("labels_through"), writes.labels_through, gt=True)
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

    def labels_watermark(self, allowed_lateness_s: float, idle_timeout_s: float) -> float | None:
        """The watermark, held back to where the consumer of every active input partition has settled the
        repurchase deadlines it passed (StateWrites.labels_through): labels are known up to there, not up to the
        watermark, while a partition's consumer lags behind it (paused, slow, or between two batches)."""
        active, through = self._active_partitions(idle_timeout_s, also="labels_through")
        now_watermark = watermark(active, allowed_lateness_s)
        if now_watermark is None:
            return None
        return min([now_watermark, *(through[p] for p in active if p in through)])

    def slowest_partition_s(self, idle_timeout_s: float) -> float | None:
        """The newest event time of the slowest input partition among those that brought events within
        `idle_timeout_s` (None: none did)."""
        return self.watermark(0.0, idle_timeout_s)

    # read by the trainer
    def examples_total(self) -> int:
        return self.examples_and_alarm()[0]

    def examples_and_alarm(self) -> tuple[int, bool]:
        """In one round trip: the resolved examples ever, and whether a drift alarm waits for the trainer."""
        pipe = self._client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.get(self.keys.shard_key(shard, "examples_total"))
        pipe.exists(self.keys.meta("drift"))
        *counts, alarm = pipe.execute()
        return sum(int(count or 0) for count in counts), bool(alarm)

    def raise_drift_alarm(self, regime_since_ts: float) -> None:
        """Ask the trainer for a fine-tune (it takes the alarm with take_drift_alarm), on the examples from
        `regime_since_ts` on (kept, so a trainer that takes over later trains on the same regime)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self.keys.meta("regime_since_ts"), repr(float(regime_since_ts)))
        pipe.set(self.keys.meta("drift"), "1")
        pipe.execute()

    def take_drift_alarm(self) -> bool:
        return self._client.getdel(self.keys.meta("drift")) is not None

    def regime_since_ts(self) -> float | None:
        """Where the last drift alarm estimated the current regime began (event time), if any alarmed."""
        raw = self._client.get(self.keys.meta("regime_since_ts"))
        return float(raw) if raw is not None else None

    def recent_examples(self, max_examples: int, until_ts_s: float = math.inf) -> list[Example]:
        """The newest `max_examples` labelled examples of event time up to `until_ts_s`, oldest first."""
        highest = "+inf" if until_ts_s == math.inf else until_ts_s  # windows start at or before it
        shards = range(self.keys.shards)
        pipe = self._client.pipeline(transaction=False)
        for shard in shards:
            pipe.zrevrangebyscore(self.keys.shard_key(shard, "windows"), highest, "-inf")
        starts = sorted({int(s) for found in pipe.execute() for s in found}, reverse=True)
        collected: list[Example] = []
        for start in starts:
            pipe = self._client.pipeline(transaction=False)
            for shard in shards:
                pipe.lrange(self.keys.shard_key(shard, f"window:{start}"), 0, -1)
            raws = [raw for found in pipe.execute() for raw in found]
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
        waiting = self._deadline_query(list(self.newest_by_partition()), lambda pipe, key: pipe.zrevrangebyscore(
            key, "+inf", f"({since_ts_s}", start=0, num=max_examples))
        users = list({user for found in waiting.values() for user in found})
        _, pendings = self.load_profiles(users) if users else ({}, {})
        recent = positives + [e for e in pendings.values() if e.ts_s > since_ts_s]
        recent.sort(key=lambda e: e.ts_s)
        return recent[-max_examples:]

    def window_sizes(self) -> dict[int, int]:
        """Examples kept in each window, by start."""
        shards = range(self.keys.shards)
        pipe = self._client.pipeline(transaction=False)
        for shard in shards:
            pipe.zrange(self.keys.shard_key(shard, "windows"), 0, -1)
        starts_by_shard = [[int(s) for s in found] for found in pipe.execute()]
        pipe = self._client.pipeline(transaction=False)
        for shard, starts in zip(shards, starts_by_shard):
            for start in starts:
                pipe.llen(self.keys.shard_key(shard, f"window:{start}"))
        sizes: dict[int, int] = defaultdict(int)
        for start, size in zip((start for starts in starts_by_shard for start in starts), pipe.execute()):
            sizes[start] += size
        return dict(sorted(sizes.items()))

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
        if not starts:
            return
        pipe = self._client.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            for start in starts:
                pipe.delete(self.keys.shard_key(shard, f"window:{start}"))
            pipe.zrem(self.keys.shard_key(shard, "windows"), *[str(s) for s in starts])
        pipe.execute()
