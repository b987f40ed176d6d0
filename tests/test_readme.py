"""The README (a newcomer's guide) and docs/operations.md (the settings, metrics and dead-letter reasons
an operator reads): keep them true to the code."""
import re
from pathlib import Path

from pydantic import SecretStr

from streamadapt.schemas import RejectReason
from streamadapt.settings import OPTIONS, Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def test_every_setting_is_documented_and_no_stale_one():
    for option in OPTIONS:
        assert f"`{option.env}`" in OPERATIONS and f"`{option.flag}`" in OPERATIONS, option.env
    documented = set(re.findall(r"`(STREAMADAPT_[A-Z0-9_]+)`", README + OPERATIONS))
    # STREAMADAPT_PORT: what Kubernetes sets, named where the docs say that unknown variables are only warned of
    assert documented <= {o.env for o in OPTIONS} | {"STREAMADAPT_PORT"}


def test_every_settings_default_is_the_one_the_table_shows():
    for option in OPTIONS:
        fields = (Settings.model_fields[option.part].annotation if option.part else Settings).model_fields
        default = fields[option.field].get_default(call_default_factory=True)
        if isinstance(default, SecretStr):  # a default secret is no secret: the table shows it
            default = default.get_secret_value()
        row = re.search(rf"^\| `{option.env}` \| `{re.escape(option.flag)}` \| `([^`]*)` \|", OPERATIONS, re.MULTILINE)
        assert row is not None, option.env
        assert row.group(1) == ('""' if str(default) == "" else str(default)), option.env


def test_every_dead_letter_reason_is_documented():
    for reason in RejectReason:
        assert f"`{reason.value}`" in OPERATIONS, reason.value


def test_the_two_commands_exist():
    root = Path(__file__).resolve().parents[1]
    for script in ("scripts/demo", "scripts/test", "scripts/dev-stack"):
        assert script in README and (root / script).stat().st_mode & 0o111, script
