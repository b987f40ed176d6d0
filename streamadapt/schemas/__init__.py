"""Message schemas of the external contract (DESIGN.md). Each model exports its JSON Schema."""
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
