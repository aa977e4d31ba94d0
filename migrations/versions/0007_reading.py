"""reading tool: soft "being read by" claims and an index per filtered-worklist sort

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'reading_claims',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('user_name', sa.String(length=255), nullable=False),
        sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_id', 'user_id', name='uq_reading_claims_study_user'),
    )
    op.create_index('ix_reading_claims_study_id', 'reading_claims', ['study_id'], unique=False)
    op.create_index('ix_reading_claims_user_id', 'reading_claims', ['user_id'], unique=False)
    op.create_index('ix_reading_claims_seen_at', 'reading_claims', ['seen_at'], unique=False)
    op.create_index('ix_worklist_rows_risk', 'worklist_rows', ['section', 'neg_score', 'first_id'], unique=False)
    op.create_index('ix_worklist_rows_arrival_id', 'worklist_rows', ['section', 'received_at', 'first_id'],
                    unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_worklist_rows_arrival_id', table_name='worklist_rows')
    op.drop_index('ix_worklist_rows_risk', table_name='worklist_rows')
    op.drop_index('ix_reading_claims_seen_at', table_name='reading_claims')
    op.drop_index('ix_reading_claims_user_id', table_name='reading_claims')
    op.drop_index('ix_reading_claims_study_id', table_name='reading_claims')
    op.drop_table('reading_claims')
