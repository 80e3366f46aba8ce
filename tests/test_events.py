import threading

import pytest

from dario_lib.events import EventBus, Subscription, TooManySubscribers


def test_every_subscriber_gets_events_in_order():
    bus = EventBus()
    a, b = bus.subscribe(), bus.subscribe()
    for i in range(3):
        bus.publish("record", {"id": i})
    for sub in (a, b):
        assert [sub.get(0.1)[1]["id"] for _ in range(3)] == [0, 1, 2]
        assert sub.get(0.01) is Subscription.TIMEOUT


def test_subscriber_cap():
    bus = EventBus(max_subscribers=2)
    first = bus.subscribe()
    bus.subscribe()
    with pytest.raises(TooManySubscribers):
        bus.subscribe()
    first.close()
    bus.subscribe()


def test_full_subscriber_is_dropped_without_blocking_the_publisher():
    bus = EventBus(queue_size=4)
    slow, fast = bus.subscribe(), bus.subscribe()
    done = threading.Event()

    def publish():
        for i in range(10):
            bus.publish("record", {"id": i})
            assert fast.get(1)[1]["id"] == i
        done.set()

    thread = threading.Thread(target=publish)
    thread.start()
    assert done.wait(2)
    thread.join()
    assert bus.dropped == 1 and bus.count == 1
    assert slow.get(0.01) is None           # dropped: ends at once, queue discarded
    assert fast.get(0.01) is Subscription.TIMEOUT


def test_close_all_wakes_readers():
    bus = EventBus()
    sub = bus.subscribe()
    got = []
    reader = threading.Thread(target=lambda: got.append(sub.get(5)))
    reader.start()
    bus.close_all()
    reader.join(2)
    assert got == [None] and bus.count == 0
