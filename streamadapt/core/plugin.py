"""Feature plug-ins: what turns an event, and what is known of its user, into the feature vector.

One code path for pretraining and serving. Both walk the events in event-time order through the same three
calls of one plug-in object: `recall` (the user's state as an event at that time sees it), `encode` (the
features of each event from its user's state before it) and `advance` (the state after the event).
`pretrain` does it over a file (`encode_stream`); the worker over the stream, a batch at a time, keeping
each user's state in Redis between batches (`state_to_json`, `state_from_json`).

A plug-in is a class, named as MODULE:NAME (`pretrain --features`, `run --features`), built with the
checkpoint's FeatureSpec: the classes it knows, their frequencies, and how long it remembers an idle user.
The built-in one is streamadapt.core.features.CategoryFeatures; docs/extending.md shows a plug-in that adds
an event field to it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from streamadapt.core.features import FeatureSpec
from streamadapt.core.named import import_named
from streamadapt.schemas import PurchaseEvent
from streamadapt.settings import BUILT_IN_FEATURES

BUILT_IN = BUILT_IN_FEATURES  # MODULE:NAME of CategoryFeatures

State = Any  # one user's state, as a plug-in keeps it: whatever its state_to_json and state_from_json round-trip


class Features(Protocol):
    """A feature plug-in. `name` and `version` are recorded in the checkpoint, and the worker refuses to serve
    it with another plug-in, or another version: bump `version` whenever the features of an event change.

    A user's state is the plug-in's own. It must not grow without bound: `max_state_bytes` caps its JSON, and a
    state over it is dropped by the worker (the user counts as new), with a warning. `class_block_width`, when
    above zero, says that the first columns are the built-in network's per-class block (CategoryFeatures and
    its subclasses); any other plug-in gets the built-in dense network, or your own (`--model-builder`).
    """

    name: ClassVar[str]
    version: ClassVar[str]
    max_state_bytes: ClassVar[int]

    def __init__(self, spec: FeatureSpec) -> None: ...

    @property
    def n_features(self) -> int: ...

    @property
    def class_block_width(self) -> int: ...

    def recall(self, state: State | None, ts_s: float) -> State:
        """The state an event at `ts_s` is seen with; `state` is None for a user never seen (or forgotten)."""

    def encode(self, rows: Sequence[tuple[State, PurchaseEvent]], observed_since_s: float) -> np.ndarray:
        """float32 (len(rows), n_features): each event's features from its user's state before it.
        `observed_since_s` is the event time from which states have been kept."""

    def advance(self, state: State, event: PurchaseEvent) -> State:
        """The user's state after `event`. Pure: `state` is not changed."""

    def state_to_json(self, state: State) -> Any: ...

    def state_from_json(self, payload: Any) -> State:
        """The state `state_to_json` gave; ValueError for anything else."""


class FeaturesError(ValueError):
    """A plug-in that cannot be used, worded for the operator in one line."""


def load_features(reference: str) -> type[Features]:
    """The plug-in class named by "MODULE:NAME", imported with the working directory on the path."""
    plugin = import_named(reference, "--features", "MODULE:NAME", FeaturesError)
    missing = [a for a in ("name", "version", "max_state_bytes", "recall", "encode", "advance", "state_to_json",
                           "state_from_json") if not hasattr(plugin, a)]
    if not isinstance(plugin, type) or missing:
        raise FeaturesError(f"--features {reference}: not a feature plug-in class"
                            + (f" (it lacks {', '.join(missing)})" if isinstance(plugin, type) else ""))
    return plugin


def encode_stream(ordered: Sequence[PurchaseEvent], features: Features, observed_since_s: float | None = None
                  ) -> np.ndarray:
    """Features of every event of a stream in event-time order, each from its user's state before it, as the
    worker computes them batch by batch; states kept from `observed_since_s` (default: the first event)."""
    states: dict[str, State] = {}
    rows = []
    for event in ordered:
        state = features.recall(states.get(event.user_id), event.ts_s)
        rows.append((state, event))
        states[event.user_id] = features.advance(state, event)
    if observed_since_s is None:
        observed_since_s = ordered[0].ts_s if ordered else 0.0
    return features.encode(rows, observed_since_s)
