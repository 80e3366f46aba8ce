import io
import threading


from dario_lib import notify
from dario_lib.notify import Notifier, command_for

HOSTILE = 'Halt "now"; $(rm -rf ~) `id` \\ \' end\nnext line & | > <'


def test_clean_strips_quotes_backticks_dollars_backslashes_newlines_and_caps():
    cleaned = notify.clean(HOSTILE + "x" * 500)
    for ch in "\"'`$\\\n\r":
        assert ch not in cleaned
    assert len(cleaned) == notify.MAX_TEXT


def test_macos_passes_text_as_argv_not_in_the_script():
    argv, env = command_for("darwin", HOSTILE, "msg")
    assert argv[0] == "osascript" and env is None
    script = [argv[i + 1] for i, a in enumerate(argv) if a == "-e"]
    assert script[0] == "on run argv" and "item 1 of argv" in script[1]
    assert all("Halt" not in line for line in script)       # never spliced into AppleScript
    assert argv[-2:] == [notify.clean(HOSTILE), "msg"]


def test_windows_passes_text_through_environment():
    argv, env = command_for("win32", HOSTILE, "msg")
    assert argv[:4] == ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command"]
    assert "Halt" not in argv[4] and "$env:DARIO_NOTIFY_TITLE" in argv[4]
    assert env == {"DARIO_NOTIFY_TITLE": notify.clean(HOSTILE), "DARIO_NOTIFY_MESSAGE": "msg"}


def test_linux_notify_send_with_option_terminator():
    argv, _ = command_for("linux", "-title", "msg")
    assert argv == ["notify-send", "--", "-title", "msg"]


def test_unknown_platform_has_no_command():
    assert command_for("plan9", "t", "m") == (None, None)


class FakeProcess:
    def wait(self, timeout=None):
        return 0


def test_spawn_uses_argument_list_and_never_a_shell():
    calls, done = [], threading.Event()

    def spawn(argv, **kwargs):
        calls.append((argv, kwargs))
        done.set()
        return FakeProcess()

    stream = io.StringIO()
    Notifier(platform="linux", spawn=spawn, stream=stream).notify("t", HOSTILE)
    assert done.wait(2)
    argv, kwargs = calls[0]
    assert isinstance(argv, list) and kwargs.get("shell", False) is False
    assert kwargs["stdout"] == kwargs["stderr"] == kwargs["stdin"] == notify.subprocess.DEVNULL
    assert stream.getvalue() == "\a"


def test_missing_program_is_silent_and_bell_still_rings():
    def spawn(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    stream = io.StringIO()
    notifier = Notifier(platform="linux", spawn=spawn, stream=stream)
    notifier.notify("t", "m")               # must not raise
    assert stream.getvalue() == "\a"


def test_os_notify_off_still_rings_the_bell():
    stream = io.StringIO()
    spawned = []
    Notifier(os_notify=False, platform="linux", spawn=lambda *a, **k: spawned.append(a),
             stream=stream).notify("t", "m")
    assert stream.getvalue() == "\a" and spawned == []


def test_notify_never_blocks_the_caller():
    release = threading.Event()

    def slow_spawn(argv, **kwargs):
        release.wait(5)
        return FakeProcess()

    notifier = Notifier(platform="linux", spawn=slow_spawn, stream=io.StringIO())
    finished = threading.Event()
    threading.Thread(target=lambda: (notifier.notify("t", "m"), finished.set())).start()
    assert finished.wait(1)
    release.set()


def test_source_never_uses_a_shell():
    import inspect
    source = inspect.getsource(notify)
    assert "shell=True" not in source and "os.system" not in source
