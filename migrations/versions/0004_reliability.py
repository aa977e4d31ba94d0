"""reliability: claims counted per study (poison-file containment) and a per-user session generation

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('studies', schema=None) as batch_op:
        # Claims taken without a stored result: a worker that dies on a file each time stops at the limit.
        batch_op.add_column(sa.Column('claim_count', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('users', schema=None) as batch_op:
        # Bumped on logout (and password change): every session cookie of an older generation is void.
        batch_op.add_column(sa.Column('session_generation', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('session_generation')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('claim_count')
