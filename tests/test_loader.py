"""The challenge loader on every quirk of the real data and every kind of bad input."""

from __future__ import annotations

import logging
from datetime import date

import pytest
from challenge_layout import Row, default_rows, write_challenge
from hypothesis import given, settings
from hypothesis import strategies as st

from milbench.data import ChallengeDataError, load_challenge, parse_dob


@pytest.fixture
def rows():
    return default_rows(n_train=9, n_test=3)


def test_reads_combined_csv_with_index_column(tmp_path, rows):
    cohort = load_challenge(write_challenge(tmp_path / "c", rows))
    assert len(cohort) == 12
    assert [p.split for p in cohort.patients] == ["train"] * 9 + ["test"] * 3
    assert all(p.label is None for p in cohort.test().patients)
    assert {p.label for p in cohort.train().patients} == {0, 1}
    assert {p.gender for p in cohort.patients} == {"M", "F"}  # lowercase f normalised
    first = cohort.subset(["P1"]).patients[0]
    assert [p.name for p in first.image_paths] == sorted(p.name for p in first.image_paths)
    assert first.n_images == rows[0].n_images


def test_reads_without_index_column_and_from_split_csvs(tmp_path, rows):
    a = load_challenge(write_challenge(tmp_path / "a", rows, index_column=False))
    b = load_challenge(write_challenge(tmp_path / "b", rows, combined=False))
    assert a.ids == b.ids
    assert a.frame()[["label", "gender", "dob", "lymph_count"]].equals(
        b.frame()[["label", "gender", "dob", "lymph_count"]]
    )


def test_patients_sorted_numerically(tmp_path):
    rows = [Row("P10", 1), Row("P9", 0), Row("P2", 1), Row("P100", -1)]
    assert load_challenge(write_challenge(tmp_path / "c", rows)).ids == ["P2", "P9", "P10", "P100"]


def test_mixed_dob_formats_and_age(tmp_path):
    assert parse_dob("11/3/1933") == date(1933, 11, 3)
    assert parse_dob("28-04-1943") == date(1943, 4, 28)
    rows = [Row("P1", 1, dob="1/1/1951"), Row("P2", 0, dob="01-01-1971"), Row("P3", -1)]
    cohort = load_challenge(write_challenge(tmp_path / "c", rows), reference_date=date(2021, 1, 1))
    ages = dict(zip(cohort.ids, cohort.frame()["age"], strict=True))
    assert ages["P1"] == pytest.approx(70.0, abs=0.01)
    assert ages["P2"] == pytest.approx(50.0, abs=0.01)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dob": "1933-11-03"}, r"line 2 \(ID P1\), field DOB: '1933-11-03' is neither"),
        ({"dob": "13/40/1950"}, r"field DOB"),
        ({"label": 2}, r"line 2 \(ID P1\), field LABEL: '2' is not one of 0, 1 or -1"),
        ({"count": "abc"}, r"field LYMPH_COUNT: 'abc' is not a number"),
        ({"count": ""}, r"field LYMPH_COUNT: '' is not a number"),
        ({"count": "-3"}, r"field LYMPH_COUNT: -3.0 is not a positive count"),
        ({"gender": "X"}, r"field GENDER: 'X' is not M or F"),
    ],
)
def test_bad_fields_name_file_line_and_field(tmp_path, rows, change, message):
    for key, value in change.items():
        setattr(rows[0], key, value)
    root = write_challenge(tmp_path / "c", rows)
    with pytest.raises(ChallengeDataError, match=message) as error:
        load_challenge(root)
    assert "clinical_annotation.csv" in str(error.value)


def test_malformed_row_names_line(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows)
    csv_path = root / "clinical_annotation.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3] + ",extra"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChallengeDataError, match=r"clinical_annotation.csv line 4: 7 fields, header has 6"):
        load_challenge(root)


def test_missing_column(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows)
    csv_path = root / "clinical_annotation.csv"
    csv_path.write_text(csv_path.read_text().replace("LYMPH_COUNT", "COUNT"))
    with pytest.raises(ChallengeDataError, match=r"line 1: missing columns \['LYMPH_COUNT'\]"):
        load_challenge(root)


def test_duplicate_ids(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows)
    csv_path = root / "clinical_annotation.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines + [lines[1].replace("0,P1", "99,P1", 1)]) + "\n")
    with pytest.raises(ChallengeDataError, match=r"line 14 \(ID P1\): duplicate ID, first seen at .*line 2"):
        load_challenge(root)


def test_folder_without_row_and_row_without_folder(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows)
    (root / "trainset" / "P999").mkdir()
    with pytest.raises(ChallengeDataError, match=r"patient folders with no clinical CSV row: .*P999"):
        load_challenge(root)
    (root / "trainset" / "P999").rmdir()
    for image in (root / "trainset" / "P2").iterdir():
        image.unlink()
    (root / "trainset" / "P2").rmdir()
    with pytest.raises(ChallengeDataError, match=r"\(ID P2\): no patient folder P2"):
        load_challenge(root)


def test_empty_patient_folder(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows)
    for image in (root / "trainset" / "P2").iterdir():
        image.unlink()
    with pytest.raises(ChallengeDataError, match=r"trainset/P2: patient folder holds no usable image"):
        load_challenge(root)


def test_label_split_mismatch(tmp_path, rows):
    rows[0].label = -1  # a -1 row whose folder lands in testset is fine; make the CSV disagree
    root = write_challenge(tmp_path / "c", rows)
    (root / "testset" / "P1").rename(root / "trainset" / "P1")
    with pytest.raises(ChallengeDataError, match=r"\(ID P1\), field LABEL: train patients need 0 or 1"):
        load_challenge(root)


def test_bad_images_are_skipped_and_recorded(tmp_path, rows, caplog):
    root = write_challenge(tmp_path / "c", rows)
    folder = root / "trainset" / "P2"
    n_good = len(list(folder.iterdir()))
    (folder / "000090.jpg").write_bytes(b"")
    (folder / "000091.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        cohort = load_challenge(root)
    assert cohort.subset(["P2"]).patients[0].n_images == n_good
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in cohort.skipped}
    assert reasons.keys() == {"000090.jpg", "000091.jpg", "notes.txt"}
    assert reasons["000090.jpg"] == "zero-byte file"
    assert reasons["000091.jpg"].startswith("unreadable image")
    assert reasons["notes.txt"] == "not an image file (extension)"
    assert "000091.jpg" in caplog.text


def test_strict_images_turns_skips_into_errors(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows)
    (root / "trainset" / "P2" / "000090.jpg").write_bytes(b"")
    with pytest.raises(ChallengeDataError, match=r"P2/000090.jpg: zero-byte file"):
        load_challenge(root, strict_images=True)


def test_missing_csvs_and_folder(tmp_path, rows):
    root = write_challenge(tmp_path / "c", rows, combined=False)
    (root / "testset" / "testset_data.csv").unlink()
    message = r"no clinical_annotation.csv and no testset/testset_data.csv"
    with pytest.raises(ChallengeDataError, match=message):
        load_challenge(root)
    with pytest.raises(ChallengeDataError, match="not a folder"):
        load_challenge(tmp_path / "nowhere")


@given(st.text(max_size=20))
def test_parse_dob_returns_a_date_or_a_clear_error(text):
    try:
        parsed = parse_dob(text)
    except ValueError as error:
        assert repr(text) in str(error)
    else:
        assert 1 <= parsed.month <= 12


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_csv_content_gives_cohort_or_clear_error(tmp_path_factory, content):
    root = write_challenge(tmp_path_factory.mktemp("h"), default_rows(3, 1))
    (root / "clinical_annotation.csv").write_text(content)
    try:
        load_challenge(root)
    except ChallengeDataError as error:
        assert "clinical_annotation.csv" in str(error) or "patient folders" in str(error)
