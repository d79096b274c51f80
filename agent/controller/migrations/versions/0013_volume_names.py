"""volumes: names need not be unique in a pool (seed 001 identifies
volumes by uuid, and its examples create two named "test")

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("volumes") as b:
        b.drop_constraint("uq_volumes_tenant_pool_name", type_="unique")
        b.create_index("ix_volumes_pool_name", ["pool_uuid", "name"])


def downgrade() -> None:
    with op.batch_alter_table("volumes") as b:
        b.drop_index("ix_volumes_pool_name")
        b.create_unique_constraint("uq_volumes_tenant_pool_name", ["tenant", "pool_uuid", "name"])
