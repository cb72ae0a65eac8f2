"""A small-data feature space for toy experiments: a small CNN trained on Fashion-MNIST (evaluation.md §3, §6, §7).

Inception on 28x28 greyscale images mostly measures resize artefacts, so toy runs use the 128-d penultimate ReLU
features of a two-conv CNN trained on Fashion-MNIST train ("Fréchet LeNet distance"), with the same metrics as
ImageNet plus density/coverage and a classifier IS, and class-conditional accuracy of generated images.

Data: the Debian package `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist) or any folder
holding the four standard IDX files (gzipped or not). The trained network is cached under the user's cache folder
(${DD2_CACHE_DIR}, else ${XDG_CACHE_HOME}/dd2, else ~/.cache/dd2), keyed by its training config.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm import tqdm

from dd2_core.checkpoint import load_strict, save_safetensors
from dd2_eval._arrays import as_tensor
from dd2_eval.errors import EvalError, MissingResourceError, NpzFormatError
from dd2_eval.fid import feature_stats, frechet_distance
from dd2_eval.inception_score import inception_score
from dd2_eval.kid import kernel_inception_distance
from dd2_eval.precision_recall import density_coverage, manifold_radii, precision_recall

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIZE = 28
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DATA_HINT = (
    "install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files under "
    f"{FASHION_MNIST_DIR}), or pass --data DIR holding train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
    "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
)
_NET_VERSION = 1  # bump when the architecture or the training recipe changes: it invalidates cached networks


def cache_dir() -> Path:
    """dd2's cache folder: ${DD2_CACHE_DIR}, else ${XDG_CACHE_HOME}/dd2, else ~/.cache/dd2."""
    if os.environ.get("DD2_CACHE_DIR"):
        return Path(os.environ["DD2_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dd2"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX array (gzipped or raw): 2 zero bytes, type code (0x08 = uint8), ndim, big-endian int32 sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise NpzFormatError(f"IDX file {str(path)!r}: could not be read ({type(e).__name__}: {e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise NpzFormatError(f"IDX file {str(path)!r}: expected a uint8 IDX header (00 00 08 ndim), got {data[:4]!r}")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise NpzFormatError(
            f"IDX file {str(path)!r}: header promises {dims} = {int(np.prod(dims))} bytes, found {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels. Shapes: -> uint8 (N, 28, 28), int64 (N,) (60k train, 10k test)."""
    if split not in IDX_FILES:
        raise EvalError(f"split: expected 'train' or 'test', got {split!r}")
    folder = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    paths = []
    for stem in IDX_FILES[split]:
        found = [folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()]
        if not found:
            raise MissingResourceError(f"Fashion-MNIST: {stem}(.gz) not found in {str(folder)!r}; {DATA_HINT}")
        paths.append(found[0])
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or labels.shape != (images.shape[0],):
        raise NpzFormatError(
            f"Fashion-MNIST in {str(folder)!r}: expected images (N, 28, 28) and labels (N,), "
            f"got {images.shape} and {labels.shape}"
        )
    return images, labels.astype(np.int64)


class ToyFeatureConfig(BaseModel):
    """How the toy feature network is trained (the cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature_dim: int = Field(128, ge=8, description="width of the penultimate ReLU layer = the feature space")
    epochs: int = Field(1, ge=1, description="1 epoch gives ~86 % test accuracy (evaluation.md §7.1)")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    seed: int = Field(0, description="initialisation and shuffling seed")
    train_images: int | None = Field(None, ge=100, description="train on the first N images only (tests); None = all")


class ToyFeatureNet(nn.Module):
    """conv3x3(16) -> ReLU -> maxpool2 -> conv3x3(32) -> ReLU -> maxpool2 -> FC(feature_dim) -> ReLU [features]
    -> FC(10) [logits]. Small enough to train for an epoch in well under a minute on 2 CPU cores.

    Shapes: x (B, 1, 28, 28) float in [-0.5, 0.5] -> features (B, feature_dim), logits (B, 10).
    """

    def __init__(self, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 7, 7)
        f = F.relu(self.fc(x.flatten(1)))  # (B, feature_dim)
        return f, self.head(f)


def toy_input(images: np.ndarray | Tensor) -> Tensor:
    """Images -> the network's input. Accepts uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3) (RGB -> ITU-R 601 luma;
    a grey image stored as RGB is unchanged); other sizes are resized to 28x28 (bilinear, antialiased).

    Shapes: -> (N, 1, 28, 28) float32 in [-0.5, 0.5].
    """
    x = as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[-1] not in (1, 3)):
        raise EvalError(
            f"toy images: expected uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {x.dtype} {tuple(x.shape)}"
        )
    x = x.float()
    if x.dim() == 4:
        if x.shape[-1] == 3:
            x = x @ torch.tensor([0.299, 0.587, 0.114], device=x.device)  # (N, H, W)
        else:
            x = x[..., 0]
    x = x[:, None] / 255.0 - 0.5  # (N, 1, H, W)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_toy_net(
    cfg: ToyFeatureConfig, data_dir: str | os.PathLike | None = None, *, progress: bool = False
) -> tuple[ToyFeatureNet, float]:
    """Train the feature network on Fashion-MNIST train (seeded, CPU); returns it and its test accuracy."""
    images, labels = load_fashion_mnist("train", data_dir)
    if cfg.train_images is not None:
        images, labels = images[: cfg.train_images], labels[: cfg.train_images]
    x, y = toy_input(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ToyFeatureNet(cfg.feature_dim)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    net.train()
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    with tqdm(total=steps, desc="toy feature net", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                loss = F.cross_entropy(net(x[idx])[1], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
    net.eval().requires_grad_(False)
    test_images, test_labels = load_fashion_mnist("test", data_dir)
    acc = ToyFeatureSpace(net).accuracy(test_images, test_labels)
    logger.info("trained the toy feature net: %d images, %d epochs, test accuracy %.4f", len(x), cfg.epochs, acc)
    return net, acc


def load_toy_net(
    cfg: ToyFeatureConfig | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> ToyFeatureNet:
    """The cached toy feature network for `cfg`, trained and cached on first use (about half a minute on 2 cores)."""
    cfg = cfg or ToyFeatureConfig()
    key = hashlib.sha256(json.dumps({"v": _NET_VERSION} | cfg.model_dump(), sort_keys=True).encode()).hexdigest()
    path = Path(cache) if cache is not None else cache_dir() / "toy"
    path = path / f"fmnist_cnn_{key[:16]}.safetensors"
    net = ToyFeatureNet(cfg.feature_dim)
    if path.is_file():
        from safetensors.torch import load_file

        load_strict(
            net, load_file(str(path)), expected=f"ToyFeatureNet(feature_dim={cfg.feature_dim})", source=str(path)
        )
        logger.info("loaded the toy feature net from %s", path)
        return net.eval().requires_grad_(False)
    net, acc = train_toy_net(cfg, data_dir, progress=progress)
    save_safetensors(net.state_dict(), path, metadata={"config": cfg.model_dump_json(), "test_accuracy": f"{acc:.6f}"})
    logger.info("cached the toy feature net at %s", path)
    return net


@dataclass(frozen=True)
class ToyMetrics:
    """Image-level toy metrics of samples against a reference set, in the toy CNN's feature space."""

    fd: float
    kid: float
    precision: float
    recall: float
    density: float
    coverage: float
    classifier_is: float
    num_samples: int
    num_reference: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class ToyReference:
    """A reference set's features and k-NN radii, computed once (`ToyFeatureSpace.reference`) and passed to
    `metrics` for every method: the reference's N_r x N_r distances dominate a metrics call otherwise.
    Shapes: features (N_r, D), radii (N_r,) each."""

    features: Tensor
    k: int
    radii: Tensor  # k-NN radii for precision/recall
    coverage_k: int
    coverage_radii: Tensor  # coverage_k-NN radii for density/coverage

    def __len__(self) -> int:
        return self.features.shape[0]


class ToyFeatureSpace:
    """Features, metrics and class-conditional accuracy in the toy CNN's space.

    Example::

        space = ToyFeatureSpace(load_toy_net())
        ref, _ = load_fashion_mnist("test")
        print(space.metrics(samples_uint8, ref).to_dict())
    """

    def __init__(self, net: ToyFeatureNet, *, batch_size: int = 1000) -> None:
        self.net = net.eval()
        self.device = next(net.parameters()).device
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """Shapes: images (N, H, W[, 1|3]) uint8 -> features (N, feature_dim), logits (N, 10), float32 on CPU."""
        x = toy_input(images)
        feats, logits = [], []
        for start in range(0, len(x), self.batch_size):
            f, lg = self.net(x[start : start + self.batch_size].to(self.device))
            feats.append(f.cpu())
            logits.append(lg.cpu())
        return torch.cat(feats), torch.cat(logits)

    def accuracy(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
        """Fraction of images that the classifier assigns to their label (class-conditional sample quality)."""
        y = as_tensor(labels)
        if y.shape != (len(images),):
            raise EvalError(f"labels: expected shape ({len(images)},), got {tuple(y.shape)}")
        return float((self.features(images)[1].argmax(1) == y.cpu()).double().mean())

    def reference(self, images: np.ndarray | Tensor, *, k: int = 3, coverage_k: int = 5) -> ToyReference:
        """Features and k-NN radii of a reference set, for many `metrics` calls.  Shapes: images (N, H, W[, C])."""
        f_r, _ = self.features(images)
        return ToyReference(f_r, k, manifold_radii(f_r, k=k), coverage_k, manifold_radii(f_r, k=coverage_k))

    def metrics(
        self,
        samples: np.ndarray | Tensor,
        reference: np.ndarray | Tensor | ToyReference,
        *,
        k: int = 3,
        coverage_k: int = 5,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ) -> ToyMetrics:
        """FD, KID (features scaled to unit RMS of the reference, else the cubic kernel explodes), precision/recall
        (k = 3), density/coverage (k = 5) and classifier IS (one split, at most 10).  `reference`: images, or a
        `ToyReference` of this space (the same numbers, without recomputing the reference's features and radii)."""
        if not isinstance(reference, ToyReference):
            reference = self.reference(reference, k=k, coverage_k=coverage_k)
        elif (reference.k, reference.coverage_k) != (k, coverage_k):
            raise EvalError(f"reference: built for k = {reference.k}, coverage_k = {reference.coverage_k}; "
                            f"metrics asked for k = {k}, coverage_k = {coverage_k}")  # fmt: skip
        f_s, logits = self.features(samples)
        f_r = reference.features
        rms = f_r.pow(2).mean().sqrt().clamp_min(1e-12)
        pr = precision_recall(f_r, f_s, k=k, reference_radii=reference.radii)
        dc = density_coverage(f_r, f_s, k=coverage_k, real_radii=reference.coverage_radii)
        return ToyMetrics(
            fd=frechet_distance(feature_stats(f_s), feature_stats(f_r)),
            kid=kernel_inception_distance(
                f_s / rms, f_r / rms, num_subsets=kid_subsets, subset_size=kid_subset_size
            ).mean,
            precision=pr.precision,
            recall=pr.recall,
            density=dc.density,
            coverage=dc.coverage,
            classifier_is=inception_score(logits, split_size=len(logits)).mean,
            num_samples=len(f_s),
            num_reference=len(f_r),
        )
