"""The exact proof that one step can hold an AR teacher's joint, on a teacher small enough to enumerate.

A toy teacher (dd2_teachers.toy) over V codes and N positions is fitted to a strongly correlated synthetic joint; its
own joint p_T is then computed exactly by enumerating all V^N sequences. Every method draws the same number of
sequences, each continuous token is snapped to its nearest code, and TV(empirical, p_T) is reported (`tv.*`):

    noise_floor      the teacher's own samples (the best any sampler can score at this sample count)
    set_prediction   every position sampled independently from p_T's exact marginals (one-step baseline)
    ar_diffusion     model A after GTS, sampled token by token with Euler steps (a multi-step sanity check)
    gts_init         the one-step generator right after GTS initialisation (the paper's starting point)
    paper            DD2 as published: CSD from model A, K = 5, t ~ U[0.02, 0.98], SiD weight omega
    recommended      the project's recipe (`RECOMMENDED`): on-policy flow-map regression from model A, then
                     anchored CSD from its EMA generator
    onpolicy         on-policy flow-map regression alone (no pairs, one teacher pass per batch)
    regression       DD1: offline regression onto flow-map pairs, the pairs' cost included
    + any `ProofConfig.ablations` (named recipes)

Every trained method gets the same compute budget (`budget_seconds`), counted in CPU seconds of this process
(`time.process_time`, one thread): on one thread that is the same work whatever else runs on the machine. EMA
generators are evaluated (the paper's choice), the raw ones are reported too (`tv_raw.*`).

Run: python -m dd2_train.proof --preset full --out runs/proof.json   (nox -s proof)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from dd2_core.checkpoint import atomic_write_bytes
from dd2_core.generator import OneStepGenerator
from dd2_core.heads import HeadConfig
from dd2_core.sampling import nearest_code
from dd2_teachers.toy import (
    ToyTeacher,
    ToyTeacherConfig,
    ar_diffusion_from_teacher,
    fit_toy_teacher,
    histogram,
    marginals,
    synthetic_joint,
    total_variation,
)
from dd2_train.loop import flow_map_pairs, train_csd, train_gts, train_onpolicy_regression, train_regression
from dd2_train.steps import CSDConfig, GTSConfig, RegressConfig

logger = logging.getLogger(__name__)


class CSDVariant(BaseModel):
    """One way to run CSD: the step config plus the optimiser settings of the two networks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    csd: CSDConfig = Field(default_factory=CSDConfig)
    lr_generator: float = Field(3e-4, gt=0)
    lr_guidance: float = Field(1e-3, gt=0)
    guidance_prefit: int = Field(0, ge=0, description="FCS updates of psi alone before CSD (loop.train_csd)")


class Recipe(BaseModel):
    """A one-step training plan within a compute budget: a flow-map regression phase (share `regress_share` of the
    budget), then CSD for the rest. regress_share 0: CSD from model A (the paper); 1: regression only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head_time: float = Field(1.0, gt=0.0, le=1.0, description="the generator's head time (OneStepGenerator)")
    regress: RegressConfig = Field(default_factory=RegressConfig)
    regress_share: float = Field(0.0, ge=0.0, le=1.0, description="share of the budget spent regressing")
    regress_lr: float = Field(1e-3, gt=0)
    csd: CSDVariant = Field(default_factory=CSDVariant)


# The paper's CSD settings (Tab. 11 where explicit, method.md 10 where not).
PAPER = Recipe(csd=CSDVariant())
# Toy-tuned CSD settings of earlier sessions (prototype-notes.md): K = 2, t away from both ends, no SiD weight,
# snapped prefixes, a guidance pre-fit.
TUNED_CSD = CSDConfig(guidance_updates=2, t_min=0.1, t_max=0.9, weighting="none", snap_prefix=True)
TUNED = CSDVariant(csd=TUNED_CSD, guidance_prefit=200)
# The project's recipe (README "Recipes"; the same settings as dd2_train.config's `recommended`): on-policy
# regression for half the budget, then CSD from its EMA generator with an anchor decaying from 1 to 0.1.
RECOMMENDED = Recipe(
    regress=RegressConfig(mode="onpolicy"),
    regress_share=0.5,
    csd=CSDVariant(
        csd=TUNED_CSD.model_copy(update={"anchor_weight": 1.0, "anchor_final": 0.1}),
        lr_generator=1.5e-4,
        guidance_prefit=200,
    ),
)


class ProofConfig(BaseModel):
    """Everything the proof experiment does; presets below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    teacher: ToyTeacherConfig = Field(default_factory=ToyTeacherConfig)
    sharpness: float = Field(3.0, gt=0, description="peakedness of the synthetic joint's conditionals")
    teacher_steps: int = Field(1500, ge=1)
    head: HeadConfig | None = Field(None, description="velocity head; None = 3 x 128 sized to the teacher")
    gts: GTSConfig = Field(default_factory=GTSConfig)
    gts_steps: int = Field(1500, ge=1)
    gts_lr: float = 1e-3
    batch: int = Field(256, ge=1)
    budget_seconds: float = Field(120.0, gt=0, description="CPU seconds (one thread) of every trained method")
    methods: tuple[str, ...] = Field(
        ("paper", "recommended", "onpolicy", "regression"), description="which trained methods to run"
    )
    recipes: dict[str, Recipe] = Field(
        default_factory=lambda: {
            "paper": PAPER,
            "recommended": RECOMMENDED,
            "onpolicy": Recipe(regress=RegressConfig(mode="onpolicy"), regress_share=1.0),
            "regression": Recipe(regress=RegressConfig(mode="offline"), regress_share=1.0),
        },
        description="the recipe of every method name (ablations: add names here and to `methods`)",
    )
    pairs: int = Field(50000, ge=1, description="flow-map pairs of offline regression (made inside its budget)")
    flow_steps: int = Field(32, ge=1, description="Euler steps of the offline pairs' flow map")
    ema_max_decay: float = Field(0.999, gt=0, lt=1)
    eval_samples: int = Field(20000, ge=1)
    ar_steps: int = Field(20, ge=1, description="Euler steps per token when sampling model A")
    threads: int = Field(1, ge=1, description="torch threads (the budget is CPU time: keep 1)")

    def head_config(self) -> HeadConfig:
        t = self.teacher
        return self.head or HeadConfig(token_dim=t.token_dim, cond_dim=t.dim, width=128, depth=3)


PRESETS: dict[str, dict] = {
    # CI: the recommended recipe only, about 2-3 minutes on 2 cores
    "ci": {"teacher_steps": 800, "gts_steps": 500, "budget_seconds": 60.0, "methods": ("recommended",)},
    "full": {"teacher_steps": 2000, "gts_steps": 2000, "budget_seconds": 240.0},
}


@torch.no_grad()
def generator_tv(generator: OneStepGenerator, teacher: ToyTeacher, p_t: torch.Tensor, n: int, rng) -> float:
    """TV between the snapped one-step samples and the teacher's exact joint."""
    labels = torch.zeros(n, dtype=torch.long)
    q = generator(generator.sample_noise(n, generator=rng), labels)
    return total_variation(histogram(nearest_code(q, teacher.codebook), teacher.cfg.codebook_size), p_t)


def run_recipe(
    recipe: Recipe, model_a, teacher: ToyTeacher, cfg: ProofConfig, rng: torch.Generator
) -> tuple[OneStepGenerator, OneStepGenerator, dict]:
    """Train one method from model A within cfg.budget_seconds of CPU time. Returns (ema, raw generator, log)."""
    clock = time.process_time
    t0 = clock()
    generator = OneStepGenerator.from_ar_diffusion(model_a, recipe.head_time)
    ema, log = generator, {}
    budget = cfg.budget_seconds * recipe.regress_share
    if recipe.regress_share > 0 and recipe.regress.mode == "offline":
        r = recipe.regress
        pairs = flow_map_pairs(teacher, cfg.pairs, steps=cfg.flow_steps, rng=rng)
        log["pairs_seconds"] = clock() - t0
        ema = copy.deepcopy(generator).eval().requires_grad_(False)
        res = train_regression(generator, pairs, steps=10**9, batch=cfg.batch, lr=recipe.regress_lr,
                               seconds=max(1.0, budget - (clock() - t0)), rng=rng, clock=clock, ema=ema,
                               ema_max_decay=cfg.ema_max_decay)  # fmt: skip
        log["regress"] = res.__dict__
        log["flow_steps"] = r.flow_steps
    elif recipe.regress_share > 0:
        ema, res = train_onpolicy_regression(
            generator, teacher, recipe.regress, steps=10**9, batch=cfg.batch, lr=recipe.regress_lr, seconds=budget,
            rng=rng, ema_max_decay=cfg.ema_max_decay, clock=clock,
        )  # fmt: skip
        log["regress"] = res.__dict__
    if recipe.regress_share < 1:
        v = recipe.csd
        start = ema if recipe.regress_share > 0 else generator  # CSD continues from the regression's EMA
        generator = copy.deepcopy(start).train().requires_grad_(True)
        left = max(1.0, cfg.budget_seconds - (clock() - t0))
        ema, res = train_csd(
            generator, copy.deepcopy(model_a), teacher, v.csd, steps=10**9, batch=cfg.batch,
            lr_generator=v.lr_generator, lr_guidance=v.lr_guidance, seconds=left, rng=rng,
            guidance_prefit=v.guidance_prefit, ema_max_decay=cfg.ema_max_decay, clock=clock,
        )  # fmt: skip
        log["csd"] = res.__dict__
    log["seconds"] = clock() - t0
    return ema, generator, log


def run_proof(cfg: ProofConfig) -> dict:
    """Run every method of the module docstring and return the JSON-able results."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    v, n = cfg.teacher.codebook_size, cfg.teacher.num_tokens
    out: dict = {"config": cfg.model_dump(mode="json"), "tv": {}, "tv_raw": {}, "seconds": {}, "logs": {}}
    tic = time.perf_counter()

    teacher = ToyTeacher(cfg.teacher)
    data = synthetic_joint(v, n, sharpness=cfg.sharpness, seed=cfg.seed)
    out["tv"]["teacher_vs_data"] = fit_toy_teacher(teacher, data, steps=cfg.teacher_steps, generator=rng)
    teacher.eval().requires_grad_(False)
    p_t = teacher.exact_joint()
    out["seconds"]["teacher_fit"] = time.perf_counter() - tic

    labels = torch.zeros(cfg.eval_samples, dtype=torch.long)
    out["tv"]["noise_floor"] = total_variation(histogram(teacher.sample(labels, generator=rng), v), p_t)
    marg = marginals(p_t, v, n).float()  # (N, V)
    ids = torch.stack([torch.multinomial(marg[i], cfg.eval_samples, True, generator=rng) for i in range(n)], -1)
    out["tv"]["set_prediction"] = total_variation(histogram(ids, v), p_t)

    tic = time.perf_counter()
    model_a = ar_diffusion_from_teacher(teacher, cfg.head_config())
    out["gts"] = train_gts(
        model_a, teacher, cfg.gts, steps=cfg.gts_steps, batch=cfg.batch, lr=cfg.gts_lr, rng=rng
    ).__dict__
    out["seconds"]["gts"] = time.perf_counter() - tic
    toks = model_a.sample(labels, steps=cfg.ar_steps, generator=rng, snap_codebook=teacher.codebook)
    out["tv"]["ar_diffusion"] = total_variation(histogram(nearest_code(toks, teacher.codebook), v), p_t)
    out["tv"]["gts_init"] = generator_tv(OneStepGenerator.from_ar_diffusion(model_a), teacher, p_t, cfg.eval_samples,
                                         rng)  # fmt: skip

    for name in cfg.methods:
        if name not in cfg.recipes:
            raise ValueError(f"methods: {name!r} has no recipe; known: {sorted(cfg.recipes)}")
        logger.info("proof: %s (%.0f CPU seconds)", name, cfg.budget_seconds)
        ema, raw, log = run_recipe(cfg.recipes[name], model_a, teacher, cfg, rng)
        eval_rng = torch.Generator().manual_seed(cfg.seed + 1)  # every method sees the same evaluation noise
        out["tv"][name] = generator_tv(ema, teacher, p_t, cfg.eval_samples, eval_rng)
        out["tv_raw"][name] = generator_tv(raw, teacher, p_t, cfg.eval_samples, eval_rng)
        out["seconds"][name] = log["seconds"]
        out["logs"][name] = log
        logger.info("proof: %s TV %.4f (raw %.4f)", name, out["tv"][name], out["tv_raw"][name])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="size of the run (default: full)")
    parser.add_argument("--out", type=Path, default=Path("proof.json"), help="JSON results (default: proof.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=None, help="CPU seconds per trained method (preset's)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    over: dict = {"seed": args.seed}
    if args.budget is not None:
        over["budget_seconds"] = args.budget
    if args.methods:
        over["methods"] = tuple(args.methods.split(","))
    cfg = ProofConfig.model_validate(PRESETS[args.preset] | over)
    tic = time.perf_counter()
    result = run_proof(cfg)
    result["seconds"]["total"] = time.perf_counter() - tic
    atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())
    width = max(map(len, result["tv"]))
    for k, val in result["tv"].items():
        print(f"{k:<{width}}  TV {val:.4f}")
    print(f"wrote {args.out} in {result['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
