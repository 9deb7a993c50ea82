"""The deployment artefact: ``pip wheel .`` gives a binary wheel that installs
into a clean virtual environment without Cython and runs with the compiled
fast path."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from gateway._testbase.net import free_port, http_get, wait_port

pytestmark = pytest.mark.slow  # builds the wheel and a virtual environment


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GATEWAY_NO_EXTENSIONS")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"),
                    str(ROOT)], check=True, env=env, timeout=600)
    wheels = glob.glob(str(tmp / "dist" / "ws_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    assert "-none-any" not in wheels[0]  # a binary wheel
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", wheels[0]], check=True, env=env, timeout=600)
    return venv, wheels[0], env


def test_wheel_is_binary_and_has_no_sources_to_compile(wheel_venv):
    import zipfile
    _, wheel, _ = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("gateway/_fastpath.") and n.endswith(".so") for n in names)
    assert "gateway/_fastpath_py.py" in names
    assert "gateway/_testbase/__init__.py" in names  # the harness ships, as asyncpg's does
    assert not any(n.endswith(".c") for n in names)
    for name in ("index.html", "app.js", "gateway-client.js", "style.css",
                 "vendor/lightweight-charts.standalone.production.js", "vendor/LICENSE", "vendor/README.md"):
        assert f"gateway/web/{name}" in names   # the page (WS_WEB_UI) ships


def test_installed_wheel_runs_compiled_without_cython(wheel_venv, redis_server, tmp_path):
    venv, _, env = wheel_venv
    py = str(venv / "bin" / "python")
    # Run from elsewhere so the source tree cannot shadow the installed package.
    check = subprocess.run(
        [py, "-c", "import importlib.util, gateway.fastpath as f; "
                   "print(f.IS_COMPILED, importlib.util.find_spec('Cython') is None, f.impl.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    compiled, no_cython, path = check.stdout.split()
    assert compiled == "True" and no_cython == "True" and str(venv) in path

    port = free_port()
    proc = subprocess.Popen(
        [str(venv / "bin" / "ws-gateway"), "--host", "127.0.0.1", "--port", str(port),
         "--redis-url", redis_server.url, "--web-ui", "on"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import asyncio

        import websockets

        async def main():
            wait_port(port, alive=lambda: proc.poll() is None)
            ws = await websockets.connect(f"ws://127.0.0.1:{port}")
            await ws.recv()
            await ws.send('{"action":"subscribe","symbols":["WHL"]}')
            await ws.recv()
            deadline = time.monotonic() + 10
            while redis_server.client().publish("channel:trade:WHL", b'{"w":1}') == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert '"data":{"w":1}' in await asyncio.wait_for(ws.recv(), 5)
            await ws.close()
        asyncio.run(main())
        # The page's files are read from the installed package.
        status, _, body = http_get(port, "/ui/gateway-client.js")
        assert status == 200 and b"export class GatewayClient" in body
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "fast path: compiled" in out
