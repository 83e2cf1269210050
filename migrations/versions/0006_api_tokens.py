"""converge_api_tokens: bearer tokens for the REST API and the dashboard, stored as SHA-256 hashes only.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 10:38:33
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('converge_api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=100), nullable=True, comment='a label, for people'),
    sa.Column('scope', sa.String(length=8), nullable=False, comment='read | write | admin'),
    sa.Column('token_hash', sa.String(length=64), nullable=False, comment='SHA-256 of the whole token, hex'),
    sa.Column('prefix', sa.String(length=12), nullable=False, comment="the token's first 12 characters, for listing"),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True, comment='updated at most once a minute'),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('converge_api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_converge_api_tokens_token_hash'), ['token_hash'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('converge_api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_converge_api_tokens_token_hash'))

    op.drop_table('converge_api_tokens')
