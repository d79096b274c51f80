"""volumes (seed 001)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("cluster_uuid", sa.String(36), nullable=False),
        sa.Column("pool_uuid", sa.String(36), nullable=False, index=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("vtype", sa.String(8), nullable=False),
        sa.Column("capacity", sa.BigInteger, nullable=False),
        sa.Column("used", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("snap_cap", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("snap_length", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("host_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("access_path", sa.String(1024), nullable=False, server_default=""),
        sa.Column("parent", sa.String(36), nullable=False, server_default=""),
        sa.Column("parent_snapshot", sa.String(36), nullable=False, server_default=""),
        sa.Column("attr_json", sa.Text, nullable=False, server_default="null"),
        sa.Column("state", sa.String(16), nullable=False, server_default="ready"),
        sa.Column("ctime", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant", "pool_uuid", "name", name="uq_volumes_tenant_pool_name"),
    )


def downgrade() -> None:
    op.drop_table("volumes")
