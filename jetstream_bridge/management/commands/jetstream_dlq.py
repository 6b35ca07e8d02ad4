from __future__ import annotations

import json
from argparse import ArgumentParser
from collections.abc import Iterable
from typing import Any

from django.core.management.base import CommandError

from ... import dlq
from ...conf import get_config
from ..base import BridgeCommand, duration_arg, render_table
from ..render import dead_letter_lines, dead_letter_notes, dead_letter_rows, printable


def parse_seqs(values: Iterable[str | int] | None) -> frozenset[int]:
    """Turn ``--seq`` values (repeatable, or comma-separated) into a set of sequences."""
    seqs: set[int] = set()
    for value in values or ():
        for part in str(value).split(","):
            if part.strip():
                seqs.add(int(part))
    return frozenset(seqs)


def _filters(parser: ArgumentParser) -> None:
    parser.add_argument("--reason", help="only this reason (malformed, rejected, invalid, ...)")
    parser.add_argument("--consumer", help="only messages dead-lettered by this durable")
    parser.add_argument(
        "--seq", action="append", default=[], help="only this DLQ sequence (repeatable)"
    )
    parser.add_argument(
        "--since", type=duration_arg, metavar="AGE", help="only dead-lettered within AGE (1h)"
    )
    parser.add_argument(
        "--older-than",
        type=duration_arg,
        metavar="AGE",
        help="only dead-lettered more than AGE ago",
    )


class Command(BridgeCommand):
    help = "Triage dead letters: list, show, replay (to their original subject) or purge them."

    def add_arguments(self, parser: ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        listing = actions.add_parser("list", help="list dead letters with reason and age")
        _filters(listing)
        listing.add_argument("--limit", type=int, default=100, help="show at most this many")
        listing.add_argument("--json", action="store_true", help="print JSON")
        show = actions.add_parser("show", help="show one dead letter with headers and body")
        show.add_argument("seq", type=int, help="stream sequence of the dead letter")
        show.add_argument("--json", action="store_true", help="print JSON")
        replay = actions.add_parser("replay", help="republish dead letters to their subject")
        _filters(replay)
        replay.add_argument(
            "--keep", action="store_true", help="keep them in the DLQ after replaying"
        )
        replay.add_argument(
            "--to-subject",
            action="append",
            default=[],
            metavar="SUBJECT",
            help="also replay letters whose original subject is SUBJECT (repeatable); by "
            "default only this app's inbound subject is a target",
        )
        replay.add_argument(
            "--broadcast",
            action="store_true",
            help="let every durable on the subject handle it again, not only the one that "
            "dead-lettered it",
        )
        replay.add_argument(
            "--include-unverified",
            action="store_true",
            help="also replay letters whose signature does not verify with DLQ_SIGNING_KEY",
        )
        purge = actions.add_parser("purge", help="delete dead letters")
        _filters(purge)
        purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    def run(self, **options: Any) -> None:
        getattr(self, f"_{options['action']}")(options)

    def _selection(self, options: dict[str, Any]) -> dlq.Selection:
        try:
            seqs = parse_seqs(options["seq"])
        except ValueError as exc:
            raise CommandError(f"--seq takes stream sequences: {exc}") from exc
        return dlq.Selection(
            reason=options["reason"],
            consumer=options["consumer"],
            seqs=seqs,
            since=options["since"],
            older_than=options["older_than"],
        )

    def _list(self, options: dict[str, Any]) -> None:
        depth, messages = dlq.list_dead_letters(self._selection(options), limit=options["limit"])
        if options["json"]:
            data = {
                "subject": depth.subject,
                "stream": depth.stream,
                "depth": depth.messages,
                "messages": [m.to_dict() for m in messages],
            }
            self.stdout.write(json.dumps(data, indent=2))
            return
        if messages:
            for line in render_table(dead_letter_rows(messages)):
                self.stdout.write(line)
            for line in dead_letter_notes(messages):
                self.stdout.write(line)
        self.stdout.write(
            f"{len(messages)} shown; {depth.messages} dead letter(s) on {depth.subject}"
            + (f" in stream {depth.stream}" if depth.stream else " (no stream stores it)")
        )

    def _show(self, options: dict[str, Any]) -> None:
        message = dlq.get_dead_letter(options["seq"])
        if message is None:
            raise CommandError(f"no dead letter at sequence {options['seq']}")
        if options["json"]:
            self.stdout.write(json.dumps(message.to_dict(body=True), indent=2))
        else:
            for line in dead_letter_lines(message):
                self.stdout.write(line)

    def _replay(self, options: dict[str, Any]) -> None:
        policy = dlq.ReplayPolicy(
            subjects=frozenset(self._targets(options["to_subject"])),
            include_unverified=options["include_unverified"],
            broadcast=options["broadcast"],
        )
        result = dlq.replay(self._selection(options), keep=options["keep"], policy=policy)
        for seq, new_seq in result.replayed:
            self.stdout.write(f"replayed {seq} -> stream sequence {new_seq}")
        for seq, why in result.failed:
            self.stderr.write(f"not replayed {seq}: {printable(why)}")
        kept = "kept in the DLQ" if options["keep"] else f"{result.deleted} removed from the DLQ"
        self.stdout.write(f"replayed {len(result.replayed)} dead letter(s), {kept}")
        if result.failed:
            raise CommandError(f"{len(result.failed)} dead letter(s) could not be replayed")

    def _targets(self, subjects: list[str]) -> list[str]:
        """Check each ``--to-subject`` against the rules a replay target must meet."""
        config = get_config()
        for subject in subjects:
            problem = dlq.replay_problem(config, subject, allowed={subject})
            if problem:
                raise CommandError(f"--to-subject {printable(subject)}: {printable(problem)}")
        return subjects

    def _purge(self, options: dict[str, Any]) -> None:
        selection = self._selection(options)
        matching, last_seq = dlq.count(selection)
        if not matching:
            self.stdout.write("no dead letters match; nothing purged")
            return
        if not options["yes"]:
            try:
                answer = input(f"Delete {matching} dead letter(s) for good? [y/N] ")
            except EOFError:  # no terminal: never assume yes
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("purge cancelled; nothing deleted")
        purged = dlq.purge(selection, upto_seq=last_seq)
        self.stdout.write(f"purged {purged} dead letter(s)")
