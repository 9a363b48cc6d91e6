"""The opt-in decision log: one JSON line per answered request, rotated by size, written off the event loop."""

from __future__ import annotations

import logging
import logging.handlers
import queue
from typing import Any

import orjson

from router.config import DecisionLogConfig


class DecisionLog:
    def __init__(self, cfg: DecisionLogConfig) -> None:
        self.cfg = cfg
        cfg.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.handlers.RotatingFileHandler(
            cfg.path, maxBytes=cfg.max_bytes, backupCount=cfg.backups, encoding="utf-8"
        )
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, self._file)  # a thread does the writing
        self._logger = logging.Logger(f"router.decisions.{id(self)}")  # not registered: no global state
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._listener.start()

    def write(self, record: dict[str, Any]) -> None:
        if not self.cfg.include_prompt:
            record.pop("prompt", None)
        self._logger.info(orjson.dumps(record).decode())

    def close(self) -> None:
        self._listener.stop()
        self._file.close()
