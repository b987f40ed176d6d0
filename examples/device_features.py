"""A feature plug-in of your own, for `streamadapt pretrain --features examples.device_features:DeviceFeatures`
(and the same `--features` for `streamadapt run`).

It keeps the built-in features and appends the device a purchase was made on, an event field the contract
does not have: the worker passes such fields on, unvalidated, in `event.model_extra`. Appended after the
built-in columns, the new ones reach the built-in network's context part, so it needs no change.
"""
from collections.abc import Sequence

import numpy as np

from streamadapt.core.features import CategoryFeatures, UserState
from streamadapt.schemas import PurchaseEvent

DEVICES = ("app", "mobile", "desktop")  # anything else, or no device, is the last column


class DeviceFeatures(CategoryFeatures):
    name = "example.device"  # recorded in the checkpoint with the version: the worker refuses another
    version = "1"  # bump it whenever the features of an event change

    @property
    def n_features(self) -> int:
        return super().n_features + len(DEVICES) + 1

    def encode(self, rows: Sequence[tuple[UserState, PurchaseEvent]], observed_since_s: float) -> np.ndarray:
        devices = np.zeros((len(rows), len(DEVICES) + 1), np.float32)
        for row, (_, event) in enumerate(rows):
            device = (event.model_extra or {}).get("device")
            devices[row, DEVICES.index(device) if device in DEVICES else len(DEVICES)] = 1.0
        return np.hstack([super().encode(rows, observed_since_s), devices])
