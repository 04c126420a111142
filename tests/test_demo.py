"""The miniature experiments (demo.py scienceqa / ablations) end to end, a few training steps each: the plumbing."""
import json
import os
import shutil

import pytest

import data
import demo
import scienceqa


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("miniature")


@pytest.mark.slow
def test_scienceqa_miniature_writes_the_score_files_result_and_prints_the_table_7_row(runs, capsys):
    demo.main(["scienceqa", "--quick", "--images", "6", "--demo-dir", str(runs / "demo"), "--out", str(runs / "sqa")])
    result = json.loads((runs / "sqa" / "result.json").read_text())
    problems = scienceqa.load_scienceqa(str(runs / "sqa" / "scienceqa"), "test")
    assert set(result) == set(scienceqa.score(problems, {})) and result["count"] == len(problems)
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("miniature ScienceQA")]
    assert len(row) == 1 and all(column in row[0] for column in scienceqa.COLUMNS)


@pytest.mark.slow
def test_ablations_run_every_variant_and_print_and_write_one_table(runs, capsys):
    demo.main(["ablations", "--quick", "--images", "6", "--demo-dir", str(runs / "demo"), "--out", str(runs / "sqa")])
    for name in demo.ABLATIONS:
        assert (runs / "sqa" / "ablations" / name / "result.json").is_file()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(demo.ABLATIONS) and "90.92" in table[1]
    assert (runs / "sqa" / "ablations" / "table.md").read_text().splitlines()[2:] == table[1:]
    stage1 = runs / "sqa" / "ablations" / "last-layer" / "stage1" / "config.json"
    assert json.loads(stage1.read_text())["select_layer"] == -1


class Stop(Exception):
    pass


def test_smaller_llm_stage_1_command_has_no_bare_set(tmp_path, monkeypatch):
    demo_dir = tmp_path / "demo"  # the demo's tokenizer and a stage-1 projector in place: no demo run needed
    (demo_dir / "base" / "llm").mkdir(parents=True)
    (demo_dir / "stage1").mkdir()
    (demo_dir / "stage1" / "projector.safetensors").write_bytes(b"")
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer.model"), demo_dir / "base" / "llm")
    commands = []

    def record(args, quiet=False):  # the stage-1 command, then stop before the conversion
        commands.append(args)
        if args[0] != "train.py":
            raise Stop

    monkeypatch.setattr(demo, "_python", record)
    with pytest.raises(Stop):
        demo.scienceqa_run(str(tmp_path / "out"), str(tmp_path / "sqa"), str(demo_dir), stage1="small", n_images=2)
    stage1, = [c for c in commands if c[0] == "train.py"]
    assert "--set" not in stage1 and stage1[stage1.index("--model") + 1].endswith("llm-small")


def test_demo_tokenizer_does_not_change_when_a_template_is_added(tmp_path, monkeypatch):
    before = open(demo.make_demo_data(str(tmp_path / "a"), n_train=40, n_eval=4)["tokenizer"], "rb").read()
    extra = data.Template("two", "A new system prompt, with words the demo text never has: zygote quixotic.")
    monkeypatch.setitem(data.TEMPLATES, "new_template", extra)
    after = open(demo.make_demo_data(str(tmp_path / "b"), n_train=40, n_eval=4)["tokenizer"], "rb").read()
    assert after == before
