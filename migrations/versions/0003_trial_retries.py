"""converge_trial_retries: failed attempts that were rerun as a new trial.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 04:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('converge_trial_retries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('trial_number', sa.Integer(), nullable=False, comment='the failed attempt'),
    sa.Column('trial_id', sa.Integer(), nullable=False, comment="Optuna's trial_id of the failed attempt"),
    sa.Column('retry_number', sa.Integer(), nullable=False, comment='the trial that reruns it'),
    sa.Column('reason', sa.String(length=16), nullable=False, comment='crashed | stale | interrupted'),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['converge_studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_id', 'trial_number', name='uq_converge_trial_retries_trial')
    )


def downgrade() -> None:
    op.drop_table('converge_trial_retries')
