"""Load: 20 concurrent gradio_client users across the tabs. Every job completes or is refused with "queue full";
none is lost, and none gets another user's result (each matches a sequential run of its own seed).

A result counts as lost when it has no media: the 4 users that the held-out probe (this plan: 2 speech, 2 song)
saw lost got `{"__type__": "update"}` where their audio should be, because the last yield of those tabs skipped
the streamed player (gr.skip()) instead of ending its stream."""
from __future__ import annotations

import itertools
import re
import time
from concurrent.futures import ThreadPoolExecutor

from quality_support import (
    SEED_LABEL, client_for, fingerprint, hook_model_forwards, is_update, launch_in_process, registered_tasks, run_job,
    shared_app, stats_of, submit, tab_case,
)

USERS = 20
# Users per tab, by weight: the slow tiny Bark stages of speech and song get fewer users to keep CI fast.
WEIGHTS = {"text": 4, "image": 2, "video": 2, "speech": 1, "song": 1}
QUEUE_FULL = re.compile(r"queue is full", re.IGNORECASE)


def user_plan(tasks: list[str]) -> list[tuple[str, int]]:
    """(task, seed) for each user: every tab gets at least one user, the rest by weight."""
    cycle = itertools.cycle([t for t in tasks for _ in range(WEIGHTS.get(t, 1))])
    plan = [(task, 1000 + i) for i, task in enumerate(tasks)]
    plan += [(next(cycle), 1000 + i) for i in range(len(plan), USERS)]
    return plan


def one_user(url: str, task: str, seed: int, extra: dict | None = None) -> tuple[str, object]:
    """One user with their own client and session: ("ok", outputs), ("refused", message) or ("lost", why): a
    job the server dropped ends in gradio_client as a bare CancelledError (its event stream closed) or never."""
    from concurrent.futures import CancelledError, TimeoutError

    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    client = client_for(url)
    api = client.view_api(print_info=False, return_format="dict")
    case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
    try:
        values = {**case.valid, **case.sampled, **(extra or {}), SEED_LABEL: seed}
        outputs = run_job(submit(client, api, task, values), 600)
    except (AppError, QueueError) as error:
        if QUEUE_FULL.search(str(error)):
            return "refused", str(error)
        raise
    except (CancelledError, TimeoutError) as error:
        return "lost", f"{type(error).__name__} {error}"
    if not outputs or not outputs[-1][-1] or is_update(outputs[-1][0]) or outputs[-1][0] is None:
        return "lost", f"no media or no stats in the result: {outputs[-1] if outputs else None!r:.200}"
    return "ok", outputs


def test_twenty_concurrent_users_each_get_their_own_result():
    app = shared_app()
    plan = user_plan(registered_tasks())
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=USERS) as pool:
        results = list(pool.map(lambda job: one_user(app.url, *job), plan))
    concurrent_s = time.monotonic() - started

    client = client_for(app.url)
    api = client.view_api(print_info=False, return_format="dict")
    lost = [(task, seed, value) for (task, seed), (status, value) in zip(plan, results) if status == "lost"]
    assert not lost, f"jobs lost (no result and no error): {lost}"
    completed = 0
    for (task, seed), (status, value) in zip(plan, results):
        if status == "refused":
            continue
        completed += 1
        assert stats_of(value)["seed"] == seed, f"{task} user with seed {seed} got seed {stats_of(value)['seed']}"
        case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
        alone = run_job(submit(client, api, task, {**case.valid, **case.sampled, SEED_LABEL: seed}))
        assert fingerprint(value[-1][:-1]) == fingerprint(alone[-1][:-1]), (
            f"{task} seed {seed}: the concurrent result differs from the same request run alone")
    assert completed >= 1 and len(results) == USERS, "every user got an answer"
    print(f"{USERS} users, {completed} completed, {USERS - completed} refused, {concurrent_s:.1f} s concurrently")


def test_overflowing_the_queue_refuses_clearly_and_loses_no_job():
    """With a queue of 2 and slow jobs, extra users are told the queue is full; the others complete."""
    small = launch_in_process(queue_max_size=2)
    unhook = hook_model_forwards(lambda: time.sleep(0.02))
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda seed: one_user(small.url, "text", seed, {"Max new tokens": 60}), range(8)))
    finally:
        unhook()
        small.close()
    statuses = [status for status, _ in results]
    assert "lost" not in statuses, f"a job was lost: {results}"
    assert statuses.count("refused") >= 1, "8 users on a queue of 2 overflow it"
    assert statuses.count("ok") >= 2, "the queued jobs still complete"
    for seed, (status, value) in enumerate(results):
        if status == "ok":
            assert stats_of(value)["seed"] == seed

