"""archive_kms.retry: the one retry loop. What it retries is the error's ``retryable``;
waits follow the backoff or the service's Retry-After; nothing here sleeps for real."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from archive_kms import retry
from archive_kms.errors import (
    ArchiveKmsError,
    KeyThrottledError,
    ObjectExistsError,
    ServiceUnavailableError,
    StorageError,
    TransientError,
    ValidationError,
)


class Flaky:
    """Raises the given errors in turn, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class VendorError(Exception):
    def __init__(self, headers: dict[str, str] | None = None) -> None:
        super().__init__("vendor said no")
        self.response = type("R", (), {"headers": headers or {}})()


def translate(exc: BaseException) -> ArchiveKmsError:
    return ServiceUnavailableError(f"translated {exc}", resource="thing")


def test_backoff_is_capped_exponential_with_equal_jitter():
    b = retry.Backoff(base_delay=0.5, max_delay=4.0)
    assert [b.delay(n, rand=lambda: 0.0) for n in range(1, 6)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [b.delay(n, rand=lambda: 1.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.delay(1, retry_after=3.0, rand=lambda: 1.0) == 3.0  # Retry-After wins when longer
    no_jitter = retry.Backoff(base_delay=0.5, max_delay=8.0, jitter=False)
    assert [no_jitter.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    fixed = retry.Backoff(base_delay=0.2, max_delay=0.2, jitter=False, factor=1)
    assert {fixed.delay(n) for n in range(1, 10)} == {0.2}
    with pytest.raises(ValidationError):
        retry.Backoff(max_attempts=0)


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"Retry-After": "Wed, 25 Nov 2026 06:00:05 GMT"}, 5.0),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_forms(headers, seconds):
    now = datetime(2026, 11, 25, 6, 0, 0, tzinfo=UTC)
    assert retry.retry_after_seconds(headers, now=lambda: now) == seconds


def test_call_retries_what_is_retryable_and_honours_retry_after():
    sleeps: list[float] = []
    fn = Flaky(VendorError({"Retry-After": "3"}), VendorError(), TransientError("busy"))
    out = retry.call(fn, backoff=retry.Backoff(), translate=translate, sleep=sleeps.append, rand=lambda: 0.0)
    assert out == "done" and fn.calls == 4
    assert sleeps == [3.0, 0.5, 1.0]  # Retry-After, then the backoff (0.25 would be attempt 1's)


def test_the_type_decides_not_the_call_site():
    class Retryable(StorageError):  # not a TransientError, yet says a retry helps
        retryable = True

    fn = Flaky(Retryable("once more"))
    assert retry.call(fn, backoff=retry.Backoff(), sleep=lambda s: None) == "done" and fn.calls == 2

    for terminal in (ObjectExistsError("exists"), StorageError("denied"), ValidationError("bad")):
        fn = Flaky(terminal)
        with pytest.raises(type(terminal)) as info:
            retry.call(fn, backoff=retry.Backoff(), sleep=lambda s: pytest.fail("must not wait"))
        assert info.value is terminal and fn.calls == 1

    plain = Flaky(KeyError("not ours"))  # without translate, foreign errors are not retried
    with pytest.raises(KeyError):
        retry.call(plain, backoff=retry.Backoff(), sleep=lambda s: pytest.fail("must not wait"))


def test_call_gives_up_after_the_budget_keeping_the_type_and_the_cause():
    sleeps: list[float] = []
    fn = Flaky(*[VendorError() for _ in range(10)])
    with pytest.raises(ServiceUnavailableError, match="gave up after 3 attempts") as info:
        retry.call(fn, backoff=retry.Backoff(max_attempts=3), translate=translate, sleep=sleeps.append)
    assert fn.calls == 3 and len(sleeps) == 2
    assert info.value.retryable and info.value.resource == "thing"
    assert isinstance(info.value.__cause__, VendorError)

    throttled = Flaky(*[KeyThrottledError("slow down", resource="kv") for _ in range(3)])
    with pytest.raises(KeyThrottledError, match="gave up after 2 attempts"):
        retry.call(throttled, backoff=retry.Backoff(max_attempts=2), sleep=lambda s: None)


def test_a_retry_after_beyond_the_limit_fails_at_once_and_stays_retryable():
    fn = Flaky(VendorError({"Retry-After": "600"}))
    with pytest.raises(ServiceUnavailableError, match="asks to wait 600 s, longer than 60 s") as info:
        retry.call(fn, backoff=retry.Backoff(), translate=translate, sleep=lambda s: pytest.fail("must not wait"))
    assert fn.calls == 1 and info.value.retryable

    err = KeyThrottledError("throttled", resource="kv")
    err.retry_after = 120.0  # set by the adapter that translated it
    with pytest.raises(KeyThrottledError, match="asks to wait 120 s"):
        retry.call(Flaky(err), backoff=retry.Backoff(), sleep=lambda s: pytest.fail("must not wait"))


def test_rounds_repeat_while_work_is_left_and_stop_at_the_budget():
    sleeps: list[float] = []
    left = [3]

    def one_round() -> bool:
        left[0] -= 1
        return left[0] > 0

    b = retry.Backoff(max_attempts=5, base_delay=1.0, max_delay=3.0)
    assert retry.rounds(one_round, backoff=b, sleep=sleeps.append, rand=lambda: 0.0) == 3
    assert sleeps == [0.5, 1.0]
    sleeps.clear()
    assert retry.rounds(lambda: True, backoff=b, sleep=sleeps.append, rand=lambda: 0.0) == 5
    assert sleeps == [0.5, 1.0, 1.5, 1.5]
    with pytest.raises(RuntimeError):
        retry.rounds(Flaky(RuntimeError("the whole request failed")), backoff=b, sleep=sleeps.append)


def test_poll_waits_until_true_or_the_deadline_on_the_callers_clock():
    slept: list[float] = []
    answers = iter([False, False, True])
    fixed = retry.Backoff(base_delay=0.5, max_delay=0.5, jitter=False, factor=1)
    retry.poll(
        lambda: next(answers),
        timeout=10,
        backoff=fixed,
        on_timeout=lambda: AssertionError("no timeout expected"),
        clock=lambda: sum(slept),
        sleep=slept.append,
    )
    assert slept == [0.5, 0.5]

    slept.clear()
    with pytest.raises(ServiceUnavailableError, match="never"):
        retry.poll(
            lambda: False,
            timeout=2,
            backoff=fixed,
            on_timeout=lambda: ServiceUnavailableError("never"),
            clock=lambda: sum(slept),
            sleep=slept.append,
        )
    assert sum(slept) == 2.0  # checked at 0, 0.5, ..., 2.0; gave up at the deadline

    slept.clear()
    with pytest.raises(ServiceUnavailableError):
        retry.poll(
            lambda: False,
            timeout=5,
            backoff=retry.Backoff(base_delay=1.0, max_delay=8.0, jitter=False),
            on_timeout=lambda: ServiceUnavailableError("never"),
            clock=lambda: sum(slept),
            sleep=slept.append,
            wait_must_fit=True,
        )
    assert slept == [1.0, 2.0]  # the next wait (4 s) would end past the deadline
