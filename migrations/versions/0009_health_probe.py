"""converge_health: the single row `/v1/health` rewrites to learn whether the database takes a write.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 18:00:00
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table('converge_health',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False, comment='always 1'),
    sa.Column('probes', sa.Integer(), nullable=False, comment='write probes that went through'),
    sa.Column('probed_at', sa.DateTime(timezone=True), nullable=False, comment='the latest one'),
    sa.PrimaryKeyConstraint('id')
    )
    op.bulk_insert(table, [{'id': 1, 'probes': 0, 'probed_at': datetime.now(timezone.utc)}])


def downgrade() -> None:
    op.drop_table('converge_health')
