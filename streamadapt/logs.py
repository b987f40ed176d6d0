"""How the process logs: text lines for a terminal, or one JSON object per line for a log pipeline."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message, and the
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class WithoutClientTracebacks(logging.Filter):
    """kafka-python logs a connection that breaks (a broker that refuses our certificate, say) with the
    traceback of its socket call, and then its error again on a line of its own: the traceback is dropped, so
    that an expected network failure reads as lines of a log, not as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("kafka."):
            record.exc_info, record.exc_text = None, None
        return True


def set_up(level: str = "INFO", log_format: str = "text") -> None:
    """The root logger's level and format (replacing any handler set up before)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
    root.setLevel(level)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(existing, WithoutClientTracebacks) for existing in handler.filters):
            handler.addFilter(WithoutClientTracebacks())


def report(line: str) -> None:
    """The one line a failed command ends with, on stderr: as a JSON object when the log is JSON."""
    if any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers):
        logging.getLogger("streamadapt").error("%s", line)
    else:
        print(line, file=sys.stderr)
