"""Log lines as JSON objects (``PI_AGENT_LOG_FORMAT=json``): one object a line, for a log
collector. The app's loggers and gunicorn's (gunicorn.conf.py) use it alike. Standard
library only: gunicorn's master imports it.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    """A record as ``{"time", "level", "logger", "pid", "message", ...}``; a turn's line
    adds its fields (turn_log.py) beside the message, an exception its text as "error"."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the message
            message = f"{record.msg} {record.args!r}"
        line: dict[str, object] = {}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        # Set after the fields: a field never hides what every line has.
        line.update({
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": message,
        })
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str, skipkeys=True)
