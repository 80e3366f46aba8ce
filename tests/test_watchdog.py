import socket

from dario_lib.watchdog import Watchdog

from .helpers import FakeClock


def test_deadline_shuts_the_socket_down_only_once_passed():
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    ours, theirs = socket.socketpair()
    slot = dog.register(ours)
    slot.arm(5)
    clock.advance(4)
    dog.tick()
    theirs.sendall(b"x")
    assert ours.recv(1) == b"x"                 # still open
    clock.advance(2)
    dog.tick()
    assert ours.recv(1) == b""                  # shut down: a blocked reader sees EOF
    slot.disarm()
    ours.close(), theirs.close()


def test_disarmed_and_unregistered_slots_are_left_alone():
    clock = FakeClock()
    dog = Watchdog(clock=clock)
    ours, theirs = socket.socketpair()
    slot = dog.register(ours)
    slot.arm(1)
    slot.disarm()
    other = dog.register(ours)
    other.arm(1)
    dog.unregister(other)
    clock.advance(10)
    dog.tick()
    theirs.sendall(b"y")
    assert ours.recv(1) == b"y"
    ours.close(), theirs.close()


def test_watch_fires_once_when_the_peer_hangs_up_not_when_it_sends():
    dog = Watchdog(clock=FakeClock())
    ours, theirs = socket.socketpair()
    calls = []
    slot = dog.register(ours)
    slot.watch(lambda: calls.append(1))
    theirs.sendall(b"pipelined")                # data waiting is not a hang-up
    dog.tick()
    assert calls == []
    ours.recv(100)
    theirs.close()
    dog.tick()
    dog.tick()
    assert calls == [1] and slot.on_gone is None
    ours.close()
