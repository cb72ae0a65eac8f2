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
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from dd2_core.checkpoint import atomic_write_bytes, save_safetensors
from dd2_core.cli import image_grid, save_png
from dd2_core.generator import OneStepGenerator
from dd2_core.models.llamagen import LlamaGen, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_core.pipeline import OneStepPipeline, to_uint8
from dd2_core.sampling import nearest_code
from dd2_eval.errors import MissingResourceError
from dd2_eval.speed import time_calls
from dd2_eval.toy import CLASS_NAMES, ToyFeatureSpace, load_fashion_mnist, load_toy_net
from dd2_train.build import build_ar_diffusion, build_teacher
from dd2_train.checkpoint import RunFolder, module_weights, read_manifest, resolve_checkpoint
from dd2_train.config import TrainConfig, deep_merge, load_config, validate_config
from dd2_train.data import TokenStream, expand_shards, shard_plan
from dd2_train.tokenizer import VQTrainConfig, codebook_usage, encode_images, train_vq, write_code_shards

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
    """One demo run: data subset, tokenizer, teacher sizes, training-run overrides, evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    train_images: int = Field(60000, ge=NUM_CLASSES, description="Fashion-MNIST train images used (first N)")
    vq: VQConfig
    vq_train: VQTrainConfig
    gpt: LlamaGenConfig = Field(..., description="the teacher's sizes (vocab_size = vq.codebook_size)")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of demo/fashion_mnist.yaml")
    eval: EvalSpec = Field(default_factory=EvalSpec)


# 28 x 28 images, 4x downsampling: 7 x 7 = 49 tokens of a 256-code, 8-dim L2-normalised codebook
_VQ = {"codebook_size": 256, "codebook_dim": 8, "z_channels": 32, "ch": 16, "ch_mult": (1, 2, 2),
       "num_res_blocks": 1, "norm_groups": 8, "codebook_used_size": 0}  # fmt: skip
_GPT = {"n_layer": 3, "dim": 64, "n_head": 4, "vocab_size": 256, "num_classes": NUM_CLASSES, "grid": 7,
        "multiple_of": 32, "cont_hidden": 128}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"vq": _VQ, "gpt": _GPT, "vq_train": {"steps": 400, "batch_size": 64}},  # demo/fashion_mnist.yaml as is
    "ci": {  # the reduced run of tests/test_demo.py: a few minutes on 2 cores
        "train_images": 10000,
        "vq": _VQ,
        "gpt": _GPT,
        "vq_train": {"steps": 200, "batch_size": 64},
        "train": {
            "adapt": {"steps": 500},
            "gen_data": {"num_samples": 2000},
            "gts": {"steps": 200},
            "csd": {"steps": 400, "guidance_prefit": 100},
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
def train_config(cfg: DemoConfig, out: Path, teacher_ckpt: Path) -> tuple[Path, TrainConfig]:
    """Fill the YAML template (paths, sizes, preset overrides), validate it, write <out>/config.yaml."""
    raw = yaml.safe_load(TEMPLATE.read_text())
    raw = deep_merge(raw, cfg.train)
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
    latest = RunFolder(folder).latest_checkpoint()
    return latest is not None and int(read_manifest(latest)["step"]) >= steps


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

    gts_model = build_ar_diffusion(teacher, tc.teacher, tc.head)
    gts_model.load_state_dict(module_weights(resolve_checkpoint(tc.stage_dir("gts")), "model"))
    before = OneStepGenerator(gts_model).eval()

    def before_csd(labels, g):
        tokens = before(before.sample_noise(labels.shape[0], generator=g), labels)
        return to_uint8(teacher.decode_tokens(tokens)), nearest_code(tokens, codebook), labels

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
    return [
        Method("teacher", "teacher (AR)", str(n), teacher_ar),
        Method("dd2", "DD2 one-step", "1", one_step),
        Method(f"dd2_refine{k}", f"DD2 + teacher, last {k} tokens", str(1 + k), refined),
        Method("set_prediction", "set prediction (marginals)", "1", set_prediction),
        Method("before_csd", "one-step before CSD (GTS init)", "1", before_csd),
        Method("reconstruction", "tokenizer reconstruction", "-", reconstruction),
    ]


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


def evaluate(tc: TrainConfig, cfg: DemoConfig, out: Path, vq: LlamaGenVQ, test, data_dir: str | None) -> dict:
    spec = cfg.eval
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher(tc.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=tc.run_dir)
    pipe = OneStepPipeline.from_pretrained(tc.export.out_dir)
    space = ToyFeatureSpace(load_toy_net(data_dir=data_dir))
    test_images, test_labels = test
    reference = test_images  # all 10k test images
    labels = balanced_labels(spec.samples)
    rows, grids = {}, []
    for m in build_methods(tc, spec, teacher, pipe, test, vq):
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
        rows[m.key] = row
        per = spec.samples // NUM_CLASSES
        grid_idx = torch.cat([torch.arange(c * per, c * per + min(per, 10)) for c in range(NUM_CLASSES)])
        save_png(image_grid(images[grid_idx], rows=NUM_CLASSES), report_dir / f"{m.key}.png")
        grids.append((m.name, images))
        logger.info("report: %s: fd %.2f, recall %.3f, acc %.3f (%.1f s)", m.name, row["fd"], row["recall"],
                    row["accuracy"], seconds)  # fmt: skip
    teacher_nll_own = rows["teacher"]["nll"]
    for row in rows.values():
        row["nll_gap"] = row["nll"] - teacher_nll_own
    overview_png(grids, report_dir / "overview.png")
    sp, te, dd = rows["set_prediction"]["fd"], rows["teacher"]["fd"], rows["dd2"]["fd"]
    return {
        "rows": rows,
        "gap_closed": (sp - dd) / (sp - te) if sp != te else float("nan"),
        "pipeline_source": json.loads((tc.export.out_dir / "teacher_ref.json").read_text())["source_checkpoint"],
        "samples_per_method": spec.samples,
        "reference": f"Fashion-MNIST test ({len(reference)} images)",
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }


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
    p.add_argument("--csd-steps", type=int, default=None,
                   help="CSD rounds instead of the preset's; on a finished run folder CSD resumes from its last "
                   "checkpoint and continues (full preset: 800; at t_min 0.1, 3000 gave FD 56 -> 32)")  # fmt: skip
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

        return fashion_mnist_var.main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    preset = PRESETS[args.preset]
    if args.csd_steps is not None:
        if args.csd_steps < 1:
            print(f"demo: --csd-steps must be >= 1, got {args.csd_steps}", file=sys.stderr)
            return 2
        preset = deep_merge(preset, {"train": {"csd": {"steps": args.csd_steps}}})
    cfg = DemoConfig.model_validate(preset)
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
    config_path, tc = train_config(cfg, out, teacher_init(cfg, out))
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
    if previous is not None and previous.get("pipeline_source") == source and not args.redo_report:
        result = previous
        clock.reused("report")
    else:
        result = clock.run("report", lambda: evaluate(tc, cfg, out, vq, test, args.data))
        result["timings"] = dict(clock.steps)
        result["preset"] = args.preset
        write_report(result, cfg, tc, out)
    logger.info("this run: %.1f s (%s)", clock.total, clock.steps)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print()
        print(table(result))
        print(f"\nDD2 one-step closes {result['gap_closed']:.0%} of the FD gap between set prediction and the teacher.")
        print(f"report: {out / 'report' / 'report.md'}  (this run: {clock.total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
