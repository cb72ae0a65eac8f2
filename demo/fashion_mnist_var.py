"""The embedded default on a VAR teacher: `python demo/fashion_mnist.py --family var` (issue 15, part 2).

    python demo/fashion_mnist.py --family var                      # full preset -> runs/demo-var/report
    python demo/fashion_mnist.py --family var --preset ci --out runs/demo-var-ci   # tests/test_demo_var.py

The same pipeline as the LlamaGen demo (demo/fashion_mnist.py, whose generic helpers this file imports), with VAR's
next-scale prediction in place of the raster-order GPT. Fashion-MNIST's 28x28 images are padded to 32x32 (background
value) and tokenised at 4 scales of 1x1, 2x2, 4x4 and 8x8 residual tokens: 85 tokens in 4 groups. Every step uses the
project's own code; a second run reuses every finished step:

  1 tokenizer  a small VAR multi-scale VQVAE (dd2_core VARVQVAE), trained from pixels (dd2_train.var_tokenizer)
                                                                                                      tokenizer/
  2 codes      the training images' per-scale token ids (one tensor file: VAR has no `adapt` stage)  codes/
  3 teacher    a small VAR transformer (dd2_core VAR) trained on the codes by teacher-forced next-scale
               cross-entropy with 10 % class dropout (a trained null class, so CFG is available)          teacher/
  4 distil     the recipe's stages (recommended: gen-data -> gts -> gen-pairs -> regress -> csd -> export)
               through the real launch path: deepspeed --num_gpus 1 packages/dd2-train/run.py            pipeline/
  5 sample     `dd2 sample --pipeline <out>/pipeline` (dd2-core only): a PNG grid per class (32x32, padded)
  6 report     teacher AR over scales, DD2 one-step, DD2 + teacher resampling the last scale, set prediction,
               the one-step generator before distillation (and after regression, before CSD), the tokenizer's
               reconstructions: toy FD, precision, recall, class accuracy, teacher NLL, latency, images/s  report/

Images are cropped back to 28x28 before any metric, so that they are compared with the Fashion-MNIST test set in the
same toy feature space as the LlamaGen demo's.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from fashion_mnist import (
    COLUMNS,
    NUM_CLASSES,
    Clock,
    EvalSpec,
    Method,
    balanced_labels,
    class_marginals,
    launch,
    overview_png,
    pending_stages,
    speed,
    table,
    write_json,
)
from pydantic import BaseModel, ConfigDict, Field

from dd2_core.checkpoint import atomic_write_bytes, load_strict, read_state_dict, save_safetensors
from dd2_core.cli import image_grid, save_png
from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_core.pipeline import OneStepPipeline, to_uint8
from dd2_core.sampling import nearest_code
from dd2_eval.errors import MissingResourceError
from dd2_eval.toy import ToyFeatureSpace, load_fashion_mnist, load_toy_net
from dd2_train.build import build_generator, build_teacher, restore_frozen_tokenizer
from dd2_train.checkpoint import module_weights, resolve_checkpoint
from dd2_train.config import TrainConfig, deep_merge, load_config, validate_config
from dd2_train.data import TokenStream, expand_shards
from dd2_train.tokenizer import VQTrainConfig
from dd2_train.var_tokenizer import VARTrainConfig, crop_images, encode_var_images, train_var, train_var_vqvae

logger = logging.getLogger("demo.var")

TEMPLATE = Path(__file__).with_name("fashion_mnist_var.yaml")
IMAGE_SIDE = 28  # Fashion-MNIST; the VQVAE sees it padded to its image size (32)


class VARDemoConfig(BaseModel):
    """One VAR demo run: data subset, VQVAE and VAR sizes and training, training-run overrides, evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    train_images: int = Field(60000, ge=NUM_CLASSES, description="Fashion-MNIST train images used (first N)")
    vqvae: VARVQVAEConfig
    vqvae_train: VQTrainConfig
    var: VARConfig = Field(..., description="the teacher's sizes (vocab_size, token_dim, patch_nums = the VQVAE's)")
    var_train: VARTrainConfig
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of demo/fashion_mnist_var.yaml")
    eval: EvalSpec = Field(default_factory=lambda: EvalSpec(refine_groups=1))


# 32x32 (28x28 padded), 4x downsampling to an 8x8 latent, scales 1, 2, 4, 8: 85 tokens of a 256-code, 8-dim codebook
_PN = (1, 2, 4, 8)
_VQVAE = {"vocab_size": 256, "token_dim": 8, "ch": 16, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "norm_groups": 8,
          "patch_nums": _PN}  # fmt: skip
_VAR = {"depth": 3, "embed_dim": 64, "num_heads": 4, "num_classes": NUM_CLASSES, "vocab_size": 256, "token_dim": 8,
        "patch_nums": _PN}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "full": {  # demo/fashion_mnist_var.yaml as is; 13-15 minutes on 2 cores (docs/experiments.md, session 6)
        "train_images": 30000,
        "vqvae": _VQVAE,
        "vqvae_train": {"steps": 300, "batch_size": 64},
        "var": _VAR,
        "var_train": {"steps": 900, "batch_size": 64, "lr": 2e-3},
    },
    "ci": {  # the reduced run of tests/test_demo_var.py: about 4 minutes on 2 cores
        "train_images": 10000,
        "vqvae": _VQVAE,
        "vqvae_train": {"steps": 200, "batch_size": 32},
        "var": _VAR,
        "var_train": {"steps": 500, "batch_size": 32, "lr": 2e-3},
        "train": {
            "gen_data": {"num_samples": 1000, "shard_size": 250, "batch_size": 250},
            "gts": {"steps": 100},
            "gen_pairs": {"num_samples": 1000, "shard_size": 250, "batch_size": 250, "flow_steps": 16},
            "regress": {"steps": 150},
            "csd": {"steps": 100, "batch_size": 16, "guidance_prefit": 20},
        },
        "eval": {"samples": 500, "refine_groups": 1, "latency_repeats": 2, "throughput_repeats": 1},
    },
}


# -- 1-3: tokenizer, codes, teacher --------------------------------------------------------------------------------
def _load(module: torch.nn.Module, path: Path, what: str) -> torch.nn.Module:
    load_strict(module, read_state_dict(path), expected=what, source=str(path))
    return module.eval().requires_grad_(False)


def tokenizer_stage(cfg: VARDemoConfig, out: Path, train_images: np.ndarray, clock: Clock) -> VARVQVAE:
    weights = out / "tokenizer" / "vqvae.safetensors"
    if weights.is_file():
        clock.reused("tokenizer")
        return _load(VARVQVAE(cfg.vqvae), weights, "the VAR demo's VQVAE")

    def train() -> tuple[VARVQVAE, dict]:
        torch.manual_seed(cfg.seed)
        vqvae = VARVQVAE(cfg.vqvae)
        return vqvae, train_var_vqvae(vqvae, train_images, cfg.vqvae_train)

    vqvae, summary = clock.run("tokenizer", train)
    write_json(weights.parent / "train.json", {"config": cfg.vqvae.model_dump(mode="json"), **summary})
    save_safetensors(vqvae.state_dict(), weights)  # last: its presence marks the step done
    return vqvae


def codes_stage(out: Path, vqvae: VARVQVAE, images: np.ndarray, labels: np.ndarray, clock: Clock):
    """Per-scale token ids of the training images.  Shapes: -> ids (M, 85) int64, labels (M,) int64."""
    path = out / "codes" / "codes.safetensors"
    if path.is_file():
        clock.reused("codes")
    else:

        def tokenize() -> None:
            ids = encode_var_images(vqvae, images)  # (M, N)
            used = int(torch.unique(ids).numel())
            logger.info("codes: %d images -> %d tokens each; %d of %d codes used", len(ids), ids.shape[1], used,
                        vqvae.cfg.vocab_size)  # fmt: skip
            save_safetensors({"ids": ids, "labels": torch.from_numpy(labels).long()}, path)

        clock.run("codes", tokenize)
    codes = read_state_dict(path)
    return codes["ids"], codes["labels"]


def teacher_stage(cfg: VARDemoConfig, out: Path, vqvae: VARVQVAE, ids, labels, clock: Clock) -> Path:
    """The VAR teacher trained on the codes; written as a raw state_dict (like the released var_d16.pth)."""
    path = out / "teacher" / "var.safetensors"
    if path.is_file():
        clock.reused("teacher")
        return path

    def train() -> tuple[VAR, dict]:
        torch.manual_seed(cfg.seed)
        var = VAR(cfg.var)
        return var, train_var(var, vqvae, ids, labels, cfg.var_train)

    var, summary = clock.run("teacher", train)
    write_json(path.parent / "train.json", {"config": cfg.var.model_dump(mode="json"), **summary})
    save_safetensors(var.state_dict(), path)  # last: its presence marks the step done
    return path


# -- 4: the training run -------------------------------------------------------------------------------------------
def train_config(cfg: VARDemoConfig, out: Path, teacher_ckpt: Path) -> tuple[Path, TrainConfig]:
    """Fill the YAML template (paths, sizes, preset overrides), validate it, write <out>/config.yaml."""
    raw = deep_merge(yaml.safe_load(TEMPLATE.read_text()), cfg.train)
    raw["run_dir"] = str(out)
    raw["teacher"] |= {
        "ckpt": str(teacher_ckpt),
        "vq_ckpt": str(out / "tokenizer" / "vqvae.safetensors"),
        "var": cfg.var.model_dump(mode="json"),
        "vqvae": cfg.vqvae.model_dump(mode="json"),
    }
    raw["export"] = {"out_dir": str(out / "pipeline")}
    raw["seed"] = cfg.seed
    train_cfg = validate_config(raw)
    path = out / "config.yaml"
    atomic_write_bytes(path, yaml.safe_dump(raw, sort_keys=False).encode())
    return path, train_cfg


# -- 6: the report -------------------------------------------------------------------------------------------------
def gen_data_ids(tc: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All gen-data teacher samples (ids (M, N), labels (M,)), in shard order."""
    stream = TokenStream(
        expand_shards(str(tc.run_dir / "gen-data" / "shards")),
        batch_size=tc.gen_data.shard_size,
        num_tokens=tc.teacher.var.num_tokens,
        vocab_size=tc.teacher.vqvae.vocab_size,
        num_classes=NUM_CLASSES,
        shuffle_buffer=0,
        shard_shuffle=False,
    )
    batches = [b for b in stream.epoch_batches(0) if "ids" in b]
    return torch.cat([b["ids"] for b in batches]), torch.cat([b["labels"] for b in batches])


def one_step_of(tc: TrainConfig, teacher, stage: str, module: str):
    """The one-step generator of a stage's last checkpoint: gts's model A ('model') or regress's EMA ('ema')."""
    generator = build_generator(teacher, tc.teacher, tc.head, tc.onestep)
    weights = module_weights(resolve_checkpoint(tc.stage_dir(stage)), module)
    (generator.model if module == "model" else generator).load_state_dict(weights)
    restore_frozen_tokenizer(generator.model, teacher, tc.teacher)
    return generator.eval()


@torch.no_grad()
def build_methods(tc: TrainConfig, spec: EvalSpec, teacher, pipe: OneStepPipeline, test, vqvae: VARVQVAE):
    """The compared samplers. Each draw(labels, g) returns (uint8 images (B, 28, 28, 3), ids (B, N), labels (B,))."""
    codebook = teacher.codebook

    def crop(images_m11: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) in [-1, 1] -> uint8 (B, 28, 28, 3)
        return crop_images(to_uint8(images_m11), IMAGE_SIDE, IMAGE_SIDE)

    def teacher_ar(labels, g):
        ids = teacher.sample(labels, generator=g)  # KV-cached, scale by scale (4 steps)
        return crop(vqvae.decode_ids(ids)), ids, labels

    def one_step(labels, g):
        out = pipe(labels, generator=g)
        return crop_images(out.images, IMAGE_SIDE, IMAGE_SIDE), nearest_code(out.tokens, codebook), labels

    def refined(labels, g):
        out = pipe(labels, generator=g, teacher=teacher, refine_groups=spec.refine_groups)
        return crop_images(out.images, IMAGE_SIDE, IMAGE_SIDE), nearest_code(out.tokens, codebook), labels

    gen_ids, gen_labels = gen_data_ids(tc)
    marginals = class_marginals(gen_ids, gen_labels, codebook.shape[0])  # (10, N, V)

    def set_prediction(labels, g):
        probs = marginals[labels]  # (B, N, V)
        ids = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(probs.shape[:2])  # independent positions
        return crop(vqvae.decode_ids(ids)), ids, labels

    def generator_row(generator):
        def draw(labels, g):
            tokens = generator(generator.sample_noise(labels.shape[0], generator=g), labels)
            return crop(vqvae.decode_tokens(tokens)), nearest_code(tokens, codebook), labels

        return draw

    test_images, test_labels = test
    by_class = [np.flatnonzero(test_labels == c) for c in range(NUM_CLASSES)]
    cursor = {"i": 0}

    def reconstruction(labels, g):
        picks = []  # real test images of the requested classes, in order (the reconstruction row is not random)
        for c in labels.tolist():
            pool = by_class[c]
            picks.append(pool[cursor["i"] % len(pool)])
            cursor["i"] += 1
        ids = encode_var_images(vqvae, test_images[np.array(picks)])
        return crop(vqvae.decode_ids(ids)), ids, labels

    before = generator_row(one_step_of(tc, teacher, "gts", "model"))
    k, groups = spec.refine_groups, tc.teacher.var.token_groups
    last = "scale" if k == 1 else f"{k} scales"
    methods = [
        Method("teacher", f"teacher (AR over {len(groups)} scales)", str(len(groups)), teacher_ar),
        Method("dd2", "DD2 one-step", "1", one_step),
        Method(f"dd2_refine{k}", f"DD2 + teacher, last {last}", str(1 + k), refined),
        Method("set_prediction", "set prediction (marginals)", "1", set_prediction),
        Method("before", "one-step before distillation (GTS init)", "1", before),
    ]
    if "regress" in tc.stages:
        methods.append(Method("after_regress", "one-step after regression (CSD init)", "1",
                              generator_row(one_step_of(tc, teacher, "regress", "ema"))))  # fmt: skip
    methods.append(Method("reconstruction", "tokenizer reconstruction", "-", reconstruction))
    return methods


@torch.no_grad()
def teacher_nll(teacher, ids: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Mean -log p_teacher(id_i | earlier scales, class) under the teacher's policy (nats per token)."""
    total = 0.0
    for i in range(0, len(ids), batch):
        x, y = ids[i : i + batch], labels[i : i + batch]
        lp = teacher.log_probs(teacher.embed(x), y)  # (b, N, V)
        total += float(-lp.gather(-1, x[..., None]).sum())
    return total / ids.numel()


def evaluate(tc: TrainConfig, cfg: VARDemoConfig, out: Path, vqvae: VARVQVAE, test, data_dir: str | None) -> dict:
    spec = cfg.eval
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher(tc.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=tc.run_dir)
    pipe = OneStepPipeline.from_pretrained(tc.export.out_dir)
    space = ToyFeatureSpace(load_toy_net(data_dir=data_dir))
    test_images, _ = test
    labels = balanced_labels(spec.samples)
    rows, grids = {}, []
    reference = space.reference(test_images)  # features and k-NN radii of the test set, once
    for m in build_methods(tc, spec, teacher, pipe, test, vqvae):
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
    for row in rows.values():
        row["nll_gap"] = row["nll"] - rows["teacher"]["nll"]
    overview_png(grids, report_dir / "overview.png")
    # the samplers alone (tokens, no VQVAE decoding): the teacher's 4 KV-cached scale steps vs one generator pass
    samplers = {
        "teacher": Method("teacher", "", "", lambda labels, g: teacher.sample(labels, generator=g)),
        "dd2": Method("dd2", "", "", lambda labels, g: pipe(labels, generator=g, decode=False)),
    }
    tokens_only = {key: speed(m, spec) for key, m in samplers.items()}
    sp, te, dd = rows["set_prediction"]["fd"], rows["teacher"]["fd"], rows["dd2"]["fd"]
    return {
        "family": "var",
        "recipe": tc.recipe,
        "rows": rows,
        "gap_closed": (sp - dd) / (sp - te) if sp != te else float("nan"),
        "speedup_b1": rows["teacher"]["latency_ms"] / rows["dd2"]["latency_ms"],
        "speedup_b64": rows["dd2"]["images_per_s"] / rows["teacher"]["images_per_s"],
        "tokens_only": tokens_only,
        "pipeline_source": json.loads((tc.export.out_dir / "teacher_ref.json").read_text())["source_checkpoint"],
        "samples_per_method": spec.samples,
        "reference": f"Fashion-MNIST test ({len(test_images)} images)",
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }


def write_report(result: dict, cfg: VARDemoConfig, tc: TrainConfig, out: Path) -> None:
    report_dir = out / "report"
    write_json(report_dir / "report.json", result)
    v, q, p, to = tc.teacher.var, tc.teacher.vqvae, tc.teacher.policy, result["tokens_only"]
    distil = (f"gen-data {tc.gen_data.num_samples} teacher samples, GTS {tc.gts.steps} steps, "
              + (f"gen-pairs {tc.gen_pairs.num_samples} flow-map pairs, regress {tc.regress.steps} steps, "
                 if "regress" in tc.stages else "")
              + f"CSD {tc.csd.steps} generator steps (K = {tc.csd.guidance_updates}"
              + (f", anchor {tc.csd.anchor_weight:g}" if tc.csd.anchor_weight else "") + ")")  # fmt: skip
    md = [
        "# DD2 on Fashion-MNIST with a VAR teacher",
        "",
        f"Teacher: VAR architecture, depth {v.depth}, width {v.width}, scales {list(v.patch_nums)} ({v.num_tokens} "
        f"tokens in {len(v.patch_nums)} groups) of a {q.vocab_size}-code multi-scale VQVAE (dim {q.token_dim}, "
        f"images padded to {q.image_size}x{q.image_size}), trained from scratch for {cfg.var_train.steps} steps on "
        f"{cfg.train_images} images (class dropout {cfg.var_train.label_drop}); VQVAE {cfg.vqvae_train.steps} steps. "
        f"Teacher policy: CFG {p.cfg_scale:g} ({p.cfg_schedule}), top-k {p.top_k}, top-p {p.top_p:g}. "
        f"Recipe `{tc.recipe}`: {distil}; EMA generator exported.",
        "",
        f"{result['samples_per_method']} images per method (balanced classes, cropped back to 28x28) against "
        f"{result['reference']}, in the toy CNN feature space of `dd2_eval.toy`; teacher NLL = -log p_teacher per "
        f"token under its policy (DD2 outputs snapped to the nearest code); speed on {result['device']}, eager, "
        "decoding included.",
        "",
        table(result),
        "",
        f"DD2 one-step closes **{result['gap_closed']:.0%}** of the FD gap between set prediction and the teacher; "
        f"it is {result['speedup_b1']:.1f}x faster than the teacher's AR sampling at batch 1 and "
        f"{result['speedup_b64']:.1f}x at batch {cfg.eval.throughput_batch}.",
        "",
        f"Without decoding (tokens only): teacher AR {to['teacher']['latency_ms']:.1f} ms at batch 1, "
        f"{to['teacher']['images_per_s']:.0f} samples/s at batch {cfg.eval.throughput_batch}; DD2 one-step "
        f"{to['dd2']['latency_ms']:.1f} ms, {to['dd2']['images_per_s']:.0f} samples/s.",
        "",
        "![overview](overview.png)",
        "",
        "Grids (one row per class): " + ", ".join(f"[{r['name']}]({k}.png)" for k, r in result["rows"].items()),
        "",
        "Wall time of this run's steps (s): " + ", ".join(f"{k} {v}" for k, v in result.get("timings", {}).items()),
        "",
    ]
    atomic_write_bytes(report_dir / "report.md", "\n".join(md).encode())


# -- main ----------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """The VAR demo; `args` are demo/fashion_mnist.py's (--family var)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    preset = PRESETS[args.preset]
    if args.csd_steps is not None:
        if args.csd_steps < 1:
            print(f"demo: --csd-steps must be >= 1, got {args.csd_steps}", file=sys.stderr)
            return 2
        preset = deep_merge(preset, {"train": {"csd": {"steps": args.csd_steps}}})
    cfg = VARDemoConfig.model_validate(preset)
    out = (args.out or Path("runs/demo-var")).resolve()
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

    vqvae = tokenizer_stage(cfg, out, train_images, clock)
    ids, labels = codes_stage(out, vqvae, train_images, train_labels, clock)
    config_path, tc = train_config(cfg, out, teacher_stage(cfg, out, vqvae, ids, labels, clock))
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
        result = clock.run("report", lambda: evaluate(tc, cfg, out, vqvae, test, args.data))
        result["timings"] = dict(clock.steps)
        result["preset"] = args.preset
        write_report(result, cfg, tc, out)
    logger.info("this run: %.1f s (%s)", clock.total, clock.steps)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print()
        print(table(result))
        print(f"\nDD2 one-step closes {result['gap_closed']:.0%} of the FD gap between set prediction and the "
              f"teacher; {result['speedup_b1']:.1f}x faster than AR at batch 1, {result['speedup_b64']:.1f}x at "
              f"batch {cfg.eval.throughput_batch}.")  # fmt: skip
        print(f"report: {out / 'report' / 'report.md'}  (this run: {clock.total:.0f} s)")
    return 0


__all__ = ["COLUMNS", "PRESETS", "VARDemoConfig", "main"]
