"""out-of-distribution guard: an admin's "score anyway" override per study

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('studies') as batch:
        batch.add_column(sa.Column('guard_override_by', sa.String(length=255), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('studies') as batch:
        batch.drop_column('guard_override_by')
