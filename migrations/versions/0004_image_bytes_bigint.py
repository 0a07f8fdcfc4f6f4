"""image_bytes as a 64-bit integer: uploads of slides reach tens of gigabytes (PostgreSQL's
integer stops at 2 GiB)

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
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("image_bytes", existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("image_bytes", existing_type=sa.BigInteger(), type_=sa.Integer())
