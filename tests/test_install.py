"""The package as users install it: a wheel in a fresh virtual environment, used from outside the repository.

Every other test imports the package from the checkout (an editable install or PYTHONPATH), where a data file
missing from the wheel's package data is still found; here only the wheel's own files are on the path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # from a copy: an in-tree build leaves build/ and *.egg-info in the checkout
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "show_attend_tell", source / "show_attend_tell", ignore=skip)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", out, source])
    (built,) = out.glob("show_attend_tell-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """A venv holding only the wheel; the dependencies come from the venv running the tests, through a .pth file
    (copying torch would take gigabytes), which adds that site-packages as a plain path: its editable-install
    hooks are .pth files of their own and so are not run."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv, env


def test_wheel_holds_every_data_file_of_the_package(wheel):
    tracked = _run(["git", "-C", REPO, "ls-files", "show_attend_tell"]).stdout.split()
    data = {name for name in tracked if not name.endswith(".py")}
    assert data, "git ls-files found no data files"
    assert data - set(zipfile.ZipFile(wheel).namelist()) == set()


def test_installed_wheel_captions_and_serves(installed, tmp_path):
    venv, env = installed
    python, sat = venv / "bin" / "python", venv / "bin" / "sat"
    where = _run([python, "-c", "import show_attend_tell; print(show_attend_tell.__file__)"], env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    shutil.copy(REPO / "examples" / "coffee.jpg", tmp_path / "coffee.jpg")
    captioned = _run([sat, "caption", "coffee.jpg"], env=env, cwd=tmp_path, timeout=600)
    assert "coffee.jpg" in captioned.stdout and len(captioned.stdout.split()) > 3, captioned.stdout

    port = _free_port()
    server = subprocess.Popen(
        [sat, "serve", "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as reply:
                    health = json.load(reply)
                break
            except OSError:
                assert time.monotonic() < deadline, "sat serve did not answer /api/health"
                time.sleep(1)
        assert health["status"] == "ok" and health["decoder"] == "lstm" and health["grid_size"] == 14
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
            assert b"<html" in reply.read().lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()
