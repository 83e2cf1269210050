"""converge_studies.auto_repairs: automatic repairs reserved so far, capped by the spec's auto_repair.max.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 07:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('converge_studies') as batch:
        batch.add_column(sa.Column('auto_repairs', sa.Integer(), nullable=False, server_default='0',
                                   comment='automatic repairs reserved so far; one is reserved by incrementing it'))


def downgrade() -> None:
    with op.batch_alter_table('converge_studies') as batch:
        batch.drop_column('auto_repairs')
