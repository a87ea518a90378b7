"""Submission writing (validated, atomic, never overwriting) and checking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milbench.submit import SubmissionError, check_submission, write_submission

TEST_IDS = ["P3", "P7", "P71"]


def test_writes_versioned_files_with_provenance(tmp_path):
    first = write_submission({"P71": 1, "P3": 0, "P7": 1}, TEST_IDS, tmp_path, "clinical", {"seed": 4})
    assert first.name == "clinical-v1.csv"
    assert first.read_text() == "Id,Predicted\nP3,0\nP7,1\nP71,1\n"
    assert json.loads(first.with_suffix(".json").read_text()) == {"submission": "clinical-v1.csv", "seed": 4}
    second = write_submission({"P71": 0, "P3": 0, "P7": 0}, TEST_IDS, tmp_path, "clinical", {})
    assert second.name == "clinical-v2.csv"
    assert first.read_text() == "Id,Predicted\nP3,0\nP7,1\nP71,1\n"  # untouched
    assert check_submission(first, TEST_IDS) == [] and check_submission(second, TEST_IDS) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clinical-v1.csv", "clinical-v1.json", "clinical-v2.csv", "clinical-v2.json"]


@pytest.mark.parametrize(
    "predictions, message",
    [
        ({"P3": 0, "P7": 1}, r"missing test patients: \['P71'\]"),
        ({"P3": 0, "P7": 1, "P71": 1, "P1": 0}, r"not test patients: \['P1'\]"),
        ({"P3": 0, "P7": 2, "P71": 1}, r"must be 0 or 1: \{'P7': 2\}"),
    ],
)
def test_invalid_predictions_are_refused_and_nothing_written(tmp_path, predictions, message):
    with pytest.raises(SubmissionError, match=message):
        write_submission(predictions, TEST_IDS, tmp_path, "x", {})
    assert list(tmp_path.iterdir()) == []


def test_check_names_lines(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("Id,Predicted\nP3,0\nP3,1\nP9,1\nP7,yes\nP71\n")
    problems = check_submission(path, TEST_IDS)
    assert f"{path} line 3: duplicate Id P3 (first on line 2)" in problems
    assert f"{path} line 4: Id 'P9' is not a test patient" in problems
    assert f"{path} line 5: Predicted must be 0 or 1, got 'yes'" in problems
    assert f"{path} line 6: expected 2 fields, got 1" in problems
    assert f"{path}: missing test patients ['P71']" in problems
    path.write_text("id,label\nP3,0\nP7,1\nP71,1\n")
    assert check_submission(path, TEST_IDS) == [f"{path} line 1: header must be Id,Predicted, got id,label"]
    assert "cannot read" in check_submission(tmp_path / "absent.csv", TEST_IDS)[0]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=120))
def test_check_any_content_gives_messages_not_exceptions(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("s") / "s.csv"
    path.write_bytes(content.encode("utf-8", errors="replace"))
    problems = check_submission(path, TEST_IDS)
    assert all(isinstance(p, str) and str(path) in p for p in problems)
    assert problems  # random text is never a complete valid submission


def _write_one(args):
    directory, value = args
    return str(write_submission({"P3": value, "P7": value, "P71": value}, TEST_IDS, directory,
                                "race", {"writer": value}))


def _create_run(base):
    from milbench.runs import Run

    return str(Run.create(base, "race").path)


def test_concurrent_writers_get_distinct_versions_and_run_directories(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        paths = pool.map(_write_one, [(tmp_path / "subs", i % 2) for i in range(12)])
        runs = pool.map(_create_run, [tmp_path / "runs"] * 12)
    assert len(set(paths)) == 12 and len(set(runs)) == 12
    for path in paths:  # every file whole, with its own provenance
        assert check_submission(path, TEST_IDS) == []
        provenance = json.loads(Path(path).with_suffix(".json").read_text())
        assert provenance["submission"] == Path(path).name
