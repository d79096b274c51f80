"""backup points: when a deletion last wanted a GC, and when the last one ran

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backup_points") as b:
        b.add_column(sa.Column("gc_wanted_at", sa.Float, nullable=False, server_default="0"))
        b.add_column(sa.Column("last_gc_at", sa.Float, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("backup_points") as b:
        b.drop_column("last_gc_at")
        b.drop_column("gc_wanted_at")
