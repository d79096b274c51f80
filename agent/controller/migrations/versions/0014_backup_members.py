"""backup_members: seed 003's backup sharing between projects

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup_members",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("backup_id", sa.String(36), nullable=False, index=True),
        sa.Column("tenant", sa.String(36), nullable=False),
        sa.Column("dest_project_id", sa.String(36), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("vault_id", sa.String(36), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False, server_default="0"),
        sa.UniqueConstraint("backup_id", "dest_project_id", name="uq_backup_members_backup_dest"),
    )


def downgrade() -> None:
    op.drop_table("backup_members")
