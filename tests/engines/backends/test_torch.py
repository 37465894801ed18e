"""The torch backend's thread helper: a thread keeps the intra-op team it asked for."""

from __future__ import annotations

import threading

import torch

from fewstep.engines.backends.torch import set_intra_op_threads


def test_a_threads_team_is_what_it_set_whatever_another_thread_sets_later() -> None:
    """torch sets a thread's team up lazily, from the count the last `set_num_threads` of any thread left: a
    thread that set 1 and ran its first op after another thread set 2 used to run with 2."""
    before = torch.get_num_threads()
    asked, other_set, seen = threading.Event(), threading.Event(), []

    def engine_thread() -> None:
        set_intra_op_threads(1)
        asked.set()
        other_set.wait(30)
        torch.ones(64, 64) @ torch.ones(64, 64)  # its first parallel op
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=engine_thread)
    t.start()
    try:
        assert asked.wait(30)
        torch.set_num_threads(2)  # another engine thread takes its share meanwhile
        other_set.set()
        t.join(30)
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
