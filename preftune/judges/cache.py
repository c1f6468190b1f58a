"""An on-disk cache of judge replies, so re-running an evaluation or a judging step costs zero requests.

SQLite rather than JSONL: several worker threads (and several processes sharing a cache) write at once,
and SQLite gives atomic inserts and file locking for free. Only the key's hash and the model's reply text are
stored, never a request header, so nothing secret can end up in the file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path


def cache_key(*parts: object) -> str:
    """sha256 hex of the JSON encoding of ``parts`` (e.g. base URL, model, template, temperature, prompt)."""
    blob = json.dumps(list(parts), ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """A key -> reply-text table in one SQLite file; safe to share across threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT, created REAL)"
            )

    def get(self, key: str) -> str | None:
        """The cached reply for ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, reply: str) -> None:
        """Store (or replace) the reply for ``key``."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO replies (key, reply, created) VALUES (?, ?, ?)",
                (key, reply, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"
