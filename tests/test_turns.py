"""Calls take turns at the model between layers, the one with the least work left first
(backends/turns.py): a small call that arrives while a large one runs finishes first, and each
call's scores are those it gives alone."""

import threading

import numpy as np
import pytest

from conftest import ragged_items
from darl_infer import Scorer
from darl_infer.backends.turns import TakingTurns, between_layers


def _until(condition, timeout=10.0):
    event = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        event.wait(0.005)
    raise AssertionError("condition not reached")


def test_a_waiting_call_with_less_work_left_runs_first():
    turns, order = TakingTurns(), []
    inside, resume = threading.Event(), threading.Event()

    def large():
        with turns.call(100):
            inside.set()
            resume.wait(10)
            between_layers(10)  # 90 left: the small call (5) takes the turn here
            order.append("large")

    def small():
        with turns.call(5):
            order.append("small")

    threads = [threading.Thread(target=large)]
    threads[0].start()
    assert inside.wait(10)
    threads.append(threading.Thread(target=small))
    threads[1].start()
    _until(lambda: turns.waiting == 1)  # it waits: the large call holds the turn until its next layer
    assert order == []
    resume.set()
    for thread in threads:
        thread.join(10)
    assert order == ["small", "large"]


def test_a_waiting_call_with_more_work_left_waits_for_the_end():
    turns, order = TakingTurns(), []
    inside, resume = threading.Event(), threading.Event()

    def running():
        with turns.call(50):
            inside.set()
            resume.wait(10)
            for _ in range(5):
                between_layers(10)
                order.append("running")

    def larger():
        with turns.call(60):
            order.append("larger")

    first = threading.Thread(target=running)
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=larger)
    second.start()
    _until(lambda: turns.waiting == 1)
    resume.set()
    first.join(10), second.join(10)
    assert order == ["running"] * 5 + ["larger"]


def test_a_call_inside_a_call_is_refused_and_outside_one_layers_are_free():
    turns = TakingTurns()
    between_layers(10)  # outside any call: nothing to count, nothing to wait for
    with turns.call(10):
        with pytest.raises(RuntimeError, match="wait for itself"):
            with TakingTurns().call(1):
                pass


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_small_call_overtakes_a_running_large_one_with_the_scores_it_gets_alone(tiny_checkpoints, arch, rng):
    scorer = Scorer.from_pretrained(tiny_checkpoints[arch], backend="torch", token_budget=256)
    large = ("w1 w2 w3", ragged_items(rng, 24, max_tokens=40))
    small = ("w4", ragged_items(rng, 2, max_tokens=8))
    alone = {name: scorer.score(*job).probs for name, job in (("large", large), ("small", small))}

    runner = scorer.backend.runner
    op, inside, resume = runner.attention_op, threading.Event(), threading.Event()

    def held_once(*args):  # the large call's first attention waits until the small call queues
        if not inside.is_set():
            inside.set()
            resume.wait(10)
        return op(*args)

    runner.attention_op = held_once
    got, order = {}, []
    probs_many = scorer.backend._probs_many

    def recorded(*args):  # runs within the call's turn: `order` is the order the calls ended in
        out = probs_many(*args)
        order.append(threading.current_thread().name)
        return out

    scorer.backend._probs_many = recorded

    def score(name, job):
        got[name] = scorer.score(*job).probs

    threads = [threading.Thread(target=score, args=("large", large), name="large")]
    threads[0].start()
    assert inside.wait(10)
    threads.append(threading.Thread(target=score, args=("small", small), name="small"))
    threads[1].start()
    _until(lambda: scorer.backend.turns.waiting == 1)
    resume.set()
    for thread in threads:
        thread.join(30)
    assert order == ["small", "large"]
    for name in ("large", "small"):
        np.testing.assert_allclose(got[name], alone[name], rtol=0, atol=1e-6)
