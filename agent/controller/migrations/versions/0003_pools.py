"""pools (seed 002)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("cluster_uuid", sa.String(36), nullable=False, index=True),
        sa.Column("zone_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("pool_type", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("ip", sa.String(255), nullable=False, server_default=""),
        sa.Column("port", sa.String(8), nullable=False, server_default=""),
        sa.Column("source", sa.String(1024), nullable=False, server_default=""),
        sa.Column("username", sa.String(255), nullable=False, server_default=""),
        sa.Column("password_sealed", sa.String(512), nullable=False, server_default=""),
        sa.Column("limit_host", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("avail_hosts_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("avail_tenants_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("attr_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("status", sa.String(16), nullable=False, server_default="unknown"),
        sa.Column("capacity", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("used", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("machine_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("ctime", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.BigInteger, nullable=False, server_default="0"),
        sa.UniqueConstraint("cluster_uuid", "name", name="uq_pools_cluster_name"),
    )


def downgrade() -> None:
    op.drop_table("pools")
