"""gateway/config.py and the CLI's config errors, without sockets or a server.

Every converter in SETTINGS is exercised at its bounds and with bad text;
REDIS_URL parsing covers each scheme and never echoes a password; the CLI
cases all fail configuration, so no server is ever started.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest

from gateway import cli
from gateway.config import SETTINGS, Config, ConfigError, RedisTarget, listen_backlog, parse_redis_url

BY_FIELD = {s.field: s for s in SETTINGS}
SECRET = "hunter2-s3cret"


def convert(field: str, text: str):
    s = BY_FIELD[field]
    return s.convert(s.env, text)


def refused(field: str, text: str) -> str:
    """The ConfigError message for ``text``; checks it is one line naming the setting."""
    s = BY_FIELD[field]
    with pytest.raises(ConfigError) as exc:
        s.convert(s.env, text)
    message = str(exc.value)
    assert "\n" not in message
    assert s.env in message
    return message


# --- the table itself ------------------------------------------------------------

def test_settings_table_matches_config_fields():
    config_fields = [f.name for f in dataclasses.fields(Config) if f.name != "redis"]
    assert [s.field for s in SETTINGS] == config_fields
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS)
    assert all(s.flag.startswith("--") and s.help for s in SETTINGS)


def test_defaults_in_table_equal_config_defaults():
    assert Config.from_sources({}) == Config()
    assert Config.from_env({}) == Config()


# --- integer settings --------------------------------------------------------------

INT_BOUNDS = {
    "port": (0, 65535),
    "max_symbols": (1, 10000),
    "max_message_size": (64, 1 << 30),
    "max_buffered_bytes": (1024, None),
    "client_msg_burst": (1, None),
    "max_connections_per_user": (0, None),
    "max_connections_per_ip": (0, None),
    "connect_burst": (0, None),
    "history_size": (1, 10_000_000),
    "candle_backfill": (0, 10000),
    "compression_min_size": (0, None),
    "backlog": (0, 1 << 20),
    "workers": (1, 1024),
    "write_delay_us": (0, 100_000),
}


def test_every_int_setting_is_listed():
    ints = {f.name for f in dataclasses.fields(Config) if f.type == "int"}
    assert ints == set(INT_BOUNDS)


@pytest.mark.parametrize("field", INT_BOUNDS)
def test_int_bounds(field):
    lo, hi = INT_BOUNDS[field]
    assert convert(field, str(lo)) == lo
    assert convert(field, f"  {lo + 1}\n") == lo + 1
    message = refused(field, str(lo - 1))
    if hi is None:
        assert convert(field, str(10 ** 12)) == 10 ** 12
        assert f"at least {lo}, got {lo - 1}" in message
    else:
        assert convert(field, str(hi)) == hi
        assert f"between {lo} and {hi}, got {lo - 1}" in message
        assert f"between {lo} and {hi}, got {hi + 1}" in refused(field, str(hi + 1))


@pytest.mark.parametrize("field", INT_BOUNDS)
def test_int_bad_text(field):
    for text in ["", "abc", "1.5", "1e3", "0x10", "5 5", "--1"]:
        assert f"must be a whole number, got {text!r}" in refused(field, text)


# --- float settings ----------------------------------------------------------------

FLOAT_LOWER = {
    "heartbeat_interval": 0.05,
    "stats_interval": 0.05,
    "client_msg_rate": 0.0,
    "connect_rate": 0.0,
}


def test_every_float_setting_is_listed():
    floats = {f.name for f in dataclasses.fields(Config) if f.type == "float"}
    assert floats == set(FLOAT_LOWER)


@pytest.mark.parametrize("field", FLOAT_LOWER)
def test_float_bounds(field):
    lo = FLOAT_LOWER[field]
    assert convert(field, str(lo)) == lo
    assert convert(field, " 2.5 ") == 2.5
    assert convert(field, "1e3") == 1000.0
    assert isinstance(convert(field, "7"), float)
    below = repr(lo - 0.01)
    assert f"at least {lo}, got {below!r}" in refused(field, below)


@pytest.mark.parametrize("field", FLOAT_LOWER)
def test_float_non_finite_or_negative(field):
    for text in ["nan", "inf", "-inf", "Infinity", "-1"]:
        assert f"must be at least {FLOAT_LOWER[field]}, got {text!r}" in refused(field, text)


@pytest.mark.parametrize("field", FLOAT_LOWER)
def test_float_bad_text(field):
    for text in ["", "soon", "1s", "1,5"]:
        assert f"must be a number of seconds, got {text!r}" in refused(field, text)


# --- the other converters --------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("disconnect", "disconnect"), ("Conflate", "conflate"), (" CONFLATE ", "conflate")])
def test_slow_client_policy(text, value):
    assert convert("slow_client_policy", text) == value


@pytest.mark.parametrize("text", ["", "drop", "conflate,disconnect"])
def test_slow_client_policy_bad(text):
    assert "one of disconnect, conflate" in refused("slow_client_policy", text)


@pytest.mark.parametrize("text, value", [
    ("debug", "DEBUG"), (" Info ", "INFO"), ("WARNING", "WARNING"), ("error", "ERROR"),
    ("critical", "CRITICAL")])
def test_log_level(text, value):
    assert convert("log_level", text) == value
    assert Config(log_level=value).log_level_number == getattr(__import__("logging"), value)


@pytest.mark.parametrize("text", ["", "warn", "trace", "10"])
def test_log_level_bad(text):
    assert f"got {text!r}" in refused("log_level", text)


@pytest.mark.parametrize("text", ["channel:trade:", "x", "md.trades.", " spaced "])
def test_channel_prefix(text):
    assert convert("channel_prefix", text) == text  # kept verbatim, not stripped


@pytest.mark.parametrize("text", ["", "a*", "a?", "a[b]", "a]", "a\\b", "a\nb", "a\tb", "a\x00"])
def test_channel_prefix_bad(text):
    assert "without glob characters" in refused("channel_prefix", text)


def test_host():
    assert convert("host", " ::1 ") == "::1"
    assert convert("host", "0.0.0.0") == "0.0.0.0"
    assert "must not be empty" in refused("host", "")
    assert "must not be empty" in refused("host", " \t ")


@pytest.mark.parametrize("field", ["redis_url", "jwt_secret"])
def test_plain_strings_pass_through(field):
    assert convert(field, " a b ") == " a b "


@pytest.mark.parametrize("text, value", [
    ("on", True), ("ON", True), ("1", True), ("true", True), (" yes ", True),
    ("off", False), ("Off", False), ("0", False), ("false", False), ("no", False)])
def test_compression_on_off(text, value):
    assert convert("compression", text) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", "enabled"])
def test_compression_on_off_bad(text):
    assert f"must be on or off, got {text!r}" in refused("compression", text)


def test_web_ui_is_off_unless_turned_on():
    assert Config().web_ui is False and Config.from_sources({}).web_ui is False
    assert Config.from_sources({"WS_WEB_UI": "on"}).web_ui is True
    assert Config.from_sources({"WS_WEB_UI": "on"}, {"web_ui": "off"}).web_ui is False
    assert convert("web_ui", " ON ") is True and convert("web_ui", "0") is False
    assert "WS_WEB_UI must be on or off, got 'sometimes'" in refused("web_ui", "sometimes")


@pytest.mark.parametrize("text, value", [
    ("", ()), (" , ,", ()),
    ("https://a.example", ("https://a.example",)),
    (" https://a.example , http://b.example:8080/ ", ("https://a.example", "http://b.example:8080/")),
])
def test_allowed_origins(text, value):
    assert convert("allowed_origins", text) == value


@pytest.mark.parametrize("item", ["a.example", "ftp://a.example", "https://", "//a.example", "*"])
def test_allowed_origins_bad(item):
    message = refused("allowed_origins", f"https://ok.example,{item}")
    assert f"got {item!r}" in message


@pytest.mark.parametrize("text, value", [
    ("", ()),
    ("10.0.0.0/8, 192.168.1.5,::1", ("10.0.0.0/8", "192.168.1.5", "::1")),
    ("10.0.0.1/8", ("10.0.0.1/8",)),                      # host bits allowed (strict=False)
    ("2001:db8::/32", ("2001:db8::/32",)),
])
def test_trusted_proxies(text, value):
    assert convert("trusted_proxies", text) == value


@pytest.mark.parametrize("item", ["proxy.local", "10.0.0.0/33", "300.1.1.1", "::g", "10.0.0.0/8/8"])
def test_trusted_proxies_bad(item):
    assert f"IP addresses or networks, got {item!r}" in refused("trusted_proxies", f"10.0.0.1,{item}")


@pytest.mark.parametrize("field", ["tls_cert", "tls_key"])
def test_optional_file(field, tmp_path):
    f = tmp_path / "x.pem"
    f.write_text("x")
    assert convert(field, "") == ""
    assert convert(field, f" {f} ") == str(f)
    assert "must name a readable file" in refused(field, str(tmp_path / "missing.pem"))
    assert "must name a readable file" in refused(field, str(tmp_path))  # a directory


@pytest.fixture(scope="module")
def ec_key_pems():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return public, private


def test_jwt_public_key_reads_the_pem(tmp_path, ec_key_pems):
    public, _ = ec_key_pems
    f = tmp_path / "pub.pem"
    f.write_bytes(public)
    assert convert("jwt_public_key", "") == ""
    assert convert("jwt_public_key", str(f)) == public.decode()  # the PEM text, not the path


def test_jwt_public_key_bad(tmp_path, ec_key_pems):
    _, private = ec_key_pems
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    priv = tmp_path / "private.pem"
    priv.write_bytes(private)
    assert "must name a readable file" in refused("jwt_public_key", str(tmp_path / "nope.pem"))
    assert "is not a PEM public key" in refused("jwt_public_key", str(garbage))
    assert "is not a PEM public key" in refused("jwt_public_key", str(priv))


# --- REDIS_URL ------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6379", RedisTarget()),
    ("redis://localhost", RedisTarget(host="localhost")),
    ("REDIS://cache.example:7000", None),  # scheme is case-insensitive in urlsplit
    ("rediss://cache.example:6380/2", RedisTarget(host="cache.example", port=6380, db=2, tls=True)),
    ("redis://:pw@h", RedisTarget(host="h", password="pw")),
    ("redis://user:pw@h/3", RedisTarget(host="h", username="user", password="pw", db=3)),
    ("redis://us%40er:p%3Aa%40ss@h", RedisTarget(host="h", username="us@er", password="p:a@ss")),
    ("redis://u:p@ss@h", RedisTarget(host="h", username="u", password="p@ss")),
    ("redis://:@h", RedisTarget(host="h", password="")),
    ("redis://h?db=4", RedisTarget(host="h", db=4)),
    ("redis://h/5?db=4", RedisTarget(host="h", db=5)),      # the path wins over ?db=
    ("redis://h/", RedisTarget(host="h")),
    ("redis://[::1]:7001/1", RedisTarget(host="::1", port=7001, db=1)),
    ("redis://H.Example", RedisTarget(host="h.example")),   # urlsplit lowercases hostname
    ("unix:///var/run/redis.sock", RedisTarget(unix_path="/var/run/redis.sock")),
    ("unix:///tmp/r.sock?db=2", RedisTarget(unix_path="/tmp/r.sock", db=2)),
    ("unix://:pw@/tmp/r.sock", RedisTarget(unix_path="/tmp/r.sock", password="pw")),
    ("unix://u:pw@/tmp/r.sock", RedisTarget(unix_path="/tmp/r.sock", username="u", password="pw")),
])
def test_parse_redis_url(url, expected):
    target = parse_redis_url(url)
    if expected is None:
        expected = RedisTarget(host="cache.example", port=7000)
    assert target == expected


@pytest.mark.parametrize("url, fragment", [
    ("", "must start with redis://, rediss:// or unix://"),
    ("http://h:6379", "must start with redis://"),
    ("127.0.0.1:6379", "must start with redis://"),
    ("redis://", "has no host"),
    ("redis:///0", "has no host"),
    ("unix://", "has no socket path"),
    ("redis://h:port", "is malformed"),
    ("redis://h:99999", "is malformed"),
    ("redis://[::1", "is malformed"),
    ("redis://h/abc", "database must be a number, got 'abc'"),
    ("redis://h/-1", "database must be a number"),
    ("redis://h/0/1", "database must be a number"),
    ("redis://h?db=x", "database must be a number, got 'x'"),
    ("unix:///s.sock?db=1.5", "database must be a number"),
    ("redis://user@h", "names a user but no password"),
    ("redis+sentinel://s1", "needs the master's name"),
    ("redis+sentinel://s1/", "needs the master's name"),
    ("redis+sentinel:///m", "empty sentinel address"),
    ("redis+sentinel://s1,,s2/m", "empty sentinel address"),
    ("redis+sentinel://s1:port/m", "sentinel address 's1:port' is malformed"),
    ("redis+sentinel://s1:99999/m", "is malformed"),
    ("redis+sentinel://s1/m/x", "database must be a number, got 'x'"),
    ("redis+sentinel://s1/m/1/2", "more after the db"),
    ("redis+sentinel://s1/my master", "master name must be"),
    ("redis+sentinel://s1/m?timeout=1", "unknown parameter(s) timeout"),
    ("redis+sentinel://u@s1/m", "names a user but no password"),
    ("redis+sentinel://s1/m?sentinel_username=su", "sentinel_username but no sentinel_password"),
    ("rediss+sentinel://s1/m", "TLS to Redis behind Sentinel is not supported"),
    ("redis+sentinel://s1/m#x", "must not have a fragment"),
])
def test_parse_redis_url_malformed(url, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_redis_url(url)
    message = str(exc.value)
    assert fragment in message and message.startswith("REDIS_URL")
    assert "\n" not in message


@pytest.mark.parametrize("url", [
    f"http://user:{SECRET}@h",
    f"ftp://:{SECRET}@h/0",
    f"redis://:{SECRET}@",
    f"redis://u:{SECRET}@/0",
    f"unix://:{SECRET}@",
    f"redis://:{SECRET}@h:port",
    f"redis://:{SECRET}@h:123456",
    f"redis://:{SECRET}@h/db",
    f"rediss://u:{SECRET}@h?db=zero",
    f"redis+sentinel://u:{SECRET}@s1,,s2/m",
    f"redis+sentinel://:{SECRET}@s1/m/1/2",
    f"redis+sentinel://s1/m/1/2?sentinel_password={SECRET}",
    f"redis+sentinel://:{SECRET}@s1:x/m",
])
def test_malformed_redis_url_errors_never_show_the_password(url):
    with pytest.raises(ConfigError) as exc:
        parse_redis_url(url)
    assert SECRET not in str(exc.value)


def test_redacted_url_keeps_the_rest():
    with pytest.raises(ConfigError) as exc:
        parse_redis_url(f"http://alice:{SECRET}@cache.example:6379/0")
    assert "'http://alice:***@cache.example:6379/0'" in str(exc.value)


@pytest.mark.parametrize("url, text", [
    (f"redis://u:{SECRET}@h:7000/3", "redis://h:7000/3"),
    (f"rediss://:{SECRET}@h", "rediss://h:6379/0"),
    (f"unix://:{SECRET}@/tmp/r.sock?db=2", "redis:///tmp/r.sock/2"),
])
def test_describe_never_shows_the_password(url, text):
    assert parse_redis_url(url).describe() == text


# --- REDIS_URL behind Sentinel ---------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster",
     dict(sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), master_name="mymaster")),
    ("redis+sentinel://s1,s2,s3/md-redis/2",          # the sentinels' port by default
     dict(sentinels=(("s1", 26379), ("s2", 26379), ("s3", 26379)), master_name="md-redis", db=2)),
    ("redis+sentinel://u:p%40ss@s1:1,[::1]:2/m/",
     dict(sentinels=(("s1", 1), ("::1", 2)), master_name="m", username="u", password="p@ss")),
    ("redis+sentinel://:pw@s1/m?db=3", dict(sentinels=(("s1", 26379),), master_name="m",
                                            password="pw", db=3)),
    ("redis+sentinel://s1,s1/m", dict(sentinels=(("s1", 26379),), master_name="m")),
    ("REDIS+SENTINEL://S1/m", dict(sentinels=(("s1", 26379),), master_name="m")),
    ("redis+sentinel://s1/m?sentinel_password=spw",
     dict(sentinels=(("s1", 26379),), master_name="m", sentinel_password="spw")),
    ("redis+sentinel://s1/m?sentinel_username=su&sentinel_password=spw",
     dict(sentinels=(("s1", 26379),), master_name="m", sentinel_username="su",
          sentinel_password="spw")),
])
def test_parse_sentinel_url(url, expected):
    target = parse_redis_url(url)
    first = expected["sentinels"][0]
    assert target == RedisTarget(host=first[0], port=first[1], **expected)


def test_describe_a_sentinel_target_never_shows_a_password():
    url = f"redis+sentinel://u:{SECRET}@s1,[::1]:26380/md/4?sentinel_password={SECRET}"
    assert parse_redis_url(url).describe() == "redis+sentinel://s1:26379,[::1]:26380/md/4"


@pytest.mark.parametrize("main", ["gateway", "candles", "functions", "feed"])
def test_bad_sentinel_url_is_one_line_and_exit_2(clean_env, capsys, main):
    from gateway import candle_service, feed, sequencing
    run = {"gateway": cli.main, "candles": candle_service.main, "feed": feed.main,
           "functions": lambda argv: sequencing.main(["load", *argv])}[main]
    assert run(["--redis-url", "redis+sentinel://s1:26379,s2:26379"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(("ws-gateway: error: ", "ws-gateway-candles: error: ",
                           "ws-gateway-feed: error: ", "ws-gateway-functions: error: "))
    assert "needs the master's name" in err


# --- Config: cross-checks, precedence, repr ------------------------------------------------

def test_config_parses_its_redis_url():
    c = Config(redis_url="rediss://:pw@r.example:6380/1")
    assert c.redis == RedisTarget(host="r.example", port=6380, password="pw", db=1, tls=True)
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config(redis_url="nope://x")


@pytest.mark.parametrize("cert, key", [("c.pem", ""), ("", "k.pem")])
def test_tls_cert_and_key_together(cert, key):
    with pytest.raises(ConfigError, match="WS_TLS_CERT and WS_TLS_KEY must be set together"):
        Config(tls_cert=cert, tls_key=key)


def test_tls_none_or_both():
    assert Config().ssl_context() is None
    assert Config(tls_cert="c.pem", tls_key="k.pem").tls_cert == "c.pem"


def test_tls_files_that_are_not_pem(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("nope")
    key.write_text("nope")
    with pytest.raises(ConfigError, match="WS_TLS_CERT/WS_TLS_KEY cannot be loaded"):
        Config(tls_cert=str(cert), tls_key=str(key)).ssl_context()


def test_jwt_secret_or_public_key_not_both():
    with pytest.raises(ConfigError, match="WS_JWT_SECRET or WS_JWT_PUBLIC_KEY, not both"):
        Config(jwt_secret="s", jwt_public_key="-----BEGIN PUBLIC KEY-----")
    assert Config(jwt_secret="s").jwt_secret == "s"


def test_precedence_flag_over_env_over_default():
    env = {"WS_PORT": "9000", "WS_MAX_SYMBOLS": "7"}
    c = Config.from_sources(env, {"port": "9100", "max_symbols": None})
    assert (c.port, c.max_symbols, c.stats_interval) == (9100, 7, 60.0)
    assert Config.from_sources(env).port == 9000
    assert Config.from_env(env) == Config.from_sources(env, {})


def test_flag_wins_even_over_a_bad_env_value():
    assert Config.from_sources({"WS_PORT": "junk"}, {"port": "1"}).port == 1


def test_empty_flag_is_a_value_not_absent():
    # "" is given (not None): it overrides the environment.
    c = Config.from_sources({"WS_JWT_SECRET": "from-env"}, {"jwt_secret": ""})
    assert c.jwt_secret == ""


def test_errors_name_the_source():
    with pytest.raises(ConfigError, match=r"^--port must be"):
        Config.from_sources({}, {"port": "-1"})
    with pytest.raises(ConfigError, match=r"^WS_PORT must be"):
        Config.from_sources({"WS_PORT": "-1"})
    with pytest.raises(ConfigError, match=r"^WS_COMPRESSION must be on or off"):
        Config.from_sources({"WS_COMPRESSION": "x"})


def test_unrelated_env_is_ignored():
    assert Config.from_sources({"PORT": "1", "ws_port": "2"}) == Config()


def test_repr_never_shows_secrets():
    c = Config(jwt_secret=SECRET, redis_url=f"redis://admin:{SECRET}@r.example:6379/2",
               host="127.0.0.1", port=9001)
    for text in (repr(c), str(c), f"{c}", f"{c!r}"):
        assert SECRET not in text
        assert "r.example:6379/2" in text and "9001" in text
    assert repr(c).startswith("Config(")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1  # type: ignore[misc]


# --- the CLI: bad configuration -> exit 2, one line on stderr ------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for s in SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    return monkeypatch


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("ws-gateway: error: ")
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--max-symbols", "0"], "--max-symbols must be between 1 and 10000"),
    (["--heartbeat-interval", "0"], "--heartbeat-interval must be at least 0.05"),
    (["--slow-client-policy", "drop"], "--slow-client-policy must be one of"),
    (["--compression", "maybe"], "--compression must be on or off"),
    (["--web-ui", "yes please"], "--web-ui must be on or off"),
    (["--redis-url", "http://h"], "REDIS_URL must start with"),
    (["--tls-cert", "/nonexistent/c.pem"], "--tls-cert must name a readable file"),
    (["--channel-prefix", "a*"], "--channel-prefix must be a non-empty channel prefix"),
])
def test_main_bad_flag_exits_2(clean_env, capsys, argv, fragment):
    assert cli.main(argv) == cli.EXIT_CONFIG == 2
    assert fragment in one_error_line(capsys)


def test_main_bad_env_exits_2(clean_env, capsys):
    clean_env.setenv("WS_MAX_MESSAGE_SIZE", "tiny")
    assert cli.main([]) == 2
    assert "WS_MAX_MESSAGE_SIZE must be a whole number, got 'tiny'" in one_error_line(capsys)


def test_main_redacts_the_redis_password(clean_env, capsys):
    clean_env.setenv("REDIS_URL", f"http://u:{SECRET}@h")
    assert cli.main([]) == 2
    err = one_error_line(capsys)
    assert SECRET not in err and "***" in err


def test_main_tls_cert_without_key(clean_env, capsys, tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert cli.main(["--tls-cert", str(cert)]) == 2
    assert "must be set together" in one_error_line(capsys)


def test_main_tls_files_not_loadable(clean_env, capsys, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    assert cli.main(["--tls-cert", str(cert), "--tls-key", str(key)]) == 2
    assert "cannot be loaded" in one_error_line(capsys)


def test_main_jwt_secret_and_public_key(clean_env, capsys, tmp_path, ec_key_pems):
    pub = tmp_path / "pub.pem"
    pub.write_bytes(ec_key_pems[0])
    clean_env.setenv("WS_JWT_SECRET", SECRET)
    assert cli.main(["--jwt-public-key", str(pub)]) == 2
    err = one_error_line(capsys)
    assert "not both" in err and SECRET not in err


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--port"], ["extra-positional"]])
def test_main_argparse_errors_exit_2_in_one_line(clean_env, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    one_error_line(capsys)


def test_main_redis_db_with_non_ascii_digit_exits_2(clean_env, capsys):
    assert cli.main(["--redis-url", "redis://h/²"]) == 2
    assert "database must be a number" in one_error_line(capsys)


def test_load_config_flags_and_given_env():
    c = cli.load_config(["--port", "0", "--allowed-origins", "https://a.example"],
                        env={"WS_MAX_SYMBOLS": "7", "WS_PORT": "1"})
    assert (c.port, c.max_symbols, c.allowed_origins) == (0, 7, ("https://a.example",))


def test_load_config_raises_config_error():
    with pytest.raises(ConfigError, match="^WS_PORT"):
        cli.load_config([], env={"WS_PORT": "x"})


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for s in SETTINGS:
        assert s.flag in out and s.env in out


# --- candle settings -----------------------------------------------------------------
def test_candle_intervals_are_checked_and_sorted():
    assert Config.from_env({"WS_CANDLE_INTERVALS": "5m, 1s,1h"}).candle_intervals == ("1s", "5m", "1h")
    assert Config.from_env({"WS_CANDLE_INTERVALS": ""}).candle_intervals == ()
    for bad, why in (("7m", "divide a day"), ("1M", "must look like"), ("0s", "must look like"),
                     ("60s,1m", "twice"), ("2d", "divide a day"), ("1.5m", "must look like")):
        with pytest.raises(ConfigError, match=why):
            Config.from_env({"WS_CANDLE_INTERVALS": bad})


def test_trade_and_candle_prefixes_must_not_overlap():
    for trade, candle in (("channel:", "channel:candle:"), ("channel:candle:x", "channel:candle:")):
        with pytest.raises(ConfigError, match="prefixes of each other"):
            Config.from_env({"WS_CHANNEL_PREFIX": trade, "WS_CANDLE_CHANNEL_PREFIX": candle})


def test_backlog_zero_means_the_kernels_cap(tmp_path):
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("8192\n")
    assert listen_backlog(0, str(somaxconn)) == 8192
    assert listen_backlog(511, str(somaxconn)) == 511
    assert listen_backlog(0, str(tmp_path / "missing")) == 4096


def test_gateway_listens_with_the_backlog(redis_server, gateway_process):
    """What the kernel holds for the listening socket (ss: Send-Q of a LISTEN
    socket is its backlog): WS_BACKLOG, or somaxconn by default."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")

    def backlog(port: int) -> int:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                             check=True).stdout.split()
        return int(out[2])
    a = gateway_process(WS_BACKLOG=321)
    b = gateway_process()
    a.wait_listening()
    b.wait_listening()
    assert backlog(a.port) == 321
    assert backlog(b.port) == listen_backlog(0)

