"""converge_trial_diagnoses: the latest convergence diagnosis of every trial.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 23:30:38.571738
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('converge_trial_diagnoses',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('trial_number', sa.Integer(), nullable=False),
    sa.Column('trial_id', sa.Integer(), nullable=False, comment="Optuna's trial_id"),
    sa.Column('epoch', sa.Integer(), nullable=False, comment='the last epoch the diagnosis saw'),
    sa.Column('verdict', sa.String(length=32), nullable=False),
    sa.Column('healthy', sa.Boolean(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('onset_epoch', sa.Integer(), nullable=True),
    sa.Column('final', sa.Boolean(), nullable=False),
    sa.Column('diagnosis', sa.JSON(), nullable=False, comment="the diagnosis as the contract's JSON"),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['converge_studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_id', 'trial_number', name='uq_converge_trial_diagnoses_trial')
    )
    with op.batch_alter_table('converge_trial_diagnoses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_converge_trial_diagnoses_verdict'), ['verdict'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('converge_trial_diagnoses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_converge_trial_diagnoses_verdict'))

    op.drop_table('converge_trial_diagnoses')
