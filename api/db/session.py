"""Engines and sessions, one engine per database URL. The API bounds its pool (`configure_pool`): a
request that cannot get a connection within the timeout fails fast (503) instead of queueing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, Engine] = {}
_makers: dict[str, sessionmaker[Session]] = {}
_pool_options: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()


def configure_pool(url: str, *, size: int, overflow: int, timeout_s: float) -> None:
    """Pool bounds for `url` (Postgres); an engine already made with other bounds is replaced."""
    # No ping per checkout (a round trip per request): after a database restart the first request on a
    # dead connection fails (503) and the pool reconnects all of them.
    options = {
        "pool_size": size,
        "max_overflow": overflow,
        "pool_timeout": timeout_s,
        "pool_pre_ping": False,
        "pool_recycle": 1800,
    }
    with _lock:
        if url.startswith("sqlite") or _pool_options.get(url) == options:
            return
        _pool_options[url] = options
        old = _engines.pop(url, None)
        _makers.pop(url, None)
        _makers.pop(f"reader:{url}", None)
    if old is not None:
        old.dispose()


def get_engine(url: str) -> Engine:
    with _lock:
        if url not in _engines:
            _engines[url] = _make_engine(url)
        return _engines[url]


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL lets the API read while the worker writes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    options = {"pool_pre_ping": True, **_pool_options.get(url, {})}
    return create_engine(url, connect_args=connect_args, **options)


def dispose_engine(url: str) -> None:
    with _lock:
        engine = _engines.pop(url, None)
        _makers.pop(url, None)
        _makers.pop(f"reader:{url}", None)
    if engine is not None:
        engine.dispose()


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    engine = get_engine(url)
    with _lock:
        if url not in _makers:
            _makers[url] = sessionmaker(engine, expire_on_commit=False)
        return _makers[url]


def get_reader(url: str) -> sessionmaker[Session]:
    """Sessions for requests that only read: autocommit, so no BEGIN/ROLLBACK round trips (Postgres)."""
    if url.startswith("sqlite"):
        return get_sessionmaker(url)
    engine = get_engine(url)
    key = f"reader:{url}"
    with _lock:
        if key not in _makers:
            _makers[key] = sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
        return _makers[key]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
