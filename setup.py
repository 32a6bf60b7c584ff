"""Build glue: compiles the CMake project (CMakeLists.txt) into reta_fast._C.

Package metadata lives in pyproject.toml. If the native build is impossible
(no cmake, no compiler, a build error) the package still installs and falls
back to its Python reference path at runtime, unless the environment sets
RETA_FAST_REQUIRE_EXTENSION=1. Extra CMake options can be passed through
CMAKE_ARGS, e.g. CMAKE_ARGS="-DRETA_USE_OPENMP=OFF".
"""

import os
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _extension_required():
    return os.environ.get("RETA_FAST_REQUIRE_EXTENSION", "").strip() == "1"


def _find_cmake():
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` PyPI package, when its script dir is not on PATH
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        # build/lib persists between in-tree builds: never ship an old binary
        # when this build fails.
        Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        try:
            self._build_with_cmake(ext)
        except Exception:
            if _extension_required():
                raise
            # Lets setuptools skip the missing file in in-place/editable copies.
            ext.optional = True
            bar = "!" * 78
            sys.stderr.write(
                f"\n{bar}\nWARNING: building the native extension {ext.name} failed;\n"
                "reta_fast will use its (much slower) Python reference path.\n"
                "Set RETA_FAST_REQUIRE_EXTENSION=1 to make this an error.\n"
                f"{traceback.format_exc()}{bar}\n\n"
            )

    def _build_with_cmake(self, ext):
        cmake = _find_cmake()
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake, or put it on PATH)")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # A cache from an earlier isolated build may point at a deleted pybind11/Python.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        config = "Debug" if self.debug else "Release"
        configure = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={out_dir}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        subprocess.run(configure, check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", config, "--target", "_C",
             "--parallel", "2"],
            check=True,
        )


setup(
    packages=[
        "reta_fast",
        *("reta_fast." + p for p in find_packages("reta_fast")),
        "reta_fast.kernels",
        *("reta_fast.kernels." + p for p in find_packages("kernels")),
    ],
    package_dir={"reta_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("reta_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
