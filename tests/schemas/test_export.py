import json

from streamadapt.schemas.export import EXPORT_DIR, MESSAGES, rendered, stale_files


def test_exported_json_schemas_are_current():
    assert stale_files() == [], "run `python -m streamadapt.schemas.export` and commit streamadapt/schemas/json/"


def test_every_message_is_exported_with_a_schema_version():
    assert set(rendered()) == {f"{name}.json" for name in MESSAGES}
    for name in MESSAGES:
        schema = json.loads((EXPORT_DIR / f"{name}.json").read_text())
        assert "schema_version" in schema["properties"], name


def test_stale_export_is_detected(tmp_path):
    for name, text in rendered().items():
        (tmp_path / name).write_text(text)
    (tmp_path / "prediction.json").write_text("{}")
    assert stale_files(tmp_path) == ["prediction.json"]
