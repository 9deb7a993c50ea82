"""Sequenced publishing (gateway/trades.lua through gateway/sequencing.py)
against a real redis-server: seq numbering, the published message's bytes,
the bounded history, epochs, trade_history, the clients, the CLI and the feed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
import uuid

import orjson
import pytest
import redis
import redis.asyncio
from conftest import ROOT, RedisServer
from redis.crc import key_slot

from gateway import sequencing
from gateway.sequencing import (
    HistoryRead,
    LibraryLoadError,
    LibraryLoadPermissionError,
    history_key,
    library_code,
    load_library,
    meta_key,
    parse_history,
    publish_trade,
    read_history,
)

PREFIX = "channel:trade:"
BAD_PAYLOAD = "publish_trade: payload must be a JSON object"


def sym(tag: str = "S") -> str:
    """A symbol no other test (or earlier run on the session Redis) used."""
    return f"{tag}{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture
def r(redis_server):
    """A sync client of the session Redis, the library loaded with the defaults."""
    client = redis_server.client()
    load_library(client)
    yield client
    client.close()


def history(client, symbol: str, after: int = 0, count: int = 100_000) -> HistoryRead:
    return parse_history(client.fcall_ro("trade_history", 1, symbol, after, count))


class Listener:
    """A plain redis-py pubsub on some channels; next() is the next message's bytes."""

    def __init__(self, client, *channels: str):
        self.ps = client.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(*channels)
        deadline = time.monotonic() + 5
        while client.pubsub_numsub(*channels) != [(c.encode(), 1) for c in channels]:
            assert time.monotonic() < deadline
            time.sleep(0.005)

    def next(self, timeout: float = 2.0) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.ps.get_message(timeout=0.05)
            if m is not None:
                return m["channel"], m["data"]
        raise AssertionError("no message")

    def nothing(self, wait: float = 0.2) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.ps.get_message(timeout=0.05) is not None:
                return False
        return True

    def close(self):
        self.ps.close()


# -- the template ----------------------------------------------------------------------

def test_library_code_fills_both_placeholders():
    code = library_code("md.t.", 7)
    assert code.startswith("#!lua name=ws_gateway\n")
    assert 'local CHANNEL_PREFIX = "md.t."' in code
    assert "local HISTORY_SIZE = 7\n" in code
    assert "@@" not in code
    assert 'local CHANNEL_PREFIX = "channel:trade:"' in library_code()
    assert "local HISTORY_SIZE = 10000\n" in library_code()


@pytest.mark.parametrize("prefix", ['a"b', "a'b", "a\\b", "a\nb", "a\rb", "a\x00b", ""])
def test_library_code_refuses_a_prefix_lua_cannot_hold(prefix):
    with pytest.raises(ValueError):
        library_code(prefix)


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "10"])
def test_library_code_refuses_a_bad_history_size(size):
    with pytest.raises(ValueError):
        library_code(PREFIX, size)


def test_library_file_is_package_data_and_script_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.lua" in project["tool"]["setuptools"]["package-data"]["gateway"]
    assert project["project"]["scripts"]["ws-gateway-functions"] == "gateway.sequencing:main"
    assert (ROOT / "gateway" / "trades.lua").is_file()


# -- numbering, message shape, history entries ------------------------------------------

def test_seq_is_contiguous_from_one_per_symbol(r):
    a, b = sym("A"), sym("B")
    seqs: dict[str, list[int]] = {a: [], b: []}
    for k in range(60):
        s = a if k % 3 else b
        seqs[s].append(publish_trade(r, s, {"k": k}))
    assert seqs[a] == list(range(1, 41))
    assert seqs[b] == list(range(1, 21))
    assert int(r.hget(meta_key(a), "seq")) == 40
    assert int(r.hget(meta_key(b), "seq")) == 20


def test_published_message_bytes(r):
    s = sym()
    listen = Listener(r, PREFIX + s)
    try:
        cases = [
            ({"price": 1.5, "symbol": "AAPL"}, b'{"price":1.5,"symbol":"AAPL"}'),
            (b'{"price":1.5,"symbol":"AAPL"}', b'{"price":1.5,"symbol":"AAPL"}'),
            ('{"p":"\u00e9\u20ac\U0001f600"}', '{"p":"\u00e9\u20ac\U0001f600"}'.encode()),
            (b"{}", b"{}"),
            (b"  \t{ }\r\n", b"{}"),
            ({}, b"{}"),
            (b' \n{ "a" : [1, {"b": null}] }\t ', b'{ "a" : [1, {"b": null}] }'),
            (b'{"nested":{"x":{}},"s":"}{"}', b'{"nested":{"x":{}},"s":"}{"}'),
        ]
        epoch = None
        for n, (trade, stored) in enumerate(cases, 1):
            assert publish_trade(r, s, trade) == n
            epoch = epoch or r.hget(meta_key(s), "epoch").decode()
            channel, data = listen.next()
            assert channel == (PREFIX + s).encode()
            head = b'{"_seq":%d,"_epoch":"%s"' % (n, epoch.encode())
            if stored == b"{}":
                assert data == head + b"}"
            else:
                assert data == head + b"," + stored[1:]
                # the gateway's cut: '{' + what follows the prefix is the stored trade
                assert b"{" + data[len(head) + 1:] == stored
            assert orjson.loads(data) == {"_seq": n, "_epoch": epoch, **orjson.loads(stored)}
            entries = r.xrange(history_key(s), f"{n}-0", f"{n}-0")
            assert entries == [(f"{n}-0".encode(), {b"d": stored})]
        assert listen.nothing()
    finally:
        listen.close()


def test_stream_entry_ids_and_fields(r):
    s = sym()
    trades = [orjson.dumps({"i": i, "symbol": s}) for i in range(25)]
    for t in trades:
        publish_trade(r, s, t)
    entries = r.xrange(history_key(s))
    assert [e[0] for e in entries] == [f"{i}-0".encode() for i in range(1, 26)]
    assert [e[1] for e in entries] == [{b"d": t} for t in trades]


def test_key_names_share_the_symbols_slot(r):
    s = sym()
    publish_trade(r, s, {"x": 1})
    assert sorted(r.keys(f"*{s}*")) == sorted([f"ws-gateway:{{{s}}}:meta".encode(),
                                               f"ws-gateway:{{{s}}}:history".encode()])
    assert meta_key(s) == f"ws-gateway:{{{s}}}:meta" and history_key(s) == f"ws-gateway:{{{s}}}:history"
    assert key_slot(meta_key(s).encode()) == key_slot(history_key(s).encode()) == key_slot(s.encode())
    assert r.type(meta_key(s)) == b"hash" and r.type(history_key(s)) == b"stream"
    assert set(r.hgetall(meta_key(s))) == {b"epoch", b"seq", b"rid"}


# -- refusals --------------------------------------------------------------------------

BAD_PAYLOADS = [b"[1,2]", b"[]", b'{"a":', b"{'a':1}", b'"text"', b"", b"   ", b"42", b"null", b"true",
                b'{"a":1} trailing', b'{"a":1}{"b":2}', b'{"a":nan}', b'{"a":inf}', b'{"a":0x10}',
                b'{"a":1e400}', b'{"a":-1' + b"0" * 400 + b"}", b'{"a":"\xff"}', b'{"a":"\xc3"}',
                b'{"a":"\xed\xa0\x80"}', b'{"a":"\\ud800"}', b"\x0b{}",
                b'{"a":"' + b"x" * 9000 + b'\xff"}', b'{"a":"' + b"x" * 9000 + b'"}x']


@pytest.mark.parametrize("payload", BAD_PAYLOADS, ids=repr)
def test_bad_payload_is_refused_and_spends_no_seq(r, payload):
    s = sym()
    listen = Listener(r, PREFIX + s)
    try:
        with pytest.raises(redis.ResponseError) as err:
            publish_trade(r, s, payload)
        assert str(err.value) == BAD_PAYLOAD
        assert r.exists(meta_key(s), history_key(s)) == 0  # a new symbol gets no keys
        assert publish_trade(r, s, {"ok": 1}) == 1
        with pytest.raises(redis.ResponseError, match=BAD_PAYLOAD):
            publish_trade(r, s, payload)
        assert publish_trade(r, s, {"ok": 2}) == 2
        assert r.xlen(history_key(s)) == 2
        assert [orjson.loads(listen.next()[1])["_seq"] for _ in range(2)] == [1, 2]
        assert listen.nothing(0.1)
    finally:
        listen.close()


def test_valid_corner_payloads_are_taken(r):
    s = sym()
    for n, p in enumerate([b'{"a":1e300}', b'{"a":"\\u0000"}', b'{"a":"\\ud83d\\ude00"}',
                           b'{"a":"\xf0\x9f\x98\x80"}', b'{"a":1' + b"0" * 290 + b"}",
                           b'{"a":"' + b"x" * 20000 + b'"}', b'{"a":"' + b"x" * 9000 + "é".encode() + b'"}'], 1):
        orjson.loads(p)  # what the gateway accepts
        assert publish_trade(r, s, p) == n


def test_empty_symbol_is_refused(r):
    with pytest.raises(redis.ResponseError, match="symbol"):
        r.fcall("publish_trade", 1, "", b"{}")
    with pytest.raises(redis.ResponseError, match="symbol"):
        r.fcall("publish_trade", 0, b"{}")


def test_history_written_ahead_refuses_without_spending_a_seq(r):
    s = sym()
    assert publish_trade(r, s, {"n": 1}) == 1
    r.xadd(history_key(s), {"d": "{}"}, id="100-0")  # not something publish_trade wrote
    with pytest.raises(redis.ResponseError):
        publish_trade(r, s, {"n": 2})
    assert int(r.hget(meta_key(s), "seq")) == 1


# -- epochs ----------------------------------------------------------------------------

def test_epoch_is_stable_and_renewed_when_keys_are_lost(own_redis):
    own_redis.start()
    c = own_redis.client()
    load_library(c)
    s = sym()
    for _ in range(5):
        publish_trade(c, s, {"x": 1})
    epochs = {history(c, s).epoch}
    assert len(epochs) == 1 and history(c, s).last == 5
    first = epochs.pop()
    assert first is not None and all(ch in "0123456789abcdef" for ch in first) and len(first) <= 16

    c.flushall()  # functions survive FLUSHALL, the keys do not
    time.sleep(0.002)
    assert publish_trade(c, s, {"x": 2}) == 1
    second = history(c, s).epoch
    assert second not in (None, first)
    assert [seq for seq, _ in history(c, s).entries] == [1]

    c.delete(meta_key(s))  # the meta lost alone (eviction): the old stream is dropped
    time.sleep(0.002)
    assert publish_trade(c, s, {"x": 3}) == 1
    third = history(c, s)
    assert third.epoch not in (None, first, second)
    assert third.first == 1 and third.last == 1 and third.entries == [(1, b'{"x":3}')]

    own_redis.restart()  # no persistence: keys and the library are gone
    c = own_redis.client()
    with pytest.raises(redis.ResponseError, match="Function not found"):
        publish_trade(c, s, {"x": 4})
    load_library(c)
    assert history(c, s) == HistoryRead(None, 0, 0, [])
    assert publish_trade(c, s, {"x": 4}) == 1
    assert history(c, s).epoch not in (None, first, second, third.epoch)
    c.close()


@pytest.mark.slow
def test_a_promoted_replica_starts_a_new_epoch(own_redis, tmp_path):
    """Replication is asynchronous: the replica a failover promotes may lack
    trades the old master acknowledged (and clients saw). Numbering on from
    its seq would name those seqs again with other trades; a new epoch does
    not. The epoch records the replication ID of the master that made it;
    a promoted replica has another."""
    own_redis.start()
    master = own_redis.client()
    load_library(master)
    # (its full sync writes an RDB file into its --dir)
    replica_server = RedisServer(extra=["--replicaof", "127.0.0.1", str(own_redis.port)],
                                 workdir=tmp_path).start()
    try:
        replica = replica_server.client()
        s = sym()
        for k in range(1, 4):
            assert publish_trade(master, s, {"k": k}) == k
        assert master.wait(1, 5000) == 1          # 1..3 reached the replica
        epoch = history(master, s).epoch
        assert history(replica, s).epoch == epoch and history(replica, s).last == 3
        replica.execute_command("REPLICAOF", "NO", "ONE")   # promoted: the link is cut first
        for k in range(4, 6):                      # acknowledged by the old master only
            assert publish_trade(master, s, {"k": k}) == k
        assert history(master, s).last == 5
        # The promoted replica: a new epoch from 1, never (epoch, 4) with another trade.
        time.sleep(0.002)
        assert publish_trade(replica, s, {"k": 40}) == 1
        h = history(replica, s)
        assert h.epoch not in (None, epoch) and h.entries == [(1, b'{"k":40}')]
        assert publish_trade(replica, s, {"k": 41}) == 2   # and it continues there
        assert history(replica, s).epoch == h.epoch
        # Where nothing changed, the epoch goes on (the old master still is one).
        assert publish_trade(master, s, {"k": 6}) == 6 and history(master, s).epoch == epoch
        replica.close()
    finally:
        replica_server.stop()
        master.close()


def test_an_epoch_made_before_server_ids_is_adopted(r):
    """A meta hash without rid (written by an earlier library) keeps its
    epoch: the server it is on adopts it at the next publish."""
    s = sym()
    publish_trade(r, s, {"k": 1})
    epoch = history(r, s).epoch
    r.hdel(meta_key(s), "rid")
    assert publish_trade(r, s, {"k": 2}) == 2
    assert history(r, s).epoch == epoch
    assert r.hget(meta_key(s), "rid") == r.info("replication")["master_replid"].encode()


# -- trimming --------------------------------------------------------------------------

def test_history_is_bounded_and_keeps_at_least_its_size(own_redis):
    own_redis.start()
    c = own_redis.client()
    load_library(c, history_size=10)
    s = sym()
    pipe = c.pipeline(transaction=False)
    for i in range(1, 1001):
        publish_trade(pipe, s, {"i": i})
    assert pipe.execute() == list(range(1, 1001))
    length = c.xlen(history_key(s))
    assert 10 <= length < 1000  # approximate trimming: whole stream nodes go
    h = history(c, s, 0, 10_000)
    assert h.last == 1000 and h.first == 1001 - length
    assert [seq for seq, _ in h.entries] == list(range(h.first, 1001))
    assert h.entries[-1] == (1000, b'{"i":1000}')
    # after below first: what is retained, from first
    assert history(c, s, 1, 5).entries[0][0] == h.first
    c.close()


# -- trade_history ---------------------------------------------------------------------

def test_trade_history_reads(r):
    s = sym()
    for i in range(1, 21):
        publish_trade(r, s, {"i": i})
    epoch = r.hget(meta_key(s), "epoch").decode()

    def d(i):
        return (i, b'{"i":%d}' % i)

    assert history(r, s, 0, 100) == HistoryRead(epoch, 1, 20, [d(i) for i in range(1, 21)])
    assert history(r, s, 0, 3) == HistoryRead(epoch, 1, 20, [d(1), d(2), d(3)])
    assert history(r, s, 12, 100).entries == [d(i) for i in range(13, 21)]
    assert history(r, s, 12, 1).entries == [d(13)]
    assert history(r, s, 19, 5).entries == [d(20)]
    assert history(r, s, 20, 5) == HistoryRead(epoch, 1, 20, [])
    assert history(r, s, 10**12, 5) == HistoryRead(epoch, 1, 20, [])
    assert history(r, s, -1, 1) == HistoryRead(epoch, 1, 20, [d(20)])
    assert history(r, s, -1, 50) == HistoryRead(epoch, 1, 20, [d(20)])
    raw = r.fcall_ro("trade_history", 1, s, 18, 10)
    assert raw == [epoch.encode(), 1, 20, 19, b'{"i":19}', 20, b'{"i":20}']


def test_trade_history_of_an_unknown_symbol(r):
    s = sym()
    assert r.fcall_ro("trade_history", 1, s, 0, 10) == [None, 0, 0]
    assert history(r, s, -1, 1) == HistoryRead(None, 0, 0, [])
    r.xadd(history_key(s), {"d": "{}"}, id="5-0")  # a stream with no epoch belongs to none
    assert history(r, s, 0, 10) == HistoryRead(None, 0, 0, [])


def test_trade_history_with_meta_but_no_stream(r):
    s = sym()
    publish_trade(r, s, {"a": 1})
    r.delete(history_key(s))
    h = history(r, s, -1, 1)
    assert h.epoch is not None and (h.first, h.last, h.entries) == (0, 1, [])
    assert publish_trade(r, s, {"a": 2}) == 2
    assert history(r, s, 0, 10).entries == [(2, b'{"a":2}')] and history(r, s).first == 2


@pytest.mark.parametrize("after,count", [("x", 1), ("1.5", 1), (-2, 1), (0, 0), (0, -3), (0, "y"),
                                         (0, "2.5"), ("", 1)])
def test_trade_history_refuses_bad_arguments(r, after, count):
    with pytest.raises(redis.ResponseError, match="trade_history"):
        r.fcall_ro("trade_history", 1, sym(), after, count)


def test_trade_history_is_read_only(r):
    info = r.function_list(library="ws_gateway")
    lib = dict(zip(info[0][::2], info[0][1::2]))
    funcs = {f[1]: f[5] for f in lib[b"functions"]}
    assert funcs == {b"publish_trade": [], b"trade_history": [b"no-writes"]}
    with pytest.raises(redis.ResponseError):
        r.fcall_ro("publish_trade", 1, sym(), b"{}")


def test_parse_history_shapes():
    assert parse_history([b"ab", 3, 4, 3, b"{}", 4, "{}"]) == HistoryRead("ab", 3, 4, [(3, b"{}"), (4, b"{}")])
    assert parse_history(["ab", 0, 0]) == HistoryRead("ab", 0, 0, [])
    assert parse_history([None, 0, 0]).epoch is None
    for bad in [None, [], [b"a", 1], [b"a", 1, 2, 3], b"abc", [1, 2, 3]]:
        with pytest.raises(ValueError):
            parse_history(bad)


# -- the three client kinds -------------------------------------------------------------

def test_publish_trade_sync_pipeline_and_transaction(r):
    s = sym()
    assert publish_trade(r, s, "{}") == 1
    pipe = r.pipeline(transaction=False)
    assert publish_trade(pipe, s, {"a": 1}) is pipe
    publish_trade(pipe, s, b'{"a":2}')
    assert pipe.execute() == [2, 3]
    with r.pipeline(transaction=True) as tx:
        publish_trade(tx, s, {"a": 3})
        tx.hget(meta_key(s), "seq")
        assert tx.execute() == [4, b"4"]
    pipe = r.pipeline(transaction=False)
    publish_trade(pipe, s, b"[]")
    publish_trade(pipe, s, {"a": 5})
    results = pipe.execute(raise_on_error=False)
    assert isinstance(results[0], redis.ResponseError) and results[1] == 5


def test_publish_trade_and_read_history_asyncio(redis_server, aio):
    s = sym()

    async def main():
        client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            assert await sequencing.aload_library(client) == "ws_gateway"
            assert await publish_trade(client, s, {"a": 1}) == 1
            assert await publish_trade(client, s, b' {"a":2} ') == 2
            pipe = client.pipeline(transaction=False)
            publish_trade(pipe, s, {"a": 3})
            assert await pipe.execute() == [3]
            h = await read_history(client, s, 1, 10)
            assert h.epoch is not None and (h.first, h.last) == (1, 3)
            assert h.entries == [(2, b'{"a":2}'), (3, b'{"a":3}')]
            assert (await read_history(client, s, -1, 1)).entries == [(3, b'{"a":3}')]
            assert await read_history(client, sym(), 0, 1) == HistoryRead(None, 0, 0, [])
        finally:
            await client.aclose()

    aio(main())


def test_decode_responses_client(redis_server):
    c = redis_server.client(decode_responses=True)
    s = sym()
    assert publish_trade(c, s, {"a": "é"}) == 1
    h = parse_history(c.fcall_ro("trade_history", 1, s, 0, 5))
    assert h.entries == [(1, '{"a":"é"}'.encode())] and isinstance(h.epoch, str)
    c.close()


# -- loading ---------------------------------------------------------------------------

def test_load_library_replaces_and_reports_errors(own_redis):
    own_redis.start()
    c = own_redis.client()
    assert load_library(c, "md.t.", 50) == "ws_gateway"
    assert load_library(c, "md.t.", 50) == "ws_gateway"  # REPLACE: loading twice is fine
    listen = Listener(c, "md.t.X")
    try:
        publish_trade(c, "X", {})
        assert listen.next()[0] == b"md.t.X"
    finally:
        listen.close()
    c.execute_command("ACL", "SETUSER", "nofn", "on", ">pw", "~*", "&*", "+@all", "-function")
    limited = own_redis.client(username="nofn", password="pw")
    with pytest.raises(redis.exceptions.NoPermissionError) as err:
        load_library(limited)
    assert isinstance(err.value, LibraryLoadPermissionError)
    assert isinstance(err.value, LibraryLoadError) and isinstance(err.value, redis.ResponseError)
    assert "ws_gateway" in str(err.value)
    with pytest.raises(ValueError):
        load_library(c, 'bad"prefix')
    limited.close()
    c.close()


# -- the command line ------------------------------------------------------------------

def run_cli(args, env_extra=None, module="gateway.sequencing"):
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "WS_CHANNEL_PREFIX", "WS_HISTORY_SIZE")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def test_cli_show():
    out = run_cli(["show", "--channel-prefix", "md.t.", "--history-size", "5"])
    assert out.returncode == 0 and out.stdout == library_code("md.t.", 5)
    out = run_cli(["show"], {"WS_CHANNEL_PREFIX": "x:", "WS_HISTORY_SIZE": "77"})
    assert out.returncode == 0 and out.stdout == library_code("x:", 77)


def test_cli_load(own_redis):
    own_redis.start()
    out = run_cli(["load", "--redis-url", own_redis.url, "--history-size", "12"])
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 and "ws_gateway" in out.stdout
    c = own_redis.client()
    code = c.function_list(library="ws_gateway", withcode=True)[0]
    code = dict(zip(code[::2], code[1::2]))[b"library_code"].decode()
    assert code == library_code(PREFIX, 12)
    out = run_cli(["load"], {"REDIS_URL": own_redis.url, "WS_CHANNEL_PREFIX": "p:"})
    assert out.returncode == 0, out.stderr
    code = c.function_list(library="ws_gateway", withcode=True)[0]
    assert dict(zip(code[::2], code[1::2]))[b"library_code"].decode() == library_code("p:", 10000)
    c.close()


@pytest.mark.parametrize("url", ["nope://x", "redis://127.0.0.1:1", "redis://127.0.0.1:notaport"])
def test_cli_load_failure_is_one_line_and_exit_1(url):
    out = run_cli(["load", "--redis-url", url])
    assert out.returncode == 1
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("ws-gateway-functions: error: ")


@pytest.mark.slow      # ~4 s: the sentinel client retries before it gives up
def test_cli_failure_never_shows_a_password():
    """The master's password and a sentinel's stay out of the error line."""
    for url in ("redis://:hunter2@127.0.0.1:1",
                "redis+sentinel://:hunter2@127.0.0.1:1/m?sentinel_password=hunter2"):
        out = run_cli(["load", "--redis-url", url])
        assert out.returncode == 1 and "hunter2" not in out.stderr and "***" in out.stderr, out.stderr


@pytest.mark.slow
def test_cli_bad_arguments_exit_2():
    assert run_cli(["load", "--history-size", "0"]).returncode == 2
    assert run_cli(["frobnicate"]).returncode == 2
    assert run_cli([]).returncode == 2
    out = run_cli(["show"], {"WS_HISTORY_SIZE": "lots"})
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "WS_HISTORY_SIZE" in out.stderr
    out = run_cli(["show", "--channel-prefix", 'a"b'])
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1


def test_console_script_when_installed(own_redis):
    script = os.path.join(os.path.dirname(sys.executable), "ws-gateway-functions")
    if not os.path.exists(script):
        pytest.skip("ws-gateway-functions not installed in this venv (pip install -e . adds it)")
    own_redis.start()
    out = subprocess.run([script, "load", "--redis-url", own_redis.url], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1


# -- the feed --------------------------------------------------------------------------

def test_feed_publishes_sequenced_trades(redis_server):
    symbols = [sym("F"), sym("G")]
    c = redis_server.client()
    listen = Listener(c, *(PREFIX + s for s in symbols))
    try:
        out = run_cli(["--redis-url", redis_server.url, "--count", "20", "--rate", "2000",
                       "--symbols", ",".join(symbols), "--seed", "3"], module="gateway.feed")
        assert out.returncode == 0, out.stderr
        assert "published 20 trade(s)" in out.stderr
        messages = [listen.next() for _ in range(20)]
        assert listen.nothing(0.1)
        total = 0
        for s in symbols:
            h = history(c, s, 0, 100)
            assert h.entries == [] or [seq for seq, _ in h.entries] == list(range(1, h.last + 1))
            total += h.last
            for seq, d in h.entries:
                trade = orjson.loads(d)
                assert trade["symbol"] == s and set(trade) == {"symbol", "price", "volume", "timestamp",
                                                              "conditions", "exchange"}
        assert total == 20
        for channel, data in messages:
            m = orjson.loads(data)
            assert m["symbol"] == channel.decode()[len(PREFIX):] and m["_seq"] >= 1
    finally:
        listen.close()
        c.close()


def test_feed_plain_publishes_bare_json(redis_server):
    s = sym("P")
    c = redis_server.client()
    listen = Listener(c, PREFIX + s)
    try:
        out = run_cli(["--redis-url", redis_server.url, "--count", "3", "--rate", "2000", "--symbols", s,
                       "--plain"], module="gateway.feed")
        assert out.returncode == 0, out.stderr
        for _ in range(3):
            assert "_seq" not in orjson.loads(listen.next()[1])
        assert c.exists(meta_key(s), history_key(s)) == 0
    finally:
        listen.close()
        c.close()
