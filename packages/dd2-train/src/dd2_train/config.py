"""The run configuration: one pydantic `TrainConfig` per run, read from YAML/JSON plus `--set a.b=v` overrides.

Defaults are the paper's where it gives them (method.md 7, DD2 Tab. 10/11) and are filled per teacher family and
size before validation (`paper_defaults`), so a config file only names what differs. Unknown keys are rejected
(extra="forbid") and every error names its field (`csd.guidance_updates`, `teacher.ckpt`, ...).

Units. "steps" are optimizer steps of the stage's trained network (for `csd`: generator updates, each preceded by
K guidance updates). `batch_size` is the global batch of one optimizer step: every rank runs
batch_size / (grad_accum x world) samples per micro-step. Paper "iterations" are read as optimizer steps (in
Tab. 11 Gui/Gen = K only then; method.md 7.1 notes the ambiguity). Warm-up steps count the engine's own optimizer
steps; the paper's generator warm-up of 40k *guidance* iterations is 40k / K generator steps.

Checks that need the file system or the world size (paths exist, batch divisibility, teacher files) run in
`check_config`, before any work, and report every problem at once.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dd2_core.errors import DD2Error
from dd2_core.logits import SamplingPolicy
from dd2_core.models.llamagen import LlamaGenConfig
from dd2_core.models.llamagen_vq import VQConfig
from dd2_core.models.var import VARConfig
from dd2_core.models.var_vqvae import VARVQVAEConfig
from dd2_train.steps import CSDConfig, GTSConfig, RegressConfig

Family = Literal["toy", "llamagen", "var"]
Stage = Literal["adapt", "gen-data", "gts", "gen-pairs", "regress", "csd", "align", "export"]
STAGE_ORDER: tuple[str, ...] = ("adapt", "gen-data", "gts", "gen-pairs", "regress", "csd", "align", "export")
Recipe = Literal["recommended", "paper"]
SIZES: dict[str, tuple[str, ...]] = {
    "toy": ("toy",),
    "llamagen": ("B", "L", "XL", "XXL", "3B", "custom"),
    "var": ("d16", "d20", "d24", "d30", "custom"),
}


class ConfigError(DD2Error, ValueError):
    """The run configuration is invalid; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- sections ----------------------------------------------------------------------------------------------------
class TeacherSpec(_Strict):
    """Which teacher, from which files."""

    family: Family = Field(..., description="toy | llamagen | var")
    size: str = Field(
        ...,
        description="toy: 'toy'; llamagen: B, L, XL, XXL, 3B or custom (teacher.gpt + teacher.vq); var: d16-d30 or "
        "custom (teacher.var + teacher.vqvae)",
    )
    ckpt: Path = Field(..., description="toy: folder written by ToyTeacher.save; llamagen: GPT .pt; var: var_dNN.pth")
    vq_ckpt: Path | None = Field(None, description="VQ tokenizer weights (tokenize, export decoder); not for toy")
    adapted: Path | None = Field(
        None, description="adapt stage folder holding the adapted teacher; llamagen default: <run_dir>/adapt if present"
    )
    policy: SamplingPolicy | None = Field(None, description="sampling policy distilled; None = family default")
    shard: bool = Field(False, description="partition the frozen teacher with ZeRO-3 instead of replicating it")
    gpt: LlamaGenConfig | None = Field(None, description="llamagen size 'custom': the GPT's sizes (n_layer, dim, ...)")
    vq: VQConfig | None = Field(None, description="llamagen size 'custom': the VQ tokenizer's sizes")
    var: VARConfig | None = Field(None, description="var size 'custom': the VAR transformer's sizes")
    vqvae: VARVQVAEConfig | None = Field(None, description="var size 'custom': the multi-scale VQVAE's sizes")
    sample_input: Literal["ids", "codes"] | None = Field(
        None,
        description="llamagen: inputs of the AR sampler, 'ids' (token table, the released teacher) or 'codes' "
        "(cont_embed of code vectors, as log_probs; for a teacher trained by adapt from scratch); None = 'ids'",
    )

    @field_validator("size")
    @classmethod
    def _size_of_family(cls, v: str, info) -> str:
        family = info.data.get("family")
        if family in SIZES and v not in SIZES[family]:
            raise ValueError(f"teacher family {family!r} has sizes {list(SIZES[family])}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _files_of_family(self) -> TeacherSpec:
        if self.family == "toy" and self.vq_ckpt is not None:
            raise ValueError("vq_ckpt: the toy teacher has no VQ tokenizer; leave it unset")
        if self.family != "toy" and self.vq_ckpt is None:
            raise ValueError(f"vq_ckpt: the {self.family} teacher needs its VQ tokenizer checkpoint, got none")
        if self.family == "var" and self.adapted is not None:
            raise ValueError("adapted: VAR needs no continuous-input adaptation (only LlamaGen); leave it unset")
        custom = self.family == "llamagen" and self.size == "custom"
        if custom and (self.gpt is None or self.vq is None):
            raise ValueError("gpt, vq: llamagen size 'custom' needs both teacher.gpt and teacher.vq sizes")
        if not custom and (self.gpt is not None or self.vq is not None):
            raise ValueError(f"gpt, vq: only for llamagen size 'custom', got {self.family} size {self.size!r}")
        if custom and self.gpt.vocab_size != self.vq.codebook_size:
            raise ValueError(
                f"gpt.vocab_size must equal vq.codebook_size, got {self.gpt.vocab_size} and {self.vq.codebook_size}"
            )
        if self.family != "llamagen" and self.sample_input is not None:
            raise ValueError(f"sample_input: only for llamagen teachers, got family {self.family!r}")
        return self._var_sizes()

    def _var_sizes(self) -> TeacherSpec:
        custom = self.family == "var" and self.size == "custom"
        if custom and (self.var is None or self.vqvae is None):
            raise ValueError("var, vqvae: var size 'custom' needs both teacher.var and teacher.vqvae sizes")
        if not custom and (self.var is not None or self.vqvae is not None):
            raise ValueError(f"var, vqvae: only for var size 'custom', got {self.family} size {self.size!r}")
        if custom:
            for name in ("vocab_size", "token_dim", "patch_nums"):
                a, b = getattr(self.var, name), getattr(self.vqvae, name)
                if a != b:
                    raise ValueError(f"var.{name} must equal vqvae.{name}, got {a} and {b}")
        return self


class HeadSpec(_Strict):
    """Velocity head of the AR-diffusion model (the backbone comes from the teacher)."""

    width: int = Field(1024, ge=8, description="residual block width (MAR: 1024)")
    depth: int = Field(3, ge=1, description="residual AdaLN blocks (method.md 10: 3-6)")


class DeepSpeedSpec(_Strict):
    zero_stage: int = Field(2, ge=1, le=3, description="ZeRO stage of every trained network")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="recompute transformer blocks in backward")
    compile: bool = Field(
        False,
        description="regional torch.compile of every transformer block and velocity head (trained networks and the "
        "teacher's teacher-forced passes; not gen-data's AR sampling); ZeRO 1-2 only",
    )
    compile_backend: str = Field("inductor", min_length=1, description="torch.compile backend (tests: aot_eager)")

    @model_validator(mode="after")
    def _compile_zero(self) -> DeepSpeedSpec:
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile: regional compilation needs ZeRO stage 1 or 2 (ZeRO-3 gathers parameters "
                             "per module in eager hooks), got zero_stage=3")  # fmt: skip
        return self


class OptimSpec(_Strict):
    """AdamW (weight decay 0 = Adam) with a linear warm-up from `warmup_start_lr` to `lr`."""

    lr: float = Field(..., gt=0, description="end learning rate (after warm-up)")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up; 0 = constant lr")
    warmup_start_lr: float = Field(1e-6, ge=0, description="learning rate at step 0 of the warm-up (Tab. 11)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas (Tab. 10/11)")
    weight_decay: float = Field(0.0, ge=0, description="not stated in the paper: 0")
    grad_clip: float = Field(1.0, ge=0, description="gradient-norm clipping; 0 = off (not stated: 1)")


class DataSpec(_Strict):
    """A stream of token shards (WebDataset)."""

    shards: str | list[str] | None = Field(
        None, description="folder, brace pattern, pipe: or http(s) URL(s); None = the stage's default input"
    )
    num_workers: int = Field(2, ge=0, description="DataLoader workers per rank")
    shuffle_buffer: int = Field(1000, ge=0, description="samples in each worker's shuffle buffer (0/1 = off)")
    skip_corrupt: bool = Field(False, description="log, count and skip corrupt shards/samples instead of failing")
    allow_pipe: bool = Field(
        False, description="allow `pipe:` shard URLs, which run a shell command (a config is code: only trusted ones)"
    )

    @model_validator(mode="after")
    def _pipe_needs_consent(self) -> DataSpec:
        items = [self.shards] if isinstance(self.shards, str) else list(self.shards or [])
        pipes = [s for s in items if s.startswith("pipe:")]
        if pipes and not self.allow_pipe:
            raise ValueError(
                f"shards: {pipes[0]!r} runs a shell command; set allow_pipe: true in this data section if you trust "
                "the config (a config with pipe: URLs is code)"
            )
        return self


class _Batched(_Strict):
    steps: int = Field(..., ge=1, description="optimizer steps of this stage")
    batch_size: int = Field(..., ge=1, description="global batch per optimizer step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    time_limit_s: float | None = Field(
        None,
        gt=0,
        description="optional wall-time budget of the stage's training steps (seconds, summed over resumes): the "
        "stage ends at the first step past it, with a checkpoint there, as if `steps` had been reached; for "
        "equal-time comparisons (set `steps` high). Learning-rate and anchor schedules still run on `steps`",
    )


class AdaptStage(_Batched):
    """Stage 0 (LlamaGen): AR cross-entropy fine-tuning of the continuous-input teacher on real image codes."""

    optim: OptimSpec
    data: DataSpec = Field(
        default_factory=DataSpec, description="shards of image codes (python -m dd2_train.data tokenize)"
    )


class GenDataStage(_Strict):
    """Teacher samples for GTS, written as WebDataset shards by every rank."""

    num_samples: int = Field(..., ge=1, description="sequences to write")
    shard_size: int = Field(..., ge=1, description="sequences per shard")
    batch_size: int = Field(..., ge=1, description="sequences per teacher sampling call, per rank")
    out_dir: Path | None = Field(None, description="shard folder; default <run_dir>/gen-data/shards")


class GenPairsStage(_Strict):
    """DD1's dataset (offline regression): (noise, flow-map token ids) pairs written as WebDataset shards by every
    rank, resumable like gen-data. The ids are the teacher's deterministic flow map F(eps) snapped to its codes."""

    num_samples: int = Field(..., ge=1, description="pairs to write")
    shard_size: int = Field(..., ge=1, description="pairs per shard")
    batch_size: int = Field(..., ge=1, description="pairs per flow-map call (N teacher passes), per rank")
    flow_steps: int = Field(32, ge=1, le=4096, description="Euler steps per token of the flow map")
    flow_power: float = Field(2.0, gt=0.0, description="time grid (1 - k/steps)^power")
    out_dir: Path | None = Field(None, description="shard folder; default <run_dir>/gen-pairs/shards")


class OneStepSpec(_Strict):
    """Options of the one-step generator (dd2_core.generator; none in the paper). Used by regress, csd, align and
    export, and recorded in the exported pipeline's config.json."""

    head_time: float = Field(1.0, gt=0.0, le=1.0, description="t fed to the generator's head (paper: unstated, 1.0)")
    noise_scale: float | Literal["codebook"] = Field(
        1.0, description="the backbone reads noise_scale * eps; 'codebook': mean code norm / sqrt(C)"
    )
    class_cond: bool = Field(False, description="a zero-initialised class embedding in the head's condition")

    @field_validator("noise_scale")
    @classmethod
    def _positive(cls, v):
        if not isinstance(v, str) and v <= 0:
            raise ValueError(f"expected > 0 or 'codebook', got {v}")
        return v


class GTSStage(_Batched, GTSConfig):
    """Stage 1: AR-diffusion tuning with the GTS loss (Tab. 10). GTSConfig's fields are the loss settings."""

    head_only_steps: int = Field(0, ge=0, description="first steps train the head only (VAR: 300k of 330k)")
    optim: OptimSpec
    data: DataSpec = Field(default_factory=DataSpec, description="teacher-sample shards; default gen-data's output")

    @model_validator(mode="after")
    def _phases(self) -> GTSStage:
        if self.head_only_steps > self.steps:
            raise ValueError(f"head_only_steps ({self.head_only_steps}) must be <= steps ({self.steps})")
        return self


class RegressStage(_Batched, RegressConfig):
    """Flow-map regression of the one-step generator (not in DD2): 'onpolicy' (one teacher pass per batch on the
    generator's own prefix) or 'offline' (DD1, on gen-pairs shards). RegressConfig's fields are the loss's."""

    optim: OptimSpec
    ema_max_decay: float = Field(0.9999, gt=0, lt=1, description="progressive EMA cap (as csd)")
    data: DataSpec = Field(default_factory=DataSpec, description="offline: pair shards; default gen-pairs' output")
    init_from: Path | None = Field(None, description="gts stage folder (model A); default <run_dir>/gts")


class CSDStage(_Batched, CSDConfig):
    """Stage 2: CSD (Tab. 11). CSDConfig's fields (guidance_updates K, fcs_draws, t range, ...) are the loss's."""

    generator: OptimSpec
    guidance: OptimSpec
    ema_max_decay: float = Field(0.9999, gt=0, lt=1, description="progressive EMA cap (App. E.3)")
    guidance_prefit: int = Field(
        0,
        ge=0,
        description="not in the paper (0 = off): FCS updates of the guidance alone before the first generator update "
        "of a fresh run, like performance alignment (App. C.3): psi starts as a copy of A, near the teacher, and CSD "
        "has little signal until psi describes the generator",
    )
    init_from: Path | None = Field(
        None, description="gts, align or csd stage folder to start from; default <run_dir>/gts"
    )
    warm_start: Literal["none", "regress"] | Path = Field(
        "none",
        description="not in the paper ('none'): a regress stage folder ('regress' = <run_dir>/regress) whose EMA "
        "generator starts CSD; the guidance still starts from init_from's model A",
    )


class AlignStage(_Batched):
    """Performance alignment (App. C.3): generator frozen at its EMA, guidance trained alone (FCS, csd's settings)."""

    guidance: OptimSpec
    init_from: Path | None = Field(None, description="csd stage folder; default <run_dir>/csd")


class ExportStage(_Strict):
    out_dir: Path | None = Field(None, description="pipeline folder; default <run_dir>/pipeline")
    use_ema: bool = Field(True, description="export the EMA generator (the paper evaluates EMA weights)")
    init_from: Path | None = Field(None, description="csd or align stage folder; default <run_dir>/csd")


class CheckpointSpec(_Strict):
    every: int = Field(1000, ge=1, description="save every N optimizer steps (and at the end)")
    keep_last: int = Field(3, ge=0, description="complete checkpoints kept; 0 = all")


class LogSpec(_Strict):
    every: int = Field(10, ge=1, description="log every N steps (a sync point: .item())")
    tensorboard: bool = Field(True, description="write TensorBoard events to <stage>/events")


# -- the run -------------------------------------------------------------------------------------------------------
class TrainConfig(_Strict):
    """One run of one stage (or several, in order) of the DD2 pipeline."""

    run_dir: Path = Field(..., description="root folder; each stage writes <run_dir>/<name or stage>/")
    stage: Stage | list[Stage] = Field(..., description="stage, or stages run in order in one launch")
    recipe: Recipe = Field(
        "recommended",
        description="defaults filled before the config file: 'paper' (DD2's CSD from model A, Tab. 11) or "
        "'recommended' (the project's: DD1 flow-map regression warm start, then anchored CSD; README)",
    )
    name: str | None = Field(None, description="stage folder name (default: the stage), e.g. csd-aligned")
    seed: int = Field(0, ge=0, description="global seed; with the same world size a run is reproducible")
    teacher: TeacherSpec
    head: HeadSpec = Field(default_factory=HeadSpec)
    onestep: OneStepSpec = Field(default_factory=OneStepSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    adapt: AdaptStage
    gen_data: GenDataStage
    gts: GTSStage
    gen_pairs: GenPairsStage
    regress: RegressStage
    csd: CSDStage
    align: AlignStage
    export: ExportStage = Field(default_factory=ExportStage)

    @model_validator(mode="before")
    @classmethod
    def _fill_paper_defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        teacher = raw.get("teacher")
        if not isinstance(teacher, Mapping):
            return raw
        family, size = teacher.get("family"), teacher.get("size")
        if family not in SIZES or size not in SIZES[family]:
            return raw  # the field validators report it
        defaults = paper_defaults(family, size)
        recipe = raw.get("recipe", "recommended")
        if recipe in RECIPES:  # else the field validator reports it
            defaults = deep_merge(defaults, RECIPES[recipe](defaults))
        return deep_merge(defaults, raw)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        stages = self.stages
        if len(set(stages)) != len(stages):
            raise ValueError(f"stage: each stage at most once, got {stages}")
        order = [STAGE_ORDER.index(s) for s in stages]
        if order != sorted(order):
            raise ValueError(f"stage: stages run in pipeline order {list(STAGE_ORDER)}, got {stages}")
        if self.name is not None and len(stages) > 1:
            raise ValueError(f"name: a custom stage folder name needs a single stage, got stages {stages}")
        if self.deepspeed.compile and self.teacher.shard:
            raise ValueError("deepspeed.compile: a ZeRO-3-sharded teacher (teacher.shard) cannot be compiled; "
                             "set one of them to false")  # fmt: skip
        if "adapt" in stages and self.teacher.family == "var":
            raise ValueError("stage: 'adapt' is LlamaGen's continuous-input adaptation; VAR needs none")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, name: str | None) -> str | None:
        if name is not None and (
            not name.strip() or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".")
        ):
            raise ValueError(f"expected one folder name inside run_dir (no '/', not '.' or '..'), got {name!r}")
        return name

    @property
    def stages(self) -> list[str]:
        return [self.stage] if isinstance(self.stage, str) else list(self.stage)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / (self.name or stage)


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """`over` on top of `base`, recursing into dicts (lists and scalars are replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _csd(steps, batch, accum, k, lr_gui, lr_gen, warmup_gui) -> dict:
    return {
        "steps": steps,
        "batch_size": batch,
        "grad_accum": accum,
        "guidance_updates": k,
        "guidance": {"lr": lr_gui, "warmup_steps": warmup_gui},
        "generator": {"lr": lr_gen, "warmup_steps": warmup_gui // k},  # warm-up over guidance iterations (E.3)
    }


def _pairs_and_regress(csd: dict) -> dict:
    """gen-pairs and regress sized from the csd stage: regress uses csd's batch, generator lr and accumulation."""
    return {
        "gen_pairs": {"num_samples": 1_281_167, "shard_size": 5000, "batch_size": 256},  # [inferred] as gen-data
        "regress": {
            "steps": csd["steps"],
            "batch_size": csd["batch_size"],
            "grad_accum": csd["grad_accum"],
            "optim": {"lr": csd["generator"]["lr"], "warmup_steps": 1000},
        },
    }


def paper_defaults(family: str, size: str) -> dict:
    """Stage hyper-parameters of the paper (method.md 7.1, 7.2; Tab. 10, 11) for a teacher, as a raw config dict.

    Values the paper does not give are marked [inferred] (method.md 10). The toy teacher's are sized for seconds.
    """
    if family == "toy":
        return {
            "head": {"width": 64, "depth": 2},
            "adapt": {"steps": 100, "batch_size": 64, "optim": {"lr": 1e-3}},
            "gen_data": {"num_samples": 4096, "shard_size": 512, "batch_size": 512},
            "gts": {"steps": 500, "batch_size": 128, "optim": {"lr": 1e-3}},
            "csd": _csd(300, 128, 1, 5, 1e-3, 3e-4, 0),
            "align": {"steps": 50, "batch_size": 128, "guidance": {"lr": 1e-3}},
            "gen_pairs": {"num_samples": 8192, "shard_size": 1024, "batch_size": 1024},
            "regress": {"steps": 300, "batch_size": 128, "optim": {"lr": 1e-3}},
        }
    policy = (
        {"cfg_scale": 2.0, "cfg_schedule": "constant", "top_k": 8000, "top_p": 1.0, "top_p_rule": "hf"}
        if family == "llamagen"
        else {"cfg_scale": 2.0, "cfg_schedule": "ramp", "top_k": 900, "top_p": 0.95, "top_p_rule": "var"}
    )  # paper B.4 (distillation targets)
    gen_data = {"num_samples": 1_281_167, "shard_size": 5000, "batch_size": 256}  # [inferred] one ImageNet's worth
    if family == "llamagen":
        return {
            "teacher": {"policy": policy},
            # [inferred] LlamaGen's own training recipe: lr 1e-4, batch 256, wd 0.05; 200k iterations (E.4)
            "adapt": {"steps": 200_000, "batch_size": 256, "optim": {"lr": 1e-4, "weight_decay": 0.05}},
            "gen_data": gen_data,
            "gts": {"steps": 100_000, "batch_size": 512, "grad_accum": 4, "optim": {"lr": 1e-4}},
            "csd": _csd(12_000, 1024, 8, 5, 2e-4, 1e-4, 40_000),
            "align": {"steps": 8000, "batch_size": 1024, "grad_accum": 8, "guidance": {"lr": 2e-4}},
            **_pairs_and_regress(_csd(12_000, 1024, 8, 5, 2e-4, 1e-4, 40_000)),
        }
    var = {
        "d16": (
            {"steps": 330_000, "head_only_steps": 300_000, "grad_accum": 4},
            _csd(8000, 512, 4, 5, 2e-4, 2e-4, 40_000),
        ),
        "d20": (
            {"steps": 330_000, "head_only_steps": 300_000, "grad_accum": 8},
            _csd(16_000, 512, 8, 5, 2e-4, 2e-4, 40_000),
        ),
        "d24": (
            {"steps": 230_000, "head_only_steps": 200_000, "grad_accum": 16},
            _csd(15_000, 1024, 32, 2, 4e-4, 5e-5, 20_000),
        ),
        "d30": (
            {"steps": 230_000, "head_only_steps": 200_000, "grad_accum": 16},
            _csd(15_000, 1024, 32, 2, 4e-4, 5e-5, 20_000),
        ),
    }  # d30 is not in the paper: d24's settings [inferred]
    var["custom"] = var["d16"]  # a custom (small) VAR: the smallest released model's settings [inferred]
    gts, csd = var[size]
    return {
        "teacher": {"policy": policy},
        "adapt": {"steps": 1, "batch_size": 1, "optim": {"lr": 1e-4}},  # unused: VAR needs no adaptation
        "gen_data": gen_data,
        "gts": {**gts, "batch_size": 512, "optim": {"lr": 2e-4}},
        "csd": csd,
        "align": {
            "steps": 8000,
            "batch_size": csd["batch_size"],
            "grad_accum": csd["grad_accum"],
            "guidance": {"lr": csd["guidance"]["lr"]},
        },
        **_pairs_and_regress(csd),
    }


def _paper_recipe(defaults: dict) -> dict:
    """DD2 as published: CSD from model A with Tab. 11's settings (paper_defaults as they are)."""
    return {"csd": {"warm_start": "none"}}


def _recommended_recipe(defaults: dict) -> dict:
    """The project's recipe (none of it in the paper; chosen by the measurements on the enumerable toy, README
    "Recipes" and docs/experiments.md): DD1's offline flow-map regression from model A (stages `gen-pairs` and
    `regress`), then CSD from its EMA generator with a constant regression anchor (lambda = 1), K = 1 guidance update
    per generator update with m = 2 draws, t ~ U[0.1, 0.9], omega = 1, snapped prefixes, a short guidance pre-fit and
    a third of the paper's generator learning rate (a fine-tuning rate)."""
    csd = defaults["csd"]
    return {
        "regress": {"mode": "offline", "snap_prefix": True},
        "csd": {
            "warm_start": "regress",
            "guidance_updates": 1,
            "fcs_draws": 2,
            "t_min": 0.1,
            "t_max": 0.9,
            "weighting": "none",
            "snap_prefix": True,
            "guidance_prefit": 50,
            "anchor_weight": 1.0,
            "generator": {"lr": csd["generator"]["lr"] / 3, "warmup_steps": 0},
        },
    }


RECIPES = {"paper": _paper_recipe, "recommended": _recommended_recipe}


# -- loading -------------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`a.b.c=value` assignments (values parsed as YAML: numbers, booleans, lists) on a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set csd.guidance_updates=2")
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML (.yaml/.yml) or JSON (.json) mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(
            f"--config {str(path)!r}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {str(path)!r}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, `field.path: message (got value)`; consequences of a bad teacher are folded away."""
    errors = e.errors()
    teacher_bad = any(err["loc"][:1] == ("teacher",) for err in errors)
    lines, seen = [], set()
    for err in errors:
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] == "stage":
            loc = ["stage"]  # one line for the union (a stage or a list of stages)
            msg = f"expected one of {list(STAGE_ORDER)} or a list of them"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the example configs in packages/dd2-train/configs/)"
        elif err["type"] == "missing":
            if teacher_bad and loc[0] in _PRESET_SECTIONS:
                continue  # filled from the paper's defaults once teacher.family/size are valid
            msg = "required, but missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "value_error") or isinstance(got, Mapping) else f" (got {got!r})"
        line = f"  {'.'.join(loc) or '(top level)'}: {msg}{shown}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    head = f"invalid config ({len(lines)} problem{'s' if len(lines) > 1 else ''}):"
    return "\n".join([head, *lines])


_PRESET_SECTIONS = ("adapt", "gen_data", "gts", "csd", "align")


def validate_config(raw: Mapping) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override, fill the paper's defaults, validate. Raises ConfigError naming every bad field."""
    raw = read_config_file(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides))


# -- checks before any work -----------------------------------------------------------------------------------------
def default_input(cfg: TrainConfig, stage: str) -> Path | None:
    """Where a stage reads its starting weights/data when its config leaves it unset."""
    return {
        "gts": cfg.gen_data.out_dir or cfg.run_dir / "gen-data" / "shards",
        "regress": cfg.regress.init_from or cfg.run_dir / "gts",
        "regress-data": cfg.gen_pairs.out_dir or cfg.run_dir / "gen-pairs" / "shards",
        "csd": cfg.csd.init_from or cfg.run_dir / "gts",
        "csd-warm": (
            None
            if cfg.csd.warm_start == "none"
            else cfg.run_dir / "regress"
            if cfg.csd.warm_start == "regress"
            else Path(cfg.csd.warm_start)
        ),
        "align": cfg.align.init_from or cfg.run_dir / "csd",
        "export": cfg.export.init_from or cfg.run_dir / "csd",
    }.get(stage)


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """File-system and world-size checks for the selected stages; raises one ConfigError listing every problem.

    Inputs produced by an earlier stage of the same launch are not required to exist yet.
    """
    problems: list[str] = []
    stages = cfg.stages
    t = cfg.teacher
    if t.family == "toy":
        if not (t.ckpt / "config.json").is_file():
            problems.append(
                f"teacher.ckpt: expected a toy teacher folder with config.json (ToyTeacher.save), got {str(t.ckpt)!r}"
            )
    elif not t.ckpt.is_file():
        problems.append(f"teacher.ckpt: no such file {str(t.ckpt)!r}")
    if t.vq_ckpt is not None and not t.vq_ckpt.is_file():
        problems.append(f"teacher.vq_ckpt: no such file {str(t.vq_ckpt)!r}")
    if t.adapted is not None and "adapt" not in stages and not t.adapted.is_dir():
        problems.append(f"teacher.adapted: {str(t.adapted)!r} does not exist; run the adapt stage first")
    for stage in stages:
        sec = getattr(cfg, stage.replace("-", "_"))
        if isinstance(sec, _Batched):
            denom = sec.grad_accum * world_size
            if sec.batch_size % denom:
                problems.append(
                    f"{stage.replace('-', '_')}.batch_size: {sec.batch_size} is not divisible by grad_accum x world "
                    f"= {sec.grad_accum} x {world_size}; every rank needs an equal micro-batch"
                )
    for i, stage in enumerate(stages):  # explicit local shard paths must exist before any engine is built ...
        data = getattr(getattr(cfg, stage.replace("-", "_"), None), "data", None)
        written_now = any(s.startswith("gen-") for s in stages[:i])  # ... unless a stage of this launch writes them
        if isinstance(data, DataSpec) and data.shards is not None and not written_now:
            problems += _missing_shards(f"{stage.replace('-', '_')}.data.shards", data.shards)
    if "adapt" in stages and cfg.adapt.data.shards is None:
        problems.append("adapt.data.shards: required (image-code shards from `python -m dd2_train.data tokenize`)")
    if "regress" in stages and cfg.regress.mode == "offline" and "gen-pairs" not in stages:
        pairs = default_input(cfg, "regress-data")
        if cfg.regress.data.shards is None and not pairs.is_dir():
            problems.append(
                f"regress.data.shards: unset and the default {str(pairs)!r} does not exist; run gen-pairs first "
                "or set the shard URLs (regress.mode=offline reads flow-map pairs)"
            )
    warm = default_input(cfg, "csd-warm")
    if "csd" in stages and warm is not None and "regress" not in stages and not warm.exists():
        problems.append(
            f"csd.warm_start: {str(warm)!r} does not exist; run the regress stage first (recipe 'recommended'), "
            "or set csd.warm_start=none / recipe=paper to start CSD from model A"
        )
    producers = {"gts": "gen-data", "regress": "gts", "csd": "gts", "align": "csd", "export": "csd"}
    for stage, producer in producers.items():
        if stage not in stages or producer in stages:
            continue
        if stage == "gts":
            if cfg.gts.data.shards is None and not default_input(cfg, "gts").is_dir():
                problems.append(
                    f"gts.data.shards: unset and the default {str(default_input(cfg, 'gts'))!r} does not exist; "
                    "run gen-data first or set the shard URLs"
                )
            continue
        path = default_input(cfg, stage)
        earlier = [cfg.stage_dir(s).resolve() for s in stages[: stages.index(stage)]]
        if any(d == path.resolve() or d in path.resolve().parents for d in earlier):
            continue  # e.g. export.init_from = <run>/regress in a `[regress, export]` launch
        if not path.exists():
            problems.append(
                f"{stage}.init_from: {str(path)!r} does not exist; run the {producer} stage first or set it"
            )
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def _missing_shards(key: str, shards: str | list[str]) -> list[str]:
    """Problems with the local paths of a shard spec (remote pipe:/http(s) URLs are checked when read)."""
    import braceexpand

    out = []
    for item in [shards] if isinstance(shards, str) else shards:
        if item.startswith(("pipe:", "http://", "https://")):
            continue
        if os.path.isdir(item):
            if not any(name.endswith(".tar") for name in os.listdir(item)):
                out.append(f"{key}: folder {item!r} holds no *.tar shard")
            continue
        missing = [u for u in braceexpand.braceexpand(item) if not os.path.isfile(u)]
        if missing:
            out.append(
                f"{key}: no such shard file {missing[0]!r}"
                + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    return out
