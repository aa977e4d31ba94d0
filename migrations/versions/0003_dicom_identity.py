"""DICOM identity on studies (UIDs, accession, patient, acquisition) and the refused status

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# (name, length, index): plain nullable columns, so identity is queryable and indexable on every backend.
# 'refused' needs no schema change: status is a free String(16).
COLUMNS = [
    ('sop_instance_uid', 64, 'unique'),
    ('sop_class_uid', 64, None),
    ('study_instance_uid', 64, 'index'),
    ('series_instance_uid', 64, 'index'),
    ('accession_number', 64, 'index'),
    ('patient_id', 128, 'index'),
    ('patient_name', 320, None),
    ('patient_sex', 16, None),
    ('patient_age', 16, None),
    ('study_date', 16, None),
    ('study_time', 32, None),
    ('modality', 16, None),
    ('body_part_examined', 64, None),
    ('view_position', 16, None),
]


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('studies', schema=None) as batch_op:
        for name, length, _ in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.String(length=length), nullable=True))
        for name, _, index in COLUMNS:
            if index:
                # A unique index allows any number of NULLs (non-DICOM films, duplicates) on SQLite and Postgres.
                batch_op.create_index(batch_op.f(f'ix_studies_{name}'), [name], unique=index == 'unique')


def downgrade() -> None:
    """Downgrade schema."""
    # Earlier code knows no 'refused': such films become failed, keeping the guard's reason as the error.
    op.execute("UPDATE studies SET status = 'failed' WHERE status = 'refused'")
    with op.batch_alter_table('studies', schema=None) as batch_op:
        for name, _, index in reversed(COLUMNS):
            if index:
                batch_op.drop_index(batch_op.f(f'ix_studies_{name}'))
        for name, _, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
