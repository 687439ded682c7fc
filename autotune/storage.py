"""Where a study lives: the Optuna storage behind `search.storage`, for the search and the report.

`search.storage` unset: `<run_dir>/study.db` (SQLite). Otherwise a SQLAlchemy URL, or a journal
file (a path ending in .journal or .log, or journal:///path): Optuna's JournalFileStorage, what
several local search processes should share. A storage that cannot be used is the user's
ConfigError, said before anything is written.

Credentials: a password in the URL lives only in memory. Files and messages show the URL with
`***` in its place (`hide_secrets`); a URL read back from a file with `***`, or one
without a password, leaves the password to libpq as PostgreSQL users expect (PGPASSWORD,
~/.pgpass), so rerunning or reporting a study never needs the secret on disk.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
import sqlalchemy

from autotune.engine.config import ConfigError

ADVICE = ("give a reachable SQLAlchemy URL (a PostgreSQL password may come from PGPASSWORD or ~/.pgpass) "
          "or a .journal file path, or leave it unset for study.db in the run folder")
MASK = "***"
# What SQLAlchemy reads as a URL's password (the text between `user:` and `@`; make_url's own
# pattern), and a password given as a query parameter (psycopg's `?password=`).
_NETLOC_PASSWORD = re.compile(r"(\b[\w+]+://[^:/@\s]*:)([^@\s]*)(@)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&\s'\"]*)", re.IGNORECASE)
SCHEMA_LOCK = 0x6175746F74756E65  # PostgreSQL advisory lock key ("autotune") for creating Optuna's tables


def hide_secrets(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: what a file or a message may show."""
    text = _NETLOC_PASSWORD.sub(lambda m: m.group(1) + (MASK if m.group(2) else "") + m.group(3), text)
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK, text)


def _connect_url(url: str) -> str:
    """The URL to connect with: a masked password (read back from search.json, or copied from a
    report) is dropped, so libpq takes it from PGPASSWORD or ~/.pgpass."""
    return url.replace(f":{MASK}@", "@", 1) if f":{MASK}@" in url.split("?", 1)[0] else url


def storage_url(storage: Optional[str], run_dir: Path) -> str:
    """`search.storage`, or the run folder's study.db."""
    return storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def journal_path(url: str, run_dir: Optional[Path] = None) -> Optional[Path]:
    """The journal file `url` names (relative to `run_dir`), or None for a database URL."""
    if url.startswith("journal:"):
        path = Path(url.split(":", 1)[1].removeprefix("//"))
    elif url.endswith((".journal", ".log")) and "://" not in url:
        path = Path(url)
    else:
        return None
    return path if path.is_absolute() or run_dir is None else run_dir / path


def sqlite_path(url: str) -> Optional[Path]:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def check_reachable(url: str) -> None:
    """Before the run folder exists: a storage the user named must answer (the default is made later)."""
    local = journal_path(url) or sqlite_path(url)
    if local is not None:
        if local.is_absolute() and not local.parent.is_dir():
            raise ConfigError(f"search.storage={hide_secrets(url)}: folder {local.parent} does not exist")
        return
    try:
        engine = sqlalchemy.create_engine(_connect_url(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # SQLAlchemy, driver and OS errors all mean: cannot use this storage
        raise ConfigError(f"search.storage={hide_secrets(url)}: cannot connect ({_first_line(e, url)}); {ADVICE}")


def open_storage(url: str, run_dir: Path, create: bool = True) -> Any:
    """An Optuna storage for `url`. `create=False` (a report): a journal or SQLite file must exist,
    never made empty by opening it."""
    journal = journal_path(url, run_dir)
    local = journal or sqlite_path(url)
    if not create and local is not None and not local.is_file():
        raise ConfigError(f"the study's storage {local} does not exist")
    try:
        if journal is not None:
            if not journal.parent.is_dir():
                raise ConfigError(f"search.storage={hide_secrets(url)}: folder {journal.parent} does not exist")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        return _database(_connect_url(url))
    except ConfigError:
        raise
    except Exception as e:  # SQLAlchemy, driver and OS errors all mean: cannot use this storage
        raise ConfigError(f"search.storage={hide_secrets(url)}: cannot open it ({_first_line(e, url)}); {ADVICE}")


def _database(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage, whose first opening creates its tables: safe when several processes
    open a fresh database at once (a job array starts all its workers together)."""
    if sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql":
        with _schema_lock(url):
            return optuna.storages.RDBStorage(url)
    # SQLite: wait for a search process that is writing rather than fail on "database is locked";
    # elsewhere, retry while another process is creating the same tables
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    attempts = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError) as e:
            attempts += 1
            conflict = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
            if not conflict or attempts == 5:
                raise
            time.sleep(0.5 * attempts)


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock while Optuna checks or creates its tables: two processes
    creating them at once collide on the catalog (UniqueViolation on pg_type). The lock is the
    session's, released when its connection closes."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
            yield
    finally:
        engine.dispose()


def _first_line(e: Exception, url: str) -> str:
    """The first line of a driver's error, with no secret of `url` in it."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    secret = _password(url)
    return hide_secrets(text.replace(secret, MASK) if secret else text)


def _password(url: str) -> Optional[str]:
    try:
        password = sqlalchemy.engine.make_url(url).password
    except sqlalchemy.exc.ArgumentError:  # a journal path, not a URL
        return None
    return str(password) if password and password != MASK else None
