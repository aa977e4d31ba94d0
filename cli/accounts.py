"""CLI commands for accounts: `chestaid user …`, `chestaid token …`, `chestaid audit export`."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cli._common import cli_actor, load_settings
from core import audit
from core import auth
from core.db import get_engine, session_scope


@contextmanager
def _session() -> Iterator[Session]:
    """Yields a committed-on-success session on the configured database, or fails with a clear message."""
    url = load_settings().database_url
    try:
        has_tables = inspect(get_engine(url)).has_table("users")
    except OperationalError as exc:
        # The URL is not echoed: a Postgres URL may carry a password.
        raise click.ClickException(f"cannot open the database ({exc.orig}): check CHESTAID_DATABASE_URL, "
                                   "or create it with `chestaid migrate`") from exc
    if not has_tables:
        raise click.ClickException("the database has no account tables yet: run the migrations first "
                                   "(`chestaid migrate`, or start `chestaid serve` once)")
    try:
        with session_scope(url) as session:
            yield session
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from exc


def _read_password(password_stdin: bool) -> str:
    """Reads a new password from stdin (first line) or a hidden prompt asked twice, and checks the policy."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        auth.check_password_policy(password)
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from exc
    return password


_password_stdin = click.option("--password-stdin", is_flag=True,
                               help="Read the password from the first line of stdin (for scripts).")


@click.group()
def user() -> None:
    """Manage accounts (there is no default account: create the first admin with `user add NAME --role admin`)."""


@user.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(auth.ROLES), help="nurse < doctor < admin.")
@_password_stdin
def user_add(name, role, password_stdin):
    """Create an account."""
    try:
        name = auth.normalize_name(name)
    except auth.AuthError as exc:
        raise click.ClickException(str(exc)) from exc
    with _session() as session:  # check first, so nobody types a password twice for nothing
        if auth.get_user(session, name=name) is not None:
            raise click.ClickException(f"a user named {name!r} already exists")
    password = _read_password(password_stdin)
    with _session() as session:
        auth.create_user(session, name=name, role=role, password=password, actor=cli_actor())
    click.echo(f"created {role} {name!r}")


@user.command("passwd")
@click.argument("name")
@_password_stdin
def user_passwd(name, password_stdin):
    """Set a new password for an account."""
    with _session() as session:
        if auth.get_user(session, name=name) is None:
            raise click.ClickException(f"no user named {name!r}")
    password = _read_password(password_stdin)
    with _session() as session:
        auth.set_password(session, name=name, password=password, actor=cli_actor())
    click.echo(f"password changed for {auth.normalize_name(name)!r}")


@user.command("disable")
@click.argument("name")
def user_disable(name):
    """Disable an account (it can no longer sign in; its API tokens are revoked)."""
    with _session() as session:
        u = auth.disable_user(session, name=name, actor=cli_actor())
        click.echo(f"disabled {u.name!r}")


@user.command("enable")
@click.argument("name")
def user_enable(name):
    """Re-enable a disabled account."""
    with _session() as session:
        u = auth.enable_user(session, name=name, actor=cli_actor())
        click.echo(f"enabled {u.name!r}")


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


@user.command("list")
def user_list():
    """List accounts."""
    with _session() as session:
        users = auth.list_users(session)
        if not users:
            click.echo("no accounts yet: create the first admin with `chestaid user add NAME --role admin`")
            return
        click.echo(f"{'name':<24} {'role':<7} {'status':<9} {'created':<21} last login")
        for u in users:
            status = "disabled" if u.disabled else "active"
            click.echo(f"{u.name:<24} {u.role:<7} {status:<9} {_when(u.created_at):<21} {_when(u.last_login_at)}")


@click.group()
def token() -> None:
    """Manage per-user API tokens for scripts (sent as `Authorization: Bearer <token>`)."""


@token.command("create")
@click.argument("name")
@click.option("--label", default="", help="What the token is for.")
def token_create(name, label):
    """Create an API token for NAME and print it (it is shown only this once)."""
    with _session() as session:
        value = auth.create_token(session, user_name=name, label=label, actor=cli_actor())
    click.echo(value)
    click.echo("Store this token now: it cannot be shown again.", err=True)


@token.command("list")
@click.argument("name", required=False)
def token_list(name):
    """List API tokens (ids, owners, labels; never the tokens)."""
    with _session() as session:
        for t, owner in auth.list_tokens(session, user_name=name):
            state = f"revoked {_when(t.revoked_at)}" if t.revoked_at else "active"
            click.echo(f"{t.id:>5} {owner:<24} {t.prefix}…  {state:<28} last used {_when(t.last_used_at)}  "
                       f"{t.label}")


@token.command("revoke")
@click.argument("token_id", type=int)
def token_revoke(token_id):
    """Revoke an API token by id (see `token list`)."""
    with _session() as session:
        auth.revoke_token(session, token_id=token_id, actor=cli_actor())
    click.echo(f"revoked token {token_id}")


@click.group("audit")
def audit_group() -> None:
    """The append-only audit trail."""


@audit_group.command("export")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="Write to FILE instead of stdout.")
def audit_export(out):
    """Export the whole audit trail as CSV."""
    with _session() as session:
        text = audit.export_csv(session)
        if out:  # written before the export is audited, so a failed write leaves no false record
            with open(out, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        audit.record(session, actor=cli_actor(), action=audit.AUDIT_EXPORTED, destination="file" if out else "stdout")
    if out:
        click.echo(f"wrote the audit trail to {out}", err=True)
    else:
        click.echo(text, nl=False)


ACCOUNT_COMMANDS = [user, token, audit_group]
