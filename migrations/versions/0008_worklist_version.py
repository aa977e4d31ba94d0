"""worklist version: one counter that every change to the studies or the worklist rows moves

The polled worklist fragment answers 304 from it without rebuilding the page (web.poll): any committed write
to `studies` or `worklist_rows` (insert, update, delete, truncate) bumps `worklist_version.n`, in the same
transaction, so the new number becomes visible together with the change it stands for.

On Postgres the bump is a deferred constraint trigger that runs once per transaction at commit: the counter row
is locked only for the instant before the commit, after every other lock the transaction takes, so two
writers can wait on it but never deadlock (a bump at the first write would hold it across the claim's
`FOR UPDATE SKIP LOCKED` and the rest of the transaction). SQLite serialises writers, so a plain row trigger
does.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_TABLES = ('studies', 'worklist_rows')

_PG_FUNCTION = """
CREATE FUNCTION chestaid_bump_worklist_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- once per transaction: the setting is local to it and names it
    IF current_setting('chestaid.worklist_bumped', true) IS DISTINCT FROM txid_current()::text THEN
        PERFORM set_config('chestaid.worklist_bumped', txid_current()::text, true);
        UPDATE worklist_version SET n = n + 1 WHERE id = 1;
    END IF;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('worklist_version',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('n', sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint('id'))
    op.execute("INSERT INTO worklist_version (id, n) VALUES (1, 1)")
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_PG_FUNCTION)
        for table in _TABLES:
            op.execute(f"CREATE CONSTRAINT TRIGGER {table}_worklist_version AFTER INSERT OR UPDATE OR DELETE "
                       f"ON {table} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                       "EXECUTE FUNCTION chestaid_bump_worklist_version()")
            op.execute(f"CREATE TRIGGER {table}_worklist_version_truncate AFTER TRUNCATE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION chestaid_bump_worklist_version()")
    else:
        for table in _TABLES:
            for event in ('INSERT', 'UPDATE', 'DELETE'):
                op.execute(f"CREATE TRIGGER {table}_worklist_version_{event.lower()} AFTER {event} ON {table} "
                           "BEGIN UPDATE worklist_version SET n = n + 1 WHERE id = 1; END")


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == 'postgresql':
        for table in _TABLES:
            op.execute(f"DROP TRIGGER {table}_worklist_version_truncate ON {table}")
            op.execute(f"DROP TRIGGER {table}_worklist_version ON {table}")
        op.execute("DROP FUNCTION chestaid_bump_worklist_version()")
    else:
        for table in _TABLES:
            for event in ('insert', 'update', 'delete'):
                op.execute(f"DROP TRIGGER {table}_worklist_version_{event}")
    op.drop_table('worklist_version')
