"""Export every message's JSON Schema into streamadapt/schemas/json/.

    python -m streamadapt.schemas.export            # rewrite the files
    python -m streamadapt.schemas.export --check    # exit 1 when a file is stale
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from streamadapt.schemas import DeadLetter, ModelVersion, Prediction, PurchaseEvent

EXPORT_DIR = Path(__file__).parent / "json"
MESSAGES: dict[str, type[BaseModel]] = {
    "purchase_event": PurchaseEvent,
    "prediction": Prediction,
    "model_version": ModelVersion,
    "dead_letter": DeadLetter,
}


def rendered() -> dict[str, str]:
    """File name -> JSON text of each message's validation schema."""
    return {
        f"{name}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in MESSAGES.items()
    }


def stale_files(directory: Path = EXPORT_DIR) -> list[str]:
    return [name for name, text in rendered().items()
            if not (directory / name).exists() or (directory / name).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamadapt.schemas.export", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: streamadapt/schemas/json/{name} (run python -m streamadapt.schemas.export)", file=sys.stderr)
        return 1 if stale else 0
    EXPORT_DIR.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (EXPORT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
