"""RetryPolicy backoff/retry decisions and MemoryPolicy sizes/verdicts (pure, no real time)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from orchestra_nb._exceptions import ResultTooLargeError, SerializationError
from orchestra_nb._policy import MemoryPolicy, RetryPolicy, parse_size

GB = 10**9
GIB = 2**30


# --- RetryPolicy: backoff ---------------------------------------------------------------------


def test_schedule_without_jitter_is_exact() -> None:
    policy = RetryPolicy(retries=5, backoff=0.5, factor=2.0, max_backoff=100.0, jitter=0.1)
    assert policy.schedule(lambda: 0.5) == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_jitter_bounds_follow_rand() -> None:
    policy = RetryPolicy(retries=2, backoff=1.0, factor=3.0, jitter=0.25)
    assert policy.schedule(lambda: 0.0) == [0.75, 2.25]
    assert policy.delay(2, lambda: 0.75) == pytest.approx(3.0 * 1.125)
    # rand() never reaches 1, so the upper bound is approached, not hit.
    assert policy.delay(1, lambda: 0.999999) == pytest.approx(1.25, rel=1e-5)


def test_jitter_zero_ignores_rand() -> None:
    policy = RetryPolicy(retries=3, backoff=0.1, factor=2.0, jitter=0.0)
    assert policy.schedule(lambda: 0.0) == policy.schedule(lambda: 0.9) == [0.1, 0.2, 0.4]


def test_schedule_draws_once_per_retry() -> None:
    draws = iter([0.0, 0.5, 0.0])
    policy = RetryPolicy(retries=3, backoff=1.0, factor=2.0, jitter=0.5)
    assert policy.schedule(lambda: next(draws)) == [0.5, 2.0, 2.0]


def test_delay_caps_at_max_backoff_before_jitter() -> None:
    policy = RetryPolicy(retries=6, backoff=1.0, factor=10.0, max_backoff=50.0, jitter=0.2)
    assert policy.schedule(lambda: 0.5) == [1.0, 10.0, 50.0, 50.0, 50.0, 50.0]
    assert policy.delay(4, lambda: 0.0) == pytest.approx(40.0)


def test_delay_survives_float_overflow() -> None:
    policy = RetryPolicy(retries=5000, backoff=1.0, factor=10.0, max_backoff=7.0, jitter=0.0)
    assert policy.delay(5000, lambda: 0.5) == 7.0


def test_no_retries_means_empty_schedule() -> None:
    assert RetryPolicy().schedule(lambda: 0.5) == []


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_delay_rejects_rand_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"rand\(\)"):
        RetryPolicy(retries=1).delay(1, lambda: bad)


def test_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy(retries=1).delay(0, lambda: 0.5)


# --- RetryPolicy: should_retry ----------------------------------------------------------------


def test_should_retry_counts_attempts() -> None:
    policy = RetryPolicy(retries=2)
    err = RuntimeError("flaky")
    assert [policy.should_retry(err, n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    assert not RetryPolicy().should_retry(err, 1)
    with pytest.raises(ValueError, match="attempt"):
        policy.should_retry(err, 0)


def test_should_retry_respects_retry_on_with_subclasses() -> None:
    policy = RetryPolicy(retries=3, retry_on=(ConnectionError, TimeoutError))
    assert policy.should_retry(ConnectionResetError(), 1)  # subclass of ConnectionError
    assert policy.should_retry(TimeoutError(), 1)
    assert not policy.should_retry(ValueError(), 1)
    assert not RetryPolicy(retries=3, retry_on=()).should_retry(ValueError(), 1)


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        SystemExit(1),
        SerializationError("cannot pickle"),
        ResultTooLargeError("too big"),
    ],
)
def test_never_retried_even_when_listed(exc: BaseException) -> None:
    policy = RetryPolicy(retries=10, retry_on=(BaseException,))
    assert not policy.should_retry(exc, 1)


# --- RetryPolicy: coerce and validation -------------------------------------------------------


def test_coerce() -> None:
    assert RetryPolicy.coerce(None) == RetryPolicy()
    assert RetryPolicy.coerce(3) == RetryPolicy(retries=3)
    policy = RetryPolicy(retries=1, backoff=2.0)
    assert RetryPolicy.coerce(policy) is policy
    for bad in (True, 1.5, "3"):
        with pytest.raises(TypeError, match="retries"):
            RetryPolicy.coerce(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retries": -1}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"factor": 0.5}, "factor"),
        ({"max_backoff": -1.0}, "max_backoff"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"backoff": float("inf")}, "backoff"),
        ({"factor": float("nan")}, "factor"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"RetryPolicy.{field}"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retries": 1.0}, "retries"),
        ({"retries": True}, "retries"),
        ({"backoff": "1"}, "backoff"),
        ({"retry_on": ValueError}, "retry_on"),
        ({"retry_on": (ValueError, int)}, "retry_on"),
    ],
)
def test_wrong_types_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(TypeError, match=f"RetryPolicy.{field}"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_policy_is_frozen_and_slotted() -> None:
    policy = RetryPolicy(retries=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.retries = 2  # type: ignore[misc]
    assert not hasattr(policy, "__dict__")


# --- memory sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2 * GB),
        ("2 gb", 2 * GB),
        ("2G", 2 * GB),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", int(1.5 * GIB)),
        ("100kB", 100_000),
        ("3KiB", 3072),
        ("1TB", 10**12),
        ("2TiB", 2 * 2**40),
        ("123", 123),
        ("123B", 123),
        (" 7 MB ", 7 * 10**6),
        (".5KiB", 512),
    ],
)
def test_parse_size_strings(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_numbers_and_fractions() -> None:
    assert parse_size(1_000_000) == 1_000_000
    assert parse_size(0.5, total_memory=16 * GIB) == 8 * GIB
    assert parse_size(1.0, total_memory=1000) == 1000
    assert parse_size("25%", total_memory=1000) == 250
    assert parse_size("0.25", total_memory=1000) == 250  # a bare number reads as that number


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "cannot parse"),
        ("2XB", "unknown unit"),
        ("-1GB", "cannot parse"),
        (0, "at least 1 byte"),
        (-5, "at least 1 byte"),
        ("0MB", "at least 1 byte"),
        (1.5, "within"),
        (0.0, "within"),
        ("150%", "within"),
    ],
)
def test_parse_size_rejects(value: int | float | str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(value, total_memory=GB)


def test_parse_size_fraction_needs_total_memory() -> None:
    with pytest.raises(ValueError, match="total_memory"):
        parse_size(0.5)
    with pytest.raises(ValueError, match="total_memory"):
        parse_size("50%")


def test_parse_size_rejects_bool_and_other_types() -> None:
    for bad in (True, None, [1]):
        with pytest.raises(TypeError, match="memory size"):
            parse_size(bad)  # type: ignore[arg-type]


# --- MemoryPolicy -----------------------------------------------------------------------------


def test_memory_parse_builds_limits() -> None:
    policy = MemoryPolicy.parse("1GB", 0.5, total_memory=4 * GB)
    assert policy == MemoryPolicy(soft_limit=GB, hard_limit=2 * GB)
    assert MemoryPolicy.parse() == MemoryPolicy(None, None)
    assert MemoryPolicy.parse(hard_limit="512MiB").hard_limit == 512 * 2**20


def test_memory_verdicts() -> None:
    policy = MemoryPolicy(soft_limit=100, hard_limit=200)
    verdicts = [policy.verdict(rss) for rss in (0, 100, 101, 200, 201)]
    assert verdicts == ["ok", "ok", "recycle", "recycle", "kill"]


def test_memory_verdicts_with_one_limit() -> None:
    assert [MemoryPolicy(soft_limit=10).verdict(r) for r in (10, 11)] == ["ok", "recycle"]
    assert [MemoryPolicy(hard_limit=10).verdict(r) for r in (10, 11)] == ["ok", "kill"]
    assert MemoryPolicy().verdict(10**15) == "ok"
    assert MemoryPolicy(soft_limit=10, hard_limit=10).verdict(11) == "kill"


def test_memory_soft_must_not_exceed_hard() -> None:
    with pytest.raises(
        ValueError, match=r"soft_limit \(2000\) must not exceed hard_limit \(1000\)"
    ):
        MemoryPolicy(soft_limit=2000, hard_limit=1000)
    with pytest.raises(ValueError, match="soft_limit"):
        MemoryPolicy.parse("2GB", "1GB")


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"soft_limit": 0}, ValueError, "soft_limit"),
        ({"hard_limit": -1}, ValueError, "hard_limit"),
        ({"soft_limit": "2GB"}, TypeError, "soft_limit"),
        ({"hard_limit": 1.5}, TypeError, "hard_limit"),
        ({"hard_limit": True}, TypeError, "hard_limit"),
    ],
)
def test_memory_invalid_limits_name_the_field(
    kwargs: dict[str, object], error: type[Exception], field: str
) -> None:
    with pytest.raises(error, match=f"MemoryPolicy.{field}"):
        MemoryPolicy(**kwargs)  # type: ignore[arg-type]


def test_memory_policy_is_frozen_and_slotted() -> None:
    policy = MemoryPolicy(soft_limit=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.soft_limit = 2  # type: ignore[misc]
    assert not hasattr(policy, "__dict__")
