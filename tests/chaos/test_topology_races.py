"""Scenario 6: many processes ensure the topology at once while another thread creates and
deletes streams whose subjects overlap ours (and deletes our stream under them)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from jetstream_bridge.broker import Connection
from jetstream_bridge.core.errors import JetStreamBridgeError
from jetstream_bridge.core.topology_plan import desired_subjects
from jetstream_bridge.topology import ensure_topology

from .harness import (
    Campaign,
    Worker,
    nats_call,
    record,
    rng,
    scaled,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)

PROCESSES, WAVES = scaled((5, 2), (12, 5))
DURABLE = "racer"
# The one-line errors a racing ensure may end with (exit 1): the server changed under it.
EXPECTED_ERRORS = ("JetStreamApiError", "StreamNotFound", "ConsumerNotFound", "TopologyError")


class Saboteur(threading.Thread):
    """Create and delete streams that capture our subjects, and delete ours, until stopped."""

    def __init__(self, config: Any) -> None:
        super().__init__(name="chaos-saboteur", daemon=True)
        self.config = config
        self.halt = threading.Event()
        self.actions: Counter[str] = Counter()
        self.random = rng("topology-races")
        env = config.env
        self.rogues = {
            f"{env}-rogue-publish": [f"{env}.data.sync.{config.app_name}.>"],
            f"{env}-rogue-subscribe": [f"{env}.data.sync.*.{config.app_name}"],
            f"{env}-rogue-all": [f"{env}.data.>"],
        }

    def run(self) -> None:
        while not self.halt.is_set():
            action = self.random.choice(["create", "delete", "delete", "delete-ours"])
            try:
                if action == "create":
                    name = self.random.choice(list(self.rogues))
                    nats_call(
                        lambda c, name=name: c.jsm.create_stream(
                            {"name": name, "subjects": self.rogues[name], "storage": "memory"}
                        ),
                        timeout=30,
                    )
                elif action == "delete":
                    name = self.random.choice(list(self.rogues))
                    nats_call(lambda c, name=name: c.jsm.delete_stream(name), timeout=30)
                else:
                    nats_call(lambda c: c.jsm.delete_stream(self.config.stream_name), timeout=30)
                self.actions[action] += 1
            except JetStreamBridgeError:
                self.actions[f"{action}-refused"] += 1  # overlap or already gone: expected
            self.halt.wait(self.random.uniform(0.0, 0.1))

    def clear(self) -> None:
        async def drop(conn: Connection) -> None:
            for name in self.rogues:
                if await conn.jsm.stream_info(name):
                    await conn.jsm.delete_stream(name)

        nats_call(drop)


def classify(worker: Worker) -> str:
    code = worker.returncode
    text = worker.log_text()
    if code == 0 and "Traceback" not in text:
        return "ok"
    last = text.strip().splitlines()[-1] if text.strip() else ""
    if code == 1 and "Traceback" not in text and any(e in last for e in EXPECTED_ERRORS):
        return "expected-error"
    return f"unexpected (exit {code}): {text[-800:]}"


@pytest.mark.timeout(scaled(240, 900))
def test_chaos__racing_ensures_converge_under_overlapping_streams(campaign: Campaign) -> None:
    campaign.scenario = "topology-races"
    campaign.server()
    config = campaign.configure()
    saboteur = Saboteur(config)
    saboteur.start()
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    try:
        for wave in range(WAVES):
            workers = [
                campaign.fleet.add(
                    Worker(
                        f"ensure-{wave}-{index}",
                        ["jetstream_ensure_topology", "--durable", DURABLE],
                        campaign.env("ensure", consumer=False),
                        campaign.tmp_path,
                    )
                )
                for index in range(PROCESSES)
            ]
            wait_until(
                lambda workers=workers: all(not w.running for w in workers),
                timeout=scaled(120, 300),
                what=f"wave {wave} of ensure processes to exit",
            )
            for worker in workers:
                verdict = classify(worker)
                outcomes[verdict.split(":")[0]] += 1
                if verdict.startswith("unexpected"):
                    unexpected.append(f"{worker.name}: {verdict}")
    finally:
        saboteur.halt.set()
        saboteur.join(30)
    campaign.fault()
    saboteur.clear()

    # With the saboteur gone, one more ensure converges and a --check agrees.
    converge_started = time.monotonic()
    report = ensure_topology(durable=DURABLE)
    check = campaign.fleet.add(
        Worker(
            "ensure-check",
            ["jetstream_ensure_topology", "--durable", DURABLE, "--check"],
            campaign.env("ensure", consumer=False),
            campaign.tmp_path,
        )
    )
    check_code = check.wait(120)
    converge_s = time.monotonic() - converge_started
    info = nats_call(lambda c: c.jsm.stream_info(config.stream_name))
    consumer = nats_call(lambda c: c.jsm.consumer_info(config.stream_name, DURABLE))
    record(
        {
            "scenario": campaign.scenario,
            "events": PROCESSES * WAVES,
            "faults": sum(v for k, v in saboteur.actions.items() if "refused" not in k),
            "lost": 0,
            "duplicated": 0,
            "drain_s": round(converge_s, 1),
            "elapsed_s": round(time.monotonic() - campaign.started, 1),
            "ensure_outcomes": dict(outcomes),
            "saboteur_actions": dict(saboteur.actions),
        }
    )
    assert not unexpected, "\n\n".join(unexpected[:5])
    assert check_code == 0, check.log_text()
    assert report.consumer_stream == config.stream_name
    assert set(desired_subjects(config)) <= set(info.config.subjects)
    assert consumer is not None
    assert consumer.config.filter_subject == config.subjects.subscribe
