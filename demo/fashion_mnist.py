"""The embedded default: Fashion-MNIST from pixels to a one-step generator on a CPU, with a measured comparison.

    python demo/fashion_mnist.py --out runs/demo                  # the README's main command (nox -s demo)
    python demo/fashion_mnist.py --out runs/demo-ci --preset ci   # the reduced run of tests/test_demo.py

Every step uses the project's own code on a real dataset; a second run reuses every finished step:

  1 tokenizer  a small LlamaGen-architecture VQ (dd2_core LlamaGenVQ) trained on Fashion-MNIST train   tokenizer/
  2 codes      the training images as token shards (WebDataset), the adapt stage's input               codes/
  3 teacher    a small LlamaGen GPT from a seeded random initialisation, trained by the `adapt` stage
               (AR cross-entropy on the real image codes)                                              adapt/
  4 distil     gen-data -> gts -> csd -> export through the real launch path:
               deepspeed --num_gpus 1 packages/dd2-train/run.py --config <out>/config.yaml            pipeline/
  5 sample     `dd2 sample --pipeline <out>/pipeline --out-dir ...` (dd2-core only): a PNG grid per class
  6 report     teacher AR sampling, DD2 one-step, DD2 + teacher refinement, one-step set prediction, the
               generator before CSD and the tokenizer's reconstructions, on toy Fréchet distance, precision,
               recall, classifier accuracy, the teacher's NLL of the samples, latency and images/s   report/

Data: the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist) or --data DIR holding the four
IDX files. Metrics live in the toy CNN feature space of dd2_eval.toy (trained once, cached under ~/.cache/dd2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from dd2_core.checkpoint import atomic_write_bytes, save_safetensors
from dd2_core.cli import image_grid, save_png
from dd2_core.models.llamagen import LlamaGen, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_core.pipeline import OneStepPipeline, to_uint8
from dd2_core.sampling import nearest_code
from dd2_eval.errors import MissingResourceError
from dd2_eval.speed import time_calls
from dd2_eval.toy import CLASS_NAMES, ToyFeatureSpace, load_fashion_mnist, load_toy_net
from dd2_train.build import build_generator, build_teacher
from dd2_train.checkpoint import RunFolder, module_weights, read_manifest, resolve_checkpoint
from dd2_train.config import ConfigError, TrainConfig, apply_overrides, deep_merge, load_config, validate_config
from dd2_train.data import TokenStream, expand_shards, shard_plan
from dd2_train.tokenizer import VQTrainConfig, codebook_usage, encode_images, train_vq, write_code_shards
from dd2_train.trainer import stage_seconds

logger = logging.getLogger("demo")

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "packages" / "dd2-train" / "run.py"
TEMPLATE = Path(__file__).with_name("fashion_mnist.yaml")
NUM_CLASSES = 10


class EvalSpec(BaseModel):
    """What the report measures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(2000, ge=NUM_CLASSES, description="images per method (balanced over the 10 classes)")
    refine_groups: int = Field(2, ge=1, description="DD2 + teacher: the teacher resamples the last k token groups")
    latency_repeats: int = Field(5, ge=1, description="timed batch-1 calls (median)")
    throughput_batch: int = Field(64, ge=1, description="batch of the images/s measurement")
    throughput_repeats: int = Field(3, ge=1, description="timed throughput calls (median)")


class DemoConfig(BaseModel):
    """One demo run: data subset, tokenizer, teacher sizes, recipe, training-run overrides, evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    recipe: Literal["recommended", "paper"] = Field(
        "recommended", description="the distillation recipe (dd2_train.config.RECIPES; RECIPE_TRAIN below)"
    )
    train_images: int = Field(60000, ge=NUM_CLASSES, description="Fashion-MNIST train images used (first N)")
    vq: VQConfig
    vq_train: VQTrainConfig
    gpt: LlamaGenConfig = Field(..., description="the teacher's sizes (vocab_size = vq.codebook_size)")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of demo/fashion_mnist.yaml")
    train_by_recipe: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="further overrides for one recipe only (keyed by recipe)"
    )
    eval: EvalSpec = Field(default_factory=EvalSpec)


# The paper's recipe on this demo (sessions 1-4's measured settings: 6,000 teacher samples, GTS 600 steps, CSD from
# model A, K = 2, m = 2, t ~ U[0.02, 0.9], omega = 1, snapped prefixes, a 200-update guidance pre-fit);
# demo/fashion_mnist.yaml itself is the recommended recipe.
RECIPE_TRAIN: dict[str, dict[str, Any]] = {
    "recommended": {},
    "paper": {
        "recipe": "paper",
        "stage": ["adapt", "gen-data", "gts", "csd", "export"],
        "gen_data": {"num_samples": 6000},
        "gts": {"steps": 600},
        "csd": {"steps": 800, "guidance_updates": 2, "fcs_draws": 2, "t_min": 0.02, "t_max": 0.9, "weighting": "none",
                "snap_prefix": True, "guidance_prefit": 200, "generator": {"lr": 5.0e-4, "warmup_steps": 0}},
    },
}  # fmt: skip

# 28 x 28 images, 4x downsampling: 7 x 7 = 49 tokens of a 256-code, 8-dim L2-normalised codebook
_VQ = {"codebook_size": 256, "codebook_dim": 8, "z_channels": 32, "ch": 16, "ch_mult": (1, 2, 2),
       "num_res_blocks": 1, "norm_groups": 8, "codebook_used_size": 0}  # fmt: skip
_GPT = {"n_layer": 3, "dim": 64, "n_head": 4, "vocab_size": 256, "num_classes": NUM_CLASSES, "grid": 7,
        "multiple_of": 32, "cont_hidden": 128}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"vq": _VQ, "gpt": _GPT, "vq_train": {"steps": 400, "batch_size": 64}},  # demo/fashion_mnist.yaml as is
    "ci": {  # the reduced run of tests/test_demo.py: about 9 minutes on 2 cores
        "train_images": 20000,
        "vq": _VQ,
        "gpt": _GPT,
        "vq_train": {"steps": 300, "batch_size": 64},
        "train": {"adapt": {"steps": 800}, "gen_data": {"num_samples": 2000}, "gts": {"steps": 400}},
        "train_by_recipe": {
            "recommended": {"gen_pairs": {"num_samples": 6000}, "regress": {"steps": 1200}, "csd": {"steps": 250}},
            "paper": {"csd": {"steps": 400, "guidance_prefit": 100}},
        },
        "eval": {"samples": 500, "latency_repeats": 3, "throughput_repeats": 2},
    },
}


# -- small helpers -----------------------------------------------------------------------------------------------
def balanced_labels(n: int) -> torch.Tensor:
    """(n,) labels, n / 10 of each class in class order."""
    return torch.arange(NUM_CLASSES).repeat_interleave(n // NUM_CLASSES)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


class Clock:
    """Wall time of each step of this run (seconds), and what was reused."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps: dict[str, float | str] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        tic = time.perf_counter()
        result = fn()
        self.steps[name] = round(time.perf_counter() - tic, 1)
        logger.info("[%s] %.1f s", name, self.steps[name])
        return result

    def reused(self, name: str) -> None:
        self.steps[name] = "reused"
        logger.info("[%s] reused (already there)", name)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


# -- 1-2: tokenizer and codes ------------------------------------------------------------------------------------
def tokenizer_stage(cfg: DemoConfig, out: Path, train_images: np.ndarray, clock: Clock) -> LlamaGenVQ:
    folder = out / "tokenizer"
    weights = folder / "vq.safetensors"
    vq = LlamaGenVQ(cfg.vq)
    if weights.is_file():
        from dd2_core.checkpoint import load_strict, read_state_dict

        load_strict(vq, read_state_dict(weights), expected="the demo's VQ tokenizer", source=str(weights))
        clock.reused("tokenizer")
        return vq.eval().requires_grad_(False)

    def train() -> dict:
        torch.manual_seed(cfg.seed)
        fresh = LlamaGenVQ(cfg.vq)
        vq.load_state_dict(fresh.state_dict())
        return train_vq(vq, train_images, cfg.vq_train)

    summary = clock.run("tokenizer", train)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "train.json", {"config": cfg.vq.model_dump(mode="json"), **summary})
    save_safetensors(vq.state_dict(), weights)  # last: its presence marks the step done
    return vq


def codes_stage(cfg: DemoConfig, out: Path, vq: LlamaGenVQ, images: np.ndarray, labels: np.ndarray, clock: Clock):
    folder = out / "codes"
    shard_size = 1000
    plan = shard_plan(len(images), shard_size)
    if folder.is_dir() and len(list(folder.glob("shard-*.tar"))) == len(plan):
        clock.reused("codes")
        return

    def tokenize() -> None:
        ids = encode_images(vq, images)
        usage = codebook_usage(ids, cfg.vq.codebook_size)
        logger.info("codes: %d images -> %s tokens each; %s", len(ids), ids.shape[1], usage)
        meta = {"num_classes": NUM_CLASSES, "vocab_size": cfg.vq.codebook_size, "dataset": "fashion-mnist train"}
        write_code_shards(ids, torch.from_numpy(labels), folder, shard_size=shard_size, meta=meta)

    clock.run("codes", tokenize)


def teacher_init(cfg: DemoConfig, out: Path) -> Path:
    """A seeded random LlamaGen GPT with its continuous-input MLP: what `adapt` trains from."""
    path = out / "teacher-init" / "gpt.safetensors"
    if not path.is_file():
        torch.manual_seed(cfg.seed)
        gpt = LlamaGen(LlamaGenConfig.model_validate(cfg.gpt.model_dump() | {"codebook_dim": cfg.vq.codebook_dim}))
        save_safetensors(gpt.state_dict(), path)
    return path


# -- 3-4: the training run -----------------------------------------------------------------------------------------
def train_config(cfg: DemoConfig, out: Path, teacher_ckpt: Path, overrides: list[str] = ()) -> tuple[Path, TrainConfig]:
    """Fill the YAML template (recipe, paths, sizes, preset overrides, then --set KEY=VALUE), validate it, write
    <out>/config.yaml."""
    raw = yaml.safe_load(TEMPLATE.read_text())
    raw = deep_merge(raw, RECIPE_TRAIN[cfg.recipe])
    raw = deep_merge(raw, cfg.train)
    raw = deep_merge(raw, cfg.train_by_recipe.get(cfg.recipe, {}))
    raw = apply_overrides(raw, overrides)
    raw["run_dir"] = str(out)
    raw["teacher"] |= {
        "ckpt": str(teacher_ckpt),
        "vq_ckpt": str(out / "tokenizer" / "vq.safetensors"),
        "gpt": cfg.gpt.model_dump(mode="json"),
        "vq": cfg.vq.model_dump(mode="json"),
    }
    raw["adapt"] = deep_merge(raw["adapt"], {"data": {"shards": str(out / "codes")}})
    raw["export"] = {"out_dir": str(out / "pipeline")}
    raw["seed"] = cfg.seed
    train_cfg = validate_config(raw)
    path = out / "config.yaml"
    atomic_write_bytes(path, yaml.safe_dump(raw, sort_keys=False).encode())
    return path, train_cfg


def _finished(folder: Path, steps: int) -> bool:
    """The stage folder's last checkpoint is at `steps`, or its time limit (time_limit_s) ended the stage."""
    latest = RunFolder(folder).latest_checkpoint()
    if latest is None:
        return False
    manifest = read_manifest(latest)
    return int(manifest["step"]) >= steps or bool(manifest.get("state", {}).get("time_limit_reached"))


def pending_stages(tc: TrainConfig) -> list[str]:
    """The stages still to run: from the first unfinished one on (later ones depend on it)."""
    done = {
        "adapt": _finished(tc.stage_dir("adapt"), tc.adapt.steps)
        and (tc.stage_dir("adapt") / "teacher" / "gpt.safetensors").is_file(),
        "gen-data": (tc.run_dir / "gen-data" / "shards" / "index.json").is_file(),
        "gts": _finished(tc.stage_dir("gts"), tc.gts.steps),
        "gen-pairs": (tc.run_dir / "gen-pairs" / "shards" / "index.json").is_file(),
        "regress": _finished(tc.stage_dir("regress"), tc.regress.steps),
        "csd": _finished(tc.stage_dir("csd"), tc.csd.steps),
        "export": (tc.export.out_dir / "config.json").is_file(),
    }
    for i, stage in enumerate(tc.stages):
        if not done[stage]:
            return tc.stages[i:]
    return []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, stages: list[str], launcher: str, threads: int) -> None:
    """One launch of run.py for `stages` (a single process: the same code path as a multi-GPU run)."""
    port = str(_free_port())
    if launcher == "deepspeed":
        exe = Path(sys.executable).with_name("deepspeed")
        cmd = [str(exe) if exe.is_file() else "deepspeed", "--num_gpus", "1", "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", port]
    cmd += [str(RUN_PY), "--config", str(config), "--set", f"stage=[{','.join(stages)}]"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    logger.info("launch: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: the training launch failed with exit code {proc.returncode} (log above)")


# -- 6: the report -------------------------------------------------------------------------------------------------
def teacher_sample_ids(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All gen-data teacher samples (ids (M, N), labels (M,)), in shard order."""
    urls = expand_shards(str(cfg.run_dir / "gen-data" / "shards"))
    stream = TokenStream(
        urls,
        batch_size=cfg.gen_data.shard_size,
        num_tokens=cfg.teacher.gpt.num_tokens,
        vocab_size=cfg.teacher.vq.codebook_size,
        num_classes=NUM_CLASSES,
        shuffle_buffer=0,
        shard_shuffle=False,
    )
    ids, labels = [], []
    for batch in stream.epoch_batches(0):
        if "ids" in batch:
            ids.append(batch["ids"])
            labels.append(batch["labels"])
    return torch.cat(ids), torch.cat(labels)


def class_marginals(ids: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per-class, per-position code frequencies of teacher samples.  Shapes: -> (10, N, V), rows sum to 1."""
    n = ids.shape[1]
    counts = torch.zeros(NUM_CLASSES, n, vocab)
    pos = torch.arange(n).expand_as(ids)
    counts.index_put_((labels[:, None].expand_as(ids), pos, ids), torch.ones(ids.shape), accumulate=True)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


class Method:
    """One row of the report: how to draw images (and the token ids they correspond to) for given labels."""

    def __init__(self, key: str, name: str, steps: str, draw: Callable[[torch.Tensor, torch.Generator], tuple]):
        self.key, self.name, self.steps, self.draw = key, name, steps, draw


@torch.no_grad()
def build_methods(tc: TrainConfig, spec: EvalSpec, teacher, pipe: OneStepPipeline, test, vq: LlamaGenVQ):
    """The compared samplers. Each draw(labels, g) returns (uint8 images (B, 28, 28, 3), ids (B, N), labels (B,))."""
    codebook = teacher.codebook

    def decode_ids(ids: torch.Tensor) -> torch.Tensor:
        return to_uint8(teacher.decode(ids))

    def teacher_ar(labels, g):
        ids = teacher.sample(labels, generator=g)
        return decode_ids(ids), ids, labels

    def one_step(labels, g):
        out = pipe(labels, generator=g)
        return out.images, nearest_code(out.tokens, codebook), labels

    def refined(labels, g):
        out = pipe(labels, generator=g, teacher=teacher, refine_groups=spec.refine_groups)
        return out.images, nearest_code(out.tokens, codebook), labels

    gen_ids, gen_labels = teacher_sample_ids(tc)
    marginals = class_marginals(gen_ids, gen_labels, codebook.shape[0])  # (10, N, V)

    def set_prediction(labels, g):
        probs = marginals[labels]  # (B, N, V)
        ids = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(probs.shape[:2])  # independent positions
        return decode_ids(ids), ids, labels

    def generator_from(stage: str, module: str) -> Callable:
        """A one-step sampler from a stage checkpoint's generator weights (gts: model A as the generator)."""
        gen = build_generator(teacher, tc.teacher, tc.head, tc.onestep)
        weights = module_weights(resolve_checkpoint(tc.stage_dir(stage)), module)
        (gen.model if module == "model" else gen).load_state_dict(weights)
        gen.eval()

        def draw(labels, g):
            tokens = gen(gen.sample_noise(labels.shape[0], generator=g), labels)
            return to_uint8(teacher.decode_tokens(tokens)), nearest_code(tokens, codebook), labels

        return draw

    test_images, test_labels = test
    by_class = [np.flatnonzero(test_labels == c) for c in range(NUM_CLASSES)]
    cursor = {"i": 0}

    def reconstruction(labels, g):
        # real test images of the requested classes, in order (the reconstruction row is not random)
        picks = []
        for c in labels.tolist():
            pool = by_class[c]
            picks.append(pool[cursor["i"] % len(pool)])
            cursor["i"] += 1
        ids = encode_images(vq, test_images[np.array(picks)])
        return decode_ids(ids), ids, labels

    k = spec.refine_groups
    n = tc.teacher.gpt.num_tokens
    methods = [
        Method("teacher", "teacher (AR)", str(n), teacher_ar),
        Method("dd2", "DD2 one-step", "1", one_step),
        Method(f"dd2_refine{k}", f"DD2 + teacher, last {k} tokens", str(1 + k), refined),
        Method("set_prediction", "set prediction (marginals)", "1", set_prediction),
    ]
    if "regress" in tc.stages:  # the recommended recipe's warm start, before its CSD phase
        regressed = generator_from("regress", "ema")
        methods.append(Method("regress", "one-step after regression (before CSD)", "1", regressed))
    methods += [
        Method("before", "one-step before distillation (GTS init)", "1", generator_from("gts", "model")),
        Method("reconstruction", "tokenizer reconstruction", "-", reconstruction),
    ]
    return methods


@torch.no_grad()
def teacher_nll(teacher, ids: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Mean -log p_teacher(id_i | ids_<i, class) over tokens and images (nats per token)."""
    total = 0.0
    for i in range(0, len(ids), batch):
        x, y = ids[i : i + batch], labels[i : i + batch]
        lp = teacher.log_probs(teacher.embed(x), y)  # (b, N, V)
        total += float(-lp.gather(-1, x[..., None]).sum())
    return total / ids.numel()


def speed(method: Method, spec: EvalSpec) -> dict[str, float]:
    """Median latency at batch 1 (ms) and images/s at the throughput batch, eager, this CPU, including decoding."""
    device = torch.device("cpu")
    out = {}
    for batch, repeats, key in ((1, spec.latency_repeats, "latency_ms"),
                                (spec.throughput_batch, spec.throughput_repeats, "images_per_s")):  # fmt: skip
        labels = torch.arange(batch) % NUM_CLASSES
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            _, times = time_calls(lambda labels=labels, g=g: method.draw(labels, g), warmup=1, repeats=repeats,
                                  device=device)  # fmt: skip
        median = statistics.median(times)
        out[key] = median * 1e3 if key == "latency_ms" else batch / median
    return out


def overview_png(rows: list[tuple[str, torch.Tensor]], path: Path, *, per_class: int = 2, scale: int = 2) -> None:
    """One band per method: its name, then `per_class` images of each class (columns: classes), enlarged."""
    from PIL import Image, ImageDraw

    size, label_w, head_h = 28 * scale, 200, 16
    band_h = per_class * size + 6
    canvas = Image.new("RGB", (label_w + NUM_CLASSES * size, head_h + len(rows) * band_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(CLASS_NAMES):
        draw.text((label_w + c * size + 2, 2), name.split("/")[0][:9], fill="black")
    for r, (name, images) in enumerate(rows):
        y0 = head_h + r * band_h
        draw.text((6, y0 + band_h // 2 - 6), name, fill="black")
        n = images.shape[0] // NUM_CLASSES
        for c in range(NUM_CLASSES):
            for j in range(per_class):
                tile = Image.fromarray(images[c * n + j].numpy()).resize((size, size), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_w + c * size, y0 + j * size))
    save_png(torch.from_numpy(np.asarray(canvas).copy()), path)


def measure(m: Method, cfg: DemoConfig, teacher, space: ToyFeatureSpace, reference) -> tuple[dict, torch.Tensor]:
    """One report row: eval.samples images of `m` (balanced classes, seed + 1) on the toy metrics, the teacher's NLL
    and speed. Returns (row, images)."""
    spec = cfg.eval
    labels = balanced_labels(spec.samples)
    tic = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    parts = [m.draw(labels[i : i + 500], g) for i in range(0, len(labels), 500)]
    images, ids, y = (torch.cat(p) for p in zip(*parts, strict=True))
    seconds = time.perf_counter() - tic
    metrics = space.metrics(images, reference)
    row = {
        "name": m.name,
        "steps": m.steps,
        "fd": metrics.fd,
        "precision": metrics.precision,
        "recall": metrics.recall,
        "density": metrics.density,
        "coverage": metrics.coverage,
        "accuracy": space.accuracy(images, y),
        "nll": teacher_nll(teacher, ids, y),
        **speed(m, spec),
        "sampling_s": seconds,
    }
    logger.info("report: %s: fd %.2f, recall %.3f, acc %.3f (%.1f s)", m.name, row["fd"], row["recall"],
                row["accuracy"], seconds)  # fmt: skip
    return row, images


def class_grid(images: torch.Tensor, samples: int) -> torch.Tensor:
    """The first (up to) 10 images of each class of a balanced batch, one row per class."""
    per = samples // NUM_CLASSES
    idx = torch.cat([torch.arange(c * per, c * per + min(per, 10)) for c in range(NUM_CLASSES)])
    return image_grid(images[idx], rows=NUM_CLASSES)


def balanced_subset(images: torch.Tensor, samples: int, n: int) -> torch.Tensor:
    """n images of a class-major balanced batch of `samples`, n / 10 from each class."""
    per, take = samples // NUM_CLASSES, n // NUM_CLASSES
    return torch.cat([images[c * per : c * per + take] for c in range(NUM_CLASSES)])


def inception_fids(grids: dict[str, torch.Tensor], samples: int, n: int, test, folder: Path) -> dict:
    """Inception FID (dd2_eval, ADM-compatible pool3, images resized to 299) of n images per method against the
    statistics of n balanced Fashion-MNIST test images; the npz batches stay in `folder` for `dd2-eval metrics`."""
    from dd2_eval.evaluator import EvalConfig, write_reference_stats
    from dd2_eval.evaluator import evaluate as inception_evaluate
    from dd2_eval.inception import load_inception
    from dd2_eval.npz import write_images

    folder.mkdir(parents=True, exist_ok=True)
    ecfg = EvalConfig(progress=False)
    net = load_inception(None, device="cpu")
    test_images, test_labels = test
    n_ref = min(n, len(test_images))
    picks = np.concatenate([np.flatnonzero(test_labels == c)[: n_ref // NUM_CLASSES] for c in range(NUM_CLASSES)])
    ref_images = np.repeat(test_images[picks][..., None], 3, axis=-1) if test_images.ndim == 3 else test_images[picks]
    ref_stats = folder / f"reference_{len(picks)}_stats.npz"
    tic = time.perf_counter()
    if not ref_stats.is_file():
        write_images(folder / "reference.npz", ref_images)
        write_reference_stats(folder / "reference.npz", ref_stats, ecfg, net=net)
    fids = {}
    for key, images in grids.items():
        batch = folder / f"{key}.npz"
        write_images(batch, balanced_subset(images, samples, n).numpy())
        fids[key] = inception_evaluate(batch, ref_stats, ecfg, net=net).fid
        logger.info("inception FID %s: %.2f", key, fids[key])
    return {"fid": fids, "images_per_method": n, "reference_images": len(picks),
            "seconds": round(time.perf_counter() - tic, 1)}  # fmt: skip


IMAGES: dict[str, torch.Tensor] = {}  # the last report's images per method (class-major, eval.samples each)


def evaluate(tc: TrainConfig, cfg: DemoConfig, out: Path, vq: LlamaGenVQ, test, data_dir: str | None) -> dict:
    spec = cfg.eval
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher(tc.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=tc.run_dir)
    pipe = OneStepPipeline.from_pretrained(tc.export.out_dir)
    space = ToyFeatureSpace(load_toy_net(data_dir=data_dir))
    test_images, test_labels = test
    reference = space.reference(test_images)  # all 10k test images: features and k-NN radii, once
    rows, grids = {}, {}
    for m in build_methods(tc, spec, teacher, pipe, test, vq):
        rows[m.key], images = measure(m, cfg, teacher, space, reference)
        save_png(class_grid(images, spec.samples), report_dir / f"{m.key}.png")
        grids[m.key] = images
    teacher_nll_own = rows["teacher"]["nll"]
    for row in rows.values():
        row["nll_gap"] = row["nll"] - teacher_nll_own
    overview_png([(rows[k]["name"], v) for k, v in grids.items()], report_dir / "overview.png")
    sp, te, dd = rows["set_prediction"]["fd"], rows["teacher"]["fd"], rows["dd2"]["fd"]
    IMAGES.update(grids)  # for --inception, which runs after the timed steps
    return {
        "rows": rows,
        "gap_closed": (sp - dd) / (sp - te) if sp != te else float("nan"),
        "pipeline_source": json.loads((tc.export.out_dir / "teacher_ref.json").read_text())["source_checkpoint"],
        "samples_per_method": spec.samples,
        "reference": f"Fashion-MNIST test ({len(reference)} images)",
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }


# -- --compare: other distillation methods from the same model A at the main run's distillation wall time -------------
COMPARE: dict[str, str] = {
    "paper": "paper recipe (CSD from model A)",
    "dd1": "DD1 offline regression alone",
    "onpolicy": "on-policy regression alone",
}
DISTIL_STAGES = ("gen-pairs", "regress", "csd")  # what the budget W measures (the stages after model A)


def compare_config(main_raw: dict, out: Path, key: str, budget: float, pairs_seconds: float) -> dict:
    """The training config of one --compare method: the main run's resolved config, the method's stages from the
    main run's model A (gts) and adapted teacher, its training steps capped at `budget` seconds (`time_limit_s`;
    DD1's gen-pairs time counts against its budget, as it reuses the main run's pairs)."""
    run = out / "compare" / key
    unlimited = 10**7  # the time limit ends these stages
    common = {"run_dir": str(run), "teacher": {"adapted": str(out / "adapt")},
              "export": {"out_dir": str(run / "pipeline")}}  # fmt: skip
    if key == "paper":
        raw = deep_merge(main_raw, RECIPE_TRAIN["paper"])
        return deep_merge(raw, common | {
            "stage": ["csd", "export"],
            "csd": {"init_from": str(out / "gts"), "steps": unlimited, "time_limit_s": budget},
        })  # fmt: skip
    regress = {"init_from": str(out / "gts"), "steps": unlimited}
    if key == "dd1":
        regress |= {"mode": "offline", "time_limit_s": max(1.0, budget - pairs_seconds),
                    "data": {"shards": str(out / "gen-pairs" / "shards")}}  # fmt: skip
    else:
        regress |= {"mode": "onpolicy", "time_limit_s": budget}
    export = common["export"] | {"init_from": str(run / "regress")}
    return deep_merge(main_raw, common | {"stage": ["regress", "export"], "regress": regress, "export": export})


def run_compare(tc: TrainConfig, cfg: DemoConfig, out: Path, vq, test, args, threads: int) -> dict:
    """Train (resumably) and measure the --compare methods; returns {"budget_s", "rows"} (the DD2 row included)."""
    missing = [s for s in DISTIL_STAGES if s not in tc.stages]
    if missing:
        raise SystemExit(f"demo: --compare measures against the recommended recipe's stages; this run has no {missing}")
    budget = sum(stage_seconds(tc.stage_dir(s)) for s in DISTIL_STAGES)
    pairs_seconds = stage_seconds(tc.stage_dir("gen-pairs"))
    main_raw = yaml.safe_load((out / "config.yaml").read_text())
    teacher = build_teacher(tc.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=tc.run_dir)
    space = ToyFeatureSpace(load_toy_net(data_dir=args.data))
    reference = space.reference(test[0])
    rows = {}
    for key, name in COMPARE.items():
        raw = compare_config(main_raw, out, key, budget, pairs_seconds)
        run_tc = validate_config(raw)
        path = Path(raw["run_dir"]) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, yaml.safe_dump(raw, sort_keys=False).encode())
        stages = pending_stages(run_tc)
        if stages:
            launch(path, stages, args.launcher, threads)
        pipe = OneStepPipeline.from_pretrained(run_tc.export.out_dir)

        def draw(labels, g, pipe=pipe):
            o = pipe(labels, generator=g)
            return o.images, nearest_code(o.tokens, teacher.codebook), labels

        row, _ = measure(Method(key, name, "1", draw), cfg, teacher, space, reference)
        trained = run_tc.stages[0]
        state = read_manifest(resolve_checkpoint(run_tc.stage_dir(trained)))["state"]
        rows[key] = row | {"train_seconds": state.get("train_seconds"), "train_steps": state["step"]}
    return {"budget_s": budget, "pairs_s": pairs_seconds, "rows": rows}


def compare_table(result: dict, compare: dict) -> str:
    dd2 = result["rows"]["dd2"]
    lines = ["| method (same model A, same distillation wall time) | training | FD ↓ | precision ↑ | recall ↑ | "
             "class acc ↑ | teacher NLL |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    both = [("dd2", dd2 | {"training": f"{compare['budget_s']:.0f} s (gen-pairs + regress + csd)"})]
    for key, row in compare["rows"].items():
        steps = "rounds" if key == "paper" else "steps"
        both.append((key, row | {"training": f"{row['train_seconds']:.0f} s, {row['train_steps']} {steps}"}))
    for _, row in both:
        lines.append(f"| {row['name']} | {row['training']} | {row['fd']:.2f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['accuracy']:.3f} | {row['nll']:.3f} |")  # fmt: skip
    return "\n".join(lines)


COLUMNS = [("steps", "steps", "{}"), ("fd", "FD ↓", "{:.2f}"), ("precision", "precision ↑", "{:.3f}"),
           ("recall", "recall ↑", "{:.3f}"), ("accuracy", "class acc ↑", "{:.3f}"),
           ("nll", "teacher NLL", "{:.3f}"), ("nll_gap", "NLL − teacher's", "{:+.3f}"),
           ("latency_ms", "latency ms (b=1)", "{:.1f}"), ("images_per_s", "images/s", "{:.0f}")]  # fmt: skip


def table(result: dict) -> str:
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for row in result["rows"].values():
        lines.append(f"| {row['name']} | " + " | ".join(f.format(row[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def inception_section(result: dict) -> list[str]:
    """report.md lines: toy FD next to Inception FID, and the two rankings (empty without --inception)."""
    inc = result.get("inception")
    if not inc:
        return []
    rows = result["rows"]
    lines = [
        f"Inception FID ({inc['images_per_method']} images per method against {inc['reference_images']} test "
        f"images; `dd2-eval metrics` on report/inception/*.npz gives the same numbers) next to the toy FD:",
        "",
        "| method | toy FD | Inception FID |",
        "|---|---:|---:|",
        *(f"| {rows[k]['name']} | {rows[k]['fd']:.2f} | {v:.2f} |" for k, v in inc["fid"].items()),
        "",
        "Order, best first: toy " + " < ".join(inc["order_toy"]) + "; Inception " + " < ".join(inc["order_inception"]),
        "",
    ]
    return lines


def write_report(result: dict, cfg: DemoConfig, tc: TrainConfig, out: Path) -> None:
    report_dir = out / "report"
    write_json(report_dir / "report.json", result)
    keys = list(result["rows"])
    timings = result.get("timings", {})
    gpt, vq = tc.teacher.gpt, tc.teacher.vq
    md = [
        "# DD2 on Fashion-MNIST (the embedded default)",
        "",
        f"Teacher: LlamaGen architecture, {gpt.n_layer} layers, dim {gpt.dim}, {gpt.num_tokens} tokens "
        f"({gpt.grid}x{gpt.grid}) of a {vq.codebook_size}-code VQ (dim {vq.codebook_dim}), trained from scratch by "
        f"`adapt` for {tc.adapt.steps} steps on {cfg.train_images} images; tokenizer {cfg.vq_train.steps} steps. "
        f"DD2: gen-data {tc.gen_data.num_samples} teacher samples, GTS {tc.gts.steps} steps, CSD {tc.csd.steps} "
        f"generator steps (K = {tc.csd.guidance_updates}, t ~ U[{tc.csd.t_min}, {tc.csd.t_max}], weighting "
        f"{tc.csd.weighting}, lr generator {tc.csd.generator.lr:g} / guidance {tc.csd.guidance.lr:g}, batch "
        f"{tc.csd.batch_size}), EMA generator exported.",
        "",
        f"{result['samples_per_method']} images per method (balanced classes) against {result['reference']}, in the "
        "toy CNN feature space of `dd2_eval.toy`; FD = Fréchet distance there; class acc = the toy classifier's "
        "accuracy on the conditioning label; teacher NLL = -log p_teacher per token of each method's codes (DD2 "
        "outputs snapped to the nearest code); speed on "
        f"{result['device']}, eager, decoding included.",
        "",
        table(result),
        "",
        f"DD2 one-step closes **{result['gap_closed']:.0%}** of the FD gap between set prediction and the teacher.",
        "",
        "![overview](overview.png)",
        "",
        *inception_section(result),
        "Grids (one row per class): " + ", ".join(f"[{result['rows'][k]['name']}]({k}.png)" for k in keys),
        "",
        "Wall time of this run's steps (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        "",
    ]
    atomic_write_bytes(report_dir / "report.md", "\n".join(md).encode())


# -- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("llamagen", "var"), default="llamagen",
                   help="teacher family (default: llamagen); var: demo/fashion_mnist_var.py")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo, var: runs/demo-var)")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: the Debian path)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="size of the run (default: full)")
    p.add_argument("--recipe", choices=sorted(RECIPE_TRAIN), default=None,
                   help="distillation recipe (default: recommended = flow-map regression warm start + anchored CSD; "
                   "paper = CSD from model A as published); use a separate --out for each")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training-config value (dd2_train TrainConfig; repeatable), e.g. --set "
                   "regress.steps=4000; a finished stage is not rerun: use a new --out")  # fmt: skip
    p.add_argument("--csd-steps", type=int, default=None,
                   help="CSD rounds instead of the preset's; on a finished run folder CSD resumes from its last "
                   "checkpoint and continues")  # fmt: skip
    p.add_argument("--compare", action="store_true",
                   help="after the main run, distil the same model A with the paper recipe, DD1's offline "
                   "regression and on-policy regression alone, each for the main run's distillation wall time, "
                   "and write report/compare.md (outside the main job's time budget)")  # fmt: skip
    p.add_argument("--inception", type=int, default=0, metavar="N",
                   help="also measure the Inception FID (dd2_eval, ADM-compatible) of N images per method against "
                   "N balanced test images, and compare its ranking with the toy feature space's (slow on a CPU: "
                   "Inception at 299 x 299 runs a few images/s on 2 cores); recomputes the report")  # fmt: skip
    p.add_argument(
        "--inception-methods",
        default=None,
        metavar="KEYS",
        help="comma-separated report rows for --inception (default: all), e.g. teacher,dd2,set_prediction",
    )
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed", help="training launcher")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--redo-report", action="store_true", help="recompute the report even if it is up to date")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.family == "var":
        import fashion_mnist_var  # this folder is on sys.path: the script's own

        unsupported = [flag for flag, value in (("--recipe", args.recipe), ("--set", args.overrides),
                       ("--compare", args.compare), ("--inception", args.inception)) if value]  # fmt: skip
        if unsupported:
            print(f"demo: {', '.join(unsupported)}: LlamaGen demo options, not available with --family var "
                  "(its recipe and sizes are in demo/fashion_mnist_var.yaml)", file=sys.stderr)  # fmt: skip
            return 2

        return fashion_mnist_var.main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    preset = PRESETS[args.preset]
    if args.recipe is not None:
        preset = preset | {"recipe": args.recipe}
    if args.csd_steps is not None:
        if args.csd_steps < 1:
            print(f"demo: --csd-steps must be >= 1, got {args.csd_steps}", file=sys.stderr)
            return 2
        args.overrides.append(f"csd.steps={args.csd_steps}")
    cfg = DemoConfig.model_validate(preset)
    if args.inception and not (NUM_CLASSES <= args.inception <= cfg.eval.samples and args.inception % NUM_CLASSES == 0):
        print(f"demo: --inception: expected a multiple of {NUM_CLASSES} between {NUM_CLASSES} and the report's "
              f"{cfg.eval.samples} images per method, got {args.inception}", file=sys.stderr)  # fmt: skip
        return 2
    out = (args.out or Path("runs/demo")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    try:
        train_images, train_labels = load_fashion_mnist("train", args.data)
        test = load_fashion_mnist("test", args.data)
    except MissingResourceError as e:
        print(f"demo: {e}", file=sys.stderr)
        print("demo: on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2
    train_images, train_labels = train_images[: cfg.train_images], train_labels[: cfg.train_images]

    vq = tokenizer_stage(cfg, out, train_images, clock)
    codes_stage(cfg, out, vq, train_images, train_labels, clock)
    try:
        config_path, tc = train_config(cfg, out, teacher_init(cfg, out), args.overrides)
    except ConfigError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    stages = pending_stages(tc)
    if stages:
        clock.run("train " + ",".join(stages), lambda: launch(config_path, stages, args.launcher, threads))
    else:
        clock.reused("train")
    tc = load_config(config_path)

    grids = out / "report" / "dd2_sample"  # `dd2 sample` (dd2-core only): one PNG grid per class
    dd2 = shutil.which("dd2", path=str(Path(sys.executable).parent)) or "dd2"
    clock.run("dd2 sample", lambda: subprocess.run(
        [dd2, "sample", "--pipeline", str(tc.export.out_dir), "--out-dir", str(grids), "--per-class", "16",
         "--device", "cpu"], check=True
    ))  # fmt: skip

    report_json = out / "report" / "report.json"
    source = json.loads((tc.export.out_dir / "teacher_ref.json").read_text())["source_checkpoint"]
    previous = json.loads(report_json.read_text()) if report_json.is_file() else None
    if previous is not None and previous.get("pipeline_source") == source and not (args.redo_report or args.inception):
        result = previous
        clock.reused("report")
    else:
        result = clock.run("report", lambda: evaluate(tc, cfg, out, vq, test, args.data))
        result["timings"] = dict(clock.steps)
        result["preset"] = args.preset
        write_report(result, cfg, tc, out)
    logger.info("this run: %.1f s (%s)", clock.total, clock.steps)
    if args.inception:  # outside the timed steps: a one-off measurement
        keys = args.inception_methods.split(",") if args.inception_methods else list(IMAGES)
        unknown = sorted(set(keys) - set(IMAGES))
        if unknown:
            print(f"demo: --inception-methods: no report rows {unknown}; expected some of {list(IMAGES)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        chosen = {k: IMAGES[k] for k in keys}
        inc = inception_fids(chosen, cfg.eval.samples, args.inception, test, out / "report" / "inception")
        rows = result["rows"]
        inc |= {"order_inception": sorted(inc["fid"], key=inc["fid"].get),
                "order_toy": sorted(keys, key=lambda k: rows[k]["fd"])}  # fmt: skip
        result["inception"] = inc
        write_report(result, cfg, tc, out)
    compare = None
    if args.compare:
        compare = run_compare(tc, cfg, out, vq, test, args, threads)
        write_json(out / "report" / "compare.json", compare)
        md = (f"# --compare: the same model A, {compare['budget_s']:.0f} s of distillation each\n\n"
              f"{compare_table(result, compare)}\n")  # fmt: skip
        atomic_write_bytes(out / "report" / "compare.md", md.encode())
    if args.json:
        print(json.dumps(result | ({"compare": compare} if compare else {}), indent=1))
    else:
        print()
        print(table(result))
        print(f"\nDD2 one-step closes {result['gap_closed']:.0%} of the FD gap between set prediction and the teacher.")
        if compare:
            print("\n" + compare_table(result, compare))
        print(f"report: {out / 'report' / 'report.md'}  (this run: {clock.total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
