"""Logging set-up shared by every Converge process: text (default) or one JSON object per line.

`CONVERGE_LOG_FORMAT=json` turns JSON on for the API (uvicorn's loggers included), workers and
their slot processes, each line `{"time", "level", "logger", "message", "process"}` plus
`"exception"` when one is logged, for log shippers that parse JSON.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str | None = None):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                 "process": record.process or os.getpid()}
        if self.component:
            entry["component"] = self.component
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(log_format: str = "text", level: int = logging.INFO, *, text_format: str = TEXT_FORMAT,
              component: str | None = None) -> None:
    """Point the root logger at stderr in the chosen format (replacing any handler it had)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(component) if log_format == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
