"""Workflow ownership: which replica may reserve a workflow's events and start its runs.

Reserving an event cannot be exclusive across partitioned replicas, so each workflow has one
owning replica, recorded in the CRR table `ownership`. The claim (owner site id and claim time)
is a single JSON column: concurrent claims made on partitioned replicas resolve, after merge, to
one whole claim on every replica (cr-sqlite's per-column last-writer-wins with its deterministic
tie-break), never to a mix of two.

    db.ownership.claim("wf-1")          # -> this replica's site id
    db.ownership.owner("wf-1")          # -> site id, or None when unowned
    db.ownership.is_local_owner("wf-1")
"""

from __future__ import annotations

from typing import Any

import msgspec

from .database import Database, Session
from .errors import NotOwnerError
from .rows import EMPTY_IS_NONE, Table, encode_json, require_text

__all__ = ["Ownership", "OwnershipStore"]


class Claim(msgspec.Struct, frozen=True):
    owner: str
    claimed_at: int


class Ownership(msgspec.Struct, frozen=True):
    workflow_id: str
    claim: dict[str, Any] | None  # {"owner": site_id, "claimed_at": ms}, None when unowned

    @property
    def owner(self) -> str | None:
        return self.claim["owner"] if self.claim else None


_table = Table("ownership", Ownership, json_columns={"claim": EMPTY_IS_NONE})


class OwnershipStore:
    def __init__(self, db: Database):
        self.db = db

    def get(self, workflow_id: str, *, tx: Session | None = None) -> Ownership | None:
        with self.db.reading(tx) as s:
            found = _table.query(s, "workflow_id = ?", (workflow_id,))
            return found[0] if found else None

    def owner(self, workflow_id: str, *, tx: Session | None = None) -> str | None:
        """The owning replica's site id, or None when the workflow is unowned."""
        row = self.get(workflow_id, tx=tx)
        return row.owner if row else None

    def is_local_owner(self, workflow_id: str, *, tx: Session | None = None) -> bool:
        return self.owner(workflow_id, tx=tx) == self.db.site_id

    def claim(self, workflow_id: str, *, force: bool = False, tx: Session | None = None) -> str:
        """Make this replica the owner; return its site id. Claiming an owned-here workflow is a no-op.

        `force=True` takes a workflow over from another replica (an operator's decision, e.g.
        when the owner is gone for good).

        Raises:
            NotOwnerError: another replica owns the workflow (and force is False).
            ValueError: empty workflow id.
        """
        require_text("workflow_id", workflow_id)
        with self.db.transaction(tx) as s:
            current = self.owner(workflow_id, tx=s)
            if current == self.db.site_id:
                return current
            if current is not None and not force:
                raise NotOwnerError(workflow_id, current, self.db.site_id)
            self._write(s, workflow_id, encode_json(Claim(self.db.site_id, s.now_ms())))
            return self.db.site_id

    def release(self, workflow_id: str, *, tx: Session | None = None) -> int:
        """Give up ownership; return 1 if released, 0 if the workflow was unowned.

        Raises:
            NotOwnerError: another replica owns it.
        """
        with self.db.transaction(tx) as s:
            current = self.owner(workflow_id, tx=s)
            if current is None:
                return 0
            if current != self.db.site_id:
                raise NotOwnerError(workflow_id, current, self.db.site_id)
            self._write(s, workflow_id, "")
            return 1

    def require_local(self, workflow_id: str, *, tx: Session | None = None) -> None:
        """Check that this replica may run the workflow, claiming it if nobody owns it.

        Raises:
            NotOwnerError: another replica owns it.
        """
        with self.db.transaction(tx) as s:
            current = self.owner(workflow_id, tx=s)
            if current is None:
                self.claim(workflow_id, tx=s)
            elif current != self.db.site_id:
                raise NotOwnerError(workflow_id, current, self.db.site_id)

    def list(self, *, tx: Session | None = None) -> list[Ownership]:
        with self.db.reading(tx) as s:
            return _table.query(s, order="workflow_id")

    @staticmethod
    def _write(s: Session, workflow_id: str, claim: str) -> None:
        s.execute(
            "INSERT INTO ownership (workflow_id, claim) VALUES (?, ?) "
            "ON CONFLICT (workflow_id) DO UPDATE SET claim = excluded.claim",
            (workflow_id, claim),
        )
