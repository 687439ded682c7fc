"""Where a study lives: the Optuna storage behind `search.storage`, for the search and the report.

`search.storage` unset: `<run_dir>/study.db` (SQLite). Otherwise a SQLAlchemy URL, or a journal
file (a path ending in .journal or .log, or journal:///path): Optuna's JournalFileStorage, what
several local search processes should share. A storage that cannot be used is the user's
ConfigError, said before anything is written.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import optuna
import sqlalchemy

from autotune.engine.config import ConfigError

ADVICE = "give a reachable SQLAlchemy URL or a .journal file path, or leave it unset for study.db in the run folder"


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
            raise ConfigError(f"search.storage={url}: folder {local.parent} does not exist")
        return
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # SQLAlchemy, driver and OS errors all mean: cannot use this storage
        raise ConfigError(f"search.storage={url}: cannot connect ({_first_line(e)}); {ADVICE}")


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
                raise ConfigError(f"search.storage={url}: folder {journal.parent} does not exist")
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        return _database(url)
    except ConfigError:
        raise
    except Exception as e:  # SQLAlchemy, driver and OS errors all mean: cannot use this storage
        raise ConfigError(f"search.storage={url}: cannot open it ({_first_line(e)}); {ADVICE}")


def _database(url: str) -> optuna.storages.RDBStorage:
    # SQLite: wait for a search process that is writing rather than fail on "database is locked"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    attempts = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except sqlalchemy.exc.OperationalError as e:
            attempts += 1
            if "already exists" not in str(e) or attempts == 3:
                raise  # not two processes creating the schema at once
            time.sleep(1.0)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
