"""TrainConfig: paper defaults, overrides, and errors that name the field before any work starts."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig
from dd2_train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    check_config,
    load_config,
    paper_defaults,
    validate_config,
)

PKG = Path(__file__).resolve().parents[1]
CONFIGS = PKG / "configs"


def _run_module():
    spec = importlib.util.spec_from_file_location("dd2_train_run", PKG / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_teacher(tmp_path) -> Path:
    folder = tmp_path / "teacher"
    ToyTeacher(ToyTeacherConfig(dim=16, depth=1, heads=2)).save(folder)
    return folder


def _toy(tmp_path, teacher, **over) -> dict:
    raw = {
        "run_dir": str(tmp_path / "run"),
        "stage": "gts",
        "teacher": {"family": "toy", "size": "toy", "ckpt": str(teacher)},
    }
    return apply_overrides(raw, [f"{k}={v}" for k, v in over.items()])


def _error(raw) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return str(e.value)


@pytest.mark.parametrize("name", ["toy", "llamagen_l", "var_d16", "var_d20", "var_d24"])
def test_example_configs_validate_under_both_recipes(name):
    paper = load_config(CONFIGS / f"{name}.yaml", ["recipe=paper"])
    assert isinstance(paper, TrainConfig)
    assert paper.csd.guidance_updates == (2 if name == "var_d24" else 5)  # Tab. 11
    assert (paper.csd.warm_start, paper.csd.anchor_weight, paper.csd.weighting) == ("none", 0.0, "sid")
    rec = load_config(CONFIGS / f"{name}.yaml")  # the default recipe
    assert rec.recipe == "recommended" and rec.regress.mode == "offline" and rec.csd.warm_start == "regress"
    assert (rec.csd.guidance_updates, rec.csd.fcs_draws, rec.csd.anchor_weight) == (1, 2, 1.0)
    assert rec.csd.generator.lr == pytest.approx(paper.csd.generator.lr / 3)
    assert rec.csd.batch_size == paper.csd.batch_size and rec.regress.batch_size == paper.csd.batch_size
    # a file or --set value still wins over either recipe
    assert load_config(CONFIGS / f"{name}.yaml", ["csd.guidance_updates=4"]).csd.guidance_updates == 4


def test_recipe_is_checked_and_the_warm_start_must_exist(tmp_path, toy_teacher):
    assert "recipe" in _error(_toy(tmp_path, toy_teacher, recipe="fast"))
    cfg = validate_config(_toy(tmp_path, toy_teacher, stage="csd"))
    with pytest.raises(ConfigError, match="csd.warm_start: .*run the regress stage first"):
        check_config(cfg, 1)
    offline = validate_config(_toy(tmp_path, toy_teacher, stage="regress"))
    with pytest.raises(ConfigError, match="regress.data.shards: unset .*gen-pairs"):
        check_config(offline, 1)


def test_an_input_written_by_an_earlier_stage_of_the_launch_need_not_exist(tmp_path, toy_teacher):
    run = tmp_path / "run"
    (run / "gts").mkdir(parents=True)  # model A exists; the regression does not yet
    over = {"stage": "[regress,export]", "regress.mode": "onpolicy", "export.init_from": str(run / "regress")}
    check_config(validate_config(_toy(tmp_path, toy_teacher, **over)), 1)  # regress writes it first
    alone = validate_config(_toy(tmp_path, toy_teacher, **(over | {"stage": "export"})))
    with pytest.raises(ConfigError, match=r"export.init_from: .*/run/regress' does not exist"):
        check_config(alone, 1)


def test_paper_defaults_are_filled_per_teacher():
    llamagen = load_config(CONFIGS / "llamagen_l.yaml", ["recipe=paper"])
    assert (llamagen.gts.optim.lr, llamagen.gts.batch_size, llamagen.gts.grad_accum) == (1e-4, 512, 4)
    assert (llamagen.csd.generator.lr, llamagen.csd.guidance.lr, llamagen.csd.batch_size) == (1e-4, 2e-4, 1024)
    assert llamagen.csd.guidance.warmup_steps == 40_000 and llamagen.csd.generator.warmup_steps == 8000
    assert llamagen.csd.guidance.warmup_start_lr == 1e-6 and llamagen.csd.generator.betas == (0.9, 0.95)
    assert llamagen.teacher.policy.top_k == 8000 and llamagen.teacher.policy.cfg_scale == 2.0
    d24 = load_config(CONFIGS / "var_d24.yaml", ["recipe=paper"])
    assert (d24.csd.guidance.lr, d24.csd.generator.lr, d24.csd.grad_accum) == (4e-4, 5e-5, 32)
    assert (d24.gts.steps, d24.gts.head_only_steps) == (230_000, 200_000)
    assert d24.teacher.policy.cfg_schedule == "ramp" and d24.teacher.policy.top_k == 900
    # a file value wins over the preset, and the preset keeps the rest of the section
    over = load_config(CONFIGS / "var_d16.yaml", ["recipe=paper", "csd.guidance.lr=1e-3", "csd.guidance_updates=2"])
    assert over.csd.guidance.lr == 1e-3 and over.csd.guidance.warmup_steps == 40_000
    assert over.csd.guidance_updates == 2
    assert paper_defaults("var", "d20")["csd"]["grad_accum"] == 8


def test_overrides_parse_yaml_values(tmp_path, toy_teacher):
    cfg = validate_config(
        _toy(tmp_path, toy_teacher, **{"stage": "[gts,csd]", "csd.weighting": "none", "log.tensorboard": "false"})
    )
    assert cfg.stages == ["gts", "csd"] and cfg.csd.weighting == "none" and cfg.log.tensorboard is False
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["csd.guidance_updates"])
    with pytest.raises(ConfigError, match="run_dir is a value"):
        apply_overrides({"run_dir": "x"}, ["run_dir.a=1"])


def test_unknown_keys_are_rejected_naming_them(tmp_path, toy_teacher):
    msg = _error(_toy(tmp_path, toy_teacher, **{"csd.guidance_updatez": 2, "lr": 1}))
    assert "csd.guidance_updatez: unknown key" in msg and "lr: unknown key" in msg


def test_wrong_types_and_ranges_name_the_field(tmp_path, toy_teacher):
    msg = _error(_toy(tmp_path, toy_teacher, **{"csd.guidance_updates": "many", "gts.optim.lr": -1}))
    assert "csd.guidance_updates" in msg and "'many'" in msg
    assert "gts.optim.lr" in msg and "greater than 0" in msg
    assert "deepspeed.zero_stage" in _error(_toy(tmp_path, toy_teacher, **{"deepspeed.zero_stage": 4}))
    assert "csd" in _error(_toy(tmp_path, toy_teacher, **{"csd.t_min": 0.9, "csd.t_max": 0.5}))


def test_compile_is_refused_with_zero3_and_a_sharded_teacher(tmp_path, toy_teacher):
    msg = _error(_toy(tmp_path, toy_teacher, **{"deepspeed.compile": "true", "deepspeed.zero_stage": 3}))
    assert "deepspeed" in msg and "ZeRO stage 1 or 2" in msg and "zero_stage=3" in msg
    msg = _error(_toy(tmp_path, toy_teacher, **{"deepspeed.compile": "true", "teacher.shard": "true"}))
    assert "deepspeed.compile" in msg and "teacher.shard" in msg
    cfg = validate_config(_toy(tmp_path, toy_teacher, **{"deepspeed.compile": "true", "deepspeed.zero_stage": 2}))
    assert cfg.deepspeed.compile and cfg.deepspeed.compile_backend == "inductor"


def test_teacher_mismatches_name_the_field(tmp_path, toy_teacher):
    raw = _toy(tmp_path, toy_teacher, **{"teacher.family": "llamagen", "teacher.size": "d16"})
    msg = _error(raw)
    assert "teacher.size" in msg and "'d16'" in msg
    msg = _error(_toy(tmp_path, toy_teacher, **{"teacher.family": "var", "teacher.size": "d16"}))
    assert "vq_ckpt" in msg
    msg = _error(
        _toy(
            tmp_path,
            toy_teacher,
            **{"stage": "adapt", "teacher.family": "var", "teacher.size": "d16", "teacher.vq_ckpt": "x"},
        )
    )
    assert "stage" in msg and "VAR needs none" in msg
    assert "stage" in _error(_toy(tmp_path, toy_teacher, stage="[csd,gts]"))


def test_custom_var_teacher_takes_sizes_and_the_d16_preset(tmp_path):
    var = {"depth": 2, "embed_dim": 32, "num_heads": 2, "vocab_size": 16, "token_dim": 4, "patch_nums": [1, 2, 3]}
    vqvae = {"vocab_size": 16, "token_dim": 4, "ch": 32, "ch_mult": [1, 1], "patch_nums": [1, 2, 3]}
    teacher = {"family": "var", "size": "custom", "ckpt": "v.pth", "vq_ckpt": "q.pth", "var": var, "vqvae": vqvae}
    raw = {"run_dir": str(tmp_path), "stage": "gts", "recipe": "paper", "teacher": teacher}
    cfg = validate_config(raw)
    assert cfg.teacher.var.token_groups == (1, 4, 9) and cfg.teacher.vqvae.ch_mult == (1, 1)
    assert paper_defaults("var", "custom") == paper_defaults("var", "d16")  # [inferred]: the smallest released VAR
    assert (cfg.gts.steps, cfg.csd.guidance_updates, cfg.teacher.policy.top_k) == (330_000, 5, 900)
    assert "var size 'custom' needs both" in _error(raw | {"teacher": teacher | {"vqvae": None}})
    assert "var.patch_nums must equal vqvae.patch_nums" in _error(
        raw | {"teacher": teacher | {"vqvae": vqvae | {"patch_nums": [1, 2, 4]}}}
    )
    assert "only for var size 'custom'" in _error(raw | {"teacher": teacher | {"size": "d16"}})


def test_check_config_names_missing_paths_and_batch_split(tmp_path, toy_teacher):
    cfg = validate_config(_toy(tmp_path, toy_teacher, **{"teacher.ckpt": str(tmp_path / "nope"), "stage": "csd"}))
    with pytest.raises(ConfigError) as e:
        check_config(cfg, world_size=2)
    msg = str(e.value)
    assert "teacher.ckpt" in msg and "nope" in msg
    assert "csd.init_from" in msg  # no gts run to start from
    cfg = validate_config(
        _toy(tmp_path, toy_teacher, **{"stage": "[gen-data,gts]", "gts.batch_size": 10, "gts.grad_accum": 2})
    )
    with pytest.raises(ConfigError, match=r"gts.batch_size: 10 is not divisible by grad_accum x world = 2 x 3"):
        check_config(cfg, world_size=3)
    check_config(cfg, world_size=5)  # 10 = 2 x 5: fine; gts reads what gen-data of the same launch writes


def test_cli_dry_run_and_errors_before_any_work(tmp_path, toy_teacher, capsys):
    run = _run_module()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_toy(tmp_path, toy_teacher)))
    assert run.main(["--config", str(path), "--dry-run", "--set", "csd.guidance_updates=3", "--local_rank=0"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["csd"]["guidance_updates"] == 3 and resolved["gts"]["steps"] == 500
    # bad configs exit 2 naming the field, and nothing is created
    assert run.main(["--config", str(path), "--set", "gts.optim.lrr=1"]) == 2
    assert "gts.optim.lrr: unknown key" in capsys.readouterr().err
    assert run.main(["--config", str(path), "--set", f"teacher.ckpt={tmp_path / 'missing'}"]) == 2
    assert "teacher.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert run.main(["--config", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
