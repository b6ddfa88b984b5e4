"""Errors that name the offending field, shared by the manifest, distributor and lookup."""

from __future__ import annotations

from typing import Any

__all__ = ["FieldError"]


class FieldError(ValueError):
    """Bad input. ``field`` is its path (``spec.distribution.counts``), ``value`` what was given."""

    def __init__(self, field: str, value: Any, message: str):
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}: {message} (got {value!r})")
