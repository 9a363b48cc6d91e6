"""A durable, bounded store of labelled examples: one SQLite file.

SQLite is in Python's standard library (no new dependency, nothing in the gateway image changes), keeps what it
committed through crashes and restarts (WAL journal, ``synchronous=NORMAL``: a committed rating survives the
process; only a power cut may lose the last few), lets the learner read while the gateway writes, and holds a
few hundred thousand examples of 1–3 KB (a few hundred MB) without a server to run. One file per fleet's learner;
replicas on other hosts hand their examples to the learner through Redis, not through this file.

The store is bounded: after each write, examples beyond ``max_rows`` go, oldest rating first. Calls block (file
I/O): from an event loop, call them in a worker thread (``asyncio.to_thread``). One instance may be shared by
threads (a lock serialises them).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from router.learning.examples import LabelledExample, Observation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    rated_at REAL NOT NULL,
    key TEXT NOT NULL,
    backend TEXT NOT NULL,
    chosen TEXT NOT NULL,
    label REAL NOT NULL,
    propensity REAL NOT NULL,
    estimates TEXT NOT NULL,
    versions TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    features BLOB NOT NULL,
    text TEXT,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_backend_rated ON examples (backend, rated_at);
CREATE INDEX IF NOT EXISTS examples_rated ON examples (rated_at);
"""

_COLUMNS = ("id, at, rated_at, key, backend, chosen, label, propensity, estimates, versions, fingerprint, features, "
            "text, meta")


class ExampleStore:
    """Labelled examples in SQLite at ``path``; at most ``max_rows`` (the oldest ratings go first)."""

    def __init__(self, path: str | Path, max_rows: int = 200_000) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = Path(path)
        self.max_rows = max_rows
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ExampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, examples: Iterable[LabelledExample]) -> int:
        """Insert examples (an id already stored is kept as it was: a request is rated once); return how many
        were new. Then drop the oldest beyond ``max_rows``."""
        rows = [_row(e) for e in examples]
        if not rows:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                self._db.executemany(f"INSERT OR IGNORE INTO examples ({_COLUMNS}) VALUES "
                                     "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                added = self._db.total_changes - before
                excess = self._count_locked() - self.max_rows
                if excess > 0:
                    self._db.execute("DELETE FROM examples WHERE id IN (SELECT id FROM examples "
                                     "ORDER BY rated_at, id LIMIT ?)", (excess,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added

    def _count_locked(self, backend: str | None = None) -> int:
        if backend is None:
            return int(self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM examples WHERE backend = ?", (backend,)).fetchone()[0])

    def count(self, backend: str | None = None, *, since: float | None = None) -> int:
        """Examples stored (of ``backend``; rated after ``since``)."""
        with self._lock:
            if since is None:
                return self._count_locked(backend)
            if backend is None:
                row = self._db.execute("SELECT COUNT(*) FROM examples WHERE rated_at > ?", (since,)).fetchone()
            else:
                row = self._db.execute("SELECT COUNT(*) FROM examples WHERE backend = ? AND rated_at > ?",
                                       (backend, since)).fetchone()
            return int(row[0])

    def backends(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT backend FROM examples ORDER BY backend")]

    def recent(self, backend: str, limit: int, *, keys: Sequence[str] | None = None,
               since: float | None = None) -> list[LabelledExample]:
        """The ``limit`` most recently rated examples answered by ``backend`` (oldest first), only from ``keys``
        when given, only rated after ``since`` when given."""
        where, args = ["backend = ?"], [backend]
        if keys is not None:
            if not keys:
                return []
            where.append(f"key IN ({', '.join('?' * len(keys))})")
            args.extend(keys)
        if since is not None:
            where.append("rated_at > ?")
            args.append(since)
        sql = (f"SELECT {_COLUMNS} FROM examples WHERE {' AND '.join(where)} ORDER BY rated_at DESC, id DESC "
               "LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, (*args, int(limit))).fetchall()
        return [_example(r) for r in reversed(rows)]

    def newest_rating(self, backend: str | None = None) -> float | None:
        with self._lock:
            if backend is None:
                row = self._db.execute("SELECT MAX(rated_at) FROM examples").fetchone()
            else:
                row = self._db.execute("SELECT MAX(rated_at) FROM examples WHERE backend = ?", (backend,)).fetchone()
        return None if row[0] is None else float(row[0])


def _row(e: LabelledExample) -> tuple[object, ...]:
    o = e.observation
    return (o.id, o.at, e.rated_at, o.key, o.backend, o.chosen, e.label, o.propensity, json.dumps(dict(o.estimates)),
            json.dumps(dict(o.versions)), o.fingerprint, o.features, o.text, json.dumps(dict(o.meta)))


def _example(r: Sequence[object]) -> LabelledExample:
    (id_, at, rated_at, key, backend, chosen, label, propensity, estimates, versions, fingerprint, features, text,
     meta) = r
    obs = Observation(str(id_), float(at), str(key), str(backend), str(chosen), float(propensity),  # type: ignore[arg-type]
                      json.loads(str(estimates)), json.loads(str(versions)), str(fingerprint), bytes(features),  # type: ignore[arg-type]
                      None if text is None else str(text), json.loads(str(meta)))
    return LabelledExample(obs, float(label), float(rated_at))  # type: ignore[arg-type]
