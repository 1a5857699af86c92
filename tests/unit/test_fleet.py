"""Node loss and fencing without services: the settings' relation, the broker options, the fence's
decision, the fenced output sink, the tags the refresher renews. The same pieces against Redis,
S3 and real workers: tests/integration/test_node_loss.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from tasks.app import RESTORE_MUTEX_EXPIRE, RESTORE_SCAN_INTERVAL, make_celery
from tasks.errors import TransientError
from tasks.settings import VISIBILITY_REFRESHES, Settings
from worker import fleet
from worker.lifecycle import DeliveryFence, FencedOutputs, Superseded, superseded


def test_visibility_timeout_spans_a_few_renewals_and_no_longer_the_time_limit() -> None:
    defaults = Settings()
    assert defaults.visibility_timeout >= VISIBILITY_REFRESHES * defaults.visibility_refresh_interval
    assert (
        defaults.visibility_timeout + RESTORE_SCAN_INTERVAL < 60
    )  # a lost node's task is back within a minute
    Settings(
        task_time_limit=3600, visibility_timeout=30, visibility_refresh_interval=10
    )  # far below the limit


@pytest.mark.parametrize(("timeout", "interval"), [(29, 10), (45, 16), (10, 4)])
def test_settings_refuse_a_timeout_of_too_few_renewals(timeout: int, interval: int) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(visibility_timeout=timeout, visibility_refresh_interval=interval)
    message = str(refused.value)
    assert f"CHROMA_VISIBILITY_TIMEOUT ({timeout}s) must be at least 3 x" in message
    assert f"CHROMA_VISIBILITY_REFRESH_INTERVAL ({interval}s) = {3 * interval}s" in message


def test_broker_scans_for_silent_workers_every_few_seconds() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:9/0", visibility_timeout=40)
    options = make_celery(settings).conf.broker_transport_options
    assert options["visibility_timeout"] == 40
    assert options["unacked_restore_interval"] == RESTORE_SCAN_INTERVAL
    assert options["unacked_restore_throttle"] == 1
    assert options["unacked_mutex_expire"] == RESTORE_MUTEX_EXPIRE < settings.visibility_timeout


@pytest.mark.parametrize(
    ("deliveries", "delivery", "replaced"),
    [(1, 1, False), (2, 1, True), (2, 2, False), (5, 3, True), (0, 1, False)],
)
def test_a_delivery_is_replaced_once_a_later_one_has_started(deliveries, delivery, replaced) -> None:
    assert superseded(deliveries, delivery) is replaced


@dataclass(frozen=True)
class CountedFence(DeliveryFence):
    """The fence reading the last of ``counts`` instead of Redis (none: Redis unreachable)."""

    counts: list[int] = field(default_factory=list)

    def _deliveries(self, wait: float) -> int:
        if not self.counts:
            raise TransientError(
                "could not check that this delivery is the newest: result backend unreachable"
            )
        return self.counts[-1]


class Sink:
    result_key = "gen/t/result.json"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def begin(self) -> None:
        self.calls.append(("begin",))

    def put(self, index: int, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        self.calls.append(("put", index))
        return f"gen/t/{index}.{ext}", f"s3://outputs/gen/t/{index}.{ext}"

    def put_result(self, result) -> None:
        self.calls.append(("put_result",))

    def remove(self, keys) -> None:
        self.calls.append(("remove", tuple(keys)))


def fenced(*counts: int) -> tuple[FencedOutputs, Sink, CountedFence]:
    fence = CountedFence(Settings(), "t", 0, delivery=1, counts=list(counts))
    sink = Sink()
    return FencedOutputs(sink, fence), sink, fence


def test_fenced_outputs_write_while_the_delivery_is_the_newest() -> None:
    outputs, sink, _ = fenced(1)
    outputs.begin()
    assert outputs.put(0, "png", b"x", "image/png") == ("gen/t/0.png", "s3://outputs/gen/t/0.png")
    outputs.put_result(None)
    outputs.remove(["gen/t/0.png"])
    assert sink.calls == [("begin",), ("put", 0), ("put_result",), ("remove", ("gen/t/0.png",))]
    assert outputs.result_key == sink.result_key


def test_a_replaced_delivery_writes_and_removes_nothing() -> None:
    outputs, sink, fence = fenced(1)
    outputs.begin()
    fence.counts.append(2)  # another worker took the task meanwhile
    for write in (
        outputs.begin,
        lambda: outputs.put(0, "png", b"x", "image/png"),
        lambda: outputs.put_result(None),
    ):
        with pytest.raises(Superseded, match="delivery 1 was replaced by delivery 2"):
            write()
    outputs.remove(["gen/t/0.png"])  # the images under these keys are the newer delivery's now
    assert sink.calls == [("begin",)]


def test_an_unknown_count_blocks_writes_and_removals() -> None:
    outputs, sink, _ = fenced()
    with pytest.raises(TransientError):
        outputs.put(0, "png", b"x", "image/png")
    outputs.remove(["gen/t/0.png"])
    assert sink.calls == []


def test_the_refresher_renews_unacknowledged_tasks_held_reserved_running_or_scheduled() -> None:
    from celery.worker import state

    class Request:  # what the refresher reads of a celery.worker.request.Request
        def __init__(self, tag: str, acknowledged: bool = False) -> None:
            self.message, self.acknowledged = SimpleNamespace(delivery_tag=tag), acknowledged

    running, done, retry = (
        Request("tag-running"),
        Request("tag-done", acknowledged=True),
        Request("tag-retry"),
    )
    state.requests.update({"a": running, "b": done})
    state.scheduled_requests.add(retry)
    try:
        assert fleet.held_delivery_tags() == ["tag-retry", "tag-running"]
    finally:
        state.requests.clear()
        state.scheduled_requests.clear()
    assert fleet.held_delivery_tags() == []


def test_restored_tasks_get_a_fresh_delivery_tag_through_one_wrapper() -> None:
    from kombu.transport import redis as kombu_redis

    fleet.renew_delivery_tags_on_restore()
    wrapped = kombu_redis.Channel._do_restore_message
    fleet.renew_delivery_tags_on_restore()  # once per process, however often it is asked
    assert kombu_redis.Channel._do_restore_message is wrapped and wrapped.renews_delivery_tag

    pushed = []
    channel = SimpleNamespace(
        _lookup=lambda exchange, routing_key: [routing_key],
        _get_message_priority=lambda payload, reverse: 0,
        _q_for_pri=lambda queue, priority: queue,
    )
    pipe = SimpleNamespace(rpush=lambda queue, body: pushed.append((queue, body)))
    payload = {"headers": {}, "properties": {"delivery_tag": "old", "delivery_info": {}}}
    wrapped(channel, payload, "", "chroma", pipe)
    assert payload["properties"]["delivery_tag"] not in ("old", None)
    assert payload["headers"]["redelivered"] is True and pushed[0][0] == "chroma"
