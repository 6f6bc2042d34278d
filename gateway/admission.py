"""Admission control: per-key rate limits and the gateway's concurrency cap with a bounded queue.

- **Per key** (`api_keys[].requests_per_minute`, `tokens_per_minute`): token buckets that refill
  continuously, each holding at most one minute's allowance. A request takes one request token when
  it is admitted; its tokens (prompt + completion, as vLLM counted them) are charged when it ends, so
  the token bucket may go into debt, and a key in debt is refused until it has refilled. Beyond
  either: 429 `rate_limit_exceeded` with `Retry-After` (whole seconds until the bucket allows it).
  `api_keys[].max_concurrent_requests` bounds a key's requests in flight (from admission to their
  end, queued ones included), so one key cannot fill the whole cap: beyond it, 429 with
  `Retry-After: 1`.
- **Concurrency**: at most `max_concurrent_requests` requests talk to vLLM at once; up to
  `max_queued_requests` more wait, each at most `queue_timeout_s`; beyond that, or after waiting
  that long, 503 `overloaded` with `Retry-After`. Memory stays bounded whatever clients send.

State is per gateway process (`--workers N` gives each worker its own buckets and cap: divide the
limits by N). Pure bookkeeping: the clock is injected; knows nothing about HTTP or upstreams.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import GatewayOverloaded, RateLimited


@dataclass
class TokenBucket:
    """`capacity` tokens at most, refilled at `rate_per_s`; starts full."""

    rate_per_s: float
    capacity: float
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self.updated = -math.inf

    def _refill(self, now: float) -> None:
        if self.updated == -math.inf:
            self.updated = now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens are there (0 when they are now)."""
        self._refill(now)
        return max(0.0, (amount - self.tokens) / self.rate_per_s)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount


@dataclass
class KeyBuckets:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    max_concurrent: int | None = None
    in_flight: int = 0


def per_minute(limit: int | None) -> TokenBucket | None:
    return None if limit is None else TokenBucket(rate_per_s=limit / 60.0, capacity=float(limit))


class Admission:
    def __init__(
        self,
        *,
        max_concurrent: int,
        max_queued: int,
        queue_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._buckets: dict[str, KeyBuckets] = {}
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self.waiting = 0
        self.active = 0

    # --- per-key rates -----------------------------------------------------------------------------
    def limit_key(
        self,
        name: str,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        max_concurrent: int | None = None,
    ) -> None:
        if requests_per_minute is None and tokens_per_minute is None and max_concurrent is None:
            return
        self._buckets[name] = KeyBuckets(
            per_minute(requests_per_minute), per_minute(tokens_per_minute), max_concurrent=max_concurrent
        )

    def admit(self, key_name: str | None) -> None:
        """Take one request of `key_name`'s allowance, or raise RateLimited (429) saying when to retry.

        An admitted request counts as in flight for its key until `finished` is called for it."""
        buckets = self._buckets.get(key_name) if key_name is not None else None
        if buckets is None:
            return
        if buckets.max_concurrent is not None and buckets.in_flight >= buckets.max_concurrent:
            raise RateLimited(
                f"this API key has {buckets.in_flight} requests in flight, its limit; retry when one has ended",
                retry_after_s=1,
            )
        now = self._clock()
        waits = []
        if buckets.requests is not None:
            waits.append(("requests", buckets.requests.wait_for(1.0, now)))
        if buckets.tokens is not None:
            # Any positive balance admits a request: its size is known only when it ends.
            waits.append(("tokens", buckets.tokens.wait_for(min(1.0, buckets.tokens.capacity), now)))
        limited = [(what, wait) for what, wait in waits if wait > 0]
        if limited:
            what, wait = max(limited, key=lambda item: item[1])
            raise RateLimited(
                f"this API key is over its {what} per minute; retry in {math.ceil(wait)} s",
                retry_after_s=math.ceil(wait),
            )
        if buckets.requests is not None:
            buckets.requests.take(1.0, now)
        buckets.in_flight += 1

    def finished(self, key_name: str | None, tokens: int) -> None:
        """An admitted request of `key_name` ended: it leaves the key's in-flight count and its tokens
        are charged (the balance may go negative). Call exactly once per admitted request."""
        buckets = self._buckets.get(key_name) if key_name is not None else None
        if buckets is None:
            return
        buckets.in_flight = max(0, buckets.in_flight - 1)
        if buckets.tokens is not None and tokens > 0:
            buckets.tokens.take(float(tokens), self._clock())

    # --- concurrency ---------------------------------------------------------------------------------
    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot (bounded queue, bounded wait); returns its release, safe to call twice.

        Raises GatewayOverloaded (503) when the queue is full or the wait times out."""
        if self._slots.locked():
            if self.waiting >= self._max_queued:
                raise GatewayOverloaded("the gateway is at its concurrency limit and its queue is full; retry shortly")
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self._queue_timeout_s)
            except TimeoutError:
                raise GatewayOverloaded(
                    f"the gateway is at its concurrency limit; no slot freed within {self._queue_timeout_s:g} s"
                ) from None
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1
                self._slots.release()

        return release
