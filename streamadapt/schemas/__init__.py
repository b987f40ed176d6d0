"""The messages of the external contract: the input event, the prediction, the dead letter and the model
version. Each exports its JSON Schema (`python -m streamadapt.schemas.export`)."""
from streamadapt.schemas.dead_letter import DeadLetter, RejectReason
from streamadapt.schemas.model_version import ModelVersion, TrainedOn
from streamadapt.schemas.prediction import ClassProbability, Prediction
from streamadapt.schemas.purchase import SUPPORTED_SCHEMA_VERSIONS, PurchaseEvent

__all__ = [
    "SUPPORTED_SCHEMA_VERSIONS",
    "ClassProbability",
    "DeadLetter",
    "ModelVersion",
    "Prediction",
    "PurchaseEvent",
    "RejectReason",
    "TrainedOn",
]
