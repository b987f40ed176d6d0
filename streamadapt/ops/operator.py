"""`streamadapt models list|show|rollback`: the operator's view of the registry."""
from __future__ import annotations

import json
from contextlib import closing

from streamadapt.kafka.kafka_python import open_producer
from streamadapt.settings import Settings, SettingsError
from streamadapt.state.registry import Registry
from streamadapt.state.store import connect


def models_command(settings: Settings, action: str, version: str | None) -> str:
    with closing(connect(settings.redis)) as client:
        registry = Registry(client, settings.redis.key_prefix, settings.model_name)
        champion = registry.champion()
        if action == "list":
            return _table(registry, champion)
        record = registry.get(version or "")
        if record is None:
            raise SettingsError(f"no model version {version!r} in the registry of {settings.model_name!r}")
        if action == "show":
            return json.dumps(json.loads(record.model_dump_json()), indent=2)
        registry.parameters(record)  # refuse to roll back to an artifact that would not verify
        registry.set_champion(record.version)
        announced = record.model_copy(update={"promoted": True, "decision": f"rollback by operator (was {champion})"})
        producer = open_producer(settings.kafka)
        try:
            producer.send(settings.kafka.model_versions_topic, key=record.model.encode(),
                          value=announced.model_dump_json().encode()).get(timeout=30)
        finally:
            producer.close(timeout=10)
        return f"champion of {settings.model_name} is now {record.version} (was {champion}); every replica swaps to it"


def _table(registry: Registry, champion: str | None) -> str:
    waiting = registry.unannounced_versions()
    rows = [f"{'version':<19}promoted  announced  strategy  examples  candidate_log_loss  champion_log_loss  created_at"]
    for r in registry.all():
        mark = "*" if r.version == champion else " "
        cand = r.metrics.get("candidate", {}).get("log_loss")
        champ = r.metrics.get("champion", {}).get("log_loss")
        rows.append(f"{mark}{r.version:<18}{str(r.promoted):<10}{'no' if r.version in waiting else 'yes':<11}"
                    f"{(r.strategy or '-'):<10}{r.trained_on.examples:<10}"
                    f"{'-' if cand is None else f'{cand:.4f}':<20}{'-' if champ is None else f'{champ:.4f}':<19}"
                    f"{r.created_at.isoformat(timespec='seconds')}")
    rows.append("(* = champion; announced no = not yet on the model-versions topic: the leading trainer publishes it "
                "once Kafka takes it)")
    return "\n".join(rows)
