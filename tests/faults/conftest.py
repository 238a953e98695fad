"""Shared helpers of the fault-tolerance suite (issue 4)."""

from __future__ import annotations


# make_pool lives in tests/conftest.py (the local backend's tests use it too).
