"""converge_schedules, converge_schedule_runs and converge_webhook_deliveries: nightly (cron) sweeps,
one run row per schedule and fire time (the unique insert decides which scheduler launches it), and each
webhook notification with its delivery attempts.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('converge_schedules',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('cron', sa.String(length=120), nullable=False, comment='a 5-field cron expression'),
    sa.Column('timezone', sa.String(length=64), nullable=False, comment='an IANA time zone, e.g. Europe/Berlin'),
    sa.Column('template', sa.JSON(), nullable=False, comment="a study spec whose name is the runs' prefix"),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('misfire_grace_s', sa.Integer(), nullable=False, comment='a fire time missed by more is skipped'),
    sa.Column('overlap', sa.String(length=8), nullable=False,
              comment='skip | queue: a fire while the last run is going'),
    sa.Column('warm_start_top_k', sa.Integer(), nullable=False,
              comment="the previous run's best k params enqueued first"),
    sa.Column('warm_start_search_space', sa.Boolean(), nullable=False,
              comment="start from the previous run's recommended search space"),
    sa.Column('regression_threshold', sa.Float(), nullable=False,
              comment='a run whose best worsens by more than this fraction is a regression'),
    sa.Column('webhook_url', sa.String(length=2000), nullable=True),
    sa.Column('fired_through', sa.DateTime(timezone=True), nullable=True, comment='the latest fire time handled'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('converge_schedule_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('schedule_id', sa.Integer(), nullable=False),
    sa.Column('fire_time', sa.DateTime(timezone=True), nullable=False, comment='the cron time it is for'),
    sa.Column('state', sa.String(length=16), nullable=False,
              comment='waiting | starting | running | done | failed | cancelled | skipped'),
    sa.Column('reason', sa.Text(), nullable=True, comment='why skipped or failed'),
    sa.Column('study_name', sa.String(length=100), nullable=True),
    sa.Column('manual', sa.Boolean(), nullable=False, comment='run-now, not the cron'),
    sa.Column('warm_start', sa.JSON(), nullable=True, comment='what was carried over from the last run'),
    sa.Column('report', sa.JSON(), nullable=True, comment='the comparison with the previous run'),
    sa.Column('regression', sa.Boolean(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['schedule_id'], ['converge_schedules.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('schedule_id', 'fire_time', name='uq_converge_schedule_runs_fire')
    )
    with op.batch_alter_table('converge_schedule_runs', schema=None) as batch_op:
        batch_op.create_index('ix_converge_schedule_runs_state', ['state'], unique=False)

    op.create_table('converge_webhook_deliveries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('schedule_id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False, comment='run.finished | run.regression | run.failed'),
    sa.Column('url', sa.String(length=2000), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, comment='pending | delivered | failed'),
    sa.Column('attempts', sa.JSON(), nullable=False, comment='each attempt: at, status (HTTP) or error, seconds'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['converge_schedule_runs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['schedule_id'], ['converge_schedules.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('converge_webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_converge_webhook_deliveries_run', ['run_id'], unique=False)


def downgrade() -> None:

    with op.batch_alter_table('converge_webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_converge_webhook_deliveries_run')

    op.drop_table('converge_webhook_deliveries')
    with op.batch_alter_table('converge_schedule_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_converge_schedule_runs_state')

    op.drop_table('converge_schedule_runs')
    op.drop_table('converge_schedules')
