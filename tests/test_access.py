"""Access control and TLS with real clients: every rule refused and allowed."""
from __future__ import annotations

import asyncio
import datetime
import ssl
import time

import jwt
import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from test_operations import scrape

SECRET = "test-secret-that-is-long-enough-for-hs256"


async def open_ws(gw, path="/", scheme="ws", **kwargs):
    ws = await websockets.connect(f"{scheme}://127.0.0.1:{gw.port}{path}", **kwargs)
    return ws, orjson.loads(await ws.recv())


async def refused(gw, path="/", **kwargs):
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"ws://127.0.0.1:{gw.port}{path}", **kwargs)
    r = info.value.response
    return r.status_code, orjson.loads(r.body) if r.body else None, r.headers


def hs256(**claims) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_jwt_hs256_refusals_and_admission(aio, impl, redis_server, caplog):
    now = int(time.time())

    async def main():
        async with running_gateway(impl, redis_server.url, jwt_secret=SECRET) as gw:
            cases = [
                ("/", "Missing token"),
                ("/?token=", "Missing token"),
                ("/?token=not.a.jwt", "malformed"),
                ("/?token=" + jwt.encode({"sub": "u"}, "other-secret-other-secret-other-secret", algorithm="HS256"),
                 "signature is invalid"),
                ("/?token=" + hs256(sub="u", exp=now - 10), "expired"),
                ("/?token=" + hs256(sub="u", nbf=now + 3600), "not yet valid"),
                ("/?token=" + hs256(name="no sub"), "'sub'"),
                ("/?token=" + hs256(sub="u", max_symbols="ten"), "max_symbols"),
                ("/?token=" + jwt.encode({"sub": "u"}, None, algorithm="none"), "algorithm not allowed"),
            ]
            for path, expected in cases:
                status, body, _ = await refused(gw, path)
                assert status == 401, path
                assert body["type"] == "error" and expected in body["message"], (path, body)
            assert not gw.sessions

            # Allowed: query parameter or Authorization header; sub and max_symbols used.
            ws, welcome = await open_ws(gw, "/?token=" + hs256(sub="alice", max_symbols=2, exp=now + 3600))
            assert welcome["data"]["userId"] == "alice"
            assert welcome["data"]["maxSymbolsPerConnection"] == 2
            await ws.send('{"action":"subscribe","symbols":["A","B","C"]}')
            r = orjson.loads(await ws.recv())
            assert r["message"] == "Cannot subscribe: would exceed maximum of 2 symbols per connection"
            ws2, welcome2 = await open_ws(
                gw, additional_headers={"Authorization": "Bearer " + hs256(sub="bob")})
            assert welcome2["data"]["userId"] == "bob"
            assert welcome2["data"]["maxSymbolsPerConnection"] == 5
            m = await scrape(gw.port)
            assert m['gateway_refused_connections_total{reason="auth_missing"}'] == 2
            assert m['gateway_refused_connections_total{reason="auth_expired"}'] == 1
            await ws.close()
            await ws2.close()
    with caplog.at_level("INFO", logger="gateway"):
        aio(main())
    assert "refused 127.0.0.1: 401 auth_expired" in caplog.text
    assert "eyJ" not in caplog.text and SECRET not in caplog.text  # no token, no secret


def keypair(kind: str, tmp_path):
    key = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / f"{kind}.pem"
    path.write_bytes(pem)
    return key, str(path)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_jwt_public_key(aio, impl, redis_server, tmp_path, alg):
    key, path = keypair(alg, tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = keypair(alg, tmp_path / "other")  # a key the gateway does not trust
    from gateway.config import Config
    pem = Config.from_env({"WS_JWT_PUBLIC_KEY": path}).jwt_public_key

    async def main():
        async with running_gateway(impl, redis_server.url, jwt_public_key=pem) as gw:
            ws, welcome = await open_ws(gw, "/?token=" + jwt.encode({"sub": "carol"}, key, algorithm=alg))
            assert welcome["data"]["userId"] == "carol"
            await ws.close()
            status, body, _ = await refused(gw, "/?token=" + jwt.encode({"sub": "carol"}, other, algorithm=alg))
            assert status == 401 and "signature" in body["message"]
            # An HS256 token signed with the public key text must not pass.
            status, body, _ = await refused(gw, "/?token=" + jwt.encode({"sub": "x"}, "k" * 40, algorithm="HS256"))
            assert status == 401 and "algorithm" in body["message"]
    aio(main())


@pytest.mark.slow
@pytest.mark.heavy
def test_token_expiring_mid_connection_closes_1008(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, jwt_secret=SECRET) as gw:
            token = hs256(sub="dave", exp=int(time.time()) + 2)
            ws, _ = await open_ws(gw, "/?token=" + token)
            await ws.send('{"action":"subscribe","symbols":["EXP"]}')
            await ws.recv()
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1008 and info.value.rcvd.reason == "token expired"
            await wait_until(lambda: not gw.sessions and gw.table.subscription_count == 0)
    aio(main())


def test_connections_per_user(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, jwt_secret=SECRET,
                                   max_connections_per_user=2) as gw:
            token = "/?token=" + hs256(sub="erin")
            a, _ = await open_ws(gw, token)
            b, _ = await open_ws(gw, token)
            status, body, _ = await refused(gw, token)
            assert status == 429 and "this user" in body["message"]
            c, _ = await open_ws(gw, "/?token=" + hs256(sub="frank"))  # another user is fine
            await a.close()
            await wait_until(lambda: len(gw.sessions) == 2)
            d, _ = await open_ws(gw, token)  # a slot came back
            for ws in (b, c, d):
                await ws.close()
    aio(main())


def test_connections_per_ip(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_connections_per_ip=3) as gw:
            conns = [(await open_ws(gw))[0] for _ in range(3)]
            status, body, _ = await refused(gw)
            assert status == 429 and "this address" in body["message"]
            await conns[0].close()
            await wait_until(lambda: len(gw.sessions) == 2)
            conns[0], _ = await open_ws(gw)
            assert (await scrape(gw.port))['gateway_refused_connections_total{reason="ip_limit"}'] == 1
            for ws in conns:
                await ws.close()
    aio(main())


@pytest.mark.heavy
def test_connect_rate_retry_after(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, connect_rate=2, connect_burst=3) as gw:
            conns = [(await open_ws(gw))[0] for _ in range(3)]
            status, body, headers = await refused(gw)
            assert status == 429 and "retry later" in body["message"]
            assert int(headers["Retry-After"]) >= 1
            await asyncio.sleep(0.6)  # one token back at 2/s
            conns.append((await open_ws(gw))[0])
            for ws in conns:
                await ws.close()
    aio(main())


def test_allowed_origins(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url,
                                   allowed_origins=("https://desk.example", "http://localhost:3000")) as gw:
            status, body, _ = await refused(gw, origin="https://evil.example")
            assert status == 403 and "evil.example" in body["message"]
            ws, _ = await open_ws(gw, origin="https://desk.example")
            await ws.close()
            ws, _ = await open_ws(gw, origin="http://LOCALHOST:3000")
            await ws.close()
            ws, _ = await open_ws(gw)  # no Origin: not a browser page
            await ws.close()
    aio(main())


def test_forwarded_for_believed_only_from_trusted_proxies(aio, impl, redis_server):
    async def main():
        xff = lambda ip: {"X-Forwarded-For": ip}  # noqa: E731
        # Untrusted peer: X-Forwarded-For is ignored, so one limit for all.
        async with running_gateway(impl, redis_server.url, max_connections_per_ip=1) as gw:
            a, _ = await open_ws(gw, additional_headers=xff("203.0.113.1"))
            status, _, _ = await refused(gw, additional_headers=xff("203.0.113.2"))
            assert status == 429
            await a.close()
        # Trusted proxy: each forwarded client has its own limit.
        async with running_gateway(impl, redis_server.url, max_connections_per_ip=1,
                                   trusted_proxies=("127.0.0.0/8",)) as gw:
            a, _ = await open_ws(gw, additional_headers=xff("203.0.113.1"))
            b, _ = await open_ws(gw, additional_headers=xff("198.51.100.7, 203.0.113.2"))
            status, _, _ = await refused(gw, additional_headers=xff("203.0.113.1"))
            assert status == 429
            assert set(gw.access.per_ip) == {"203.0.113.1", "203.0.113.2"}
            await a.close()
            await b.close()
    aio(main())


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_wss(aio, impl, redis_server, tmp_path):
    cert, key = self_signed(tmp_path)
    client_ctx = ssl.create_default_context(cafile=cert)

    async def main():
        async with running_gateway(impl, redis_server.url, tls_cert=cert, tls_key=key) as gw:
            await wait_until(lambda: gw.redis.ready)
            ws, welcome = await open_ws(gw, scheme="wss", ssl=client_ctx)
            assert welcome["message"] == "Connected to WebSocket Gateway"
            await ws.send('{"action":"subscribe","symbols":["TLS"]}')
            await ws.recv()
            payload = b'{"secure":true,"pad":"' + b"z" * 5000 + b'"}'
            redis_server.client().publish("channel:trade:TLS", payload)
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["data"]["secure"] is True
            await ws.close()
            # Plain ws:// to a TLS port does not get a session.
            with pytest.raises((websockets.InvalidMessage, OSError, websockets.InvalidHandshake)):
                await websockets.connect(f"ws://127.0.0.1:{gw.port}", open_timeout=3)
    aio(main())


def test_bad_tls_or_auth_config_exits_2(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, gateway_env
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    cases = [
        ({"WS_TLS_CERT": str(bad)}, "must be set together"),
        ({"WS_TLS_CERT": str(bad), "WS_TLS_KEY": str(bad)}, "cannot be loaded"),
        ({"WS_TLS_CERT": "/nonexistent.pem", "WS_TLS_KEY": str(bad)}, "readable file"),
        ({"WS_JWT_PUBLIC_KEY": str(bad)}, "not a PEM public key"),
        ({"WS_TRUSTED_PROXIES": "10.0.0.0/8,banana"}, "IP addresses or networks"),
        ({"WS_ALLOWED_ORIGINS": "desk.example"}, "https://host"),
        ({"WS_COMPRESSION": "maybe"}, "on or off"),
    ]
    for env, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "gateway"], env=gateway_env(**env), cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, (env, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (env, proc.stderr)
