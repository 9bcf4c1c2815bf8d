"""The project installed as a new user's machine has it: its runtime dependencies only, no
test tools, then served by gunicorn with the project's gunicorn.conf.py and gevent worker.

The test run hides a missing runtime dependency when a test tool brings it in (pytest
brings ``packaging``, which gunicorn's gevent worker needs). The wheels come from the
wheelhouse that ``scripts/test`` downloads with the project's dependencies, so the test
itself reaches no package index.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import requests

from .fake_ollama import FakeOllama
from .live_server import ROOT, serving

WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
# What a checkout holds that serving needs; tests, benchmarks and the .venv stay behind.
SERVED_FILES = ("pi_agent", "setup.cfg", "pyproject.toml", "README.md", "wsgi.py",
                "gunicorn.conf.py")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the checkout and a new virtual environment with the project installed."""
    assert WHEELHOUSE.is_dir(), f"no wheelhouse at {WHEELHOUSE}: run the tests with ./scripts/test"
    base = tmp_path_factory.mktemp("install")
    checkout = base / "checkout"
    checkout.mkdir()
    for name in SERVED_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, checkout / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, checkout / name)
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-index", "--find-links", str(WHEELHOUSE), str(checkout)],
        check=True, timeout=300, capture_output=True,
    )
    return python, checkout


def test_installs_without_test_tools(installed: tuple[Path, Path]) -> None:
    python, _ = installed
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; "
         "print(*(bool(u.find_spec(m)) for m in ('pytest', 'gevent', 'packaging')))"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    # No test tool, and what the gevent worker needs is there by the project's own word.
    assert found.stdout.split() == ["False", "True", "True"]


def test_installs_the_files_beside_the_code(installed: tuple[Path, Path]) -> None:
    """Package data (the chat page, the built-in agents, the Redis scripts) is installed,
    not only in the checkout: looked at from outside it."""
    python, checkout = installed
    found = subprocess.run(
        [str(python), "-c", "import pi_agent, pathlib; root = pathlib.Path(pi_agent.__file__)"
         ".parent; print(root); print(*sorted(str(p.relative_to(root)) for p in root.rglob('*')"
         " if p.suffix in ('.html', '.js', '.css', '.toml', '.lua')))"],
        check=True, capture_output=True, text=True, timeout=60, cwd=checkout.parent,
    )
    root, files = found.stdout.splitlines()
    assert not Path(root).is_relative_to(checkout)
    assert files.split() == ["core/agents.toml", "stores/redis.lua", "web/page/static/index.html",
                             "web/page/static/page.css", "web/page/static/page.js"]


def test_serves_health_and_a_chat(installed: tuple[Path, Path], fake_ollama: FakeOllama,
                                  tmp_path: Path) -> None:
    python, checkout = installed
    with serving(tmp_path / "gunicorn.log", python=str(python), cwd=checkout,
                 OLLAMA_URL=fake_ollama.url) as server:
        assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
        reply = requests.post(server.url + "/chat", json={"message": "hello"}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["reply"] == "Hello, world!"
        for name in ("", "page.js", "page.css"):
            served = requests.get(f"{server.url}/ui/{name}", timeout=10)
            assert served.status_code == 200 and len(served.content) > 1000, name
        log = server.log.read_text()
    assert "Using worker: pi_agent.worker.GeventWorker" in log
    assert "Booting worker" in log and "Worker failed to boot" not in log
