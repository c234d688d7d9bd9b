"""Calls to the MLflow tracking store: retried while it fails, raised at once when it rejects a request."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException

from fsg_endo.errors import FsgEndoError


class TrackingError(FsgEndoError):
    """The tracking store failed for longer than the tracker tolerates, or rejected a request."""


class TrackingOutage(TrackingError):
    """The tracking store kept failing for longer than the tracker tolerates."""


def _transient(err: Exception) -> bool:
    """Whether a store error may pass on retry: anything but MLflow refusing the request itself (HTTP 4xx)."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return not 400 <= status < 500 or status in (408, 429)
    return True


def _lost_insert_race(err: Exception) -> bool:
    """Whether the store refused a row another writer inserted between this request's lookup and its insert
    (SQLite's IntegrityError, PostgreSQL's UniqueViolation): the same request, repeated, finds the row."""
    return isinstance(err, MlflowException) and ("IntegrityError" in str(err) or "UniqueViolation" in str(err))


def retry_store(
    fn: Callable[[], Any], uri: str, max_outage: float, first_backoff: float = 0.5, max_backoff: float = 30.0
) -> Any:
    """``fn()``, retried with exponential backoff while the store fails (unreachable, or SQLite's "database is
    locked") for less than ``max_outage`` seconds; a request the store rejects raises at once, except that one
    lost insert race (two sweep children logging one dataset) is repeated at once."""
    first_failure, delay, raced = None, first_backoff, False
    while True:
        try:
            return fn()
        except Exception as err:
            if _lost_insert_race(err) and not raced:
                raced = True
                continue
            if not _transient(err):
                raise TrackingError(
                    f"tracking store {uri} rejected a request: {str(err).splitlines()[0][:200]}"
                ) from err
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if now - first_failure >= max_outage:
                raise TrackingOutage(
                    f"tracking store {uri} failed for {now - first_failure:.1f} s: {str(err).splitlines()[0][:200]}"
                ) from err
            time.sleep(min(delay, max_backoff, max_outage - (now - first_failure)))
            delay *= 2
