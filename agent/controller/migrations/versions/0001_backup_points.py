"""backup points (seed 000)

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backup_points",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("tenant_name", sa.String(255), nullable=False, server_default=""),
        sa.Column("cluster_uuid", sa.String(36), nullable=False),
        sa.Column("zone_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("btype", sa.String(16), nullable=False),
        sa.Column("ip", sa.String(255), nullable=False, server_default=""),
        sa.Column("port", sa.String(8), nullable=False, server_default=""),
        sa.Column("root_dir", sa.String(1024), nullable=False, server_default=""),
        sa.Column("sub_dir", sa.String(1024), nullable=False, server_default=""),
        sa.Column("password_sealed", sa.String(512), nullable=False, server_default=""),
        sa.Column("ref", sa.Integer, nullable=False, server_default="0"),
        sa.Column("state", sa.String(16), nullable=False, server_default="unknown"),
        sa.Column("ctime", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant", "name", name="uq_backup_points_tenant_name"),
    )


def downgrade() -> None:
    op.drop_table("backup_points")
