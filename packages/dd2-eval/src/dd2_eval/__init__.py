"""dd2-eval: ADM-compatible FID/sFID/IS/precision/recall offline, ADM npz sampling, toy metrics, speed benchmarks."""

from dd2_eval.errors import EvalError, MissingExtraError, MissingResourceError, NpzFormatError
from dd2_eval.evaluator import EvalConfig, EvalReport, evaluate, write_reference_stats
from dd2_eval.fid import FeatureStats, RunningStats, feature_stats, frechet_distance
from dd2_eval.inception import (
    ExtractedFeatures,
    InceptionExtractor,
    InceptionV3FID,
    load_inception,
    load_is_head,
    preprocess,
    tf1_resize_bilinear,
)
from dd2_eval.inception_score import InceptionScore, inception_score
from dd2_eval.kid import KernelDistance, kernel_inception_distance
from dd2_eval.npz import (
    NpzImageWriter,
    ReferenceBatch,
    iter_images,
    read_images,
    read_labels,
    read_reference,
    write_images,
    write_reference,
)
from dd2_eval.precision_recall import DensityCoverage, PrecisionRecall, density_coverage, precision_recall
from dd2_eval.sample import SampleConfig, sample_to_npz
from dd2_eval.speed import BenchConfig, BenchReport, bar_chart_png, bench_pipeline
from dd2_eval.teacher import load_teacher_plugin
from dd2_eval.toy import ToyFeatureConfig, ToyFeatureSpace, ToyMetrics, load_fashion_mnist, load_toy_net

__version__ = "0.1.0"

__all__ = [
    "BenchConfig",
    "BenchReport",
    "DensityCoverage",
    "EvalConfig",
    "EvalError",
    "EvalReport",
    "ExtractedFeatures",
    "FeatureStats",
    "InceptionExtractor",
    "InceptionScore",
    "InceptionV3FID",
    "KernelDistance",
    "MissingExtraError",
    "MissingResourceError",
    "NpzFormatError",
    "NpzImageWriter",
    "PrecisionRecall",
    "ReferenceBatch",
    "RunningStats",
    "SampleConfig",
    "ToyFeatureConfig",
    "ToyFeatureSpace",
    "ToyMetrics",
    "bar_chart_png",
    "bench_pipeline",
    "density_coverage",
    "evaluate",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "iter_images",
    "kernel_inception_distance",
    "load_fashion_mnist",
    "load_inception",
    "load_is_head",
    "load_teacher_plugin",
    "load_toy_net",
    "precision_recall",
    "preprocess",
    "read_images",
    "read_labels",
    "read_reference",
    "sample_to_npz",
    "tf1_resize_bilinear",
    "write_images",
    "write_reference",
    "write_reference_stats",
]
