"""backups: the consistency of the snapshot each was taken from

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("consistency", sa.String(16), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.drop_column("consistency")
