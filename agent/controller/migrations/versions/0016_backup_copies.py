"""backups: copy_of, the backup a copy on another backup point was made from

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("copy_of", sa.String(36), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.drop_column("copy_of")
