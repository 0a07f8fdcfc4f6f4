"""Bring a database to the newest schema with Alembic (never `create_all`).

`python -m shared.jobs.migrate` is the compose `migrate` step; the dev stack and the tests call
`upgrade_database(url)`.
"""

from __future__ import annotations

import sys

from alembic import command
from alembic.config import Config

from shared.settings import REPO_ROOT, get_settings


def alembic_config(database_url: str) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["skip_logging"] = True
    return config


def upgrade_database(database_url: str, revision: str = "head") -> None:
    if database_url.startswith("sqlite:///"):
        from pathlib import Path

        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    url = get_settings().resolved_database_url
    upgrade_database(url, argv[0] if argv else "head")
    print(f"database at {url.split('@')[-1]} is at {argv[0] if argv else 'head'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
