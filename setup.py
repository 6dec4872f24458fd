"""Build steps that pyproject.toml cannot declare: Python code generated from proto/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"


def generate_protos() -> None:
    """Generates idis/v1/*_pb2*.py(i) next to the .proto files (also for editable installs)."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "idis").rglob("*.proto"))
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
    ]
    mypy_plugin = shutil.which("protoc-gen-mypy")
    if mypy_plugin:
        args += [f"--plugin=protoc-gen-mypy={mypy_plugin}", f"--mypy_out=quiet:{PROTO_ROOT}"]
        grpc_plugin = shutil.which("protoc-gen-mypy_grpc")
        if grpc_plugin:
            args += [f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}", f"--mypy_grpc_out=quiet:{PROTO_ROOT}"]
    else:
        args += [f"--pyi_out={PROTO_ROOT}"]
    subprocess.run(args + protos, check=True, cwd=PROTO_ROOT)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


def extensions() -> list[Extension]:
    """The compiled hot path; optional, so a machine without a C compiler still installs (the
    pure-Python twin then serves, with a warning at start-up)."""
    from Cython.Build import cythonize

    ext = Extension("resolver._cache", ["resolver/_cache.pyx"], extra_compile_args=["-O3"], optional=True)
    return list(cythonize([ext], compiler_directives={"language_level": "3"}, quiet=True))  # type: ignore[no-untyped-call]


setup(cmdclass={"build_py": BuildPyWithProtos}, ext_modules=extensions())
