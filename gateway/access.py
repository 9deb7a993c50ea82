"""Who may connect: origins, per-IP and per-user limits, connect rate, JWT.

``AccessPolicy.admit(request, peer_ip)`` runs once per WebSocket upgrade and
returns an Admission (the connection goes ahead) or a Refusal (an HTTP
status and a JSON body; no WebSocket session is opened). Nothing here runs
after the upgrade, so authentication costs the fan-out nothing.
"""
from __future__ import annotations

import ipaddress
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

from . import protocol
from .ratelimit import TokenBucket


@dataclass(slots=True)
class Admission:
    ip: str
    user_id: str | None = None
    max_symbols: int | None = None     # from the token's max_symbols claim
    expires_at: float | None = None    # the token's exp (epoch seconds)


@dataclass(slots=True)
class Refusal:
    status: int
    reason: str                        # metrics label: origin, ip_limit, ...
    message: str
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return protocol.refusal_body(self.message)


class AccessPolicy:
    def __init__(self, config, clock=time.monotonic, wall=time.time):
        self.clock = clock
        self.wall = wall
        self.max_per_ip = config.max_connections_per_ip
        self.max_per_user = config.max_connections_per_user
        self.rate = config.connect_rate
        self.burst = float(config.connect_burst or max(1.0, 2 * config.connect_rate))
        self.origins = {o.lower().rstrip("/") for o in config.allowed_origins}
        self.proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self.jwt_key, self.jwt_algorithms = _jwt_key(config)
        if self.jwt_key is not None:
            # Imported now, not at the first upgrade: a cold import of PyJWT
            # and cryptography holds the event loop for ~100 ms.
            import jwt  # noqa: F401
        self.per_ip: dict[str, int] = {}
        self.per_user: dict[str, int] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.refusals: dict[str, int] = {}

    @property
    def auth_enabled(self) -> bool:
        return self.jwt_key is not None

    # --- the upgrade decision ---------------------------------------------------
    def admit(self, request, peer_ip: str) -> Admission | Refusal:
        headers = request.headers
        # A proxy may add its own header line rather than extend the client's:
        # every line, in order, is one list of hops.
        ip = self.client_ip(peer_ip, ",".join(headers.getall("X-Forwarded-For", ())) or None)
        if self.origins:
            origin = headers.get("Origin")
            # Browsers always send Origin; a client without one is not a
            # browser page, and the check exists for browser pages.
            if origin is not None and origin.lower().rstrip("/") not in self.origins:
                return self._refuse(403, "origin", f"Origin {origin!r} is not allowed")
        if self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
            return self._refuse(429, "ip_limit",
                                f"Too many connections from this address (limit {self.max_per_ip})")
        if self.rate:
            wait = self._take_connect_token(ip)
            if wait:
                return self._refuse(429, "connect_rate",
                                    f"Too many new connections from this address "
                                    f"(limit {self.rate:g}/s); retry later",
                                    {"Retry-After": str(max(1, int(wait + 0.999)))})
        admission = Admission(ip=sys.intern(ip))
        if self.jwt_key is not None:
            refused = self._authenticate(request, admission)
            if refused is not None:
                return refused
            user = admission.user_id
            if self.max_per_user and user is not None and self.per_user.get(user, 0) >= self.max_per_user:
                return self._refuse(429, "user_limit",
                                    f"Too many connections for this user (limit {self.max_per_user})")
        return admission

    def connected(self, a: Admission) -> None:
        self.per_ip[a.ip] = self.per_ip.get(a.ip, 0) + 1
        if a.user_id is not None:
            self.per_user[a.user_id] = self.per_user.get(a.user_id, 0) + 1

    def disconnected(self, a: Admission) -> None:
        _decrement(self.per_ip, a.ip)
        if a.user_id is not None:
            _decrement(self.per_user, a.user_id)

    # --- pieces -----------------------------------------------------------------
    def client_ip(self, peer_ip: str, forwarded_for: str | None) -> str:
        """The peer, or for a trusted proxy the last untrusted X-Forwarded-For hop."""
        if not forwarded_for or not self._trusted(peer_ip):
            return peer_ip
        for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer_ip  # garbage in the header: believe nothing of it
            if not self._trusted(hop):
                return hop
        return peer_ip

    def _trusted(self, ip: str) -> bool:
        if not self.proxies:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.proxies)

    def _take_connect_token(self, ip: str) -> float:
        """0 if a connection may start now, else seconds until it may."""
        now = self.clock()
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) > 10000:
                self._prune(now)
            bucket = self.buckets[ip] = TokenBucket(self.burst, now)
        return bucket.take(self.rate, self.burst, now)

    def _prune(self, now: float) -> None:
        # Forget addresses whose bucket has refilled: they are as good as new.
        full = [ip for ip, b in self.buckets.items() if b.full(self.rate, self.burst, now)]
        for ip in full:
            del self.buckets[ip]

    def _authenticate(self, request, admission: Admission) -> Refusal | None:
        import jwt
        token = _token(request)
        if token is None:
            return self._refuse(401, "auth_missing",
                                "Missing token: send ?token=<JWT> or 'Authorization: Bearer <JWT>'")
        try:
            claims = jwt.decode(token, self.jwt_key, algorithms=self.jwt_algorithms,
                                options={"require": ["sub"]})
        except jwt.ExpiredSignatureError:
            return self._refuse(401, "auth_expired", "Token expired")
        except jwt.ImmatureSignatureError:
            return self._refuse(401, "auth_not_yet_valid", "Token not yet valid (nbf/iat in the future)")
        except jwt.InvalidSignatureError:
            return self._refuse(401, "auth_bad_signature", "Token signature is invalid")
        except jwt.InvalidAlgorithmError:
            return self._refuse(401, "auth_bad_algorithm",
                                f"Token algorithm not allowed (accepted: {', '.join(self.jwt_algorithms)})")
        except jwt.MissingRequiredClaimError as exc:
            return self._refuse(401, "auth_bad_claims", f"Token is missing the {exc.claim!r} claim")
        except jwt.DecodeError:
            return self._refuse(401, "auth_malformed", "Token is malformed")
        except jwt.InvalidTokenError as exc:
            return self._refuse(401, "auth_invalid", f"Token is invalid: {exc}")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return self._refuse(401, "auth_bad_claims", "Token 'sub' must be a non-empty string")
        limit = claims.get("max_symbols")
        if limit is not None and (type(limit) is not int or not 1 <= limit <= 10000):
            return self._refuse(401, "auth_bad_claims", "Token 'max_symbols' must be an integer 1-10000")
        exp = claims.get("exp")
        admission.user_id = sys.intern(sub)
        admission.max_symbols = limit
        admission.expires_at = float(exp) if isinstance(exp, (int, float)) else None
        return None

    def _refuse(self, status: int, reason: str, message: str, headers: dict | None = None) -> Refusal:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return Refusal(status, reason, message, headers or {})


def _decrement(counts: dict, key) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


def _token(request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    _, _, query = request.path.partition(b"?")
    if query:
        values = urllib.parse.parse_qs(query.decode("latin-1")).get("token")
        if values and values[0]:
            return values[0]
    return None


def _jwt_key(config):
    if config.jwt_secret:
        return config.jwt_secret, ["HS256"]
    if config.jwt_public_key:
        return config.jwt_public_key, ["RS256", "ES256"]
    return None, []
