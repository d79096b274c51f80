"""vaults, policies, vault resources, checkpoints (seed 003)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("operation_type", sa.String(16), nullable=False, server_default="backup"),
        sa.Column("definition_json", sa.Text, nullable=False),
        sa.Column("patterns_json", sa.Text, nullable=False),
        sa.Column("start_time", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("tenant", "name", name="uq_policies_tenant_name"),
    )
    op.create_table(
        "vaults",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("description", sa.String(64), nullable=False, server_default=""),
        sa.Column("backup_point_uuid", sa.String(36), nullable=False, index=True),
        sa.Column("size_gb", sa.BigInteger, nullable=False),
        sa.Column("object_type", sa.String(16), nullable=False, server_default="disk"),
        sa.Column("consistent_level", sa.String(32), nullable=False, server_default="crash_consistent"),
        sa.Column("policy_id", sa.String(36), nullable=False, server_default="", index=True),
        sa.Column("policy_since", sa.Float, nullable=False, server_default="0"),
        sa.Column("backup_name_prefix", sa.String(32), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False, server_default="available"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("tenant", "name", name="uq_vaults_tenant_name"),
    )
    op.create_table(
        "vault_resources",
        sa.Column("volume_uuid", sa.String(36), primary_key=True),
        sa.Column("vault_id", sa.String(36), nullable=False, index=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("base_snapshot", sa.String(36), nullable=False, server_default=""),
        sa.Column("added_at", sa.Float, nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("vault_id", sa.String(36), nullable=False, index=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("policy_id", sa.String(36), nullable=False, server_default=""),
        sa.Column("due_at", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="protecting"),
        sa.Column("manual", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("resources_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("skipped_json", sa.Text, nullable=False, server_default="[]"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("vault_id", "due_at", name="uq_checkpoints_vault_due"),
    )
    with op.batch_alter_table("backups") as b:
        b.add_column(sa.Column("vault_id", sa.String(36), nullable=False, server_default=""))
        b.add_column(sa.Column("checkpoint_id", sa.String(36), nullable=False, server_default=""))
        b.create_index("ix_backups_vault_id", ["vault_id"])


def downgrade() -> None:
    with op.batch_alter_table("backups") as b:
        b.drop_index("ix_backups_vault_id")
        b.drop_column("checkpoint_id")
        b.drop_column("vault_id")
    for t in ("checkpoints", "vault_resources", "vaults", "policies"):
        op.drop_table(t)
