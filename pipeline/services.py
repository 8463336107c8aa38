"""Checks that the external services a run needs answer, before any work starts.

A tracking server or database that is down should stop a run at once with one line, not after a stage has
computed for an hour (or behind minutes of MLflow's HTTP retries). Local stores (``sqlite:``, ``file:``, plain
paths) are not checked: opening them is the stage's business.
"""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.parse
import urllib.request

from omegaconf import DictConfig

from pipeline.errors import UserError
from pipeline.search.study import hide_password

RDB_SCHEMES = ("postgresql", "mysql")


def check_services(cfg: DictConfig, stages: list[str], timeout_s: float = 5) -> None:
    """Check ``tracking.uri`` if set, and ``adapters.optuna.storage`` if set and ``adapters`` is to run."""
    if cfg.tracking.get("uri"):
        check_tracking_uri(str(cfg.tracking.uri), timeout_s, name="tracking.uri")
    if "adapters" in stages and cfg.adapters.optuna.get("storage"):
        check_rdb_url(str(cfg.adapters.optuna.storage), timeout_s, name="adapters.optuna.storage")


def check_tracking_uri(uri: str, timeout_s: float = 5, *, name: str = "tracking server") -> None:
    """An http(s) tracking URI must answer ``GET <uri>/health``; a database URI must accept a connection."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_health(uri, timeout_s, name)
    elif scheme.startswith(RDB_SCHEMES):
        check_rdb_url(uri, timeout_s, name=name)


def check_rdb_url(url: str, timeout_s: float = 5, *, name: str = "database") -> None:
    """A PostgreSQL or MySQL URL (any SQLAlchemy driver) must accept a connection within ``timeout_s``."""
    if not urllib.parse.urlsplit(url).scheme.lower().startswith(RDB_SCHEMES):
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": max(1, round(timeout_s))})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        hint = ""
        if isinstance(err, ImportError) and urllib.parse.urlsplit(url).scheme.lower() == "postgresql":
            hint = "; name the installed driver: postgresql+psycopg://..."
        raise UserError(f"{name} {hide_password(url)}: cannot connect ({_reason(err, url)}{hint})") from None


def _check_health(uri: str, timeout_s: float, name: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    headers = {}
    if parts.username is not None:  # urllib does not take credentials in the URL; send them as basic auth
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
        parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
    health = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/health", query="", fragment=""))
    try:
        with urllib.request.urlopen(urllib.request.Request(health, headers=headers), timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # it answers; credentials are MLflow's business
            return
        reason = f"GET /health answered HTTP {err.code}: is it an MLflow tracking server?"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = _reason(getattr(err, "reason", err), uri)
    raise UserError(f"{name} {hide_password(uri)}: no MLflow tracking server answers ({reason})")


def _reason(err: object, url: str) -> str:
    """The first line of an error, without the driver's class name and with any password in it hidden."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\([\w.]+\) ", "", text)  # SQLAlchemy's "(psycopg.OperationalError) " prefix
    text = re.sub(r"\s+", " ", text)
    password = urllib.parse.urlsplit(url).password
    if password:
        text = text.replace(password, "***")
    return hide_password(text) or type(err).__name__
