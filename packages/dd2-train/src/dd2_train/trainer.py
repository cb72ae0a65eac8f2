"""The DeepSpeed driver: runs the stages of a TrainConfig with the step functions of `dd2_train.steps`.

    train(cfg)                     process group, checks before any work, then each selected stage in order
      run_adapt     adapt_step     on image-code shards                   -> <stage>/teacher/ (adapted teacher)
      run_gen_data  teacher.sample                                        -> <run_dir>/gen-data/shards/*.tar
      run_gts       gts_step       on teacher-sample shards               -> model A (engine "model")
      run_gen_pairs teacher_flow_map                                      -> <run_dir>/gen-pairs/shards/*.tar
      run_regress   onpolicy_regression_step (one teacher pass per batch) or regression_step on pair shards, EMA
                                                                          -> engine "generator", ema
      run_csd       K x grad_accum guidance_step, grad_accum generator_step, EMA
                                                                          -> engines "generator", "guidance", ema
      run_align     guidance_step with the generator frozen at its EMA    -> engine "guidance", generator, ema
      run_export    dd2_train.export                                      -> pipeline folder

The algorithm is only in `dd2_train.steps`: a DeepSpeed engine is the step's updater and `engine.module` its
model. `engine.step()` steps the optimizer only at gradient-accumulation boundaries, so one optimizer step is
`grad_accum` step-function calls, and K guidance updates are K x grad_accum guidance_step calls.

Every stage writes `<run_dir>/<name>/` (dd2_train.checkpoint) and resumes from its latest complete checkpoint when
the same command is run again: engines (weights, optimizer, LR schedule), EMA, per-rank RNG states and the data
stream's position are restored, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dd2_core.checkpoint import atomic_write_bytes, read_state_dict, save_safetensors
from dd2_core.generator import OneStepGenerator
from dd2_core.sampling import nearest_code, teacher_flow_map
from dd2_train import engine as eng
from dd2_train.build import (
    ADAPTED_DIR,
    build_adapt_model,
    build_ar_diffusion,
    build_generator,
    build_teacher,
    onestep_options,
    restore_frozen_tokenizer,
    save_adapted_teacher,
)
from dd2_train.checkpoint import (
    RunFolder,
    capture_rng,
    load_rank_state,
    module_weights,
    read_manifest,
    resolve_checkpoint,
    restore_rng,
    save_rank_state,
    write_json,
)
from dd2_train.config import ConfigError, OptimSpec, TrainConfig, check_config, default_input
from dd2_train.data import TokenStream, derive_seed, expand_shards, read_shard_meta, write_teacher_samples
from dd2_train.logs import MetricsLogger, Throughput, setup_logging
from dd2_train.runlock import RunFolderBusy, RunLock
from dd2_train.steps import (
    CSDConfig,
    GTSConfig,
    RegressConfig,
    adapt_step,
    ema_update,
    generator_step,
    gts_step,
    guidance_step,
    onpolicy_regression_step,
    regression_step,
    start_residual_guidance,
)

logger = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What every stage needs: the config, the process, its folder and RNG."""

    cfg: TrainConfig
    stage: str
    dist: eng.DistInfo
    folder: RunFolder
    precision: str
    rng: torch.Generator  # this rank's generator for noise, labels and t (saved in checkpoints)
    metrics: MetricsLogger | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16: engines hold bf16 weights, and autocast keeps fp32 inputs (noise, codes) compatible with them."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


# -- entry ---------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, local_rank: int | None = None) -> None:
    """Run the configured stage(s). Config problems are raised on every rank before any work starts."""
    dist = eng.init_distributed(local_rank)
    setup_logging(dist.rank)
    error = None
    try:
        check_config(cfg, dist.world_size)
    except ConfigError as e:
        error = e
    if not eng.all_ranks_ok(error is None):
        raise error or ConfigError("invalid config on another rank (see its log)")
    lock = _lock_run_dir(cfg, dist)  # one writer per run folder, for the whole launch
    try:
        _train_stages(cfg, dist)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(cfg: TrainConfig, dist: eng.DistInfo) -> RunLock | None:
    """Rank 0 takes the run folder's lock; every rank stops (RunFolderBusy) if another launch holds it."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = RunLock(cfg.run_dir)
            lock.acquire()
        except (RunFolderBusy, OSError) as e:  # busy, or a run_dir this process cannot write
            lock, error = None, e
    if not eng.all_ranks_ok(error is None):
        eng.shutdown(wait=False)
        raise error or RunFolderBusy(f"{cfg.run_dir}: rank 0 could not lock the run folder (its message says why)")
    return lock


def _train_stages(cfg: TrainConfig, dist: eng.DistInfo) -> None:
    precision = eng.resolve_precision(cfg.deepspeed.precision)
    if precision == "bf16" and dist.device.type == "cpu":
        logger.warning("bf16 on CPU is slow and not what CI tests; deepspeed.precision=auto picks fp32 there")
    logger.info(
        "dd2 train: stages %s, world %d, device %s, precision %s, ZeRO %d, torch %s, deepspeed %s",
        cfg.stages,
        dist.world_size,
        dist.device.type,
        precision,
        cfg.deepspeed.zero_stage,
        torch.__version__,
        eng.deepspeed_version(),
    )
    try:
        for stage in cfg.stages:
            run_stage(cfg, stage, dist, precision)
    except BaseException:
        eng.shutdown(wait=False)  # no barrier: another rank may be gone
        raise
    eng.shutdown()


STAGES: dict[str, Callable[[StageContext], None]] = {}


def run_stage(cfg: TrainConfig, stage: str, dist: eng.DistInfo, precision: str) -> None:
    folder = RunFolder(cfg.stage_dir(stage))
    setup_logging(dist.rank, folder.path)
    if dist.is_main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.remove_partial()
    eng.barrier()
    rng = torch.Generator(device=dist.device).manual_seed(derive_seed(cfg.seed, stage, "loop", dist.rank))
    ctx = StageContext(cfg, stage, dist, folder, precision, rng)
    logger.info("stage %s -> %s", stage, folder.path)
    tic = time.perf_counter()
    STAGES[stage](ctx)
    _write_snapshot(ctx)  # stages without a checkpoint (gen-data, export): once they succeeded
    eng.barrier()
    seconds = time.perf_counter() - tic
    logger.info("stage %s done in %.1f s", stage, seconds)
    if dist.is_main:  # one line per launch that ran the stage (a resumed stage has several): its wall time
        with open(folder.path / LAUNCHES_FILE, "a") as f:
            f.write(json.dumps({"stage": stage, "seconds": round(seconds, 3), "world_size": dist.world_size,
                                "end": time.time()}) + "\n")  # fmt: skip


LAUNCHES_FILE = "launches.jsonl"


def stage_seconds(stage_dir: str | Path) -> float:
    """Wall time a stage folder's stage took, summed over the launches that ran it (0.0 if none finished);
    unreadable lines (a launch killed while writing) are skipped."""
    path = Path(stage_dir) / LAUNCHES_FILE
    total = 0.0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                total += float(json.loads(line)["seconds"])
            except (ValueError, TypeError, KeyError):
                continue
    return total


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _seed_models(cfg: TrainConfig, stage: str) -> None:
    """Identical initial weights on every rank (fresh heads draw from the global RNG)."""
    torch.manual_seed(derive_seed(cfg.seed, stage, "init"))


def _seed_rank(ctx: StageContext) -> None:
    """Per-rank global RNG for anything not drawing from ctx.rng."""
    torch.manual_seed(derive_seed(ctx.cfg.seed, ctx.stage, "global", ctx.dist.rank))


# -- engines -------------------------------------------------------------------------------------------------------
def _spec(ctx: StageContext, optim: OptimSpec, batch_size: int, grad_accum: int) -> eng.EngineSpec:
    return eng.EngineSpec(
        lr=optim.lr,
        warmup_start_lr=optim.warmup_start_lr,
        warmup_steps=optim.warmup_steps,
        betas=optim.betas,
        weight_decay=optim.weight_decay,
        grad_clip=optim.grad_clip,
        zero_stage=ctx.cfg.deepspeed.zero_stage,
        precision=ctx.precision,
        micro_batch=batch_size // (grad_accum * ctx.dist.world_size),
        grad_accum=grad_accum,
        world_size=ctx.dist.world_size,
    )


def _engine(ctx: StageContext, module: nn.Module, spec: eng.EngineSpec, name: str):
    if ctx.cfg.deepspeed.activation_checkpointing:
        target = module.model.backbone if isinstance(module, OneStepGenerator) else getattr(module, "backbone", module)
        n = eng.enable_activation_checkpointing(target)
        logger.info("%s: activation checkpointing on %d blocks", name, n)
    engine = eng.build_engine(module, spec)
    if ctx.cfg.deepspeed.compile:
        n = eng.compile_regions(module, backend=ctx.cfg.deepspeed.compile_backend)
        logger.info("%s: torch.compile (%s) on %d regions", name, ctx.cfg.deepspeed.compile_backend, n)
    n_train = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters() if p.requires_grad)
    logger.info(
        "%s: %.2fM trainable parameters, micro-batch %d x accumulation %d x world %d, lr %.2e (warm-up %d steps)",
        name,
        n_train / 1e6,
        spec.micro_batch,
        spec.grad_accum,
        spec.world_size,
        spec.lr,
        spec.warmup_steps,
    )
    return engine


def _teacher(ctx: StageContext) -> nn.Module:
    """The frozen fp32 teacher, replicated; `_place_teacher` once the trained networks are built from it."""
    return build_teacher(ctx.cfg.teacher, device=ctx.device, dtype=torch.float32, run_dir=ctx.cfg.run_dir)


def _place_teacher(ctx: StageContext, teacher: nn.Module, *, teacher_forced: bool = True) -> None:
    """ZeRO-3-partition the teacher's transformer (teacher.shard) or, on bf16 runs, cast it to bf16; with
    deepspeed.compile, compile its blocks where it runs teacher-forced passes (not gen-data's KV-cached sampler,
    which has its own compiled decode step)."""
    cfg = ctx.cfg
    # the transformer only: codebooks and tokenizers stay fp32 and replicated
    net = {"toy": teacher, "llamagen": getattr(teacher, "model", None), "var": getattr(teacher, "var", None)}[
        cfg.teacher.family
    ]
    if cfg.teacher.shard:
        target = _shard_target(cfg.teacher.family, net)
        ctx.extra["teacher_engine"] = eng.shard_frozen(target, precision=ctx.precision, world_size=ctx.dist.world_size)
        logger.info("teacher: ZeRO-3 partitioned over %d ranks", ctx.dist.world_size)
    elif ctx.precision == "bf16" and cfg.teacher.family != "toy":
        net.to(torch.bfloat16)  # runs under autocast; logits and log-probs are computed in fp32
    if cfg.deepspeed.compile and teacher_forced:
        n = eng.compile_regions(net, backend=cfg.deepspeed.compile_backend)
        logger.info("teacher: torch.compile (%s) on %d blocks", cfg.deepspeed.compile_backend, n)


def _shard_target(family: str, net: nn.Module) -> nn.Module:
    """What ZeRO-3 partitions of a frozen teacher. VAR: its blocks only (nearly all its weights); the VAR module's
    own parameters (pos_start, pos_1LC) are read by the KV-cached sampler and the teacher-forced pass outside any
    forward of that module, where ZeRO-3 would not gather them, so they stay replicated with the embeddings."""
    return net.blocks if family == "var" else net


# -- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(
    ctx: StageContext,
    step: int,
    *,
    engines: Mapping[str, Any],
    files: Mapping[str, nn.Module] | None = None,
    stream: TokenStream | None = None,
    state: Mapping[str, Any] | None = None,
) -> None:
    """Collective: write `checkpoints/step_N/` atomically (dd2_train.checkpoint) with everything resume needs."""
    folder = ctx.folder
    if ctx.dist.is_main:
        folder.begin(step)
    eng.barrier()
    tmp = folder.tmp_path(step)
    for name, engine in engines.items():
        eng.save_engine(engine, tmp, name)
    modules: dict[str, dict] = {name: {"kind": "engine"} for name in engines}
    for name, module in (files or {}).items():
        modules[name] = {"kind": "file", "file": f"{name}.safetensors"}
        if ctx.dist.is_main:
            save_safetensors(module.state_dict(), tmp / f"{name}.safetensors")
    rank_state = {"rng": capture_rng(ctx.rng), "data": stream.state_dict() if stream is not None else None}
    save_rank_state(tmp, ctx.dist.rank, rank_state)
    eng.barrier()
    if ctx.dist.is_main:
        manifest = {
            "stage": ctx.stage,
            "world_size": ctx.dist.world_size,
            "zero_stage": ctx.cfg.deepspeed.zero_stage,
            "modules": modules,
            "state": dict(state or {}),
            "time": time.time(),
        }
        final = folder.commit(step, manifest, ctx.cfg.checkpoint.keep_last)
        logger.info("saved checkpoint %s", final)
    eng.barrier()


def load_checkpoint(
    ctx: StageContext,
    step_dir: Path,
    *,
    engines: Mapping[str, Any],
    files: Mapping[str, nn.Module] | None = None,
    stream: TokenStream | None = None,
) -> dict:
    """Collective: restore what `save_checkpoint` wrote. Returns the manifest."""
    manifest = read_manifest(step_dir)
    if manifest["world_size"] != ctx.dist.world_size:
        raise ConfigError(
            f"resume: {step_dir} was written by {manifest['world_size']} ranks, this run has {ctx.dist.world_size}; "
            "ZeRO partitions need the same world size (or start a new run folder with name=...)"
        )
    for name, engine in engines.items():
        eng.load_engine(engine, step_dir, name)
    for name, module in (files or {}).items():
        own = module.state_dict()
        sd = read_state_dict(step_dir / f"{name}.safetensors")
        module.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()})
    rank_state = load_rank_state(step_dir, ctx.dist.rank)
    restore_rng(rank_state["rng"], ctx.rng)
    if stream is not None:
        stream.load_state_dict(rank_state["data"])
    logger.info("resumed from %s (step %d)", step_dir, manifest["step"])
    return manifest


def _truncate_log(ctx: StageContext, step: int) -> None:
    """Before training from `step`, drop log.jsonl records of later steps (they are about to be recomputed) and any
    line that does not parse (a last line cut short by a full disk or a kill); the rewrite is atomic."""
    path = ctx.folder.path / "log.jsonl"
    if not ctx.dist.is_main or not path.is_file():
        return
    keep, dropped, bad = [], 0, []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            later = int(record["step"]) > step
        except (ValueError, TypeError, KeyError):
            bad.append(number)
            continue
        if later:
            dropped += 1
        else:
            keep.append(line)
    if bad:
        logger.warning("%s: dropped %d unreadable line(s) (line %s; cut short by a full disk or a kill?)", path,
                       len(bad), ", ".join(map(str, bad[:5])))  # fmt: skip
    if bad or dropped:
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _write_snapshot(ctx: StageContext) -> None:
    """config.json of the stage folder (rank 0), once the stage has resumed or started cleanly: a launch that fails
    before that leaves the previous run's snapshot in place."""
    if not ctx.dist.is_main or ctx.extra.get("snapshot_written"):
        return
    snapshot = ctx.cfg.model_dump(mode="json")
    old = ctx.folder.path / "config.json"
    if old.is_file():
        try:
            changed = _diff(json.loads(old.read_text()), snapshot)
        except ValueError:
            changed = [f"{old} was unreadable"]
        if changed:
            logger.warning("config differs from the snapshot of the previous run in %s: %s", ctx.folder.path, changed)
    write_json(old, snapshot)
    ctx.extra["snapshot_written"] = True


# -- the loop shared by every trained stage ---------------------------------------------------------------------------
@dataclass
class _Loop:
    """Step counting, logging and checkpoint cadence of one stage."""

    ctx: StageContext
    total: int
    samples_per_step: int
    start: int = 0
    time_limit: float | None = None  # the stage's time_limit_s

    def __post_init__(self) -> None:
        resumed = self.ctx.extra.get("resumed_state", {}) if self.start else {}
        self.seconds_before = float(resumed.get("train_seconds", 0.0))  # training time of earlier launches
        self.stopped = bool(resumed.get("time_limit_reached", False))
        self.tic = time.perf_counter()
        self.speed = Throughput(self.start, self.total, self.samples_per_step)
        self.ctx.metrics = MetricsLogger(
            self.ctx.folder.path,
            stage=self.ctx.stage,
            rank=self.ctx.dist.rank,
            device=self.ctx.device,
            tensorboard=self.ctx.cfg.log.tensorboard,
        )

    def steps(self) -> Iterator[int]:
        if self.start >= self.total or self.stopped:
            why = "its time limit was reached" if self.stopped else f"{self.start}/{self.total} steps"
            logger.info("stage %s already complete (%s)", self.ctx.stage, why)
            return
        for step in range(self.start, self.total):
            yield step
            if self.stopped:
                return

    @property
    def seconds(self) -> float:
        """Training wall time of this stage so far, earlier launches included."""
        return self.seconds_before + time.perf_counter() - self.tic

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint records of the loop: the step, the training time, whether the time limit ended it."""
        return {"step": step, "train_seconds": round(self.seconds, 3), "time_limit_reached": self.stopped}

    def after(self, step: int, metrics: Mapping[str, Tensor], save: Callable[[int], None]) -> None:
        """`step` (0-based) just finished: log and save on their cadences (both are collectives); past the time
        limit (rank 0's clock decides, for every rank) the stage ends here with a checkpoint."""
        done = step + 1
        cfg = self.ctx.cfg
        if self.time_limit is not None and done < self.total:
            self.stopped = bool(eng.broadcast_object(self.seconds >= self.time_limit))
            if self.stopped:
                logger.info("stage %s: time limit %.0f s reached after %d/%d steps (%.1f s)", self.ctx.stage,
                            self.time_limit, done, self.total, self.seconds)  # fmt: skip
        last = done == self.total or self.stopped
        if done % cfg.log.every == 0 or last:
            self.ctx.metrics.log(done, self.total, metrics, self.speed.update(done))
        if done % cfg.checkpoint.every == 0 or last:
            save(done)

    def close(self) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.close()


def _latest(ctx: StageContext) -> str | None:
    """Rank 0's view of the stage's latest complete checkpoint, on every rank."""
    latest = ctx.folder.latest_checkpoint() if ctx.dist.is_main else None
    return eng.broadcast_object(str(latest) if latest is not None else None)


def _resume_or_init(ctx: StageContext, load: Callable[[Path], dict], init: Callable[[], None]) -> int:
    """Resume from the stage's latest checkpoint if there is one, else initialise. Returns the start step."""
    latest = _latest(ctx)
    if latest is None:
        init()
        start = 0
    else:
        manifest = load(Path(latest))
        start = int(manifest["step"])
        ctx.extra["resumed_state"] = dict(manifest.get("state") or {})
    _truncate_log(ctx, start)
    _write_snapshot(ctx)
    return start


def _stream(ctx: StageContext, data, default: str | None, teacher, micro: int, *, pairs: bool = False) -> TokenStream:
    """The stage's shard stream; `pairs`: flow-map pair shards of gen-pairs (samples hold noise too)."""
    shards = data.shards if data.shards is not None else default
    urls = expand_shards(shards)
    meta = read_shard_meta(urls[0])
    kind = "flow-map-pairs" if pairs else "teacher-samples"
    if pairs and meta.get("kind") != kind:
        raise ConfigError(f"{ctx.stage}.data.shards: {urls[0]} holds {meta.get('kind')!r} shards, expected {kind!r} "
                          "(written by the gen-pairs stage)")  # fmt: skip
    expected = {"num_tokens": teacher.num_tokens, "vocab_size": teacher.codebook.shape[0]}
    found = {k: meta.get(k) for k in expected}
    if found != expected:
        raise ConfigError(f"{ctx.stage}.data.shards: {urls[0]} holds {found}, but the teacher has {expected}")
    if meta.get("policy") not in (None, teacher.policy.model_dump(mode="json")):
        logger.warning(
            "%s: shards were sampled with policy %s, the teacher's is %s", urls[0], meta["policy"], teacher.policy
        )
    return TokenStream(
        urls,
        batch_size=micro,
        num_tokens=teacher.num_tokens,
        vocab_size=teacher.codebook.shape[0],
        num_classes=teacher.num_classes,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        skip_corrupt=data.skip_corrupt,
        seed=derive_seed(ctx.cfg.seed, ctx.stage, "data"),
        token_dim=int(teacher.codebook.shape[1]) if pairs else None,
    )


def _finish_stream(stream: TokenStream) -> None:
    stream.close()
    if stream.skipped:
        logger.warning("data: %d corrupt shards/samples were skipped on this rank (data.skip_corrupt)", stream.skipped)


# -- stages ----------------------------------------------------------------------------------------------------------
def run_adapt(ctx: StageContext) -> None:
    """Stage 0: AR cross-entropy fine-tuning of the continuous-input teacher (adapt_step) on image codes."""
    cfg, sec = ctx.cfg, ctx.cfg.adapt
    _seed_models(cfg, ctx.stage)
    teacher = build_teacher(cfg.teacher, device=ctx.device, dtype=torch.float32, run_dir=cfg.run_dir)
    codebook = teacher.codebook.detach().float().clone()
    model = build_adapt_model(teacher, cfg.teacher)
    spec = _spec(ctx, sec.optim, sec.batch_size, sec.grad_accum)
    engine = _engine(ctx, model, spec, "adapt")
    stream = _stream(ctx, sec.data, None, teacher, spec.micro_batch)
    _seed_rank(ctx)
    start = _resume_or_init(
        ctx, lambda d: load_checkpoint(ctx, d, engines={"model": engine}, stream=stream), lambda: None
    )
    loop = _Loop(ctx, sec.steps, sec.batch_size, start, sec.time_limit_s)

    def save(step: int) -> None:
        save_checkpoint(ctx, step, engines={"model": engine}, stream=stream, state=loop.state(step))

    engine.train()
    for step in loop.steps():
        acc: dict[str, Tensor] = {}
        for _ in range(sec.grad_accum):
            batch = next(stream)
            ids, labels = batch["ids"].to(ctx.device), batch["labels"].to(ctx.device)
            with ctx.autocast():
                m = adapt_step(engine.module, engine, ids, labels, codebook)
            acc = _accumulate(acc, m, sec.grad_accum)
        loop.after(step, acc, save)
    loop.close()
    _finish_stream(stream)
    if ctx.dist.is_main:  # from the fp32 master weights of the final checkpoint, not the (bf16) engine module
        weights = module_weights(ctx.folder.latest_checkpoint(), "model")
        save_adapted_teacher(weights, teacher, cfg.teacher, ctx.folder.path / ADAPTED_DIR)
        logger.info("adapted teacher written to %s", ctx.folder.path / ADAPTED_DIR)


def _accumulate(acc: dict[str, Tensor], m: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """Mean of the micro-step metrics of one optimizer step (tensor ops only: no sync)."""
    return {k: acc.get(k, 0) + v / n for k, v in m.items()}


def _shard_meta(ctx: StageContext, teacher, kind: str, **extra) -> dict:
    """What every shard of gen-data / gen-pairs records (a re-run refuses shards written with other settings)."""
    cfg = ctx.cfg
    return {
        "kind": kind,
        "teacher": cfg.teacher.family,
        "size": cfg.teacher.size,
        "teacher_ckpt": str(cfg.teacher.ckpt),
        "policy": teacher.policy.model_dump(mode="json"),
        "num_tokens": teacher.num_tokens,
        "vocab_size": int(teacher.codebook.shape[0]),
        "num_classes": teacher.num_classes,
        "seed": cfg.seed,
        **extra,
    }


def _write_shards(ctx: StageContext, sample_fn, out: Path, sec, meta: dict) -> None:
    """gen-data / gen-pairs: every rank writes its shards (resumable), then rank 0 writes out/index.json."""
    counts = write_teacher_samples(
        sample_fn,
        out,
        num_samples=sec.num_samples,
        shard_size=sec.shard_size,
        batch_size=sec.batch_size,
        num_classes=meta["num_classes"],
        meta=meta,
        seed=ctx.cfg.seed,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        device=ctx.device,
        stage=ctx.stage,
    )
    logger.info("%s rank %d: %s", ctx.stage, ctx.dist.rank, counts)
    eng.barrier()
    if ctx.dist.is_main:
        shards = sorted(p.name for p in out.glob("shard-*.tar"))
        index = {**meta, "num_samples": sec.num_samples, "shard_size": sec.shard_size, "shards": shards}
        write_json(out / "index.json", index)
        logger.info("%s: %d shards, %d samples in %s", ctx.stage, len(shards), sec.num_samples, out)


def run_gen_data(ctx: StageContext) -> None:
    """Teacher samples -> shards, every rank in parallel; finished shards are skipped on a re-run."""
    cfg, sec = ctx.cfg, ctx.cfg.gen_data
    teacher = _teacher(ctx)
    _place_teacher(ctx, teacher, teacher_forced=False)
    out = sec.out_dir or default_input(cfg, "gts")
    meta = _shard_meta(ctx, teacher, "teacher-samples")

    def sample(labels: Tensor, g: torch.Generator) -> Tensor:
        with ctx.autocast():
            return teacher.sample(labels, generator=g)

    _write_shards(ctx, sample, out, sec, meta)


def run_gts(ctx: StageContext) -> None:
    """Stage 1: AR-diffusion tuning with GTS on teacher samples (head only for the first head_only_steps)."""
    cfg, sec = ctx.cfg, ctx.cfg.gts
    _seed_models(cfg, ctx.stage)
    teacher = _teacher(ctx)
    model = build_ar_diffusion(teacher, cfg.teacher, cfg.head)
    _place_teacher(ctx, teacher)
    spec = _spec(ctx, sec.optim, sec.batch_size, sec.grad_accum)
    engine = _engine(ctx, model, spec, "model")
    stream = _stream(ctx, sec.data, str(default_input(cfg, "gts")), teacher, spec.micro_batch)
    _seed_rank(ctx)
    start = _resume_or_init(
        ctx, lambda d: load_checkpoint(ctx, d, engines={"model": engine}, stream=stream), lambda: None
    )
    loop = _Loop(ctx, sec.steps, sec.batch_size, start, sec.time_limit_s)
    loss_fields = sec.model_dump(include=set(GTSConfig.model_fields))
    phase_cfg = {flag: GTSConfig.model_validate(loss_fields | {"head_only": flag}) for flag in (False, True)}

    def save(step: int) -> None:
        save_checkpoint(ctx, step, engines={"model": engine}, stream=stream, state=loop.state(step))

    engine.train()
    for step in loop.steps():
        step_cfg = phase_cfg[sec.head_only or step < sec.head_only_steps]
        acc: dict[str, Tensor] = {}
        for _ in range(sec.grad_accum):
            batch = next(stream)
            labels = batch["labels"].to(ctx.device)
            tokens = teacher.embed(batch["ids"].to(ctx.device)).float()  # (B, N, C)
            with ctx.autocast():
                m = gts_step(engine.module, engine, teacher, tokens, labels, step_cfg, rng=ctx.rng)
            acc = _accumulate(acc, m, sec.grad_accum)
        loop.after(step, acc | {"lr": torch.tensor(eng.engine_lr(engine))}, save)
    loop.close()
    _finish_stream(stream)


def _reference_model(ctx: StageContext, teacher: nn.Module, align_weight: float) -> nn.Module | None:
    """The frozen GTS model A for prefix-feature alignment (align_weight > 0), from <run_dir>/gts or regress's
    init_from; None when alignment is off."""
    if align_weight <= 0:
        return None
    cfg = ctx.cfg
    step_dir = resolve_checkpoint(default_input(cfg, "regress"))  # regress.init_from or <run_dir>/gts
    if "model" not in read_manifest(step_dir)["modules"]:
        raise ConfigError(f"align_weight: needs model A from a gts stage; {step_dir} holds no 'model'")
    reference = build_ar_diffusion(teacher, cfg.teacher, cfg.head)
    reference.load_state_dict(module_weights(step_dir, "model"))
    restore_frozen_tokenizer(reference, teacher, cfg.teacher)  # VAR's phi convs: fp32, the decoder's
    return eng.freeze(reference, device=ctx.device)


def run_gen_pairs(ctx: StageContext) -> None:
    """DD1's dataset: (noise, F(noise)) pairs of the teacher's flow map -> shards, every rank in parallel, resumable.

    F is integrated group by group (N teacher-forced passes for LlamaGen, one per scale for VAR); the shards hold
    the noise and F's tokens snapped to code ids (the flow map ends on codes up to the integration error)."""
    cfg, sec = ctx.cfg, ctx.cfg.gen_pairs
    teacher = _teacher(ctx)
    _place_teacher(ctx, teacher)
    out = default_input(cfg, "regress-data")
    codebook = teacher.codebook.float()
    meta = _shard_meta(ctx, teacher, "flow-map-pairs", token_dim=int(codebook.shape[1]), flow_steps=sec.flow_steps,
                       flow_power=sec.flow_power)  # fmt: skip

    def pairs(labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        noise = torch.randn(labels.shape[0], teacher.num_tokens, codebook.shape[1], generator=g, device=ctx.device)
        with ctx.autocast():
            tokens = teacher_flow_map(teacher, noise, labels, steps=sec.flow_steps, power=sec.flow_power)
        return nearest_code(tokens.float(), codebook), noise

    _write_shards(ctx, pairs, out, sec, meta)


def run_regress(ctx: StageContext) -> None:
    """Flow-map regression of the one-step generator from model A: on-policy (one teacher pass per batch on the
    generator's own prefix) or offline (DD1, on gen-pairs shards); EMA with the progressive rule."""
    cfg, sec = ctx.cfg, ctx.cfg.regress
    _seed_models(cfg, ctx.stage)
    teacher = _teacher(ctx)
    generator = build_generator(teacher, cfg.teacher, cfg.head, cfg.onestep)
    resuming = _latest(ctx) is not None
    if not resuming:
        step_dir = resolve_checkpoint(default_input(cfg, "regress"))
        modules = read_manifest(step_dir)["modules"]
        if "model" not in modules:
            raise ConfigError(f"regress.init_from: {step_dir} holds {sorted(modules)}; expected a gts stage "
                              "checkpoint (model A)")  # fmt: skip
        generator.model.load_state_dict(module_weights(step_dir, "model"))
        restore_frozen_tokenizer(generator.model, teacher, cfg.teacher)  # VAR's phi convs: fp32, the decoder's
        logger.info("generator initialised from model A of %s", step_dir)
    ema = copy.deepcopy(generator).requires_grad_(False).eval()
    reference = _reference_model(ctx, teacher, sec.align_weight)
    _place_teacher(ctx, teacher)
    spec = _spec(ctx, sec.optim, sec.batch_size, sec.grad_accum)
    engine = _engine(ctx, generator, spec, "generator")
    offline = sec.mode == "offline"
    stream = None
    if offline:
        stream = _stream(ctx, sec.data, str(default_input(cfg, "regress-data")), teacher, spec.micro_batch, pairs=True)
    _seed_rank(ctx)
    start = _resume_or_init(
        ctx,
        lambda d: load_checkpoint(ctx, d, engines={"generator": engine}, files={"ema": ema}, stream=stream),
        lambda: None,
    )
    loop = _Loop(ctx, sec.steps, sec.batch_size, start, sec.time_limit_s)
    step_cfg = RegressConfig.model_validate(sec.model_dump(include=set(RegressConfig.model_fields)))
    codebook = teacher.codebook.float()

    def save(step: int) -> None:
        save_checkpoint(ctx, step, engines={"generator": engine}, files={"ema": ema}, stream=stream,
                        state=loop.state(step))  # fmt: skip

    engine.train()
    for step in loop.steps():
        acc: dict[str, Tensor] = {}
        for _ in range(sec.grad_accum):
            with ctx.autocast():
                if offline:
                    batch = next(stream)
                    labels = batch["labels"].to(ctx.device)
                    tokens = codebook[batch["ids"].to(ctx.device)]  # (B, N, C): F(noise), snapped
                    m = regression_step(engine.module, engine, batch["noise"].to(ctx.device), tokens, labels)
                else:
                    labels = torch.randint(teacher.num_classes, (spec.micro_batch,), generator=ctx.rng,
                                           device=ctx.device)  # fmt: skip
                    m = onpolicy_regression_step(engine.module, engine, teacher, labels, step_cfg, rng=ctx.rng,
                                                 reference=reference)  # fmt: skip
            acc = _accumulate(acc, m, sec.grad_accum)
        with eng.gathered(engine.module, cfg.deepspeed.zero_stage):
            decay = ema_update(ema, engine.module, step, sec.ema_max_decay)
        loop.after(step, acc | {"lr": torch.tensor(eng.engine_lr(engine)), "ema_decay": torch.tensor(decay)}, save)
    loop.close()
    if stream is not None:
        _finish_stream(stream)


def _csd_networks(ctx: StageContext, teacher: nn.Module, init_from: Path | None, warm_start: Path | None = None):
    """(generator, guidance, ema) before the engines: from model A (gts) or from a csd/align checkpoint; with
    `warm_start` (a regress stage folder, fresh runs only) the generator and its EMA start from its EMA generator."""
    cfg = ctx.cfg
    base = build_ar_diffusion(teacher, cfg.teacher, cfg.head)
    generator = OneStepGenerator.from_ar_diffusion(base, **onestep_options(cfg.onestep, teacher.codebook))
    guidance = base
    ema = None
    if init_from is not None:
        step_dir = resolve_checkpoint(init_from)
        modules = read_manifest(step_dir)["modules"]
        if "model" in modules:  # a gts checkpoint: A initialises generator and guidance (DD2 3.3)
            sd = module_weights(step_dir, "model")
            guidance.load_state_dict(sd)
            generator.model.load_state_dict(sd)
        else:
            generator.load_state_dict(module_weights(step_dir, "generator"))
            guidance.load_state_dict(module_weights(step_dir, "guidance"))
            if "ema" in modules:
                ema = copy.deepcopy(generator)
                ema.load_state_dict(module_weights(step_dir, "ema"))
        logger.info("initialised from %s (%s)", step_dir, sorted(modules))
    if warm_start is not None and init_from is not None and "model" not in modules:
        logger.info("csd.warm_start ignored: %s is a csd/align checkpoint, which holds the generator", step_dir)
    elif warm_start is not None:
        warm_dir = resolve_checkpoint(warm_start)
        warm_modules = read_manifest(warm_dir)["modules"]
        if "ema" not in warm_modules or "guidance" in warm_modules:
            raise ConfigError(f"csd.warm_start: {warm_dir} holds {sorted(warm_modules)}; expected a regress stage "
                              "checkpoint (generator and ema)")  # fmt: skip
        generator.load_state_dict(module_weights(warm_dir, "ema"))
        ema = None
        logger.info("generator warm-started from the EMA generator of %s", warm_dir)
    for model in (generator.model, guidance, *([ema.model] if ema is not None else [])):
        restore_frozen_tokenizer(model, teacher, cfg.teacher)  # VAR's phi convs: fp32, the decoder's
    if cfg.csd.guidance_residual and (init_from is None or "model" in modules):
        start_residual_guidance(guidance)  # psi = teacher + residual (from A: the residual starts at zero)
    if ema is None:
        ema = copy.deepcopy(generator)
    ema.requires_grad_(False).eval()
    return generator, guidance, ema


def run_csd(ctx: StageContext) -> None:
    """Stage 2: K guidance (FCS) updates per generator (CSD) update; the generator's EMA with the progressive rule."""
    cfg, sec = ctx.cfg, ctx.cfg.csd
    _seed_models(cfg, ctx.stage)
    teacher = _teacher(ctx)
    resuming = _latest(ctx) is not None
    generator, guidance, ema = _csd_networks(
        ctx,
        teacher,
        None if resuming else default_input(cfg, "csd"),
        None if resuming else default_input(cfg, "csd-warm"),
    )
    reference = _reference_model(ctx, teacher, sec.align_weight)
    _place_teacher(ctx, teacher)
    gen_engine = _engine(ctx, generator, _spec(ctx, sec.generator, sec.batch_size, sec.grad_accum), "generator")
    gui_engine = _engine(ctx, guidance, _spec(ctx, sec.guidance, sec.batch_size, sec.grad_accum), "guidance")
    engines = {"generator": gen_engine, "guidance": gui_engine}
    _seed_rank(ctx)
    start = _resume_or_init(ctx, lambda d: load_checkpoint(ctx, d, engines=engines, files={"ema": ema}), lambda: None)
    loop = _Loop(ctx, sec.steps, sec.batch_size, start, sec.time_limit_s)
    step_cfg = CSDConfig.model_validate(sec.model_dump(include=set(CSDConfig.model_fields)))
    micro = gen_engine.train_micro_batch_size_per_gpu()

    def labels() -> Tensor:
        return torch.randint(teacher.num_classes, (micro,), generator=ctx.rng, device=ctx.device)

    def save(step: int) -> None:
        save_checkpoint(ctx, step, engines=engines, files={"ema": ema}, state=loop.state(step))

    gen_engine.train()
    gui_engine.train()
    if start == 0 and sec.guidance_prefit:  # fresh run only: a resumed run has its guidance in the checkpoint
        _guidance_prefit(ctx, gui_engine, gen_engine.module, labels, step_cfg, teacher)
    for step in loop.steps():
        gui_acc: dict[str, Tensor] = {}
        for _ in range(step_cfg.guidance_updates):  # K guidance updates (DD2 Alg. 1) ...
            gui_acc = {}
            for _ in range(sec.grad_accum):  # ... each of grad_accum micro-steps
                with ctx.autocast():
                    m = guidance_step(
                        gui_engine.module,
                        gui_engine,
                        gen_engine.module,
                        labels(),
                        step_cfg,
                        teacher=teacher,
                        rng=ctx.rng,
                    )
                gui_acc = _accumulate(gui_acc, m, sec.grad_accum)
        gen_acc: dict[str, Tensor] = {}
        for _ in range(sec.grad_accum):
            with ctx.autocast():
                m = generator_step(
                    gen_engine.module, gen_engine, gui_engine.module, teacher, labels(), step_cfg, rng=ctx.rng,
                    step=step, reference=reference,
                )  # fmt: skip
            gen_acc = _accumulate(gen_acc, m, sec.grad_accum)
        with eng.gathered(gen_engine.module, cfg.deepspeed.zero_stage):
            decay = ema_update(ema, gen_engine.module, step, sec.ema_max_decay)
        extras = {
            "lr_generator": torch.tensor(eng.engine_lr(gen_engine)),
            "lr_guidance": torch.tensor(eng.engine_lr(gui_engine)),
            "ema_decay": torch.tensor(decay),
        }
        loop.after(step, gui_acc | gen_acc | extras, save)
    loop.close()


def _guidance_prefit(ctx: StageContext, gui_engine, generator: nn.Module, labels, step_cfg: CSDConfig, teacher) -> None:
    """`csd.guidance_prefit` FCS updates of the guidance alone (the generator is only sampled), before round 1."""
    sec = ctx.cfg.csd
    tic, acc = time.perf_counter(), {}
    for i in range(sec.guidance_prefit):
        acc = {}
        for _ in range(sec.grad_accum):
            with ctx.autocast():
                m = guidance_step(gui_engine.module, gui_engine, generator, labels(), step_cfg, teacher=teacher,
                                  rng=ctx.rng)  # fmt: skip
            acc = _accumulate(acc, m, sec.grad_accum)
        if (i + 1) % ctx.cfg.log.every == 0 or i + 1 == sec.guidance_prefit:
            loss = {k: float(v) for k, v in acc.items()}
            logger.info("csd guidance pre-fit %d/%d | %s | %.1f s", i + 1, sec.guidance_prefit, loss,
                        time.perf_counter() - tic)  # fmt: skip


def run_align(ctx: StageContext) -> None:
    """Performance alignment (App. C.3): generator <- its EMA and frozen; guidance alone trained with FCS."""
    cfg, sec = ctx.cfg, ctx.cfg.align
    _seed_models(cfg, ctx.stage)
    teacher = _teacher(ctx)
    resuming = _latest(ctx) is not None
    generator, guidance, ema = _csd_networks(ctx, teacher, None if resuming else default_input(cfg, "align"))
    _place_teacher(ctx, teacher)
    if not resuming:
        generator.load_state_dict(ema.state_dict())  # the EMA weights become the (frozen) generator
    eng.freeze(generator, device=ctx.device)  # fp32: it is saved and becomes the next csd stage's generator
    gui_engine = _engine(ctx, guidance, _spec(ctx, sec.guidance, sec.batch_size, sec.grad_accum), "guidance")
    files = {"generator": generator, "ema": ema}
    _seed_rank(ctx)
    start = _resume_or_init(
        ctx, lambda d: load_checkpoint(ctx, d, engines={"guidance": gui_engine}, files=files), lambda: None
    )
    loop = _Loop(ctx, sec.steps, sec.batch_size, start, sec.time_limit_s)
    step_cfg = CSDConfig.model_validate(cfg.csd.model_dump(include=set(CSDConfig.model_fields)))
    micro = gui_engine.train_micro_batch_size_per_gpu()

    def save(step: int) -> None:
        save_checkpoint(ctx, step, engines={"guidance": gui_engine}, files=files, state=loop.state(step))

    gui_engine.train()
    for step in loop.steps():
        acc: dict[str, Tensor] = {}
        for _ in range(sec.grad_accum):
            labels = torch.randint(teacher.num_classes, (micro,), generator=ctx.rng, device=ctx.device)
            with ctx.autocast():
                m = guidance_step(
                    gui_engine.module, gui_engine, generator, labels, step_cfg, teacher=teacher, rng=ctx.rng
                )
            acc = _accumulate(acc, m, sec.grad_accum)
        loop.after(step, acc | {"lr_guidance": torch.tensor(eng.engine_lr(gui_engine))}, save)
    loop.close()


def run_export(ctx: StageContext) -> None:
    """Write the pipeline folder (rank 0) from the latest csd/align checkpoint."""
    from dd2_train.export import export_pipeline

    cfg = ctx.cfg
    if ctx.dist.is_main:
        out = cfg.export.out_dir or cfg.run_dir / "pipeline"
        export_pipeline(cfg, resolve_checkpoint(default_input(cfg, "export")), out, device=ctx.device)
    eng.barrier()


STAGES.update(
    {
        "adapt": run_adapt,
        "gen-data": run_gen_data,
        "gts": run_gts,
        "gen-pairs": run_gen_pairs,
        "regress": run_regress,
        "csd": run_csd,
        "align": run_align,
        "export": run_export,
    }
)
