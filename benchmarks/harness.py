"""Run every benchmark scenario several times and report medians: ``python -m benchmarks``.

The harness starts its own nats-server (file storage, ``NatsServer`` from the testing kit),
creates the PostgreSQL database named by ``DATABASE_URL`` if it is missing, runs each scenario
in a fresh process ``--repeat`` times (round-robin, so slow drifts in machine load spread over
all scenarios), prints a markdown table of medians, ratios and targets, and (unless
``--smoke``) writes the same table with the machine description into ``docs/benchmarks.md``
between its ``bench:start``/``bench:end`` markers, leaving the hand-written analysis alone.

``--smoke`` runs tiny counts once: it proves the harness works (CI), not how fast anything is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/jsb_bench"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NATS_ENV = "bench"


@dataclass(frozen=True)
class Spec:
    """One measured configuration: a scenario function and its parameters."""

    key: str
    scenario: str
    full: dict[str, Any]
    smoke: dict[str, Any]
    needs: str | None = None  # an optional distribution; skipped (and said so) when absent
    max_runs: int | None = None  # fewer runs than --repeat for scenarios that take minutes


SPECS = [
    Spec("raw_serial", "raw_publish_serial", {"count": 5000}, {"count": 50}),
    Spec("raw_pipelined", "raw_publish_pipelined", {"count": 50_000}, {"count": 200}),
    Spec("raw_fetch", "raw_fetch_ack", {"count": 50_000}, {"count": 200}),
    Spec(
        "faststream_25",
        "faststream_consume",
        {"count": 5000, "batch": 25},
        {"count": 100, "batch": 25},
        needs="faststream",
    ),
    Spec(
        "faststream_100",
        "faststream_consume",
        {"count": 5000, "batch": 100},
        {"count": 100, "batch": 100},
        needs="faststream",
    ),
    Spec("publish_direct", "publish_direct", {"count": 3000}, {"count": 50}),
    Spec("publish_outbox", "publish_outbox_txn", {"count": 1000}, {"count": 30}),
    Spec("relay_1", "relay", {"count": 50_000, "relays": 1}, {"count": 500, "relays": 1}),
    Spec("relay_3", "relay", {"count": 50_000, "relays": 3}, {"count": 500, "relays": 3}),
    Spec("consume_25", "consume", {"count": 10_000, "batch": 25}, {"count": 200, "batch": 25}),
    Spec("consume_100", "consume", {"count": 10_000, "batch": 100}, {"count": 200, "batch": 100}),
    Spec(
        "consume_bulk_25",
        "consume",
        {"count": 10_000, "batch": 25, "handler": "write_rows"},
        {"count": 200, "batch": 25, "handler": "write_rows"},
    ),
    Spec(
        "consume_bulk_100",
        "consume",
        {"count": 10_000, "batch": 100, "handler": "write_rows"},
        {"count": 200, "batch": 100, "handler": "write_rows"},
    ),
    Spec("latency", "latency", {"rate": 500, "seconds": 10}, {"rate": 100, "seconds": 1}),
    Spec("latency_100", "latency", {"rate": 100, "seconds": 10}, {"rate": 50, "seconds": 1}),
    # ~4 minutes a run: once, at batch 100 (the fastest consumer setting measured here).
    Spec(
        "rss",
        "rss",
        {"count": 200_000, "batch": 100},
        {"count": 1000, "warm": 200},
        max_runs=1,
    ),
]


# -- environment --------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"bench | {text}", flush=True)


def database_name(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def ensure_database(url: str) -> str:
    """Create the database if missing; return the server's version."""
    import psycopg

    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "pgsql"):
        raise SystemExit(f"DATABASE_URL must point to PostgreSQL, got {parts.scheme}://")
    name = database_name(url)
    params: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": unquote(parts.username or "postgres"),
        "password": unquote(parts.password) if parts.password else None,
        "autocommit": True,
        "connect_timeout": 5,
    }
    with psycopg.connect(dbname="postgres", **params) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            say(f"creating database {name}")
            conn.execute(f'CREATE DATABASE "{name}"')
        version = conn.execute("SHOW server_version").fetchone()
    return str(version[0]) if version else "?"


def base_env(database_url: str, nats_url: str) -> dict[str, str]:
    env = dict(os.environ)
    # Development mode and the test suite's settings would distort every number.
    for name in ("PYTHONDEVMODE", "DJANGO_SETTINGS_MODULE", "JSB_TEST_OVERRIDES"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        DATABASE_URL=database_url,
        NATS_URLS=nats_url,
        NATS_ENV=NATS_ENV,
        APP_NAME="alpha",  # each scenario sets its own side; these satisfy the checks
        DESTINATION_APP="beta",
    )
    return env


def migrate(env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "django", "migrate", "--run-syncdb", "--verbosity", "0"]
    result = subprocess.run(
        command,
        env={**env, "DJANGO_SETTINGS_MODULE": "benchmarks.settings"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise SystemExit(f"migrate failed:\n{result.stdout}{result.stderr}")


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(pg_version: str, nats_server: str) -> list[tuple[str, str]]:
    cpu = "?"
    memory = "?"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        cpu = found.group(1).strip() if found else platform.processor() or "?"
        meminfo = Path("/proc/meminfo").read_text()
        total = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
        memory = f"{int(total.group(1)) / 1024 / 1024:.1f} GiB" if total else "?"
    except OSError:
        pass
    server_version = subprocess.run(
        [nats_server, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    versions = ", ".join(
        f"{name} {installed(name) or 'not installed'}"
        for name in ("nats-py", "Django", "psycopg", "faststream")
    )
    return [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", cpu),
        ("Memory", memory),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("PostgreSQL", pg_version),
        ("nats-server", server_version.removeprefix("nats-server: ")),
        ("Libraries", versions),
    ]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- running ------------------------------------------------------------------------------------


def run_scenario(spec: Spec, params: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.scenarios",
        spec.scenario,
        "--params",
        json.dumps(params),
    ]
    result = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise SystemExit(
            f"{spec.key} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    outcome: dict[str, Any] = json.loads(lines[-1])
    problem = sanity(spec, params, outcome)
    if problem:
        raise SystemExit(f"{spec.key}: {problem}\n{json.dumps(outcome)}\n{result.stderr}")
    return outcome


def sanity(spec: Spec, params: dict[str, Any], outcome: dict[str, Any]) -> str | None:
    """Every run also checks that the work was done, exactly once."""
    count = params.get("count")
    expected = {
        "stored": count,  # messages in the stream (duplicates would show here)
        "rows": count,  # handler rows
        "inbox": count,  # processed inbox rows
        "unsent": 0,  # outbox rows left behind
        "missing": 0,  # events whose handler never ran
        "consumer_exit": 0,
    }
    for name, want in expected.items():
        if name in outcome and want is not None and outcome[name] != want:
            return f"{name} is {outcome[name]}, expected {want}"
    if outcome.get("fast_path_idle") is False:
        return "fast-path publishes were still unrecorded after 30 s"
    return None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min, max) of every numeric field across runs; nested dicts likewise."""
    summary: dict[str, Any] = {}
    for name, first in runs[0].items():
        if isinstance(first, bool):
            continue
        if isinstance(first, (int, float)):
            values = [float(run[name]) for run in runs]
            summary[name] = statistics.median(values)
            summary[f"{name}__min"] = min(values)
            summary[f"{name}__max"] = max(values)
        elif isinstance(first, dict):
            summary[name] = summarise([run[name] for run in runs])
    return summary


# -- reporting ----------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    median: str
    spread: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Report:
    medians: dict[str, dict[str, Any]]
    runs: int
    skipped: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # runs per key, when fewer

    def get(self, key: str, metric: str) -> float | None:
        value = self.medians.get(key, {}).get(metric)
        return float(value) if isinstance(value, (int, float)) else None

    def spread(self, key: str, metric: str, fmt: Callable[[float], str]) -> str:
        low = self.get(key, f"{metric}__min")
        high = self.get(key, f"{metric}__max")
        if low is None or high is None or self.counts.get(key, self.runs) < 2:
            return ""
        return f"{fmt(low)} - {fmt(high)}"

    def note(self, key: str) -> str:
        """`` (1 run)`` where a scenario ran fewer times than the others."""
        count = self.counts.get(key, self.runs)
        return f" ({count} run{'s' if count > 1 else ''})" if count < self.runs else ""


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def ms(value: float) -> str:
    return f"{value:.2f} ms"


def mb(value: float) -> str:
    return f"{value:.1f} MB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def build_rows(report: Report, specs: dict[str, Spec], smoke: bool) -> list[Row]:
    rows: list[Row] = []

    def params(key: str) -> dict[str, Any]:
        return specs[key].smoke if smoke else specs[key].full

    def simple(key: str, label: str, metric: str, fmt: Callable[[float], str]) -> None:
        value = report.get(key, metric)
        if value is None:
            rows.append(Row(label, report.skipped.get(key, "not run"), ""))
        else:
            rows.append(Row(label, fmt(value), report.spread(key, metric, fmt)))

    simple("raw_serial", "nats-py `js.publish`, awaited one by one", "rate", rate)
    simple(
        "raw_pipelined",
        f"nats-py `js.publish_async`, ≤ 256 in flight ({params('raw_pipelined')['count']:,})",
        "rate",
        rate,
    )
    simple("raw_fetch", "nats-py pull consumer, `fetch(100)` + `ack()`", "rate", rate)
    for batch in (25, 100):
        simple(
            f"faststream_{batch}",
            f"FastStream pull subscriber, batch {batch}, ORM row + transaction per event",
            "rate",
            rate,
        )

    raw_serial = report.get("raw_serial", "rate")
    direct = report.get("publish_direct", "rate")
    if direct is not None:
        p50 = report.get("publish_direct", "p50_ms") or 0.0
        rows.append(
            Row(
                "`publish()` without outbox, sync, outside a transaction",
                f"{rate(direct)} (p50 {ms(p50)})",
                report.spread("publish_direct", "rate", rate),
                f"{direct / raw_serial:.2f} x awaited nats-py" if raw_serial else "",
            )
        )

    added = report.get("publish_outbox", "added_p50_ms")
    if added is not None:
        with_p50 = report.get("publish_outbox", "with_p50_ms") or 0.0
        without_p50 = report.get("publish_outbox", "without_p50_ms") or 0.0
        rows.append(
            Row(
                "`publish()` with outbox (PostgreSQL) in a request-like transaction: added p50",
                f"+{ms(added)} ({ms(with_p50)} vs {ms(without_p50)})",
                report.spread("publish_outbox", "added_p50_ms", ms),
                "",
                "≤ 1 ms",
                verdict(added <= 1.0),
            )
        )

    pipelined = report.get("raw_pipelined", "rate")
    for relays in (1, 3):
        key = f"relay_{relays}"
        value = report.get(key, "rate")
        if value is None:
            continue
        ratio = value / pipelined if pipelined else None
        rows.append(
            Row(
                f"`jetstream_relay` x {relays} draining {params(key)['count']:,} rows",
                rate(value),
                report.spread(key, "rate", rate),
                f"{ratio:.2f} x pipelined nats-py" if ratio is not None else "",
                "≥ 0.6 x",
                verdict(ratio >= 0.6) if ratio is not None else "",
            )
        )

    fetch = report.get("raw_fetch", "rate")
    for batch in (25, 100):
        key = f"consume_{batch}"
        value = report.get(key, "rate")
        if value is None:
            continue
        label = f"`jetstream_consume` batch {batch}, inbox on PostgreSQL, one-row handler"
        ratio = value / fetch if fetch else None
        rows.append(
            Row(
                label,
                rate(value),
                report.spread(key, "rate", rate),
                f"{ratio:.2f} x nats-py fetch+ack" if ratio is not None else "",
                "≥ 0.5 x",
                verdict(ratio >= 0.5) if ratio is not None else "",
            )
        )
        faststream = report.get(f"faststream_{batch}", "rate")
        if faststream:
            ratio = value / faststream
            rows.append(
                Row(
                    f"  ″ vs FastStream batch {batch}",
                    "",
                    "",
                    f"{ratio:.2f} x FastStream",
                    "≥ 2 x",
                    verdict(ratio >= 2.0),
                )
            )
        else:
            rows.append(
                Row(
                    f"  ″ vs FastStream batch {batch}",
                    "",
                    "",
                    report.skipped.get(f"faststream_{batch}", "not run"),
                    "≥ 2 x",
                    "",
                )
            )

    for batch in (25, 100):
        rows += _bulk_rows(report, batch, fetch)

    for key, reference in (("latency", False), ("latency_100", True)):
        latency_p50 = report.get(key, "p50_ms")
        if latency_p50 is None:
            continue
        p50 = latency_p50
        p99 = report.get(key, "p99_ms") or 0.0
        achieved = report.get(key, "achieved_rate") or 0.0
        busy = report.get(key, "busy_cores") or 0.0
        label = f"commit → handler start at {params(key)['rate']} events/s"
        if reference:
            label += " (reference)"
        load = f"{achieved:,.0f} events/s achieved; {busy:.1f} cores busy"
        rows.append(
            Row(
                f"{label}, p50",
                ms(p50),
                report.spread(key, "p50_ms", ms),
                load,
                "(≤ 5 ms at 500/s)" if reference else "≤ 5 ms",
                "" if reference else verdict(p50 <= 5.0),
            )
        )
        rows.append(
            Row(
                f"{label}, p99",
                ms(p99),
                report.spread(key, "p99_ms", ms),
                "",
                "(≤ 30 ms at 500/s)" if reference else "≤ 30 ms",
                "" if reference else verdict(p99 <= 30.0),
            )
        )

    growth = report.get("rss", "growth_mb")
    if growth is not None:
        warm = report.get("rss", "warm_mb") or 0.0
        end = report.get("rss", "end_mb") or 0.0
        rows.append(
            Row(
                f"consumer RSS growth over {params('rss')['count']:,} messages, "
                f"batch {params('rss').get('batch', 25)}" + report.note("rss"),
                f"{mb(growth)} ({mb(warm)} → {mb(end)})",
                report.spread("rss", "growth_mb", mb),
                "",
                "< 20 MB",
                verdict(growth < 20.0),
            )
        )
    return rows


def _bulk_rows(report: Report, batch: int, fetch: float | None) -> list[Row]:
    """The batch handler's row (``bulk_create`` per batch), against FastStream's same work."""
    key = f"consume_bulk_{batch}"
    value = report.get(key, "rate")
    if value is None:
        return []
    faststream = report.get(f"faststream_{batch}", "rate")
    label = f"`jetstream_consume` batch {batch}, inbox on PostgreSQL, batch handler `bulk_create`"
    return [
        Row(
            label,
            rate(value),
            report.spread(key, "rate", rate),
            f"{value / fetch:.2f} x nats-py fetch+ack" if fetch else "",
        ),
        Row(
            f"  ″ vs FastStream batch {batch}",
            "",
            "",
            f"{value / faststream:.2f} x FastStream"
            if faststream
            else report.skipped.get(f"faststream_{batch}", "not run"),
            "≥ 5 x",
            verdict(value / faststream >= 5.0) if faststream else "",
        ),
    ]


def markdown(rows: Sequence[Row], runs: int) -> str:
    header = f"| Scenario | Median of {runs} | Range | Ratio | Target | Verdict |"
    lines = [header, "| --- | ---: | ---: | --- | --- | --- |"]
    for row in rows:
        cells = [row.scenario, row.median, row.spread, row.ratio, row.target, row.verdict]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def breakdown(report: Report) -> str:
    """Where the time went, from methods the scenarios wrapped (medians of the runs)."""

    def percent(value: float) -> str:
        return f"{100 * value:.0f} %"

    lines = []
    consumer = [
        "| Consumer run | fetch (NATS) | batch transaction | ↳ inbox lookup | ↳ inbox rows "
        "| ↳ handler rows | ↳ savepoints, decode, rest | settle (acks) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in (25, 100):
        share = report.medians.get(f"consume_{batch}", {}).get("share")
        if share:
            inner = ("inbox_lookup", "inbox_row", "handler")
            rest = share.get("transaction", 0.0) - sum(share.get(name, 0.0) for name in inner)
            values = [share.get(name, 0.0) for name in ("fetch", "transaction", *inner)]
            cells = [percent(v) for v in [*values, max(0.0, rest), share.get("settle", 0.0)]]
            consumer.append(f"| `jetstream_consume` batch {batch} | " + " | ".join(cells) + " |")
    if len(consumer) > 2:
        lines += [*consumer, ""]
    relay = [
        "| Relay run (per worker thread) | claim (lock or lease rows) | record (mark sent) "
        "| rest (publish and acks, Python) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for relays in (1, 3):
        share = report.medians.get(f"relay_{relays}", {}).get("share")
        if share:
            claim, record = share.get("claim", 0.0), share.get("record", 0.0)
            cells = [percent(claim), percent(record), percent(max(0.0, 1 - claim - record))]
            relay.append(f"| `jetstream_relay` x {relays} | " + " | ".join(cells) + " |")
    if len(relay) > 2:
        lines += [*relay, ""]
    orm = report.get("publish_outbox", "outbox_orm_ms")
    raw = report.get("publish_outbox", "outbox_raw_ms")
    if orm is not None and raw is not None:
        lines += [
            "| Writing one outbox row inside a transaction | median |",
            "| --- | ---: |",
            f"| `OutboxStore.write`, as `publish()` writes it | {ms(orm)} |",
            f"| the same row with a hand-written `INSERT` (the floor) | {ms(raw)} |",
        ]
    return "\n".join(lines).strip()


def write_doc(section: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    DOC.write_text(f"{before}{START}\n{section}\n{END}{after}")


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one run, no doc")
    parser.add_argument("--repeat", type=int, help="runs per scenario (default 3; smoke 1)")
    parser.add_argument("--only", help="comma-separated keys: " + ", ".join(s.key for s in SPECS))
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)

    from jetstream_bridge.testing.server import NatsServer

    repeat = args.repeat or (1 if args.smoke else 3)
    wanted = set(args.only.split(",")) if args.only else None
    specs = [spec for spec in SPECS if wanted is None or spec.key in wanted]
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    pg_version = ensure_database(database_url)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_before = loadavg()
    say(f"load average {load_before}; database {database_name(database_url)}; {repeat} run(s)")

    with NatsServer() as server:
        env = base_env(database_url, server.url)
        migrate(env)
        say(f"nats-server {server.url} (file storage in {server.store_dir})")
        runs: dict[str, list[dict[str, Any]]] = {spec.key: [] for spec in specs}
        skipped: dict[str, str] = {}
        for spec in specs:
            if spec.needs and installed(spec.needs) is None:
                skipped[spec.key] = f"skipped: {spec.needs} is not installed"
                say(f"{spec.key}: {skipped[spec.key]}")
        for attempt in range(1, repeat + 1):
            for spec in specs:
                if spec.key in skipped or attempt > (spec.max_runs or repeat):
                    continue
                params = spec.smoke if args.smoke else spec.full
                clock = time.monotonic()
                outcome = run_scenario(spec, params, env)
                runs[spec.key].append(outcome)
                headline = {k: v for k, v in outcome.items() if isinstance(v, (int, float))}
                shown = ", ".join(
                    f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in headline.items()
                )
                runs_of_spec = min(repeat, spec.max_runs or repeat)
                took = time.monotonic() - clock
                say(f"{spec.key} run {attempt}/{runs_of_spec} ({took:.1f}s): {shown}")
        nats_binary = server.binary

    report = Report(
        medians={key: summarise(outcomes) for key, outcomes in runs.items() if outcomes},
        runs=repeat,
        skipped=skipped,
        counts={key: len(outcomes) for key, outcomes in runs.items() if outcomes},
    )
    table = markdown(build_rows(report, {s.key: s for s in SPECS}, args.smoke), repeat)
    split = breakdown(report)
    print()
    print(table)
    if split:
        print()
        print(split)
    load_after = loadavg()
    say(f"load average {load_after}")

    if not args.smoke and not args.no_doc:
        minutes = (datetime.datetime.now(datetime.timezone.utc) - started_at).total_seconds() / 60
        facts = machine(pg_version, nats_binary)
        facts += [
            ("Date (UTC)", started_at.strftime("%Y-%m-%d %H:%M")),
            ("Load average (1, 5, 15 min)", f"{load_before} before, {load_after} after"),
            ("Duration", f"{minutes:.1f} min, {repeat} runs per scenario"),
        ]
        section = "\n".join(
            [
                "Generated by `make bench`; do not edit between the markers.",
                "",
                "| Machine | |",
                "| --- | --- |",
                *(f"| {name} | {value} |" for name, value in facts),
                "",
                table,
                "",
                "Where the time went (shares of wall time, medians of the runs; for 3 relays "
                "the mean of the three processes):",
                "",
                split,
            ]
        )
        write_doc(section)
        say(f"wrote {DOC.relative_to(ROOT)}")
    return 0
