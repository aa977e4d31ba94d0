"""worklist at scale: materialised worklist rows and counts, paging and search indexes, backfilled

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_STUDIES = sa.table('studies', sa.column('id', sa.Integer), sa.column('status', sa.String),
                    sa.column('study_instance_uid', sa.String), sa.column('patient_id', sa.String),
                    sa.column('score', sa.Float), sa.column('flagged', sa.Boolean),
                    sa.column('received_at', sa.DateTime(timezone=True)),
                    sa.column('feedback_at', sa.DateTime(timezone=True)), sa.column('finding', sa.String))


def _backfill_rows() -> list[dict]:
    """Groups the scored studies as core.worklist_rows does (kept here so the migration never changes)."""
    groups: dict[tuple[str, str], list] = {}
    for m in op.get_bind().execute(sa.select(_STUDIES).where(_STUDIES.c.status == 'scored')):
        key = f"{m.study_instance_uid}|{m.patient_id or ''}" if m.study_instance_uid else f"#{m.id}"
        groups.setdefault(('unread' if m.finding is None else 'read', key), []).append(m)
    rows = []
    for (section, key), members in groups.items():
        lead = min(members, key=lambda m: (-(m.score or 0.0), m.id))
        received = min(m.received_at for m in members)
        feedback = [m.feedback_at for m in members if m.feedback_at is not None] or [received]
        rows.append({'section': section, 'group_key': key, 'lead_id': lead.id, 'neg_score': -(lead.score or 0.0),
                     'flagged': any(bool(m.flagged) for m in members),
                     'received_at': received,
                     'feedback_at': max(feedback) if section == 'read' else None,
                     'first_id': min(m.id for m in members), 'images': len(members)})
    return rows


def upgrade() -> None:
    """Upgrade schema."""
    rows_table = op.create_table(
        'worklist_rows',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('section', sa.String(length=16), nullable=False),
        sa.Column('group_key', sa.String(length=256), nullable=False),
        sa.Column('lead_id', sa.Integer(), nullable=False),
        sa.Column('neg_score', sa.Float(), nullable=False),
        sa.Column('flagged', sa.Boolean(), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('feedback_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('first_id', sa.Integer(), nullable=False),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('section', 'group_key', name='uq_worklist_rows_section_key'),
    )
    # Each unread tier and the read view is one ascending index range (risk is stored negated).
    op.create_index('ix_worklist_rows_flag_score', 'worklist_rows',
                    ['section', 'flagged', 'neg_score', 'received_at', 'first_id'])
    op.create_index('ix_worklist_rows_flag_wait', 'worklist_rows',
                    ['section', 'flagged', 'received_at', 'neg_score', 'first_id'])
    op.create_index('ix_worklist_rows_arrival', 'worklist_rows', ['section', 'received_at'])
    op.create_index('ix_worklist_rows_read', 'worklist_rows', ['section', 'feedback_at', 'first_id'])
    counts_table = op.create_table(
        'worklist_counts',
        sa.Column('section', sa.String(length=16), nullable=False),
        sa.Column('rows', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('section'),
    )
    op.create_index('ix_studies_status_received', 'studies', ['status', 'received_at', 'id'])
    op.create_index('ix_studies_source_name', 'studies', ['source_name'])
    rows = _backfill_rows()
    if rows:
        op.bulk_insert(rows_table, rows)
    op.bulk_insert(counts_table, [{'section': s, 'rows': sum(1 for r in rows if r['section'] == s)}
                                  for s in ('unread', 'read')])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_studies_source_name', table_name='studies')
    op.drop_index('ix_studies_status_received', table_name='studies')
    op.drop_table('worklist_counts')
    op.drop_index('ix_worklist_rows_read', table_name='worklist_rows')
    op.drop_index('ix_worklist_rows_arrival', table_name='worklist_rows')
    op.drop_index('ix_worklist_rows_flag_wait', table_name='worklist_rows')
    op.drop_index('ix_worklist_rows_flag_score', table_name='worklist_rows')
    op.drop_table('worklist_rows')
