"""hosts: the cluster and zone they belong to; pools: their zone's name

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as b:
        b.add_column(sa.Column("cluster_uuid", sa.String(36), nullable=False, server_default=""))
        b.add_column(sa.Column("zone_uuid", sa.String(36), nullable=False, server_default=""))
        b.add_column(sa.Column("zone_name", sa.String(64), nullable=False, server_default=""))
    with op.batch_alter_table("pools") as b:
        b.add_column(sa.Column("zone_name", sa.String(64), nullable=False, server_default="default"))


def downgrade() -> None:
    with op.batch_alter_table("pools") as b:
        b.drop_column("zone_name")
    with op.batch_alter_table("hosts") as b:
        b.drop_column("zone_name")
        b.drop_column("zone_uuid")
        b.drop_column("cluster_uuid")
