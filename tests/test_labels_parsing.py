"""Reading a labels CSV, row by row: the rows kept, the rows skipped with their line, and the errors, each
checked against the exact answer (pure: no images, no TensorFlow)."""

from pathlib import Path

import pytest

from mobiletune.data.labels import SPLIT_NAMES, Row, is_labels_file, read_labels
from mobiletune.errors import DataError


def _csv(tmp_path: Path, text: str, name: str = "labels.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_a_labels_file_is_a_csv_that_is_not_a_folder(tmp_path):
    assert is_labels_file(tmp_path / "labels.csv")  # need not exist yet: check_source says so later
    assert is_labels_file(tmp_path / "LABELS.CSV")
    assert not is_labels_file(tmp_path / "labels.tsv")
    assert not is_labels_file(tmp_path / "labels.csv.bak")
    assert not is_labels_file(tmp_path / "csv")
    (tmp_path / "images.csv").mkdir()
    assert not is_labels_file(tmp_path / "images.csv")  # a folder that happens to end in .csv is a DATA_DIR


def test_rows_with_and_without_a_split_column(tmp_path):
    rows, skipped = read_labels(_csv(tmp_path, "path,label\na.jpg,cat\nsub/b.jpg,dog\n"))
    assert rows == [Row("a.jpg", "cat", None, 2), Row("sub/b.jpg", "dog", None, 3)] and skipped == []
    rows, skipped = read_labels(_csv(tmp_path, "path,label,split\na.jpg,cat,train\nb.jpg,dog,validation\n"
                                               "c.jpg,dog,test\n"))
    assert [(r.path, r.split, r.line) for r in rows] == [("a.jpg", "train", 2), ("b.jpg", "validation", 3),
                                                         ("c.jpg", "test", 4)]


def test_the_header_is_found_in_any_order_case_and_spacing_with_extra_columns(tmp_path):
    text = " Split ,notes, LABEL,Path\nVAL, blurry ,  cat ,  a.jpg  \nTrain,,dog,b.jpg\n"
    rows, _ = read_labels(_csv(tmp_path, text))
    assert rows == [Row("a.jpg", "cat", "validation", 2), Row("b.jpg", "dog", "train", 3)]


def test_every_split_alias_maps_to_its_split_whatever_its_case(tmp_path):
    aliases = [(alias, split) for split, names in SPLIT_NAMES.items() for alias in names]
    assert ("val", "validation") in aliases
    text = "path,label,split\n" + "".join(f"{i}.jpg,cat,{a.upper() if i % 2 else a}\n"
                                          for i, (a, _) in enumerate(aliases))
    rows, _ = read_labels(_csv(tmp_path, text))
    assert [r.split for r in rows] == [split for _, split in aliases]


def test_a_spreadsheets_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    rows, _ = read_labels(_csv(tmp_path, "path,label\na.jpg,cat\n", encoding="utf-8-sig"))
    assert rows == [Row("a.jpg", "cat", None, 2)]


def test_paths_are_normalised_so_two_spellings_of_one_file_are_one_row(tmp_path):
    rows, skipped = read_labels(_csv(tmp_path, "path,label\n./x/../a.jpg,cat\na.jpg,cat\nsub//b.jpg,dog\n"))
    assert rows == [Row("a.jpg", "cat", None, 2), Row("sub/b.jpg", "dog", None, 4)]
    assert skipped == [("a.jpg", "labels.csv line 3: repeats line 2")]


def test_unusable_rows_are_skipped_with_their_line_and_blank_lines_still_count(tmp_path):
    text = ("path,label\n"
            "a.jpg,cat\n"  # line 2
            "\n"  # line 3: blank, not a skip
            " , \n"  # line 4: blank too (only spaces)
            ",dog\n"  # line 5: no path
            "b.jpg,  \n"  # line 6: no label
            "c.jpg\n"  # line 7: too short, so no label
            "a.jpg,cat\n"  # line 8: the same row again
            "d.jpg,dog\n")  # line 9
    rows, skipped = read_labels(_csv(tmp_path, text, name="mine.csv"))
    assert rows == [Row("a.jpg", "cat", None, 2), Row("d.jpg", "dog", None, 9)]
    assert skipped == [("(mine.csv line 5)", "mine.csv line 5: empty path"),
                       ("b.jpg", "mine.csv line 6: empty label"),
                       ("c.jpg", "mine.csv line 7: empty label"),
                       ("a.jpg", "mine.csv line 8: repeats line 2")]


def test_a_quoted_field_over_several_lines_moves_the_line_numbers_after_it(tmp_path):
    text = 'path,label,split\n"a\nb.jpg",cat,train\nc.jpg,dog,val\nc.jpg,dog,val\n'
    rows, skipped = read_labels(_csv(tmp_path, text))
    assert rows == [Row("a\nb.jpg", "cat", "train", 2), Row("c.jpg", "dog", "validation", 4)]
    assert skipped == [("c.jpg", "labels.csv line 5: repeats line 4")]


def test_line_breaks_inside_a_quoted_field_are_kept_as_written(tmp_path):
    # the csv module reads the file untranslated (newline=""): a Windows line break inside quotes stays \r\n
    path = tmp_path / "labels.csv"
    path.write_bytes(b'path,label\r\na.jpg,"two\r\nlines"\r\nb.jpg,dog\r\n')
    rows, skipped = read_labels(path)
    assert rows == [Row("a.jpg", "two\r\nlines", None, 2), Row("b.jpg", "dog", None, 4)] and skipped == []


def test_a_repeat_whose_split_is_spelled_otherwise_is_still_a_repeat(tmp_path):
    rows, skipped = read_labels(_csv(tmp_path, "path,label,split\na.jpg,cat,train\na.jpg,cat,TRAIN\n"))
    assert rows == [Row("a.jpg", "cat", "train", 2)]
    assert skipped == [("a.jpg", "labels.csv line 3: repeats line 2")]


@pytest.mark.parametrize(("text", "message"), [
    ("path,label,split\na.jpg,cat,train\na.jpg,dog,train\n",
     "labels.csv lines 2 and 3 both list a.jpg, as 'cat' (train) and 'dog' (train); keep one"),
    ("path,label,split\na.jpg,cat,train\na.jpg,cat,test\n",
     "labels.csv lines 2 and 3 both list a.jpg, as 'cat' (train) and 'cat' (test); keep one"),
    ("path,label\na.jpg,cat\nb.jpg,cat\n./a.jpg,dog\n",
     "labels.csv lines 2 and 4 both list a.jpg, as 'cat' (no split) and 'dog' (no split); keep one"),
    ("path,label,split\na.jpg,cat,dev\n",
     "labels.csv line 2: split 'dev' is not one of train, validation (or val), test; fix the row, or drop the "
     "split column to let mobiletune split"),
    ("path,label,split\na.jpg,cat,\n",
     "labels.csv line 2: split '' is not one of train, validation (or val), test; fix the row, or drop the "
     "split column to let mobiletune split"),
    ("file,label\na.jpg,cat\n",
     "labels.csv: needs a header row with columns path,label (and optionally split); found ['file', 'label']"),
    ("path\na.jpg\n",
     "labels.csv: needs a header row with columns path,label (and optionally split); found ['path']"),
    ("", "labels.csv: needs a header row with columns path,label (and optionally split); found an empty file"),
])
def test_contradictions_and_bad_headers_are_errors_that_say_where(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as caught:
        read_labels(path)
    # the header errors name the whole path; the row errors the file's name, beside the line
    assert str(caught.value) == (f"{tmp_path}/{message}" if message.startswith("labels.csv:") else message)


@pytest.mark.parametrize("arrange", ["missing", "folder", "latin-1", "huge-field"])
def test_files_that_cannot_be_read_are_data_errors(tmp_path, arrange):
    path = tmp_path / "labels.csv"
    if arrange == "folder":
        path.mkdir()
    elif arrange == "latin-1":
        path.write_bytes("path,label\ncaf\xe9.jpg,cat\n".encode("latin-1"))
    elif arrange == "huge-field":
        path.write_text("path,label\n" + "a" * 200_000 + ".jpg,cat\n")  # past the csv module's field limit
    with pytest.raises(DataError) as caught:
        read_labels(path)
    if arrange == "missing":
        assert str(caught.value) == f"{path}: no such file"
    else:
        assert str(caught.value).startswith(f"{path}: cannot read it as a UTF-8 CSV (")
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
