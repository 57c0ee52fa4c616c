"""What the CLIs that talk to the service over HTTP share: request headers and the replay's retries.

Image types, the deadline header, error answers and the retry policy (tenacity underneath) are the
package client's (``service.client``).
"""

from __future__ import annotations

import httpx

from service.client import (
    MAX_TIMEOUT_MS,
    TIMEOUT_HEADER,
    RetryPolicy,
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


def replay_retry_policy(retries: int, backoff_s: float) -> RetryPolicy:
    """The eval replay's policy: ``retries`` more tries after the first of any transport error or
    of a :data:`RETRYABLE_STATUSES` answer."""
    return RetryPolicy(attempts=retries + 1, backoff_s=backoff_s, statuses=RETRYABLE_STATUSES,
                       transport_errors=(httpx.TransportError,))
