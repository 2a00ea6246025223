"""The state of one `icl rda` run: an SQLite file in the output folder.

Two tables: `answers` caches every MLLM answer by (model key, image digest, prompt digest);
`results` holds the finished groups of each (record, caption). Every batch is one
transaction, so a run killed at any point (Ctrl-C, SIGKILL) has either written a batch whole
or not at all; a resumed run skips what `results` holds and reuses what `answers` holds.
WAL mode: a commit survives the process being killed (not a power cut mid-write, which
`synchronous=NORMAL` trades for speed; the run is recomputable from the cache anyway).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STATE_FILE = "rda-state.sqlite"
SCHEMA = 1


class StateMismatch(ValueError):
    """The output folder holds a run with other input or settings."""


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class RdaStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS answers (
                model_key TEXT NOT NULL, image TEXT NOT NULL, prompt TEXT NOT NULL,
                answer TEXT NOT NULL, PRIMARY KEY (model_key, image, prompt));
            CREATE TABLE IF NOT EXISTS results (
                record INTEGER NOT NULL, caption INTEGER NOT NULL,
                enriched TEXT NOT NULL, groups TEXT NOT NULL, path TEXT NOT NULL,
                PRIMARY KEY (record, caption));
            """
        )

    def close(self) -> None:
        self.db.close()

    def bind(self, settings: dict[str, Any]) -> bool:
        """Tie the state to the run's settings; True when resuming an earlier run."""
        text = json.dumps({"schema": SCHEMA, **settings}, sort_keys=True)
        row = self.db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('settings', ?)", (text,))
            return False
        if row[0] != text:
            old = json.loads(row[0])
            new = json.loads(text)
            diff = ", ".join(
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            )
            raise StateMismatch(
                f"{self.path.parent} holds an RDA run with other settings ({diff}); "
                "rerun with the same input and options, or choose another --out"
            )
        return True

    def done(self) -> set[tuple[int, int]]:
        return {(r, c) for r, c in self.db.execute("SELECT record, caption FROM results")}

    def answer(self, model_key: str, image: str, prompt: str) -> str | None:
        row = self.db.execute(
            "SELECT answer FROM answers WHERE model_key = ? AND image = ? AND prompt = ?",
            (model_key, image, digest(prompt)),
        ).fetchone()
        return None if row is None else row[0]

    def commit_batch(
        self,
        answers: Iterable[tuple[str, str, str, str]],
        results: Iterable[tuple[int, int, str, list[list[str]], str]],
    ) -> None:
        """One transaction: new answers (model key, image, prompt, answer) and results."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)",
                [(k, i, digest(p), a) for k, i, p, a in answers],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                [(r, c, e, json.dumps(g), path) for r, c, e, g, path in results],
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def results(self) -> dict[tuple[int, int], tuple[str, list[list[str]], str]]:
        return {
            (r, c): (e, json.loads(g), p)
            for r, c, e, g, p in self.db.execute(
                "SELECT record, caption, enriched, groups, path FROM results"
            )
        }

    def count_answers(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


__all__ = ["STATE_FILE", "RdaStore", "StateMismatch", "digest"]
