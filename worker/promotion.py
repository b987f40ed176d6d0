"""The promotion gate. Pure: scores in, decision out."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: dict[str, float], champion: dict[str, float], min_relative_gain: float) -> Decision:
    """Promote only when the candidate's holdout log-loss beats the champion's by `min_relative_gain`.

    Both were scored on the same holdout. A non-finite candidate score never promotes.
    """
    new, old = candidate.get("log_loss", math.nan), champion.get("log_loss", math.nan)
    if not math.isfinite(new):
        return Decision(False, "candidate log-loss is not finite")
    if not math.isfinite(old):
        return Decision(True, "champion has no finite log-loss on the holdout")
    bar = old * (1.0 - min_relative_gain)
    if new < bar:
        return Decision(True, f"log-loss {new:.4f} < {bar:.4f} (champion {old:.4f} less {min_relative_gain:.1%})")
    return Decision(False, f"log-loss {new:.4f} does not beat {bar:.4f} (champion {old:.4f} less {min_relative_gain:.1%})")
