"""vaults: servers (VMs) as resources, their disks as volume resources

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_servers",
        sa.Column("server_uuid", sa.String(36), primary_key=True),
        sa.Column("vault_id", sa.String(36), nullable=False, index=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("name", sa.String(255), nullable=False, server_default=""),
        sa.Column("exclude_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("added_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("vault_resources") as b:
        b.add_column(sa.Column("server_uuid", sa.String(36), nullable=False, server_default=""))
        b.create_index("ix_vault_resources_server_uuid", ["server_uuid"])


def downgrade() -> None:
    with op.batch_alter_table("vault_resources") as b:
        b.drop_index("ix_vault_resources_server_uuid")
        b.drop_column("server_uuid")
    op.drop_table("vault_servers")
