"""The computing tests yield the CPU to the real-process tests (``priority`` says why)."""

from __future__ import annotations

from priority import TEST_NICENESS, niceness_for, session_niceness, thread_niceness


def test_a_test_that_starts_no_processes_runs_nicer_than_the_session_on_every_thread() -> None:
    # A thread left at the session's niceness (torch's pool made during a real-process
    # test) would compete with the Flower and Ray processes the slow tests start
    assert niceness_for(real_processes=False) == session_niceness() + TEST_NICENESS
    assert set(thread_niceness()) == {niceness_for(real_processes=False)}
