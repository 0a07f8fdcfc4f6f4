"""request fingerprint (Idempotency-Key conflicts) and retry link

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
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("retry_of", sa.String(length=32), nullable=True))
        batch_op.create_index("ix_jobs_retry_of", ["retry_of"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_retry_of")
        batch_op.drop_column("retry_of")
        batch_op.drop_column("request_fingerprint")
