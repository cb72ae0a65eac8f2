"""A damaged toy-teacher folder is refused with a message naming its file, before any allocation."""

import json

import pytest

from dd2_core.errors import CheckpointError
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig


@pytest.fixture
def folder(tmp_path):
    ToyTeacher(ToyTeacherConfig(dim=16, depth=1, heads=2)).save(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_truncated_or_mistyped_config_names_the_file(folder):
    cfg = folder / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError):  # the original failure: a bare JSONDecodeError, no file name
        json.loads(cfg.read_text())
    with pytest.raises(CheckpointError, match=f"toy teacher: {cfg} is not a valid ToyTeacherConfig: .*"):
        ToyTeacher.load(folder)
    cfg.write_text(json.dumps(json.loads(text) | {"dim": "wide"}))
    with pytest.raises(CheckpointError, match=f"toy teacher: {cfg} is not a valid ToyTeacherConfig: .*dim"):
        ToyTeacher.load(folder)


def test_config_sizes_are_checked_against_the_weights_header(folder):
    cfg = folder / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"dim": 2**17, "heads": 2}))  # ~100 GB if allocated
    with pytest.raises(CheckpointError, match="model.safetensors does not match ToyTeacher"):
        ToyTeacher.load(folder)
