"""backups: why every data chunk was read, or why tracking was degraded

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("mode_reason", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.drop_column("mode_reason")
