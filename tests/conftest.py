"""Shared fixtures: an isolated config/data dir per test, the CLI runner, and the tiny real models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

try:  # the tiny real models (GGUF, safetensors, adapters) built once per session
    from model_fixtures import *  # noqa: F401,F403
except ImportError as exc:  # pragma: no cover - only while model_fixtures is missing
    if "model_fixtures" not in str(exc):
        raise


PLUGIN_PKG = Path(__file__).parent / "plugin_pkg"


def _install_example_plugin_for_this_run(site: Path) -> None:
    """Make tests/plugin_pkg an installed distribution for this test run only.

    Its entry points are written as dist-info metadata into a temp folder on
    ``sys.path`` (and ``PYTHONPATH`` for subprocesses); nothing is installed into the
    user's environment, so the example's persona, command and backend never show up
    in their ``chat`` after running the tests.
    """
    import tomllib

    project = tomllib.loads((PLUGIN_PKG / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", encoding="utf-8"
    )
    lines = ["[chat]"] + [f"{k} = {v}" for k, v in project["entry-points"]["chat"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for folder in (str(PLUGIN_PKG), str(site)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_PKG), str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    import importlib

    importlib.invalidate_caches()


_SITE: list[Path] = []


def pytest_configure(config):
    """Before any test module is imported: the example plugin becomes visible to this run."""
    import tempfile

    site = Path(tempfile.mkdtemp(prefix="chat-test-site-"))
    _SITE.append(site)
    _install_example_plugin_for_this_run(site)


def pytest_unconfigure(config):
    import shutil

    for site in _SITE:
        shutil.rmtree(site, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _no_test_touches_the_real_home(tmp_path_factory):
    """Every test, even one without ``chat_home``, keeps config, history and caches in a temp dir."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("CHAT_CONFIG_DIR", "CHAT_DATA_DIR")}

    os.environ["CHAT_CONFIG_DIR"] = str(home / "config")
    os.environ["CHAT_DATA_DIR"] = str(home / "data")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def chat_home(tmp_path, monkeypatch):
    """A fresh config dir and data dir for one test, used by the CLI and subprocesses."""
    config = tmp_path / "config"
    data = tmp_path / "data"
    monkeypatch.setenv("CHAT_CONFIG_DIR", str(config))
    monkeypatch.setenv("CHAT_DATA_DIR", str(data))
    monkeypatch.delenv("CHAT_MODEL", raising=False)
    monkeypatch.delenv("CHAT_DEBUG", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    return tmp_path


@pytest.fixture
def cli(chat_home):
    """Run the CLI in-process through typer's CliRunner: cli("-m", "scripted", "hi", input=...)."""
    from typer.testing import CliRunner

    from chat.cli import app

    runner = CliRunner()

    def invoke(*args: str, input: str | bytes | None = None):
        return runner.invoke(app, list(args), input=input, catch_exceptions=False)

    return invoke


def chat_exe() -> list[str]:
    """The installed console script, falling back to ``python -m chat``."""
    exe = Path(sys.executable).parent / "chat"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "chat"]


@pytest.fixture
def subprocess_env(chat_home):
    env = dict(os.environ)
    env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    return env
