"""Indexes for trial pages: diagnoses by (study, verdict, trial number) for a list filtered by verdict,
and retries by (study, rerun) to walk a trial's attempts back.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 09:12:00
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('converge_trial_diagnoses', schema=None) as batch_op:
        batch_op.create_index('ix_converge_trial_diagnoses_study_verdict', ['study_id', 'verdict', 'trial_number'],
                              unique=False)
    with op.batch_alter_table('converge_trial_retries', schema=None) as batch_op:
        batch_op.create_index('ix_converge_trial_retries_retry', ['study_id', 'retry_number'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('converge_trial_retries', schema=None) as batch_op:
        batch_op.drop_index('ix_converge_trial_retries_retry')
    with op.batch_alter_table('converge_trial_diagnoses', schema=None) as batch_op:
        batch_op.drop_index('ix_converge_trial_diagnoses_study_verdict')
