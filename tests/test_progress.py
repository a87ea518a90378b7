"""Progress off a terminal: the bar's progress goes to the log (pytest's output is no terminal)."""

from __future__ import annotations

import logging

import pytest

from milbench import progress
from milbench.progress import progress_bar, progress_line


def test_progress_line_counts_rate_from_this_session_only():
    line = progress_line("train", done=300, total=1000, elapsed=10.0, unit="img", first=100)
    assert line == "train: 300/1,000 img (30%), 20.0 img/s, elapsed 0:00:10, ~0:00:35 left"
    assert "left" not in progress_line("train", 1000, 1000, 10.0, "img")


def test_off_a_terminal_progress_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="milbench.progress"):
        with progress_bar("extract", 4, completed=1, unit="img") as advance:
            advance(2)
            advance(1)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [
        "extract: 3/4 img", "extract: 4/4 img", "extract: 4/4 img"]


def test_an_interruption_still_logs_how_far_it_got(caplog):
    with caplog.at_level(logging.INFO, logger="milbench.progress"):
        with pytest.raises(KeyboardInterrupt), progress_bar("train", 10, unit="img") as advance:
            advance(3)
            raise KeyboardInterrupt
    assert caplog.records[-1].getMessage().startswith("train: 3/10 img (30%)")


def test_disabled_progress_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="milbench.progress"):
        with progress_bar("quiet", 3, enabled=False) as advance:
            advance(3)
    assert caplog.records == []
