"""brokers of a cluster, guests' home leases (epochs), guests moved away by migrate

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "brokers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("figures", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_brokers")),
    )
    op.create_table(
        "guest_homes",
        sa.Column("guest_id", sa.Integer(), nullable=False),
        sa.Column("broker_id", sa.String(length=128), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["guest_id"],
            ["guests.id"],
            name=op.f("fk_guest_homes_guest_id_guests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("guest_id", name=op.f("pk_guest_homes")),
    )
    op.create_index(op.f("ix_guest_homes_broker_id"), "guest_homes", ["broker_id"])
    op.create_table(
        "guest_moves",
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_guest_moves")),
    )


def downgrade() -> None:
    op.drop_table("guest_moves")
    op.drop_index(op.f("ix_guest_homes_broker_id"), table_name="guest_homes")
    op.drop_table("guest_homes")
    op.drop_table("brokers")
