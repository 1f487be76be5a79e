"""The per-message timing line: what it reports, and that the benchmarks can read it back."""

from __future__ import annotations

import pytest

from dpfpl_app.federation import message_timing
from dpfpl_app.federation.message_timing import MessageTimes, read_line


def test_a_line_reads_back_as_its_kind_and_parts_whatever_the_log_prefix() -> None:
    # Prepare: a line as a node logs it, behind a Ray actor's and Flower's prefixes
    times = MessageTimes()
    times.parts = {"model and features": 0.25, "compute": 1.5}
    logged = f"\x1b[36m(ClientAppActor pid=7)\x1b[0m INFO :      {times.line('train.stage')}"

    # Execute
    parsed = read_line(logged)

    # Assert
    assert parsed == ("train.stage", {"model and features": 0.25, "compute": 1.5})
    assert read_line("round 3/30  local-acc 0.900") is None


def test_process_age_is_counted_for_the_first_message_of_a_process_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a simulation actor serves many messages: its age is the first message's start-up only
    monkeypatch.setattr(message_timing, "_first_message", True)
    monkeypatch.setattr(message_timing, "process_age", lambda: 900.0)

    first, second = MessageTimes(), MessageTimes()

    assert first.parts == {"process start and imports": 900.0}
    assert second.parts == {}
