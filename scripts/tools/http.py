"""What the CLIs that talk to the service over HTTP share: request headers and retries.

Image types, the deadline header and error answers are the package client's (``service.client``). Retries use
tenacity (waits, attempt counting and re-raising the last failure are its job); the policy that
decides what is retried and how long to wait is :class:`RetryPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from service.client import (
    MAX_TIMEOUT_MS,
    TIMEOUT_HEADER,
    UnknownImageType,
    image_content_type,
)

# eval replay retries server errors too (a replica restarting behind a load balancer), not only the
# "try again later" answers the client library retries
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


def image_headers(body: bytes, timeout_s: float) -> dict[str, str]:
    """Headers of a raw-body ``/predict`` request: the image's Content-Type and the deadline
    (``timeout_s`` in milliseconds, at most the service's largest).

    Raises:
        UnknownImageType: ``body`` is not an image type the service accepts.
    """
    content_type = image_content_type(body)
    if content_type is None:
        raise UnknownImageType("not a JPEG, PNG, WebP or BMP file")
    return {"Content-Type": content_type, TIMEOUT_HEADER: str(min(int(timeout_s * 1000), MAX_TIMEOUT_MS))}


class RetryableFailure(Exception):
    """An attempt that may succeed when repeated: a transport error, or an answer whose status is in
    :data:`RETRYABLE_STATUSES`; the message says why, ``retry_after`` is the answer's Retry-After."""

    def __init__(self, reason: str, retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first; waits ``backoff_s * 2**attempt`` seconds (at most
    ``max_delay_s``), or the answer's Retry-After when it gives one."""

    retries: int = 4
    backoff_s: float = 0.5
    max_delay_s: float = 30.0

    def delay_s(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait after the failed attempt number ``attempt`` (0 for the first)."""
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_delay_s)
        return min(self.backoff_s * 2**attempt, self.max_delay_s)

    def _wait(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        return self.delay_s(state.attempt_number - 1, getattr(failure, "retry_after", None))

    def retrying(self) -> AsyncRetrying:
        """A tenacity retryer: ``await policy.retrying()(attempt, *args)`` calls the coroutine
        function ``attempt`` until it returns, raises anything but :class:`RetryableFailure`, or
        has failed ``retries + 1`` times, which re-raises its last :class:`RetryableFailure`."""
        return AsyncRetrying(stop=stop_after_attempt(self.retries + 1), wait=self._wait,
                             retry=retry_if_exception_type(RetryableFailure), reraise=True)
