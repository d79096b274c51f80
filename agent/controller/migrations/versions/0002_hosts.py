"""hosts: agents that registered

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
        sa.Column("address", sa.String(512), nullable=False, server_default=""),
        sa.Column("version", sa.String(64), nullable=False, server_default=""),
        sa.Column("facts_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("pools_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("backup_points_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("max_jobs", sa.Integer, nullable=False, server_default="4"),
        sa.Column("running_jobs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("draining", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("hosts")
