"""The README is a newcomer's only guide: keep it true to the code."""
import re
from pathlib import Path

from schemas import RejectReason
from worker.settings import OPTIONS, Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented_and_no_stale_one():
    for option in OPTIONS:
        assert f"`{option.env}`" in README and f"`{option.flag}`" in README, option.env
    documented = set(re.findall(r"`(STREAMADAPT_[A-Z0-9_]+)`", README))
    assert documented <= {o.env for o in OPTIONS} | {"STREAMADAPT_KAFKA_BOOTSTRAP", "STREAMADAPT_REDIS_URL"}


def test_every_settings_default_is_the_one_the_table_shows():
    for option in OPTIONS:
        fields = (Settings.model_fields[option.part].annotation if option.part else Settings).model_fields
        default = fields[option.field].get_default(call_default_factory=True)
        row = re.search(rf"^\| `{option.env}` \| `{re.escape(option.flag)}` \| `([^`]*)` \|", README, re.MULTILINE)
        assert row is not None, option.env
        assert row.group(1) == ('""' if str(default) == "" else str(default)), option.env


def test_every_dead_letter_reason_is_documented():
    for reason in RejectReason:
        assert f"`{reason.value}`" in README, reason.value


def test_the_two_commands_exist():
    root = Path(__file__).resolve().parents[1]
    for script in ("scripts/demo", "scripts/test", "scripts/dev-stack"):
        assert script in README and (root / script).stat().st_mode & 0o111, script
