"""Per-key submission rate limit, counted in Redis so that it holds across API processes.

A fixed one-minute window per key: ``INCR`` + ``EXPIRE`` in one transaction. Over the limit
the caller learns how many seconds remain in the window (for ``Retry-After``).
"""

from __future__ import annotations

import time

import redis


def hit(client: redis.Redis, owner: str, limit_per_minute: int, now: float | None = None) -> int | None:
    """Count one submission; returns None when allowed, else seconds until the window ends."""
    if limit_per_minute <= 0:
        return None
    now = time.time() if now is None else now
    window = int(now // 60)
    key = f"heatmaps:ratelimit:{owner or '-'}:{window}"
    pipe = client.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, 120)
    count, _ = pipe.execute()
    if count > limit_per_minute:
        return max(1, int((window + 1) * 60 - now + 0.999))
    return None
