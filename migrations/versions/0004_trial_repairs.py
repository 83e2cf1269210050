"""converge_trial_repairs: unhealthy trials queued again with their first remedy applied.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 05:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('converge_trial_repairs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('trial_number', sa.Integer(), nullable=False, comment='the trial repaired'),
    sa.Column('repair_number', sa.Integer(), nullable=False, comment='the trial that runs the remedy'),
    sa.Column('remedy', sa.JSON(), nullable=False, comment='the remedy applied, as in the diagnosis'),
    sa.Column('params', sa.JSON(), nullable=False, comment="the repair's parameters"),
    sa.Column('automatic', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['converge_studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_id', 'trial_number', name='uq_converge_trial_repairs_trial')
    )


def downgrade() -> None:
    op.drop_table('converge_trial_repairs')
