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
    path = jsonl(tmp_path, '{"a": 1}\n{"a": 2}\n\0\0\0\0')  # a crash can leave the appended line's bytes zeroed
    assert fileio.repair_jsonl(path) == [{"a": 1}, {"a": 2}] and os.path.getsize(path) == 18


def test_a_complete_last_line_that_does_not_parse_is_corruption(tmp_path):
    path = jsonl(tmp_path, '{"a": 1}\n{"a": \n')  # ends in its newline: written whole, so not torn
    with pytest.raises(ValueError, match="x.jsonl: line 2"):
        fileio.read_jsonl(path)
    with pytest.raises(ValueError, match="x.jsonl: line 2"):
        fileio.repair_jsonl(path)
    assert open(path).read() == '{"a": 1}\n{"a": \n'  # nothing cut


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


@pytest.mark.parametrize("read, text", [(fileio.read_json, "[" * 100000), (fileio.read_records, "[" * 100000),
                                        (fileio.read_records, '{"a": 1}\n' + "[" * 100000 + "\n")],
                         ids=["json", "json-list", "jsonl"])
def test_json_nested_too_deep_is_an_error_naming_the_file(tmp_path, read, text):
    (tmp_path / "deep.json").write_text(text)
    with pytest.raises(ValueError, match="deep.json.*nested"):
        read(str(tmp_path / "deep.json"))


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


# ---------------------------------------------------------------------------------------------------------------------
# question ids and answer files that record what produced them


def test_repeated_ids_are_named():
    fileio.check_unique(["a", 1, "1"], "q.jsonl")  # 1 and "1" are different ids
    with pytest.raises(ValueError, match=r"q.jsonl: question ids repeated: 'b', 3"):
        fileio.check_unique(["a", "b", 3, "b", 3, "b"], "q.jsonl")


@pytest.mark.parametrize("value", [["a"], {"a": 1}, None, 1.5, True])
def test_an_id_must_be_a_string_or_an_integer(value):
    assert fileio.require_id({"id": "p1"}, "id", "f, row 4") == "p1" and fileio.require_id({"id": 7}, "id", "") == 7
    with pytest.raises(ValueError, match="f, row 4: 'id' .* is not a string or an integer"):
        fileio.require_id({"id": value}, "id", "f, row 4")


SOURCE = {"model": "/runs/a", "fingerprint": "0123abcd", "max_new_tokens": 16}


def test_resume_records_the_source_beside_the_answer_file(tmp_path):
    path = str(tmp_path / "answers.jsonl")
    assert fileio.resume_jsonl(path, SOURCE) == []
    assert json.loads(open(path + ".source.json").read()) == SOURCE and not os.path.exists(path)
    with open(path, "w") as f:
        f.write('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')  # a torn last line
    assert fileio.resume_jsonl(path, dict(SOURCE)) == [{"question_id": 1, "text": "a"}]
    assert open(path).read() == '{"question_id": 1, "text": "a"}\n'  # cut, so that appending continues


def test_resume_with_another_source_says_what_differs(tmp_path):
    path = str(tmp_path / "answers.jsonl")
    fileio.resume_jsonl(path, SOURCE)
    fileio.append_jsonl(path, {"question_id": 1, "text": "a"})
    other = {**SOURCE, "fingerprint": "ffff0000", "max_new_tokens": 32}
    with pytest.raises(ValueError) as e:
        fileio.resume_jsonl(path, other)
    message = str(e.value)
    assert "answers.jsonl" in message and "\n" not in message
    assert "fingerprint '0123abcd' there, 'ffff0000' now" in message and "max_new_tokens 16 there, 32 now" in message
    assert "/runs/a" not in message  # only what differs
    assert "another --out" in message and "delete" in message
    assert json.loads(open(path + ".source.json").read()) == SOURCE  # kept: the answers there are still SOURCE's


def test_resume_refuses_answers_without_a_record_of_their_source(tmp_path):
    path = str(tmp_path / "answers.jsonl")
    fileio.append_jsonl(path, {"question_id": 1, "text": "a"})  # e.g. a file from another program
    with pytest.raises(ValueError, match=r"answers.jsonl: holds answers \(1\) .*source.json.*cannot be checked"):
        fileio.resume_jsonl(path, SOURCE)
    os.unlink(path)  # what the message proposes: start again
    assert fileio.resume_jsonl(path, SOURCE) == []
