"""fileio.py: atomic writes, JSON and JSONL that name the file, paths kept inside their folder."""
import json
import os

import pytest

import fileio


def jsonl(tmp_path, text):
    path = str(tmp_path / "x.jsonl")
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# JSONL: an append-only log that a crash can tear only at its end


def test_append_jsonl_writes_one_line_per_record(tmp_path):
    path = str(tmp_path / "x.jsonl")
    fileio.append_jsonl(path, {"a": 1})
    fileio.append_jsonl(path, {"b": "ü"})
    assert open(path, encoding="utf-8").read() == '{"a": 1}\n{"b": "ü"}\n'
    assert fileio.read_jsonl(path) == [{"a": 1}, {"b": "ü"}]


def test_a_last_line_without_newline_is_torn(tmp_path):
    path = jsonl(tmp_path, '{"a": 1}\n{"a": 2}\n{"a": 3}')  # parses, but without its newline it may be incomplete
    assert fileio.read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_repair_cuts_the_torn_line(tmp_path):
    path = jsonl(tmp_path, '{"a": 1}\n{"a": 2}\n{"a": 3')
    assert fileio.repair_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert open(path).read() == '{"a": 1}\n{"a": 2}\n'


def test_repair_cuts_a_last_line_of_zeros(tmp_path):
    path = jsonl(tmp_path, '{"a": 1}\n{"a": 2}\n\0\0\0\0\n')  # what a crash can leave behind
    assert fileio.repair_jsonl(path) == [{"a": 1}, {"a": 2}] and os.path.getsize(path) == 18


def test_a_bad_line_before_the_last_is_corruption_named(tmp_path):
    path = jsonl(tmp_path, '{"a": 1}\n{"a": \n{"a": 2}\n')
    with pytest.raises(ValueError, match="x.jsonl: line 2"):
        fileio.read_jsonl(path)


def test_missing_jsonl_reads_as_empty(tmp_path):
    assert fileio.read_jsonl(str(tmp_path / "none.jsonl")) == [] == fileio.repair_jsonl(str(tmp_path / "n.jsonl"))


# ---------------------------------------------------------------------------------------------------------------------
# reading inputs


def test_read_json_names_the_file_on_bad_syntax_and_bad_bytes(tmp_path):
    (tmp_path / "syntax.json").write_text('[{"id": 1,}]')
    with pytest.raises(ValueError, match="syntax.json: invalid JSON at line 1"):
        fileio.read_json(str(tmp_path / "syntax.json"))
    (tmp_path / "latin1.json").write_bytes('[{"caption": "café"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8"):
        fileio.read_json(str(tmp_path / "latin1.json"))


def test_read_records_takes_a_json_list_or_jsonl_and_names_bad_lines(tmp_path):
    (tmp_path / "list.json").write_text('[{"a": 1}, {"a": 2}]')
    (tmp_path / "lines.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert fileio.read_records(str(tmp_path / "list.json")) == fileio.read_records(str(tmp_path / "lines.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        fileio.read_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bytes.jsonl").write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ValueError, match="bytes.jsonl: not UTF-8"):
        fileio.read_records(str(tmp_path / "bytes.jsonl"))


# ---------------------------------------------------------------------------------------------------------------------
# atomic writes


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    fileio.write_json(str(path), {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and os.listdir(tmp_path) == ["out.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def write(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        fileio.atomic_write(str(path), write)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_a_planted_tmp_link_does_not_redirect_a_write(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "out.json.tmp")  # the name a fixed NAME.tmp writer would open
    os.symlink(victim, tmp_path / ".out.json.tmp")
    fileio.write_json(str(tmp_path / "out.json"), [1])
    assert victim.read_text() == "precious" and json.loads((tmp_path / "out.json").read_text()) == [1]


# ---------------------------------------------------------------------------------------------------------------------
# paths from data files


def test_inside_joins_relative_paths():
    assert fileio.inside("imgs", "a/b.png", "f.json, row 0") == os.path.join("imgs", "a", "b.png")
    assert fileio.inside("imgs", "a/../b.png", "f.json, row 0") == os.path.join("imgs", "b.png")


@pytest.mark.parametrize("path", ["../../etc/passwd", "a/../../b.png", "/etc/passwd", "", "a\0b"])
def test_inside_refuses_paths_that_leave_the_root_naming_the_row(tmp_path, path):
    with pytest.raises(ValueError, match=r"f.json, row 3: "):
        fileio.inside(str(tmp_path), path, "f.json, row 3")


def test_inside_takes_an_absolute_path_under_the_root(tmp_path):
    assert fileio.inside(str(tmp_path), str(tmp_path / "a.png"), "row") == str(tmp_path / "a.png")
    assert fileio.inside("/", "/etc/passwd", "row") == "/etc/passwd"  # an absolute root, on purpose


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    fileio.write_text(tmp_path / "a.txt", "x")
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o666 & ~fileio._UMASK  # as open() makes it, not 0600


def test_fresh_dir_is_empty_and_has_ordinary_permissions(tmp_path):
    folder = fileio.fresh_dir(tmp_path, "out")
    assert os.listdir(folder) == [] and os.path.basename(folder).startswith(".out.")
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~fileio._UMASK
