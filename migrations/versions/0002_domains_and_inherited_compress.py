"""dedup domains as a resource; a guest's compress may inherit (null)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 08:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("compress", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_domains")),
    )
    # Existing guests keep their explicit true/false: nothing inherits until an admin says so.
    with op.batch_alter_table("guests") as batch:
        batch.alter_column("compress", existing_type=sa.Boolean(), nullable=True)


def downgrade() -> None:
    op.execute(sa.text("UPDATE guests SET compress = false WHERE compress IS NULL"))
    with op.batch_alter_table("guests") as batch:
        batch.alter_column("compress", existing_type=sa.Boolean(), nullable=False)
    op.drop_table("domains")
