"""One forward pass at a time, handed over between layers to the call with the least work left.

A backend's concurrent calls (a server's workers, a user's threads) take turns at the model: the
call that holds the turn runs; at each layer's attention (attention_hook.py calls
`between_layers`) it gives the turn up when a waiting call has less work left, and waits until it
is again the call with the least. So a small call that arrives while a large one runs waits one
layer, not the whole large call: shortest remaining work first, preemptive at layer granularity.
On a CPU one call already keeps every core busy, so taking turns loses no throughput, where
running calls side by side would only make their threads compete.

Work is counted in token-layers: a call's tokens times the decoder's layers when it starts, less
each pass's tokens at each layer it runs. Each call's computation is unchanged by when it runs, so
its results are too: exactness does not depend on the turns.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
from dataclasses import dataclass


@dataclass(eq=False)
class _Turn:
    left: int   # token-layers still to run (an estimate: it may end before it reaches 0)
    order: int  # arrival; the earlier first among equals


def _priority(turn: _Turn) -> tuple[int, int]:
    return turn.left, turn.order


_held: contextvars.ContextVar[tuple[TakingTurns, _Turn] | None] = contextvars.ContextVar("darl_infer_turn", default=None)


class TakingTurns:
    def __init__(self):
        self._cond = threading.Condition()
        self._running: _Turn | None = None
        self._waiting: list[_Turn] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        """Calls waiting for their turn now."""
        with self._cond:
            return len(self._waiting)

    @contextlib.contextmanager
    def call(self, work: int):
        """Hold the turn within the block, `work` token-layers ahead; the block's forward passes
        may give it up between layers (`between_layers`). Not reentrant."""
        if _held.get() is not None:
            raise RuntimeError("a backend call inside another one's turn would wait for itself")
        turn = _Turn(work, next(self._arrivals))
        with self._cond:
            self._wait_for_turn(turn)
        token = _held.set((self, turn))
        try:
            yield
        finally:
            _held.reset(token)
            with self._cond:
                self._running = None
                self._cond.notify_all()

    def _wait_for_turn(self, turn: _Turn) -> None:
        """With the condition held: wait until no call runs and `turn` has the least work left."""
        self._waiting.append(turn)
        while self._running is not None or min(self._waiting, key=_priority) is not turn:
            self._cond.wait()
        self._waiting.remove(turn)
        self._running = turn

    def _between_layers(self, turn: _Turn, tokens: int) -> None:
        turn.left = max(0, turn.left - tokens)
        with self._cond:
            if self._waiting and _priority(min(self._waiting, key=_priority)) < _priority(turn):
                self._running = None
                self._cond.notify_all()
                self._wait_for_turn(turn)


def between_layers(tokens: int) -> None:
    """A layer of `tokens` tokens is about to attend: within a `TakingTurns.call`, count it done
    and give the turn to a waiting call with less work left, if any (a no-op outside a call)."""
    held = _held.get()
    if held is not None:
        held[0]._between_layers(held[1], tokens)
