"""The package as a user installs it: a wheel built from this tree (with pip, as ``pip install .``
does), installed without extras into a fresh venv.

Every console script answers ``--help`` there; a feature that needs an extra says which one to
install; the compiled lookup cache is built, and a build that cannot compile it fails loudly
unless the pure-Python twin is asked for (``IDIS_PURE_PYTHON=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
EXTRA_MODULES = ("numpy", "hdrh", "matplotlib", "cachetools")  # what the bench extra brings
BUILD_PRODUCTS = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "state",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "*.so",
    "*.c",
    "*_pb2*.py",
    "*_pb2*.pyi",
    "*-report",
)


def build_wheel(work: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    """``pip wheel`` of a clean copy of the tree (no build products) in ``work``; the wheel, if any."""
    source = (work / "source").resolve()  # a path: pip would take a bare name for a package on the index
    shutil.copytree(ROOT, source, ignore=BUILD_PRODUCTS)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(work / "wheels"), str(source)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wheels = sorted((work / "wheels").glob("idis-*.whl")) if (work / "wheels").exists() else []
    return done, wheels[0] if wheels else None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    done, built = build_wheel(tmp_path_factory.mktemp("wheel"))
    assert done.returncode == 0 and built is not None, done.stdout + done.stderr
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh venv holding the wheel installed without extras."""
    root = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    install = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return root / "bin"


def run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120, check=False)


def test_the_fresh_venv_has_none_of_the_extras(venv: Path) -> None:
    probe = "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m)])"
    found = run(venv, "python", "-c", probe, *EXTRA_MODULES)
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help_after_a_plain_install(venv: Path, script: str) -> None:
    helped = run(venv, script, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {script}"), helped.stdout


def test_the_load_tester_says_which_extra_it_needs(venv: Path) -> None:
    ran = run(venv, "idis-bench", "--target", "127.0.0.1:9", "--prefix", "88.1", "--keys", "10", "--duration", "1")
    assert ran.returncode != 0
    assert "pip install 'idis[bench]'" in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


def test_the_plain_install_serves_from_the_compiled_cache(venv: Path, wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as contents:
        assert [n for n in contents.namelist() if n.startswith("resolver/_cache.") and n.endswith(".so")]
    which = run(venv, "python", "-c", "from resolver.cache import IMPLEMENTATION; print(IMPLEMENTATION)")
    assert which.stdout.strip() == "cython", which.stderr


def test_a_build_that_cannot_compile_the_cache_fails_saying_how_to_install_the_twin(tmp_path: Path) -> None:
    done, built = build_wheel(tmp_path, CC="false")  # a C compiler that always fails
    assert done.returncode != 0 and built is None
    assert "the compiled lookup cache (resolver._cache) did not build" in done.stdout + done.stderr
    assert "IDIS_PURE_PYTHON=1" in done.stdout + done.stderr


def test_the_pure_python_twin_installs_without_a_compiler_when_asked_for(tmp_path: Path) -> None:
    done, built = build_wheel(tmp_path, CC="false", IDIS_PURE_PYTHON="1")
    assert done.returncode == 0 and built is not None, done.stdout + done.stderr
    assert built.name.endswith("-py3-none-any.whl")  # nothing compiled in it
    with zipfile.ZipFile(built) as contents:
        names = contents.namelist()
    assert "resolver/_cache_py.py" in names and not [n for n in names if n.endswith(".so")]
