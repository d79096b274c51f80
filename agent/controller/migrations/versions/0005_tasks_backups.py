"""tasks and backups

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("operation_type", sa.String(32), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("progress", sa.Float, nullable=False, server_default="0"),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("resource_type", sa.String(16), nullable=False),
        sa.Column("resource_uuid", sa.String(36), nullable=False, index=True),
        sa.Column("pool_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("target_pool_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("backup_point_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("job_kind", sa.String(16), nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("idempotent", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("host_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("agent_job_id", sa.String(80), nullable=False, server_default=""),
        sa.Column("error_code", sa.String(32), nullable=False, server_default=""),
        sa.Column("error_message", sa.Text, nullable=False, server_default=""),
        sa.Column("result_json", sa.Text, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("ended_at", sa.Float, nullable=False, server_default="0"),
    )
    op.create_table(
        "backups",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(36), nullable=False, index=True),
        sa.Column("cluster_uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(1024), nullable=False, server_default=""),
        sa.Column("backup_point_uuid", sa.String(36), nullable=False, index=True),
        sa.Column("volume_uuid", sa.String(36), nullable=False, index=True),
        sa.Column("volume_capacity", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("volume_type", sa.String(8), nullable=False, server_default="block"),
        sa.Column("pool_uuid", sa.String(36), nullable=False, server_default=""),
        sa.Column("snapshot_uuid", sa.String(36), nullable=False),
        sa.Column("snapshot_name", sa.String(128), nullable=False, server_default=""),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False, server_default=""),
        sa.Column("size", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stored_bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("image_digest", sa.String(80), nullable=False, server_default=""),
        sa.Column("task_id", sa.String(36), nullable=False, server_default=""),
        sa.Column("ctime", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("backup_points") as batch:
        batch.add_column(sa.Column("env_sealed", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("backup_points") as batch:
        batch.drop_column("env_sealed")
    op.drop_table("backups")
    op.drop_table("tasks")
