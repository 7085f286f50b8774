"""`python -m engine`: the engine's own command line (sync's is `crdt-sync`).

    python -m engine doctor app.db        # extension, versions, site id, schema, conflicts, WAL

Exit code 0 when the diagnosis found nothing wrong; otherwise 1, with the problems on one
line on stderr. `crdt-sync doctor` prints the same facts plus the sync peers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .doctor import diagnose, write_diagnosis

__all__ = ["main", "build_parser"]

PROG = "python -m engine"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The engine's commands.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor", help="Check a replica file: extension, versions, site id, schema, conflicts, WAL.",
        description="Check a replica file (never created nor migrated): extension, versions, site id, "
                    "schema, open conflicts, WAL size. Exit code 1 when something is wrong.",
    )
    doctor.add_argument("db", metavar="DB", help="path of the database file to check")
    doctor.add_argument("--migrations", metavar="DIR", help="the migrations folder of the schema "
                        "(default: the engine's own)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return write_diagnosis(diagnose(args.db, migrations=args.migrations), PROG, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
