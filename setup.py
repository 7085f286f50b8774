"""Build hooks for the wheel; the project's metadata is in pyproject.toml.

Two things pyproject.toml cannot say:
- the wheel carries the migrations and the built cr-sqlite library inside the `engine`
  package (`engine/_bundled/`, read by engine/resources.py). They are copied into the build
  directory only, never into the source tree, so an editable install keeps reading the
  checkout's `migrations/` and `extensions/crsqlite.so` and never a stale copy;
- the wheel holds a native library, so it is platform-specific. The library does not link
  libpython (it is loaded by SQLite, not imported by Python), hence `py3-none-<platform>`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXTENSION = ROOT / "extensions" / "crsqlite.so"
MIGRATIONS = ROOT / "migrations"
BUNDLE = Path("engine") / "_bundled"  # engine/resources.py: BUNDLE_DIR


class BuildWithBundle(build_py):
    """build_py, plus the migrations and crsqlite.so copied into engine/_bundled/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: the engine reads the checkout's files in place
        if not EXTENSION.is_file():
            raise SystemExit(f"error: {EXTENSION} is missing; run `make extension` before building the wheel")
        target = Path(self.build_lib) / BUNDLE
        shutil.rmtree(target, ignore_errors=True)
        (target / "migrations").mkdir(parents=True)
        for sql in sorted(MIGRATIONS.glob("*.sql")):
            self.copy_file(str(sql), str(target / "migrations" / sql.name))
        self.copy_file(str(EXTENSION), str(target / EXTENSION.name))


class NativeDistribution(Distribution):
    """Holds a native library: installed to platlib, and the wheel is not pure."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """A wheel tagged for this platform only (it holds crsqlite.so), any Python 3."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


setup(distclass=NativeDistribution, cmdclass={"build_py": BuildWithBundle, "bdist_wheel": PlatformWheel})
