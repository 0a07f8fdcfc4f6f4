"""job_shards and jobs.shards_total / jobs.assembler: one large job split into shards that
any worker runs (issue 16)

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
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shards_total", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("assembler", sa.String(length=32), nullable=True))
    op.create_table(
        "job_shards",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("shard_index", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("row_start", sa.Integer(), nullable=False),
        sa.Column("row_stop", sa.Integer(), nullable=False),
        sa.Column("work", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=True),
        sa.Column("backup_token", sa.String(length=32), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("backup_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("units_done", sa.Integer(), nullable=False),
        sa.Column("units_total", sa.Integer(), nullable=False),
        sa.Column("compute_seconds", sa.Float(), nullable=True),
        sa.Column("result_key", sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint("job_id", "shard_index"),
    )
    op.create_index("ix_job_shards_state_heartbeat", "job_shards", ["state", "heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_job_shards_state_heartbeat", table_name="job_shards")
    op.drop_table("job_shards")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("assembler")
        batch_op.drop_column("shards_total")
