"""Where the engine's data files are: inside an installed wheel, else in a source checkout.

Two files live outside the Python code: the migrations (`migrations/*.sql`) and the built
cr-sqlite library (`extensions/crsqlite.so`). A source checkout (and an editable install of
it) keeps them at the top of the repository. A wheel built by `make wheel` carries copies of
both inside the `engine` package, under `engine/_bundled/` — setup.py copies them into the
build directory only, so the source tree never holds a copy that could go stale.

The bundled copy wins when it exists: an installed wheel must not pick up whatever checkout
happens to sit beside it. The bundled files are found with `importlib.resources`; cr-sqlite
is handed to SQLite's loader as a file name, so the engine is supported installed as files on
disk (as pip installs wheels), not imported from a zip archive.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["BUNDLE_DIR", "CHECKOUT_ROOT", "bundled_path", "checkout_path", "data_path"]

BUNDLE_DIR = "_bundled"  # setup.py writes the wheel's copies here; keep the two in step
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def bundled_path(name: str) -> Path | None:
    """The copy of `name` (e.g. "migrations", "crsqlite.so") bundled in an installed wheel,
    or None when the engine runs from a source checkout."""
    resource = files(__package__).joinpath(BUNDLE_DIR, name)
    if isinstance(resource, Path) and resource.exists():
        return resource
    return None


def checkout_path(*parts: str) -> Path:
    """A path in the source checkout this engine was imported from (it may not exist)."""
    return CHECKOUT_ROOT.joinpath(*parts)


def data_path(name: str, *checkout_parts: str) -> Path:
    """The bundled copy of `name` if there is one, else its place in the checkout."""
    return bundled_path(name) or checkout_path(*checkout_parts)
