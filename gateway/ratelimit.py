"""Token buckets: per connection for control messages (gateway.session) and
per client address for new connections (gateway.access)."""
from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` held. Only the state lives
    here (two floats): the thousands of buckets of one policy share its rate
    and burst, which callers pass in."""

    __slots__ = ("tokens", "at")

    def __init__(self, burst: float, now: float):
        self.tokens = float(burst)
        self.at = now

    def take(self, rate: float, burst: float, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is."""
        tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / rate if rate > 0 else float("inf")

    def full(self, rate: float, burst: float, now: float) -> bool:
        """True once the bucket has refilled: it is as good as a new one."""
        return self.tokens + (now - self.at) * rate >= burst
