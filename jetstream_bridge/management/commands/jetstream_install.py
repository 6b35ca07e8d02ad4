from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS

from ... import install
from ..base import BridgeCommand


class Command(BridgeCommand):
    help = (
        "Set up jetstream-bridge in this project: check INSTALLED_APPS, print (or --write) a "
        "documented JETSTREAM_BRIDGE settings block, and with --migrate apply the bridge's "
        "migrations. Safe to run again: it changes only what is missing."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--write", metavar="PATH", help="write the settings block to PATH")
        parser.add_argument(
            "--force", action="store_true", help="overwrite PATH when its content differs"
        )
        parser.add_argument("--migrate", action="store_true", help="apply the bridge's migrations")
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="database alias to migrate"
        )

    def run(self, **options: Any) -> None:
        if not install.is_installed():
            raise CommandError(
                "'jetstream_bridge' is not in INSTALLED_APPS. Add it to INSTALLED_APPS in your "
                "settings, then run `manage.py jetstream_install` again."
            )
        if options["write"]:
            path = Path(options["write"])
            outcome = install.write_settings(path, force=options["force"])
            if outcome is install.WriteResult.DIFFERS:
                raise CommandError(
                    f"{path} exists and differs from the generated settings; nothing written. "
                    "Compare them, or pass --force to overwrite."
                )
            messages = {
                install.WriteResult.CREATED: f"settings: wrote {path}",
                install.WriteResult.OVERWRITTEN: f"settings: overwrote {path}",
                install.WriteResult.UNCHANGED: f"settings: {path} is up to date; unchanged",
            }
            self.stdout.write(messages[outcome])
            if outcome is not install.WriteResult.UNCHANGED:
                self.stdout.write(
                    "  import it from your settings module, e.g. "
                    f"`from .{path.stem} import JETSTREAM_BRIDGE`"
                )
        else:
            self.stdout.write(install.settings_block(), ending="")
        if options["migrate"]:
            pending = install.pending_migrations(options["database"])
            if not pending:
                self.stdout.write("migrations: jetstream_bridge is up to date; nothing applied")
                return
            call_command(
                "migrate",
                install.APP_LABEL,
                database=options["database"],
                verbosity=0,
                stdout=self.stdout,
            )
            self.stdout.write(f"migrations: applied {', '.join(pending)}")
