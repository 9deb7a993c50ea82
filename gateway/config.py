"""Configuration: one frozen object, built and checked at the edge.

Every setting has an environment variable and a matching ``ws-gateway`` flag
(gateway.cli). Anything invalid raises ConfigError with one line that names
the setting; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says why."""


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to reach Redis (parsed from REDIS_URL)."""
    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False
    # redis+sentinel://: the sentinels asked for the master of ``master_name``
    # (host and port above are unused); their own optional credentials.
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def describe(self) -> str:
        """For logs: never includes the password."""
        if self.sentinels:
            where = ",".join(_host_port(h, p) for h, p in self.sentinels)
            return f"redis+sentinel://{where}/{self.master_name}/{self.db}"
        where = self.unix_path or f"{self.host}:{self.port}"
        return f"{'rediss' if self.tls else 'redis'}://{where}/{self.db}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


SENTINEL_PORT = 26379
SENTINEL_SCHEME = "redis+sentinel"
_MASTER_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def parse_sentinel_url(url: str) -> RedisTarget:
    """``redis+sentinel://[user:password@]host1[:port],host2[:port]/<master-name>[/db]``,
    optionally ``?sentinel_username=...&sentinel_password=...`` for sentinels
    that require AUTH. The user and password are the master's."""
    rest = url[len(SENTINEL_SCHEME) + 3:]
    rest, _, query_text = rest.partition("?")
    if "#" in rest or "#" in query_text:
        raise ConfigError(f"REDIS_URL must not have a fragment: {redact_url(url)!r}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, pw_text = userinfo.partition(":")
        username = urllib.parse.unquote(user_text) or None
        password = urllib.parse.unquote(pw_text) if colon else None
        if username and password is None:
            raise ConfigError("REDIS_URL names a user but no password")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"REDIS_URL lists an empty sentinel address: {redact_url(url)!r}")
        try:
            parts = urllib.parse.urlsplit("//" + item)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL sentinel address {item!r} is malformed: {exc}") from None
        if not parts.hostname or parts.username is not None or parts.path:
            raise ConfigError(f"REDIS_URL sentinel address {item!r} must be host[:port]")
        sentinels.append((parts.hostname, port or SENTINEL_PORT))
    segments = path.split("/") if path else []
    if segments and segments[-1] == "" and len(segments) > 1:
        segments.pop()                          # a trailing slash
    if not segments or not segments[0]:
        raise ConfigError("REDIS_URL redis+sentinel:// needs the master's name: "
                          "redis+sentinel://host1:26379,host2:26379/<master-name>[/db]")
    name = urllib.parse.unquote(segments[0])
    if not _MASTER_NAME_RE.fullmatch(name):
        raise ConfigError(f"REDIS_URL master name must be 1-128 of A-Z a-z 0-9 . _ -, got {name!r}")
    if len(segments) > 2:
        raise ConfigError(f"REDIS_URL has more after the db than it should: {redact_url(url)!r}")
    db_text = segments[1] if len(segments) == 2 else ""
    query = urllib.parse.parse_qs(query_text, keep_blank_values=True)
    unknown = sorted(set(query) - {"sentinel_username", "sentinel_password", "db"})
    if unknown:
        raise ConfigError(f"REDIS_URL has unknown parameter(s) {', '.join(unknown)}; "
                          "redis+sentinel:// takes sentinel_username, sentinel_password and db")
    db_text = db_text or (query.get("db") or [""])[0]
    db = 0
    if db_text:
        if not (db_text.isascii() and db_text.isdigit()):
            raise ConfigError(f"REDIS_URL database must be a number, got {db_text!r}")
        db = int(db_text)
    s_user = query["sentinel_username"][0] if query.get("sentinel_username") else None
    s_pw = query["sentinel_password"][0] if query.get("sentinel_password") else None
    if s_user and s_pw is None:
        raise ConfigError("REDIS_URL names a sentinel_username but no sentinel_password")
    return RedisTarget(host=sentinels[0][0], port=sentinels[0][1], username=username,
                       password=password, db=db, sentinels=tuple(dict.fromkeys(sentinels)),
                       master_name=name, sentinel_username=s_user, sentinel_password=s_pw)


def parse_redis_url(url: str) -> RedisTarget:
    if url.lower().startswith(SENTINEL_SCHEME + "://"):
        return parse_sentinel_url(url)
    if url.lower().startswith(("rediss+sentinel://", "redis+sentinels://")):
        raise ConfigError("REDIS_URL: TLS to Redis behind Sentinel is not supported; "
                          "use redis+sentinel://")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL is malformed: {exc}") from None
    query = urllib.parse.parse_qs(parts.query)
    db_text = (query.get("db") or [""])[0]
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigError(f"REDIS_URL has no host: {redact_url(url)!r}")
        path = parts.path.lstrip("/")
        db_text = path or db_text
        target: dict[str, Any] = dict(host=parts.hostname, port=port or 6379,
                                      tls=parts.scheme == "rediss")
    elif parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"REDIS_URL has no socket path: {redact_url(url)!r}")
        target = dict(unix_path=parts.path)
    else:
        raise ConfigError(
            "REDIS_URL must start with redis://, rediss:// or unix:// (or redis+sentinel://), "
            f"got {redact_url(url)!r}")
    db = 0
    if db_text:
        if not (db_text.isascii() and db_text.isdigit()):
            raise ConfigError(f"REDIS_URL database must be a number, got {db_text!r}")
        db = int(db_text)
    # A password alone (redis://:pw@host) is the classic AUTH form; a user
    # without a password makes no sense to Redis.
    if username and password is None:
        raise ConfigError("REDIS_URL names a user but no password")
    return RedisTarget(username=username or None, password=password, db=db, **target)


def redact_url(url: str) -> str:
    """``url`` for messages and logs: its password and sentinel_password as ***."""
    url = re.sub(r"(sentinel_password=)[^&#]*", r"\1***", url)
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _int(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def conv(name: str, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ConfigError(f"{name} must be {bound}, got {value}")
        return value
    return conv


def _float(lo: float) -> Callable[[str, str], float]:
    def conv(name: str, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
        if not value >= lo or value == float("inf"):
            raise ConfigError(f"{name} must be at least {lo}, got {text!r}")
        return value
    return conv


def _workers(name: str, text: str) -> int:
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return _int(1, 1024)(name, text)


def _choice(*options: str) -> Callable[[str, str], str]:
    def conv(name: str, text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {text!r}")
        return value
    return conv


def _log_level(name: str, text: str) -> str:
    value = text.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{name} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {text!r}")
    return value


def _prefix(name: str, text: str) -> str:
    if not text or any(c in text for c in "*?[]\\") or not text.isprintable():
        raise ConfigError(f"{name} must be a non-empty channel prefix without glob characters, got {text!r}")
    return text


def _host(name: str, text: str) -> str:
    if not text.strip():
        raise ConfigError(f"{name} must not be empty")
    return text.strip()


def _str(name: str, text: str) -> str:
    return text


def _optional_file(name: str, text: str) -> str:
    path = text.strip()
    if path and not os.path.isfile(path):
        raise ConfigError(f"{name} must name a readable file, got {path!r}")
    return path


def _pem_public_key(name: str, text: str) -> str:
    """The PEM text of a public key file (RS256/ES256 JWTs), checked now."""
    path = _optional_file(name, text)
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            pem = f.read()
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        load_pem_public_key(pem)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{name} {path!r} is not a PEM public key: {exc}") from None
    return pem.decode()


def _csv(name: str, text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _networks(name: str, text: str) -> tuple[str, ...]:
    items = _csv(name, text)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{name} must be IP addresses or networks, got {item!r}") from None
    return items


def _origins(name: str, text: str) -> tuple[str, ...]:
    items = _csv(name, text)
    for item in items:
        parts = urllib.parse.urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{name} entries must look like https://host[:port], got {item!r}")
    return items


# Candle intervals: a whole number and a unit, aligned to UTC multiples of
# their length (a day divides evenly into each, so no bucket straddles midnight).
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
INTERVAL_RE = re.compile(r"([1-9][0-9]{0,4})([smhd])")


def interval_ms(name: str) -> int:
    """The length of candle interval ``name`` ("1s", "5m", "1h", "1d") in milliseconds."""
    m = INTERVAL_RE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a candle interval: {name!r}")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def _intervals(name: str, text: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in _csv(name, text):
        if INTERVAL_RE.fullmatch(item) is None:
            raise ConfigError(f"{name} entries must look like 1s, 30s, 1m, 5m, 1h or 1d, got {item!r}")
        ms = interval_ms(item)
        if ms > 86_400_000 or 86_400_000 % ms:
            raise ConfigError(f"{name}: {item!r} must divide a day evenly (1s to 1d)")
        if any(interval_ms(o) == ms for o in out):
            raise ConfigError(f"{name} names the interval {item!r} twice")
        out.append(item)
    return tuple(sorted(out, key=interval_ms))


def _on_off(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ConfigError(f"{name} must be on or off, got {text!r}")


def _values(settings: tuple[Setting, ...], env: Mapping[str, str],
            overrides: Mapping[str, str | None] | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    overrides = overrides or {}
    for s in settings:
        given = overrides.get(s.field)
        if given is not None:
            values[s.field] = s.convert(s.flag, given)
        elif s.env in env:
            values[s.field] = s.convert(s.env, env[s.env])
        else:
            values[s.field] = s.convert(s.env, s.default)
    return values


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    flag: str
    default: str
    convert: Callable[[str, str], object]
    help: str


# The one table of settings: Config's fields, the environment variables, the
# CLI flags and the --help text all come from here.
SETTINGS: tuple[Setting, ...] = (
    Setting("host", "WS_HOST", "--host", "0.0.0.0", _host,
            "address the WebSocket server listens on"),
    Setting("port", "WS_PORT", "--port", "8080", _int(0, 65535),
            "WebSocket server port (0 picks a free one)"),
    Setting("workers", "WS_WORKERS", "--workers", "1", _workers,
            "gateway processes sharing the port (SO_REUSEPORT), each with its own Redis "
            "subscription; 'auto' = one per core this process may run on"),
    Setting("backlog", "WS_BACKLOG", "--backlog", "0", _int(0, 1 << 20),
            "connections the kernel may hold waiting to be accepted (0: the system's "
            "net.core.somaxconn); too small and a reconnect storm's SYNs are dropped and retried "
            "after 1 s, 3 s, 7 s"),
    Setting("redis_url", "REDIS_URL", "--redis-url", "redis://127.0.0.1:6379", _str,
            "Redis to subscribe to: redis://[[user]:password@]host[:port][/db], rediss://..., "
            "unix:///path, or redis+sentinel://[user:password@]host1:26379,host2:26379/<master-name>[/db]"),
    Setting("max_symbols", "WS_MAX_SYMBOLS", "--max-symbols", "5", _int(1, 10000),
            "most symbols one connection may subscribe to"),
    Setting("heartbeat_interval", "WS_HEARTBEAT_INTERVAL", "--heartbeat-interval", "30", _float(0.05),
            "seconds between WebSocket pings; a client that has not answered the previous one is dropped"),
    Setting("stats_interval", "WS_STATS_INTERVAL", "--stats-interval", "60", _float(0.05),
            "seconds between statistics log lines"),
    Setting("max_message_size", "WS_MAX_MESSAGE_SIZE", "--max-message-size", "102400", _int(64, 1 << 30),
            "largest client message in bytes; a larger one closes the connection with 1009"),
    Setting("channel_prefix", "WS_CHANNEL_PREFIX", "--channel-prefix", "channel:trade:", _prefix,
            "Redis channel prefix; the gateway subscribes to PREFIX*"),
    Setting("max_buffered_bytes", "WS_MAX_BUFFERED_BYTES", "--max-buffered-bytes", "1048576", _int(1024),
            "outbound bytes a client may have queued before it is treated as a slow consumer"),
    Setting("slow_client_policy", "WS_SLOW_CLIENT_POLICY", "--slow-client-policy", "disconnect",
            _choice("disconnect", "conflate"),
            "what happens to a slow consumer: disconnect (close 1008 'slow consumer') or conflate "
            "(keep the latest trade per symbol until it drains, then send each after a gap notice)"),
    Setting("client_msg_rate", "WS_CLIENT_MSG_RATE", "--client-msg-rate", "20", _float(0.0),
            "control messages per second a connection may send (0: no limit); over it a message "
            "gets an error, and a client that keeps going is closed with 1008"),
    Setting("client_msg_burst", "WS_CLIENT_MSG_BURST", "--client-msg-burst", "40", _int(1),
            "control messages a connection may send at once before the rate applies"),
    Setting("jwt_secret", "WS_JWT_SECRET", "--jwt-secret", "", _str,
            "HS256 secret: when set, every connection must present a valid JWT"),
    Setting("jwt_public_key", "WS_JWT_PUBLIC_KEY", "--jwt-public-key", "", _pem_public_key,
            "PEM public key file for RS256/ES256 JWTs: when set, every connection must present one"),
    Setting("max_connections_per_user", "WS_MAX_CONNECTIONS_PER_USER", "--max-connections-per-user",
            "0", _int(0), "connections one JWT subject may hold (0: no limit)"),
    Setting("max_connections_per_ip", "WS_MAX_CONNECTIONS_PER_IP", "--max-connections-per-ip",
            "100", _int(0), "connections one client address may hold (0: no limit)"),
    Setting("connect_rate", "WS_CONNECT_RATE", "--connect-rate", "0", _float(0.0),
            "new connections per second per client address (0: no limit); over it 429 + Retry-After"),
    Setting("connect_burst", "WS_CONNECT_BURST", "--connect-burst", "0", _int(0),
            "new connections one address may open at once (0: twice the rate)"),
    Setting("allowed_origins", "WS_ALLOWED_ORIGINS", "--allowed-origins", "", _origins,
            "comma-separated Origins allowed to connect (empty: any); others get 403"),
    Setting("trusted_proxies", "WS_TRUSTED_PROXIES", "--trusted-proxies", "", _networks,
            "comma-separated proxy addresses/networks whose X-Forwarded-For is believed"),
    Setting("tls_cert", "WS_TLS_CERT", "--tls-cert", "", _optional_file,
            "PEM certificate (chain) file: serve wss:// (needs WS_TLS_KEY)"),
    Setting("tls_key", "WS_TLS_KEY", "--tls-key", "", _optional_file,
            "PEM private key file for WS_TLS_CERT"),
    Setting("history_size", "WS_HISTORY_SIZE", "--history-size", "10000", _int(1, 10_000_000),
            "trades kept per symbol for replay (the publish_trade Redis Function's stream length, "
            "set when the gateway loads it)"),
    Setting("candle_intervals", "WS_CANDLE_INTERVALS", "--candle-intervals", "1s,1m,5m", _intervals,
            "candle streams clients may subscribe to as SYMBOL@INTERVAL (empty: none); must match "
            "the candle service's"),
    Setting("candle_backfill", "WS_CANDLE_BACKFILL", "--candle-backfill", "100", _int(0, 10000),
            "final candles sent ahead of the open one when a client subscribes to a candle stream"),
    Setting("candle_channel_prefix", "WS_CANDLE_CHANNEL_PREFIX", "--candle-channel-prefix",
            "channel:candle:", _prefix,
            "Redis channel prefix of candle streams (PREFIX<interval>:<SYMBOL>)"),
    Setting("compression", "WS_COMPRESSION", "--compression", "on", _on_off,
            "permessage-deflate for clients that offer it: on or off"),
    Setting("write_delay_us", "WS_WRITE_DELAY_US", "--write-delay-us", "0", _int(0, 100_000),
            "microseconds a client's trades may wait to share one write with later ones (0: each "
            "Redis read is written at once); fewer sends for up to this much added latency"),
    Setting("compression_min_size", "WS_COMPRESSION_MIN_SIZE", "--compression-min-size", "128", _int(0),
            "messages shorter than this many bytes go uncompressed to permessage-deflate clients too "
            "(deflate saves too little on them to pay for itself); 0: compress every message"),
    Setting("web_ui", "WS_WEB_UI", "--web-ui", "off", _on_off,
            "serve the live web page on GET / (and its files under /ui/): on or off"),
    Setting("log_level", "LOG_LEVEL", "--log-level", "INFO", _log_level,
            "DEBUG, INFO, WARNING or ERROR"),
)


SOMAXCONN = "/proc/sys/net/core/somaxconn"


def listen_backlog(configured: int, somaxconn: str = SOMAXCONN) -> int:
    """The backlog to listen with: ``configured``, or (0) the kernel's cap,
    which is also the most any listen() gets; 4096 where it cannot be read."""
    if configured:
        return configured
    try:
        with open(somaxconn) as f:
            return max(1, int(f.read().strip()))
    except (OSError, ValueError):
        return 4096


def check_prefixes(trade: str, candle: str) -> None:
    # One pattern must not match the other's channels, or a message would be
    # routed twice (or a candle taken for a trade).
    if trade.startswith(candle) or candle.startswith(trade):
        raise ConfigError(f"WS_CHANNEL_PREFIX ({trade!r}) and WS_CANDLE_CHANNEL_PREFIX ({candle!r}) "
                          "must not be prefixes of each other")


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    backlog: int = 0
    redis_url: str = "redis://127.0.0.1:6379"
    max_symbols: int = 5
    heartbeat_interval: float = 30.0
    stats_interval: float = 60.0
    max_message_size: int = 102400
    channel_prefix: str = "channel:trade:"
    max_buffered_bytes: int = 1 << 20
    slow_client_policy: str = "disconnect"
    client_msg_rate: float = 20.0
    client_msg_burst: int = 40
    jwt_secret: str = ""
    jwt_public_key: str = ""
    max_connections_per_user: int = 0
    max_connections_per_ip: int = 100
    connect_rate: float = 0.0
    connect_burst: int = 0
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    history_size: int = 10000
    candle_intervals: tuple[str, ...] = ("1s", "1m", "5m")
    candle_backfill: int = 100
    candle_channel_prefix: str = "channel:candle:"
    compression: bool = True
    write_delay_us: int = 0
    compression_min_size: int = 128
    web_ui: bool = False
    log_level: str = "INFO"
    redis: RedisTarget = dataclasses.field(default_factory=RedisTarget)

    def __post_init__(self) -> None:
        object.__setattr__(self, "redis", parse_redis_url(self.redis_url))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("WS_TLS_CERT and WS_TLS_KEY must be set together")
        if self.jwt_secret and self.jwt_public_key:
            raise ConfigError("set WS_JWT_SECRET or WS_JWT_PUBLIC_KEY, not both")
        check_prefixes(self.channel_prefix, self.candle_channel_prefix)

    def __repr__(self) -> str:  # never print the secret
        return f"Config(host={self.host!r}, port={self.port}, redis={self.redis.describe()!r}, ...)"

    def ssl_context(self):
        """The server TLS context, or None for plain ws://."""
        if not self.tls_cert:
            return None
        import ssl
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"WS_TLS_CERT/WS_TLS_KEY cannot be loaded: {exc}") from None
        return ctx

    @classmethod
    def from_sources(cls, env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
                     ) -> Config:
        """Build from environment variables, with CLI values (text) taking precedence."""
        return cls(**_values(SETTINGS, env, overrides))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        return cls.from_sources(env)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level)


# --- the candle service (ws-gateway-candles) ----------------------------------
def _shared(field: str, **changes: Any) -> Setting:
    base = next(s for s in SETTINGS if s.field == field)
    return dataclasses.replace(base, **changes)


CANDLE_SETTINGS: tuple[Setting, ...] = (
    _shared("host", help="address of the candle service's /healthz, /readyz and /metrics"),
    _shared("port", default="8081", help="port of the candle service's /healthz, /readyz and /metrics "
                                         "(0 picks a free one)"),
    _shared("redis_url", help="Redis to read trades from and publish candles to: "
                              "redis://[[user]:password@]host[:port][/db], rediss://..., unix:///path, "
                              "redis+sentinel://[user:password@]host1:26379,host2:26379/<master-name>[/db]"),
    _shared("channel_prefix", help="Redis channel prefix of trades; the service subscribes to PREFIX*"),
    _shared("candle_channel_prefix"),
    _shared("candle_intervals", help="candle intervals to compute (1s to 1d, each dividing a day)"),
    _shared("candle_backfill", help="final candles kept per stream for the gateways' backfill"),
    Setting("update_ms", "WS_CANDLE_UPDATE_MS", "--update-ms", "250", _int(10, 60_000),
            "milliseconds between update messages of an open candle (sent only when it changed)"),
    Setting("grace", "WS_CANDLE_GRACE", "--grace", "2", _float(0.0),
            "seconds after an interval ends before its final candle, for trades that arrive late"),
    Setting("late_window", "WS_CANDLE_LATE_WINDOW", "--late-window", "900", _float(0.0),
            "seconds after an interval ends during which a late trade corrects its final candle"),
    Setting("lease", "WS_CANDLE_LEASE", "--lease", "5", _float(0.5),
            "seconds within which a standby takes over when the leading candle service dies"),
    _shared("log_level"),
)


@dataclass(frozen=True)
class CandleConfig:
    host: str = "0.0.0.0"
    port: int = 8081
    redis_url: str = "redis://127.0.0.1:6379"
    channel_prefix: str = "channel:trade:"
    candle_channel_prefix: str = "channel:candle:"
    candle_intervals: tuple[str, ...] = ("1s", "1m", "5m")
    candle_backfill: int = 100
    update_ms: int = 250
    grace: float = 2.0
    late_window: float = 900.0
    lease: float = 5.0
    log_level: str = "INFO"
    redis: RedisTarget = dataclasses.field(default_factory=RedisTarget)

    def __post_init__(self) -> None:
        object.__setattr__(self, "redis", parse_redis_url(self.redis_url))
        check_prefixes(self.channel_prefix, self.candle_channel_prefix)
        if not self.candle_intervals:
            raise ConfigError("WS_CANDLE_INTERVALS must name at least one interval for the candle service")

    def __repr__(self) -> str:
        return f"CandleConfig(port={self.port}, redis={self.redis.describe()!r}, ...)"

    @classmethod
    def from_sources(cls, env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
                     ) -> CandleConfig:
        return cls(**_values(CANDLE_SETTINGS, env, overrides))

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level)
