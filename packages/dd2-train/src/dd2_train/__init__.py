"""dd2-train: the DD2 stage steps, the DeepSpeed ZeRO driver, WebDataset streaming and the run folder.

    python packages/dd2-train/run.py --config packages/dd2-train/configs/toy.yaml        (or under torchrun/deepspeed)

Modules: `steps` (one update of every stage, engine-agnostic), `loop` (a minimal single-process loop), `config`
(TrainConfig), `trainer` (the DeepSpeed driver), `engine` (the only DeepSpeed importer), `data` (shards),
`checkpoint` (run folder), `export` (pipeline folder), `logs`.
"""

from dd2_train.checkpoint import RunFolder, module_weights, resolve_checkpoint
from dd2_train.config import ConfigError, TrainConfig, check_config, load_config, paper_defaults
from dd2_train.data import DataError, TokenStream, tokenize_image_folder, write_shard, write_teacher_samples
from dd2_train.export import export_pipeline
from dd2_train.steps import (
    CSDConfig,
    GTSConfig,
    TorchUpdater,
    Updater,
    adapt_step,
    csd_round,
    ema_decay,
    ema_update,
    generator_step,
    gts_step,
    guidance_step,
    regression_step,
)
from dd2_train.trainer import train

__version__ = "0.1.0"

__all__ = [
    "CSDConfig",
    "ConfigError",
    "DataError",
    "GTSConfig",
    "RunFolder",
    "TokenStream",
    "TorchUpdater",
    "TrainConfig",
    "Updater",
    "adapt_step",
    "check_config",
    "csd_round",
    "ema_decay",
    "ema_update",
    "export_pipeline",
    "generator_step",
    "gts_step",
    "guidance_step",
    "load_config",
    "module_weights",
    "paper_defaults",
    "regression_step",
    "resolve_checkpoint",
    "tokenize_image_folder",
    "train",
    "write_shard",
    "write_teacher_samples",
]
