"""LocalChain: an embedded chain in one SQLite file, the default for a local network and the tests.

    local:///abs/path/chain.sqlite[?clock=manual|wall&seconds_per_block=12&uid=N&blocks_per_window=7]

Several processes may share the file (WAL journal, every write in a `BEGIN IMMEDIATE` transaction, busy timeout).
The block clock either follows wall time (`wall`: block = ⌊(now − genesis) / seconds_per_block⌋) or moves only
when told (`manual`: `advance(n)`, for tests and the fast demo); block times are recorded either way so a window's
time range is known. Weights follow the real chain's rules: only a uid with a validator permit may set them, at
most once per `weights_rate_limit` blocks, and they are stored normalised with the block they were set at.

The chain has a secret, fixed when the file is created (random, or from `secret=` for a reproducible local network):
block b's hash is sha256(secret, b), known once the chain has reached b, and each registered hotkey gets an sr25519
key pair derived from it, held in the file as a local wallet would be, so `sign` and `verify` run the same
signature scheme as bittensor hotkeys.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from templar_lib.chain.base import ChainError, Metagraph, Neuron, RateLimited, verify_sr25519, window_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (block INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (uid INTEGER PRIMARY KEY, hotkey TEXT UNIQUE NOT NULL, stake REAL NOT NULL,
                                    validator_permit INTEGER NOT NULL, registered_block INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS commitments (uid INTEGER PRIMARY KEY, data TEXT NOT NULL, block INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS weights (validator INTEGER NOT NULL, uid INTEGER NOT NULL, weight REAL NOT NULL,
                                    block INTEGER NOT NULL, PRIMARY KEY (validator, uid));
CREATE TABLE IF NOT EXISTS last_weights (validator INTEGER PRIMARY KEY, block INTEGER NOT NULL);
"""
MAX_COMMITMENT_BYTES = 1024


class LocalChain:
    def __init__(self, path: str | Path, *, uid: int | None = None, clock: str | None = None,
                 seconds_per_block: float | None = None, blocks_per_window: int = 7,
                 weights_rate_limit: int | None = None, secret: str | None = None) -> None:
        """Open (creating if needed) the chain at `path`. Clock settings given here are stored on creation only
        (or when explicitly passed), so every process sees the same clock. `uid`: the identity this handle acts as."""
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.blocks_per_window = blocks_per_window
        self._uid = uid
        self._create_schema()
        settings = {"clock": clock, "seconds_per_block": seconds_per_block, "weights_rate_limit": weights_rate_limit}
        with self._transaction() as db:
            defaults = {"clock": "manual", "seconds_per_block": 12.0, "weights_rate_limit": 0,
                        "genesis": time.time(), "manual_block": 0, "secret": secret or secrets.token_hex(32)}
            for key, value in defaults.items():
                db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, str(value)))
            for key, value in settings.items():
                if value is not None:
                    db.execute("UPDATE meta SET value = ? WHERE key = ?", (str(value), key))
            if self._meta(db, "clock") not in ("manual", "wall"):
                raise ValueError(f"clock must be 'manual' or 'wall', not {self._meta(db, 'clock')!r}")
            db.execute("INSERT OR IGNORE INTO blocks VALUES (0, ?)", (float(self._meta(db, "genesis")),))

    def __repr__(self) -> str:
        return f"LocalChain({self.path.as_uri()!r}, uid={self._uid})"

    # ------------------------------------------------------------------ storage plumbing
    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        connection.execute("PRAGMA busy_timeout = 30000")
        return connection

    def _create_schema(self) -> None:
        connection = self._connect()
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.executescript(_SCHEMA)
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialised across processes (BEGIN IMMEDIATE takes the write lock up front)."""
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        finally:
            connection.close()

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> str:
        return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def _read(self, query: str, parameters: tuple = ()) -> list[tuple]:
        connection = self._connect()
        try:
            return connection.execute(query, parameters).fetchall()
        finally:
            connection.close()

    # ------------------------------------------------------------------ identity
    @property
    def uid(self) -> int | None:
        return self._uid

    def as_uid(self, uid: int) -> LocalChain:
        """A handle on the same chain acting as `uid` (the local network runs every node in one process)."""
        view = object.__new__(LocalChain)
        view.__dict__.update(self.__dict__, _uid=uid)
        return view

    def register(self, *, hotkey: str | None = None, stake: float = 0.0, validator_permit: bool = False) -> int:
        """Register a hotkey (generated when not given) under the next free uid; returns the uid."""
        hotkey = hotkey or "local-" + secrets.token_hex(16)
        with self._transaction() as db:
            existing = db.execute("SELECT uid FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
            if existing:
                return existing[0]
            uid = db.execute("SELECT COALESCE(MAX(uid) + 1, 0) FROM neurons").fetchone()[0]
            db.execute("INSERT INTO neurons VALUES (?, ?, ?, ?, ?)",
                       (uid, hotkey, float(stake), int(validator_permit), self._block(db)))
        return uid

    def deregister(self, uid: int) -> None:
        with self._transaction() as db:
            for table, column in (("neurons", "uid"), ("commitments", "uid"), ("weights", "uid"),
                                  ("weights", "validator"), ("last_weights", "validator")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (uid,))

    # ------------------------------------------------------------------ clock
    def _block(self, db: sqlite3.Connection) -> int:
        if self._meta(db, "clock") == "manual":
            return int(self._meta(db, "manual_block"))
        elapsed = time.time() - float(self._meta(db, "genesis"))
        return max(0, int(elapsed // float(self._meta(db, "seconds_per_block"))))

    def block(self) -> int:
        with contextlib.closing(self._connect()) as db:
            return self._block(db)

    def window(self) -> int:
        return window_of(self.block(), self.blocks_per_window)

    @property
    def manual(self) -> bool:
        """Whether the clock moves only when told (advance), not with wall time."""
        with contextlib.closing(self._connect()) as db:
            return self._meta(db, "clock") == "manual"

    def advance(self, blocks: int = 1) -> int:
        """Manual clock: move forward `blocks` blocks (recording their time); returns the new block."""
        with self._transaction() as db:
            if self._meta(db, "clock") != "manual":
                raise ChainError("advance() needs a manual clock")
            current = int(self._meta(db, "manual_block"))
            now = time.time()
            for block in range(current + 1, current + blocks + 1):
                db.execute("INSERT OR REPLACE INTO blocks VALUES (?, ?)", (block, now))
            db.execute("UPDATE meta SET value = ? WHERE key = 'manual_block'", (str(current + blocks),))
            return current + blocks

    def advance_to_block(self, block: int) -> int:
        return self.advance(max(0, block - self.block()))

    def block_time(self, block: int) -> datetime | None:
        with contextlib.closing(self._connect()) as db:
            if self._meta(db, "clock") == "wall":
                if block > self._block(db):
                    return None
                at = float(self._meta(db, "genesis")) + block * float(self._meta(db, "seconds_per_block"))
            else:
                row = db.execute("SELECT at FROM blocks WHERE block = ?", (block,)).fetchone()
                if row is None:
                    return None
                at = row[0]
        return datetime.fromtimestamp(at, tz=timezone.utc)

    # ------------------------------------------------------------------ subnet state
    def metagraph(self) -> Metagraph:
        rows = self._read("SELECT uid, hotkey, stake, validator_permit FROM neurons ORDER BY uid")
        return Metagraph(self.block(), [Neuron(uid, hotkey, stake, bool(permit))
                                        for uid, hotkey, stake, permit in rows])

    def commit(self, data: str) -> None:
        uid = self._require_uid()
        if len(data.encode()) > MAX_COMMITMENT_BYTES:
            raise ChainError(f"commitment larger than {MAX_COMMITMENT_BYTES} bytes")
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO commitments VALUES (?, ?, ?)", (uid, data, self._block(db)))

    def commitments(self) -> dict[int, str]:
        return dict(self._read("SELECT uid, data FROM commitments ORDER BY uid"))

    def set_weights(self, weights: dict[int, float]) -> None:
        """Store this validator's weights, normalised to sum 1 over registered uids (the chain's own rule)."""
        validator = self._require_uid()
        with self._transaction() as db:
            permit = db.execute("SELECT validator_permit FROM neurons WHERE uid = ?", (validator,)).fetchone()
            if not permit or not permit[0]:
                raise ChainError(f"uid {validator} has no validator permit")
            block = self._block(db)
            last = db.execute("SELECT block FROM last_weights WHERE validator = ?", (validator,)).fetchone()
            limit = int(self._meta(db, "weights_rate_limit"))
            if last is not None and block - last[0] < limit:
                raise RateLimited(f"weights set at block {last[0]}; next allowed at block {last[0] + limit}")
            registered = {row[0] for row in db.execute("SELECT uid FROM neurons")}
            clean = {int(uid): float(w) for uid, w in weights.items() if int(uid) in registered and w > 0}
            total = sum(clean.values())
            db.execute("DELETE FROM weights WHERE validator = ?", (validator,))
            for uid, weight in sorted(clean.items()):
                db.execute("INSERT INTO weights VALUES (?, ?, ?, ?)", (validator, uid, weight / total, block))
            db.execute("INSERT OR REPLACE INTO last_weights VALUES (?, ?)", (validator, block))

    def weights(self) -> dict[int, dict[int, float]]:
        table: dict[int, dict[int, float]] = {}
        for validator, uid, weight in self._read("SELECT validator, uid, weight FROM weights ORDER BY validator, uid"):
            table.setdefault(validator, {})[uid] = weight
        return table

    # ------------------------------------------------------------------ hashes and signatures
    def _secret(self) -> str:
        with contextlib.closing(self._connect()) as db:
            return self._meta(db, "secret")

    def block_hash(self, block: int) -> str | None:
        if block < 0 or block > self.block():
            return None
        return hashlib.sha256(f"{self._secret()}:block:{block}".encode()).hexdigest()

    def _keypair(self, hotkey: str):
        from bittensor.sp_core import Keypair

        return Keypair.create_from_seed(hashlib.sha256(f"{self._secret()}:key:{hotkey}".encode()).digest())

    def sign(self, message: bytes) -> str:
        uid = self._require_uid()
        (hotkey,) = self._read("SELECT hotkey FROM neurons WHERE uid = ?", (uid,))[0]
        return bytes(self._keypair(hotkey).sign(message)).hex()

    def verify(self, hotkey: str, message: bytes, signature: str) -> bool:
        return verify_sr25519(self._keypair(hotkey).ss58_address, message, signature)

    def weights_block(self, validator: int) -> int | None:
        rows = self._read("SELECT block FROM last_weights WHERE validator = ?", (validator,))
        return rows[0][0] if rows else None

    def _require_uid(self) -> int:
        if self._uid is None:
            raise ChainError("this chain handle has no uid: open it with ?uid=N or use as_uid()")
        if not self._read("SELECT 1 FROM neurons WHERE uid = ?", (self._uid,)):
            raise ChainError(f"uid {self._uid} is not registered")
        return self._uid
