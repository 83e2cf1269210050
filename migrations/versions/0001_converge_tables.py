"""Converge's first tables: studies as submitted, per-epoch trial metrics, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 18:39:22.677082
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('converge_studies',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('n_trials', sa.Integer(), nullable=False),
    sa.Column('n_claimed', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('converge_studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_converge_studies_state'), ['state'], unique=False)

    op.create_table('converge_workers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('devices', sa.String(length=255), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('current_trials', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_heartbeat', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('converge_trial_metrics',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('trial_number', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False, comment="Optuna's trial_id"),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=True),
    sa.Column('val_loss', sa.Float(), nullable=True),
    sa.Column('val_acc', sa.Float(), nullable=True),
    sa.Column('grad_norm', sa.Float(), nullable=True),
    sa.Column('param_norm', sa.Float(), nullable=True),
    sa.Column('lr', sa.Float(), nullable=True),
    sa.Column('epoch_seconds', sa.Float(), nullable=True),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['converge_studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_id', 'trial_number', 'epoch', name='uq_converge_trial_metrics_epoch')
    )
    with op.batch_alter_table('converge_trial_metrics', schema=None) as batch_op:
        batch_op.create_index('ix_converge_trial_metrics_trial_id', ['trial_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('converge_trial_metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_converge_trial_metrics_trial_id')

    op.drop_table('converge_trial_metrics')
    op.drop_table('converge_workers')
    with op.batch_alter_table('converge_studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_converge_studies_state'))

    op.drop_table('converge_studies')
