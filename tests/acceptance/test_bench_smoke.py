"""``make bench`` in miniature: the harness runs every scenario once with tiny counts.

It proves the benchmarks still run (and that every scenario's own exactly-once checks pass);
it judges no timings. The harness gets a PostgreSQL database of its own on the suite's server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"


@pytest.fixture
def bench_database_url() -> Iterator[str]:
    db = settings.DATABASES["default"]
    if not db["ENGINE"].endswith("postgresql"):
        pytest.skip(
            "the benchmarks need PostgreSQL (run the suite with DATABASE_URL=postgres://...)"
        )
    import psycopg

    name = f"jsb_bench_smoke_{os.getpid()}"
    params = {
        "host": db.get("HOST") or "127.0.0.1",
        "port": db.get("PORT") or 5432,
        "user": db.get("USER") or "postgres",
        "password": db.get("PASSWORD") or None,
    }
    password = f":{params['password']}" if params["password"] else ""
    yield f"postgres://{params['user']}{password}@{params['host']}:{params['port']}/{name}"
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench__smoke_run_prints_the_table_and_leaves_the_doc_alone(
    bench_database_url: str,
) -> None:
    doc_before = DOC.read_text() if DOC.exists() else None
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    env["DATABASE_URL"] = bench_database_url
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "| Scenario | Median of 1 | Range | Ratio | Target | Verdict |" in out
    for row in (
        "nats-py `js.publish`, awaited one by one",
        "nats-py `js.publish_async`",
        "nats-py pull consumer, `fetch(100)` + `ack()`",
        "FastStream pull subscriber, batch 25",
        "`publish()` without outbox",
        "`publish()` with outbox (PostgreSQL) in a request-like transaction",
        "`jetstream_relay` x 1",
        "`jetstream_relay` x 3",
        "`jetstream_consume` batch 25",
        "`jetstream_consume` batch 100",
        "commit → handler start",
        "consumer RSS growth",
    ):
        assert row in out, f"missing row {row!r}:\n{out}"
    assert "| `jetstream_consume` batch 25 |" in out  # the time breakdown
    assert (DOC.read_text() if DOC.exists() else None) == doc_before
