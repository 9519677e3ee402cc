"""Where the semantic cache keeps its answers: an SQLite file (the embedded default), one row per
cached answer with its query, context, category, times and embedding.

The in-memory HNSW indexes (semantic_cache.py) hold only vectors and row ids; they are rebuilt
from this store when cache_index starts, so a restart keeps what was cached. Rows are written
as they change (insert, a hit's use time, removal), each in its own transaction; WAL mode with
`synchronous=NORMAL` keeps a write off the disk's sync path (a crash may lose the last writes,
never the file's consistency).

Vectors are stored as raw little-endian float32 bytes and everything else as SQL values:
nothing is pickled. One thread uses a store (the cache's own: semantic_service.py). For a
cluster, the same interface over JetStream is semantic_jetstream.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the HNSW labels are these ids
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    context_key TEXT NOT NULL,
    category TEXT NOT NULL,
    query TEXT NOT NULL,
    answer TEXT NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_created ON answers (created);
"""


@dataclass(slots=True)
class StoredAnswer:
    """One cached answer as the store holds it (`id` 0 until it is written)."""

    tenant: str
    model: str
    context_key: str
    category: str
    query: str
    answer: str
    completion_tokens: int
    finish_reason: str
    created: float  # unix seconds
    last_used: float
    vector: np.ndarray  # [dim] float32, unit length
    id: int = 0


class AnswerStore(Protocol):
    """Where answers live: this SQLite store, or JetStream buckets for a cluster
    (semantic_jetstream.py). Used from the cache's thread only."""

    def add(self, entry: StoredAnswer) -> int: ...
    def touch(self, entry_id: int, last_used: float) -> None: ...
    def remove(self, entries: list[StoredAnswer]) -> None: ...
    def all(self) -> Iterator[StoredAnswer]: ...
    def close(self) -> None: ...


class SemanticStore:
    """An SQLite file of cached answers (`MEMORY`: a store that lives as long as the process)."""

    def __init__(self, path: Path | str = MEMORY) -> None:
        path = str(path)
        if path != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Opened here, used by the cache's thread: sqlite3 allows that with this flag, and the
        # store is never used from two threads at once.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def add(self, entry: StoredAnswer) -> int:
        """Write a new answer; its row id (also set on `entry`)."""
        vector = np.ascontiguousarray(entry.vector, dtype="<f4").tobytes()
        cursor = self._db.execute(
            "INSERT INTO answers (tenant, model, context_key, category, query, answer, "
            "completion_tokens, finish_reason, created, last_used, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.tenant,
                entry.model,
                entry.context_key,
                entry.category,
                entry.query,
                entry.answer,
                entry.completion_tokens,
                entry.finish_reason,
                entry.created,
                entry.last_used,
                vector,
            ),
        )
        assert cursor.lastrowid is not None
        entry.id = cursor.lastrowid
        return entry.id

    def touch(self, entry_id: int, last_used: float) -> None:
        self._db.execute("UPDATE answers SET last_used = ? WHERE id = ?", (last_used, entry_id))

    def remove(self, entries: list[StoredAnswer]) -> None:
        if entries:
            self._db.executemany("DELETE FROM answers WHERE id = ?", [(e.id,) for e in entries])

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def all(self) -> Iterator[StoredAnswer]:
        """Every stored answer, oldest first."""
        rows = self._db.execute(
            "SELECT id, tenant, model, context_key, category, query, answer, completion_tokens, "
            "finish_reason, created, last_used, vector FROM answers ORDER BY id"
        )
        for row in rows:
            yield StoredAnswer(
                tenant=row[1],
                model=row[2],
                context_key=row[3],
                category=row[4],
                query=row[5],
                answer=row[6],
                completion_tokens=int(row[7]),
                finish_reason=row[8],
                created=float(row[9]),
                last_used=float(row[10]),
                vector=np.frombuffer(row[11], dtype="<f4").astype(np.float32),
                id=int(row[0]),
            )

    def close(self) -> None:
        self._db.close()
