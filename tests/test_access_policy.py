"""AccessPolicy.admit without sockets: a fake upgrade request and a fake clock.

The request carries what picows hands the listener factory: ``headers``, a
multidict.CIMultiDict (case-insensitive, one entry per header line, with get
and getall), and ``path``, the raw request target in bytes, query included.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from multidict import CIMultiDict

from gateway.access import AccessPolicy, Admission, Refusal
from gateway.config import Config

SECRET = "k" * 64          # long enough for HS256 and HS512 without PyJWT's key warning
PEER = "198.51.100.10"


class FakeRequest:
    def __init__(self, *headers: tuple[str, str], path: bytes = b"/"):
        self.headers = CIMultiDict()
        for name, value in headers:
            self.headers.add(name, value)
        self.path = path


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy(clock=None, **settings) -> AccessPolicy:
    settings.setdefault("max_connections_per_ip", 0)
    return AccessPolicy(Config(**settings), clock=clock or Clock(), wall=lambda: 1.7e9)


def admit(p: AccessPolicy, *headers, path=b"/", ip=PEER):
    return p.admit(FakeRequest(*headers, path=path), ip)


def assert_refused(decision, status: int, reason: str) -> Refusal:
    assert isinstance(decision, Refusal), decision
    assert (decision.status, decision.reason) == (status, reason), decision
    return decision


def token(claims=None, key=SECRET, alg="HS256", **extra) -> str:
    body = {"sub": "alice"} if claims is None else dict(claims)
    body.update(extra)
    return jwt.encode(body, key, algorithm=alg)


def bearer(tok: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {tok}")


# --- no policy configured -----------------------------------------------------------------

def test_open_policy_admits_anything():
    p = policy()
    a = admit(p, ("Origin", "https://anything.example"), ("X-Forwarded-For", "1.2.3.4"))
    assert a == Admission(ip=PEER)
    assert not p.auth_enabled and p.refusals == {}


# --- origins ----------------------------------------------------------------------------

ORIGINS = ("https://app.example", "http://dev.example:8080/")


@pytest.mark.parametrize("origin", [
    None,                                   # not a browser page: allowed
    "https://app.example",
    "HTTPS://APP.EXAMPLE",
    "https://app.example/",
    "http://dev.example:8080",
    "http://Dev.Example:8080/",
])
def test_origin_allowed(origin):
    headers = [] if origin is None else [("origin", origin)]
    assert isinstance(admit(policy(allowed_origins=ORIGINS), *headers), Admission)


@pytest.mark.parametrize("origin", [
    "https://evil.example",
    "http://app.example",                    # scheme matters
    "https://app.example:443",               # compared as text, no port normalisation
    "https://app.example.evil.example",
    "https://app.example/path",
    "null",
    "",
])
def test_origin_refused(origin):
    p = policy(allowed_origins=ORIGINS)
    r = assert_refused(admit(p, ("Origin", origin)), 403, "origin")
    assert r.message == f"Origin {origin!r} is not allowed"
    assert p.refusals == {"origin": 1}


# --- per-IP limit ------------------------------------------------------------------------

def test_per_ip_limit_and_bookkeeping():
    p = policy(max_connections_per_ip=2)
    a1, a2 = admit(p), admit(p)
    p.connected(a1)
    assert isinstance(admit(p), Admission)      # admitted but not connected: not counted
    p.connected(a2)
    assert p.per_ip == {PEER: 2}
    r = assert_refused(admit(p), 429, "ip_limit")
    assert "limit 2" in r.message
    assert isinstance(admit(p, ip="198.51.100.11"), Admission)
    p.disconnected(a1)
    assert p.per_ip == {PEER: 1}
    assert isinstance(admit(p), Admission)
    p.disconnected(a2)
    assert p.per_ip == {}                        # no zero entries left behind
    p.disconnected(a2)                           # an extra one never goes negative
    assert p.per_ip == {}
    assert p.refusals == {"ip_limit": 1}


def test_per_ip_zero_means_no_limit():
    p = policy(max_connections_per_ip=0)
    for _ in range(500):
        p.connected(admit(p))
    assert p.per_ip == {PEER: 500}
    assert isinstance(admit(p), Admission)


# --- connect rate -------------------------------------------------------------------------

def test_connect_rate_burst_defaults_to_twice_the_rate():
    clock = Clock()
    p = policy(clock, connect_rate=2)
    assert p.burst == 4.0
    for _ in range(4):
        assert isinstance(admit(p), Admission)
    r = assert_refused(admit(p), 429, "connect_rate")
    assert r.headers == {"Retry-After": "1"}     # 0.5 s, rounded up
    assert "limit 2/s" in r.message
    assert isinstance(admit(p, ip="198.51.100.11"), Admission)  # per address
    clock.t += 0.5
    assert isinstance(admit(p), Admission)
    assert_refused(admit(p), 429, "connect_rate")


@pytest.mark.parametrize("rate, burst, expected", [(0.2, 0, 1.0), (0.5, 0, 1.0), (3, 0, 6.0), (1, 5, 5.0)])
def test_burst(rate, burst, expected):
    p = policy(connect_rate=rate, connect_burst=burst)
    assert p.burst == expected
    for _ in range(int(expected)):
        assert isinstance(admit(p), Admission)
    assert_refused(admit(p), 429, "connect_rate")


def test_retry_after_rounds_up_to_whole_seconds():
    clock = Clock()
    p = policy(clock, connect_rate=0.25, connect_burst=1)
    assert isinstance(admit(p), Admission)
    assert admit(p).headers == {"Retry-After": "4"}      # 4.0 s exactly
    clock.t += 1.0
    assert admit(p).headers == {"Retry-After": "3"}      # 0.25 tokens: 3.0 s
    clock.t += 1.5
    r = admit(p)
    assert r.headers == {"Retry-After": "2"}             # 0.625 tokens: 1.5 s -> 2
    assert "limit 0.25/s" in r.message
    clock.t += 1.4
    assert admit(p).headers == {"Retry-After": "1"}      # 0.975 tokens: 0.1 s -> at least 1
    clock.t += 0.1
    assert isinstance(admit(p), Admission)
    assert p.refusals == {"connect_rate": 4}


def test_refused_attempts_do_not_dig_a_deeper_hole():
    clock = Clock()
    p = policy(clock, connect_rate=1, connect_burst=1)
    admit(p)
    for _ in range(50):
        assert_refused(admit(p), 429, "connect_rate")
    clock.t += 1.0
    assert isinstance(admit(p), Admission)


def test_tokens_never_exceed_the_burst():
    clock = Clock()
    p = policy(clock, connect_rate=1, connect_burst=2)
    admit(p)
    clock.t += 3600
    assert isinstance(admit(p), Admission)
    assert isinstance(admit(p), Admission)
    assert_refused(admit(p), 429, "connect_rate")


def test_bucket_pruning_forgets_refilled_addresses():
    clock = Clock(0.0)
    p = policy(clock, connect_rate=1, connect_burst=2)
    for i in range(10001):
        admit(p, ip=f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(p.buckets) == 10001
    clock.t = 0.9
    for _ in range(2):
        admit(p, ip="192.0.2.1")                    # drained at 0.9: not refilled by 1.0
    assert len(p.buckets) == 10002                  # a prune ran, but nothing was full yet
    clock.t = 1.0
    admit(p, ip="192.0.2.2")                        # a new address over 10000 triggers a prune
    assert set(p.buckets) == {"192.0.2.1", "192.0.2.2"}
    # A pruned address starts again with a full bucket.
    assert isinstance(admit(p, ip="10.0.0.0"), Admission)
    assert isinstance(admit(p, ip="10.0.0.0"), Admission)


def test_no_pruning_at_or_below_10000_buckets():
    clock = Clock(0.0)
    p = policy(clock, connect_rate=1, connect_burst=1)
    for i in range(10000):
        admit(p, ip=f"10.0.{i >> 8}.{i & 255}")
    clock.t = 100.0
    admit(p, ip="192.0.2.1")                        # 10000 buckets before it: no prune
    assert len(p.buckets) == 10001


# --- trusted proxies and X-Forwarded-For ----------------------------------------------------

PROXY = "10.0.0.1"


@pytest.mark.parametrize("peer, xff, expected", [
    (PROXY, "203.0.113.7", "203.0.113.7"),
    (PROXY, "198.51.100.1, 203.0.113.7, 10.0.0.2", "203.0.113.7"),   # last untrusted hop
    (PROXY, " 203.0.113.7 ,10.9.9.9 ", "203.0.113.7"),
    (PROXY, "10.0.0.3, 10.0.0.2", PROXY),                            # every hop trusted
    (PROXY, "203.0.113.7, garbage", PROXY),                          # garbage: believe nothing
    (PROXY, "garbage, 203.0.113.7", "203.0.113.7"),                  # never reached
    (PROXY, "unknown", PROXY),
    (PROXY, "203.0.113.7:5555", PROXY),
    (PROXY, "203.0.113.7,", PROXY),
    (PROXY, "", PROXY),
    (PROXY, None, PROXY),
    ("198.51.100.9", "203.0.113.7", "198.51.100.9"),                 # untrusted peer
    ("not-an-ip", "203.0.113.7", "not-an-ip"),
    ("::1", "2001:db8::7, fd00::2", "2001:db8::7"),
    ("fd00::9", "2001:db8::7", "2001:db8::7"),
    ("::1", "[2001:db8::7]", "::1"),
    ("::1", "fd00::1, ::1", "::1"),
    ("2001:db8::1", "203.0.113.7", "2001:db8::1"),
])
def test_client_ip(peer, xff, expected):
    p = policy(trusted_proxies=("10.0.0.0/8", "::1", "fd00::/8"))
    headers = [] if xff is None else [("x-forwarded-for", xff)]
    assert p.client_ip(peer, xff) == expected
    assert admit(p, *headers, ip=peer).ip == expected


def test_without_trusted_proxies_forwarded_for_is_ignored():
    p = policy()
    assert admit(p, ("X-Forwarded-For", "203.0.113.7"), ip=PROXY).ip == PROXY


def test_per_ip_limit_counts_the_forwarded_client():
    p = policy(trusted_proxies=("10.0.0.0/8",), max_connections_per_ip=1)
    a = admit(p, ("X-Forwarded-For", "203.0.113.7"), ip=PROXY)
    p.connected(a)
    assert p.per_ip == {"203.0.113.7": 1}
    assert_refused(admit(p, ("X-Forwarded-For", "203.0.113.7"), ip="10.0.0.2"), 429, "ip_limit")
    assert isinstance(admit(p, ("X-Forwarded-For", "203.0.113.8"), ip=PROXY), Admission)
    assert isinstance(admit(p, ip=PROXY), Admission)


def test_forwarded_for_on_several_lines_is_one_list():
    p = policy(trusted_proxies=("10.0.0.0/8",))
    a = admit(p, ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.7"), ip=PROXY)
    assert a.ip == "203.0.113.7"


# --- JWT (HS256) ------------------------------------------------------------------------

def jwt_policy(**settings) -> AccessPolicy:
    return policy(jwt_secret=SECRET, **settings)


def test_auth_enabled():
    assert jwt_policy().auth_enabled
    assert jwt_policy().jwt_algorithms == ["HS256"]


def test_missing_token():
    p = jwt_policy()
    r = assert_refused(admit(p), 401, "auth_missing")
    assert "?token=" in r.message and "Bearer" in r.message
    assert r.body() == {"type": "error", "message": r.message}


@pytest.mark.parametrize("headers, path", [
    ([("Authorization", "Bearer {t}")], b"/"),
    ([("authorization", "bearer {t}")], b"/"),
    ([("AUTHORIZATION", "BEARER   {t}  ")], b"/"),
    ([], b"/?token={t}"),
    ([], b"/stream?a=1&token={t}&b=2"),
    ([("Authorization", "Basic dXNlcjpwdw==")], b"/?token={t}"),   # not Bearer: the query
    ([("Authorization", "Bearer ")], b"/?token={t}"),              # empty Bearer: the query
    ([("Authorization", "Bearer {t}")], b"/?token=garbage"),      # the header wins
])
def test_token_sources(headers, path):
    t = token(sub="alice")
    hs = [(k, v.format(t=t)) for k, v in headers]
    a = admit(jwt_policy(), *hs, path=path.replace(b"{t}", t.encode()))
    assert isinstance(a, Admission) and a.user_id == "alice"


@pytest.mark.parametrize("headers, path", [
    ([], b"/?token="),
    ([], b"/?tok=abc"),
    ([], b"/token=abc"),
    ([("Authorization", "Token abc")], b"/"),
    ([("Authorization", "Bearer")], b"/"),
    ([("Authorization", "")], b"/"),
])
def test_no_usable_token(headers, path):
    assert_refused(admit(jwt_policy(), *headers, path=path), 401, "auth_missing")


def test_garbage_bearer_is_not_rescued_by_the_query():
    t = token()
    r = admit(jwt_policy(), ("Authorization", "Bearer garbage"), path=f"/?token={t}".encode())
    assert_refused(r, 401, "auth_malformed")


@pytest.mark.parametrize("bad", ["abc", "a.b.c", "x" * 300, "...", "eyJhbGciOiJIUzI1NiJ9.e30"])
def test_malformed(bad):
    r = assert_refused(admit(jwt_policy(), bearer(bad)), 401, "auth_malformed")
    assert r.message == "Token is malformed"


def test_bad_signature():
    r = admit(jwt_policy(), bearer(token(key="x" * 64)))
    assert_refused(r, 401, "auth_bad_signature")


def test_expired():
    r = admit(jwt_policy(), bearer(token(exp=int(time.time()) - 3600)))
    assert assert_refused(r, 401, "auth_expired").message == "Token expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid(claim):
    r = admit(jwt_policy(), bearer(token(**{claim: int(time.time()) + 3600})))
    assert_refused(r, 401, "auth_not_yet_valid")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_wrong_hmac_algorithm(alg):
    r = assert_refused(admit(jwt_policy(), bearer(token(alg=alg))), 401, "auth_bad_algorithm")
    assert "accepted: HS256" in r.message


def test_alg_none_refused():
    unsigned = jwt.encode({"sub": "alice"}, None, algorithm="none")
    assert_refused(admit(jwt_policy(), bearer(unsigned)), 401, "auth_bad_algorithm")


def test_missing_sub():
    r = assert_refused(admit(jwt_policy(), bearer(token({}))), 401, "auth_bad_claims")
    assert "'sub'" in r.message


def test_empty_sub():
    r = assert_refused(admit(jwt_policy(), bearer(token(sub=""))), 401, "auth_bad_claims")
    assert r.message == "Token 'sub' must be a non-empty string"


@pytest.mark.parametrize("sub", [5, ["alice"], {"id": "alice"}, True])
def test_non_string_sub(sub):
    # PyJWT >= 2.10 rejects a non-string sub itself (InvalidSubjectError ->
    # auth_invalid); older versions leave it to the gateway's own check.
    r = admit(jwt_policy(), bearer(token(sub=sub)))
    assert isinstance(r, Refusal) and r.status == 401
    assert r.reason in ("auth_invalid", "auth_bad_claims")


@pytest.mark.parametrize("value", [1, 5, 10000])
def test_max_symbols_claim(value):
    a = admit(jwt_policy(), bearer(token(max_symbols=value)))
    assert isinstance(a, Admission) and a.max_symbols == value


@pytest.mark.parametrize("value", [0, -1, 10001, True, False, 5.0, "5", [5]])
def test_max_symbols_claim_out_of_bounds(value):
    r = assert_refused(admit(jwt_policy(), bearer(token(max_symbols=value))), 401, "auth_bad_claims")
    assert r.message == "Token 'max_symbols' must be an integer 1-10000"


def test_admission_records_the_claims():
    exp = int(time.time()) + 600
    a = admit(jwt_policy(), bearer(token(sub="bob", exp=exp)))
    assert a == Admission(ip=PEER, user_id="bob", max_symbols=None, expires_at=float(exp))
    assert isinstance(a.expires_at, float)
    a = admit(jwt_policy(), bearer(token(sub="bob")))
    assert a.expires_at is None and a.max_symbols is None


def test_exp_that_is_not_a_number_is_malformed():
    assert_refused(admit(jwt_policy(), bearer(token(exp="soon"))), 401, "auth_malformed")


# --- JWT with a public key ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ec_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, pem


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_es256_admitted_and_hmac_with_the_public_key_refused(ec_key):
    key, pem = ec_key
    p = policy(jwt_public_key=pem)
    assert p.jwt_algorithms == ["RS256", "ES256"]
    a = admit(p, bearer(jwt.encode({"sub": "carol"}, key, algorithm="ES256")))
    assert isinstance(a, Admission) and a.user_id == "carol"
    # Algorithm confusion: an HS256 token keyed with the public PEM text.
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}." \
                    f"{_b64(json.dumps({'sub': 'mallory'}).encode())}"
    sig = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{_b64(sig)}"
    r = assert_refused(admit(p, bearer(forged)), 401, "auth_bad_algorithm")
    assert "RS256, ES256" in r.message


# --- per-user limit ---------------------------------------------------------------------

def test_per_user_limit():
    p = jwt_policy(max_connections_per_user=2)
    alice = bearer(token(sub="alice"))
    a1, a2 = admit(p, alice), admit(p, alice, ip="198.51.100.11")
    p.connected(a1)
    p.connected(a2)
    assert p.per_user == {"alice": 2}
    r = assert_refused(admit(p, alice, ip="198.51.100.12"), 429, "user_limit")
    assert "limit 2" in r.message
    assert isinstance(admit(p, bearer(token(sub="bob"))), Admission)
    p.disconnected(a1)
    assert p.per_user == {"alice": 1} and p.per_ip == {"198.51.100.11": 1}
    assert isinstance(admit(p, alice), Admission)
    p.disconnected(a2)
    assert p.per_user == {} and p.per_ip == {}


def test_per_user_limit_needs_auth():
    p = policy(max_connections_per_user=1)
    for _ in range(3):
        a = admit(p)
        assert a.user_id is None
        p.connected(a)
    assert p.per_user == {}


# --- order of the checks and the counters ---------------------------------------------------

def test_checks_run_in_order_origin_ip_rate_auth():
    clock = Clock()
    p = jwt_policy(clock=clock, allowed_origins=("https://app.example",), max_connections_per_ip=1,
                   connect_rate=1, connect_burst=1)
    assert_refused(admit(p, ("Origin", "https://evil.example")), 403, "origin")
    assert p.buckets == {}                                  # refused before the rate check
    assert_refused(admit(p), 401, "auth_missing")           # a failed auth spends a token
    assert_refused(admit(p, bearer(token())), 429, "connect_rate")
    clock.t += 1
    a = admit(p, bearer(token()))
    p.connected(a)
    before = (p.buckets[PEER].tokens, p.buckets[PEER].at)
    clock.t += 1
    assert_refused(admit(p, bearer(token())), 429, "ip_limit")
    assert (p.buckets[PEER].tokens, p.buckets[PEER].at) == before                       # the ip_limit took no token


def test_refusal_counters_by_reason():
    p = jwt_policy(allowed_origins=("https://app.example",))
    admit(p, ("Origin", "https://evil.example"))
    admit(p, ("Origin", "https://evil.example"))
    admit(p)
    admit(p, bearer("garbage"))
    admit(p, bearer(token(key="x" * 64)))
    admit(p, bearer(token(exp=int(time.time()) - 10)))
    admit(p, bearer(token(sub="")))
    admit(p, bearer(token()))                               # admitted: not counted
    assert p.refusals == {"origin": 2, "auth_missing": 1, "auth_malformed": 1,
                          "auth_bad_signature": 1, "auth_expired": 1, "auth_bad_claims": 1}


def test_refusal_body_and_headers():
    r = Refusal(429, "connect_rate", "slow down")
    assert r.body() == {"type": "error", "message": "slow down"}
    assert r.headers == {}
    r.headers["X"] = "1"
    assert Refusal(401, "x", "y").headers == {}            # not a shared default
