"""webhook columns: callback_url and the delivery record of each job

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = (
    ("callback_url", sa.String(length=2000), True, None),
    ("webhook_state", sa.String(length=16), True, None),
    ("webhook_attempts", sa.Integer(), False, "0"),
    ("webhook_last_status", sa.Integer(), True, None),
    ("webhook_last_error", sa.String(length=300), True, None),
    ("webhook_last_at", sa.DateTime(timezone=True), True, None),
    ("webhook_next_at", sa.DateTime(timezone=True), True, None),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for name, kind, nullable, default in COLUMNS:
            batch_op.add_column(sa.Column(name, kind, nullable=nullable, server_default=default))
        batch_op.create_index("ix_jobs_webhook_due", ["webhook_state", "webhook_next_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_webhook_due")
        for name, *_ in reversed(COLUMNS):
            batch_op.drop_column(name)
