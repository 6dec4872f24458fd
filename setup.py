"""Build steps that pyproject.toml cannot declare: Python code generated from proto/, the
compiled lookup cache (resolver/_cache.pyx), the benchmarks' Handle load generator
(bench/_handle_load.pyx) and the bulk importer's record maker (bench/_registrations.pyx).

The compiled cache is required: if it cannot be built the install fails, saying why, instead of
leaving a node that silently serves from the slower pure-Python twin. To install the twin on
purpose (no C compiler on the machine), build with ``IDIS_PURE_PYTHON=1``:

    IDIS_PURE_PYTHON=1 pip install .
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

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


PURE_PYTHON = os.environ.get("IDIS_PURE_PYTHON", "") == "1"


class BuildExtOrExplain(build_ext):
    """A failed build of the compiled cache stops the install with what to do about it."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, LinkError, PlatformError) as exc:
            raise CompileError(
                f"the compiled lookup cache ({ext.name}) did not build ({exc}). Install a C compiler,"
                " OpenSSL's headers and the Python headers (e.g. gcc, libssl-dev and python3-dev), or, to"
                " install the slower pure-Python twin instead, build with IDIS_PURE_PYTHON=1"
                " (IDIS_PURE_PYTHON=1 pip install .)"
            ) from exc


def extensions() -> list[Extension]:
    """The compiled hot path; none when the pure-Python twin is asked for (IDIS_PURE_PYTHON=1)."""
    if PURE_PYTHON:
        return []
    from Cython.Build import cythonize

    # OpenSSL's libcrypto (which Python's hashlib uses too) for SHA-256 without hashlib's objects:
    # SHA256_Init & co., deprecated in OpenSSL 3 in favour of EVP, whose per-call cost is what
    # they avoid.
    ext = Extension(
        "resolver._cache",
        ["resolver/_cache.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O3", "-Wno-deprecated-declarations"],
    )
    # The Handle-protocol load generator (bench/handle_bench.py, idis-bench handle-udp/-tcp); its
    # generated C goes to build/, out of the source tree.
    load = Extension("bench._handle_load", ["bench/_handle_load.pyx"], extra_compile_args=["-O3"])
    # The bulk importer's record maker (bench.dataset.registration_wire's compiled twin).
    made = Extension("bench._registrations", ["bench/_registrations.pyx"], extra_compile_args=["-O3"])
    directives = {"language_level": "3"}
    return [
        *cythonize([ext], compiler_directives=directives, quiet=True),  # type: ignore[no-untyped-call]
        *cythonize([load, made], compiler_directives=directives, quiet=True, build_dir="build"),  # type: ignore[no-untyped-call]
    ]


setup(cmdclass={"build_py": BuildPyWithProtos, "build_ext": BuildExtOrExplain}, ext_modules=extensions())
