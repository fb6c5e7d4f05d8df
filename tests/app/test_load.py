"""Twenty clients at once against the launched app on loopback: each gets a place in line and is served."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
from gradio_client import Client
from gradio_client.utils import Status

from conftest import launched_app
from slerpviz.models import EMBEDDED

CLIENTS = 20
NEW_TOKENS = 2
# A bound so a stuck queue fails the test instead of hanging it; generous for a busy 2-core machine.
DEADLINE_S = 300


@pytest.fixture(scope="module")
def url():
    # Twenty users on one machine share its address, which the queue would hold to 16 waiting jobs: here they stand
    # for twenty visitors from twenty addresses.
    with launched_app(SLERPVIZ_QUEUE_PER_ADDRESS="0") as address:
        yield address


def one_user(url: str, number: int) -> dict:
    """A client of its own, one generation, watching its status while it waits."""
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    job = client.submit(f"Count to {number + 3}:", EMBEDDED, False, 10, [], 0, 0, "slerp", "mean", "cached",
                        NEW_TOKENS, 0.0, 0, api_name="/generate")
    ranks = []
    while not job.done():
        status = job.status()
        if status.code == Status.IN_QUEUE and status.rank is not None:
            ranks.append(status.rank)
        time.sleep(0.05)
    return dict(result=job.result(), ranks=ranks)


def test_twenty_concurrent_clients_are_all_served(url):
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one_user, url, number) for number in range(CLIENTS)]
        done, pending = wait(futures, timeout=DEADLINE_S)
        assert not pending, f"{len(pending)} of {CLIENTS} clients were not served within {DEADLINE_S} s"
    users = [future.result() for future in futures]  # re-raises any client's error
    for user in users:
        base_text, merged_text, base_stats, merged_stats, *_, status = user["result"]
        assert status.startswith("**Done**"), status
        assert f"| tokens generated | {NEW_TOKENS}" in base_stats or "· done" in base_stats
        assert base_text and merged_text
    # One generation at a time on the device: with twenty at once, most waited and were told their place in line.
    # (How far back depends on how fast the clients connect, so only a queue of some depth is required.)
    told = [user for user in users if user["ranks"]]
    assert len(told) >= 3 and max(max(user["ranks"]) for user in told) >= 2
