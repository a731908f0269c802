"""Stopping a run on Flower's engine when asked (Ctrl-C, SIGTERM) instead of interrupting Flower's threads mid-wait.

An interrupt raised in the main thread, wherever Flower's engine happened to be, left its ServerApp thread waiting for
replies (for up to `round-timeout`) and its site workers inside `ray.get` after Ray had been shut down: none of them is
a daemon, so the process never exited (measured: `fedtl simulate` still running 20 s after Ctrl-C or SIGTERM, and
Ray's processes left behind once it was killed). Here a signal only asks: the ServerApp's next call on its grid raises
`RunStopped`, which Flower handles as a ServerApp failing (its workers finish the messages they hold, then it stops
them, the actors and Ray, in that order), and `engine.simulate` turns it into KeyboardInterrupt for its caller. A
site's message in flight completes, charge and release together; the run folder is left as after a crash,
resumable with `fedtl simulate --resume`. A second signal interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

# How often the ServerApp looks for the sites' replies on Flower's engine (whose own Grid looks every 0.1 s): a round
# waits for two exchanges (train, evaluate), each half a poll late on average; the in-memory store makes a look cheap.
REPLY_POLL_S = 0.01
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run was asked to stop (a signal); raised in the ServerApp's thread at its next call on the grid."""


class StoppingGrid(Grid):
    """A Grid that raises RunStopped once `stop` is set, and waits for replies in steps of REPLY_POLL_S.

    Every call goes to the engine's grid; `send_and_receive` is push, then pull until every reply is in, the timeout
    has passed, or the run is stopped. `on_push` is called after each push (it wakes the engine).
    """

    def __init__(self, grid: Grid, stop: threading.Event, *, on_push: Callable[[], None] | None = None) -> None:
        self._grid, self._stop, self.on_push = grid, stop, on_push
        self.poll_s = REPLY_POLL_S

    def _check(self) -> None:
        if self._stop.is_set():
            raise RunStopped("the run was asked to stop")

    def set_run(self, run: Any) -> None:  # noqa: ANN401 - Flower's Run
        """Set the run on the engine's grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Any:  # noqa: ANN401 - Flower's Run
        """Return the engine's grid's run."""
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: ANN401 - Flower's own signature
        """Create a message as the engine's grid does."""
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Return the connected nodes' ids, unless the run was stopped."""
        self._check()
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push `messages`, unless the run was stopped, then call `on_push`."""
        self._check()
        ids = self._grid.push_messages(messages)
        if self.on_push is not None:
            self.on_push()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies to `message_ids` that are in, unless the run was stopped."""
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages` and return their replies once all are in or `timeout` seconds have passed.

        Raises:
            RunStopped: the run was asked to stop meanwhile.
        """
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies


class StopOnSignals:
    """Within the block, SIGINT and SIGTERM set `stop` (the run ends at its next exchange); a second one interrupts.

    Entered before Ray starts, so that no signal lands inside ray.init (interrupted there, it left Ray's processes
    behind or crashed the interpreter at exit); `arm` again once Ray is up, as ray.init puts a SIGTERM handler of its
    own (sys.exit) in place. On leaving, the handlers from before are back. Only the main thread can take signals;
    elsewhere the block runs with the handlers it has.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
            self.arm()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def arm(self) -> None:
        """Put this block's handlers in place (again)."""
        for signum in self._previous:
            signal.signal(signum, self._ask_to_stop)

    def _ask_to_stop(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        log.warning(
            "%s: stopping the run once the sites' messages in flight are done (%s again stops at once)",
            signal.Signals(signum).name,
            "Ctrl-C" if signum == signal.SIGINT else "the signal",
        )
