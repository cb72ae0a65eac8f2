"""WebDataset shards of token ids: the `gen-data` writer, the streaming reader, and image-folder tokenisation.

Shard format (one tar per shard, WebDataset layout):
    __meta__                 JSON: kind, sampling settings, teacher, num_tokens, vocab_size, num_classes, seed,
                             shard index, count. WebDataset readers skip `__name__` members, so plain
                             `wds.WebDataset` pipelines see only the samples.
    <key>.ids.npy            (N,) int16 (V <= 32767) or int32 token ids
    <key>.cls                class label, ASCII integer
    <key>.noise.npy          (N, C) float32 noise, only in flow-map pair shards (gen-pairs: ids = F(noise) snapped)

Writing is resumable: a shard is written to `<name>.tar.partial` and renamed to `<name>.tar` when complete, so a
finished shard (the `.tar` exists) is skipped and a partial one is rewritten from scratch. Shard j belongs to rank
j % world and draws from its own generator seeded by (seed, j), so the data do not depend on the world size.

Reading (`TokenStream`) streams local paths, `pipe:` commands and http(s) URLs (WebDataset's gopen). Shards are
shuffled identically on every rank (seed, epoch), split by rank and then by DataLoader worker, samples pass a
shuffle buffer seeded by (seed, epoch, rank, worker) and are batched inside each worker with `partial=False`. The
stream is endless (epoch after epoch), so ranks never run out of batches at different steps; its position
(epoch, batches) is saved in checkpoints and restored by replaying the epoch's batches.

Every sample is checked (members, id range, length, label range). A corrupt or truncated shard or sample raises a
`DataError` naming the URL, or with `skip_corrupt=True` is logged as a warning and counted (`TokenStream.skipped`):
never a silently wrong batch.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dd2_core.errors import DD2Error

logger = logging.getLogger(__name__)

META_MEMBER = "__meta__"
SHARD_PATTERN = "shard-{:06d}.tar"
_REMOTE = ("pipe:", "http://", "https://")


class DataError(DD2Error, RuntimeError):
    """A shard or sample cannot be read or is not what the run expects."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -- shard lists ----------------------------------------------------------------------------------------------------
def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """URLs of every shard: a local folder (its *.tar, sorted), a brace pattern (`a-{000..009}.tar`), a
    `pipe:` command or http(s) URL (kept as given, braces expanded), or a list of those."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if not item.startswith(_REMOTE) and os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise DataError(f"shards: folder {item!r} holds no *.tar files; run the gen-data stage first")
            urls += found
        else:
            urls += list(braceexpand.braceexpand(item))
    if not urls:
        raise DataError(f"shards: {spec!r} expands to no shard URL")
    return urls


# -- writing ---------------------------------------------------------------------------------------------------------
def _ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def write_shard(path: Path, ids: Tensor, labels: Tensor, meta: Mapping[str, Any], noise: Tensor | None = None) -> None:
    """Write one complete shard atomically (`.partial` then rename).
    Shapes: ids (M, N), labels (M,), noise (M, N, C) (flow-map pairs only)."""
    if ids.dim() != 2 or labels.shape != (ids.shape[0],):
        raise DataError(
            f"write_shard: expected ids (M, N) and labels (M,), got {tuple(ids.shape)}, {tuple(labels.shape)}"
        )
    if noise is not None and (noise.dim() != 3 or noise.shape[:2] != ids.shape):
        raise DataError(f"write_shard: expected noise (M, N, C) = ({ids.shape[0]}, {ids.shape[1]}, C), got "
                        f"{tuple(noise.shape)}")  # fmt: skip
    noise_np = noise.detach().float().cpu().numpy() if noise is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    dtype = _ids_dtype(int(meta["vocab_size"]))
    ids_np = ids.cpu().numpy().astype(dtype)
    labels_np = labels.cpu().numpy()
    meta_bytes = json.dumps({**meta, "count": int(ids.shape[0])}, sort_keys=True).encode()
    with open(partial, "wb") as f:
        with wds.TarWriter(f) as writer:
            info = tarfile.TarInfo(META_MEMBER)
            info.size, info.mtime, info.mode = len(meta_bytes), int(time.time()), 0o444
            writer.tarstream.addfile(info, io.BytesIO(meta_bytes))
            for k in range(ids_np.shape[0]):
                sample = {"__key__": f"{k:08d}", "ids.npy": ids_np[k], "cls": int(labels_np[k])}
                if noise_np is not None:
                    sample["noise.npy"] = noise_np[k]
                writer.write(sample)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def read_shard_meta(url: str) -> dict:
    """The `__meta__` member of a shard (the first member of every shard this module writes)."""
    stream = wds.gopen(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.name == META_MEMBER:
                    return json.loads(tar.extractfile(member).read())
                break
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"shard {url!r}: cannot read its metadata ({type(e).__name__}: {e})") from e
    finally:
        stream.close()
    raise DataError(f"shard {url!r}: has no {META_MEMBER} member first; was it written by dd2 gen-data/tokenize?")


def shard_plan(num_samples: int, shard_size: int) -> list[int]:
    """Samples per shard: full shards, then the remainder."""
    full, rest = divmod(num_samples, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def write_teacher_samples(
    sample_fn: Callable[[Tensor, torch.Generator], Tensor | tuple[Tensor, Tensor]],
    out_dir: Path,
    *,
    num_samples: int,
    shard_size: int,
    batch_size: int,
    num_classes: int,
    meta: Mapping[str, Any],
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    stage: str = "gen-data",
) -> dict[str, int]:
    """Write this rank's shards of teacher samples; finished shards are skipped, partial ones rewritten.

    `sample_fn(labels (b,), generator) -> ids (b, N)` samples the teacher, or `-> (ids (b, N), noise (b, N, C))` for
    flow-map pairs (`stage` "gen-pairs"). Shard j (rank j % world) draws its labels uniformly and its samples from a
    generator seeded by (seed, stage, j). `meta` (sampling settings, teacher, sizes) goes
    into every shard and must equal that of shards already present. Returns counts of written and skipped shards.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(num_samples, shard_size)
    mine = list(range(rank, len(plan), world_size))
    written = skipped = 0
    start = time.perf_counter()
    done_samples = 0
    for j in mine:
        path = out_dir / SHARD_PATTERN.format(j)
        if path.is_file():
            found = read_shard_meta(str(path))
            expected = {**meta, "shard": j, "count": plan[j]}
            if {k: found.get(k) for k in expected} != expected:
                diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
                raise DataError(
                    f"{stage}: {path} was written with other settings (found, expected): {diff}; "
                    f"write to a new {stage.replace('-', '_')}.out_dir or delete the old shards"
                )
            skipped += 1
            continue
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, stage, j))
        labels = torch.randint(num_classes, (plan[j],), generator=g, device=device)
        parts = [sample_fn(labels[i : i + batch_size], g) for i in range(0, plan[j], batch_size)]
        if isinstance(parts[0], tuple):
            ids, noise = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            ids, noise = torch.cat(parts), None
        write_shard(path, ids, labels, {**meta, "shard": j}, noise)
        written += 1
        done_samples += plan[j]
        rate = done_samples / (time.perf_counter() - start)
        left = sum(plan[i] for i in mine if i > j)
        logger.info(
            "%s: wrote %s (%d/%d shards of this rank) | %.1f samples/s | eta %ds",
            stage,
            path.name,
            mine.index(j) + 1,
            len(mine),
            rate,
            int(left / rate) if rate > 0 else -1,
        )
    return {"written": written, "skipped": skipped, "shards": len(mine)}


# -- reading ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ReadSpec:
    """What the reading workers need (kept apart from TokenStream: no reference cycle delays its cleanup)."""

    urls: tuple[str, ...]
    batch_size: int
    num_tokens: int
    vocab_size: int
    num_classes: int
    rank: int
    world_size: int
    shuffle_buffer: int
    shard_shuffle: bool
    skip_corrupt: bool
    seed: int
    token_dim: int | None = None  # set: flow-map pair shards, each sample also holds noise (N, C)


class _ShardDataset(IterableDataset):
    """One epoch of one rank's batches; split further by DataLoader worker."""

    def __init__(self, spec: _ReadSpec, epoch: int):
        super().__init__()
        self.s, self.epoch = spec, epoch
        self.skipped = 0

    def _urls(self, worker: int, num_workers: int) -> list[str]:
        s = self.s
        urls = list(s.urls)
        if s.shard_shuffle:
            g = torch.Generator().manual_seed(derive_seed(s.seed, "shards", self.epoch))  # same order on all ranks
            urls = [urls[i] for i in torch.randperm(len(urls), generator=g).tolist()]
        return urls[s.rank :: s.world_size][worker::num_workers]

    def _skip_or_raise(self, url: str, exn: Exception) -> None:
        """Raise a DataError naming the shard, or (skip_corrupt) log it, count it and go on."""
        if not self.s.skip_corrupt:
            if isinstance(exn, DataError):
                raise exn
            what = exn.args[0] if exn.args else exn
            raise DataError(
                f"shard {url!r} is corrupt or truncated ({type(exn).__name__}: {what}); re-create it "
                "(gen-data rewrites missing shards) or set data.skip_corrupt=true to skip and count it"
            ) from exn
        self.skipped += 1
        logger.warning("skipping corrupt data in %s (%s: %s)", url, type(exn).__name__, exn)

    def _shard_samples(self, url: str) -> Iterator[dict]:
        """Raw samples of one shard; an unreadable shard stops at the error (what came before it is intact)."""
        try:
            stream = wds.gopen(url)
        except Exception as e:
            self._skip_or_raise(url, e)
            return
        try:
            files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
            yield from wds.tariterators.group_by_keys(files)  # grouped per shard: no sample spans two shards
        except Exception as e:
            self._skip_or_raise(url, e)
        finally:
            stream.close()

    def _decode(self, url: str, sample: dict) -> tuple[str, np.ndarray, int, np.ndarray | None] | None:
        s = self.s
        key = f"{url}:{sample.get('__key__')}"
        try:
            fields = {k for k in sample if not k.startswith("__")}
            expected = {"ids.npy", "cls"} | ({"noise.npy"} if s.token_dim else set())
            if fields != expected:
                raise DataError(f"sample {key}: expected members {sorted(expected)}, found {sorted(fields)}")
            noise = None
            if s.token_dim:
                noise = np.load(io.BytesIO(sample["noise.npy"]), allow_pickle=False)
                if noise.shape != (s.num_tokens, s.token_dim) or noise.dtype != np.float32:
                    raise DataError(f"sample {key}: expected noise float32 ({s.num_tokens}, {s.token_dim}), got "
                                    f"{noise.dtype} {noise.shape}")  # fmt: skip
            ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
            label = int(sample["cls"])
            if ids.shape != (s.num_tokens,) or ids.dtype.kind not in "iu":
                raise DataError(f"sample {key}: expected ids of shape ({s.num_tokens},), got {ids.shape} {ids.dtype}")
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= s.vocab_size):
                raise DataError(f"sample {key}: ids outside [0, {s.vocab_size}): [{ids.min()}, {ids.max()}]")
            if not 0 <= label < s.num_classes:
                raise DataError(f"sample {key}: label {label} outside [0, {s.num_classes})")
        except Exception as e:
            self._skip_or_raise(
                url, e if isinstance(e, DataError) else DataError(f"sample {key}: cannot be decoded ({e})")
            )
            return None
        return key, ids.astype(np.int64), label, noise

    def _samples(self, urls: list[str]) -> Iterator[tuple[str, np.ndarray, int, np.ndarray | None]]:
        for url in urls:
            for sample in self._shard_samples(url):
                decoded = self._decode(url, sample)
                if decoded is not None:
                    yield decoded

    def __iter__(self) -> Iterator[dict]:
        s = self.s
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = self._samples(self._urls(worker, num_workers))
        if s.shuffle_buffer > 1:
            seed = derive_seed(s.seed, "samples", self.epoch, s.rank, worker)
            samples = wds.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, seed=seed)(samples)
        batch: list[tuple[str, np.ndarray, int, np.ndarray | None]] = []
        for item in samples:
            batch.append(item)
            if len(batch) == s.batch_size:  # partial=False: the remainder of each worker is dropped
                out = {
                    "ids": torch.from_numpy(np.stack([b[1] for b in batch])),  # (B, N)
                    "labels": torch.tensor([b[2] for b in batch], dtype=torch.long),  # (B,)
                    "keys": [b[0] for b in batch],
                }
                if s.token_dim:
                    out["noise"] = torch.from_numpy(np.stack([b[3] for b in batch]))  # (B, N, C)
                yield out
                batch = []
        yield {"end_of_worker": worker, "skipped": self.skipped}


def _epoch_batches(spec: _ReadSpec, epoch: int, num_workers: int) -> Iterator[dict]:
    """A function, not a TokenStream method: the generator must not reference the stream (see _ReadSpec)."""
    dataset = _ShardDataset(spec, epoch)
    if num_workers == 0:
        yield from dataset
        return
    yield from DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(derive_seed(spec.seed, "loader", epoch, spec.rank)),  # not global
    )


class TokenStream:
    """Endless per-rank stream of {"ids" (B, N) int64, "labels" (B,) int64, "keys"} batches from token shards
    (with `token_dim`: flow-map pair shards, and "noise" (B, N, C) float32 too).

    Shapes: each batch ids (batch_size, num_tokens), labels (batch_size,).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        batch_size: int,
        num_tokens: int,
        vocab_size: int,
        num_classes: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        shard_shuffle: bool = True,
        skip_corrupt: bool = False,
        seed: int = 0,
        token_dim: int | None = None,
    ):
        self._it: Iterator[dict] | None = None
        self.urls = expand_shards(shards)
        if len(self.urls) < world_size * max(num_workers, 1):
            raise DataError(
                f"data.shards: {len(self.urls)} shards for {world_size} ranks x {max(num_workers, 1)} workers; "
                "need at least one shard per worker (write more, smaller shards or lower data.num_workers)"
            )
        if len(self.urls) % (world_size * max(num_workers, 1)):
            logger.warning(
                "%d shards do not split evenly over %d ranks x %d workers: epochs differ in length between workers",
                len(self.urls),
                world_size,
                max(num_workers, 1),
            )
        self.spec = _ReadSpec(
            urls=tuple(self.urls),
            batch_size=batch_size,
            num_tokens=num_tokens,
            vocab_size=vocab_size,
            num_classes=num_classes,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=shuffle_buffer,
            shard_shuffle=shard_shuffle,
            skip_corrupt=skip_corrupt,
            seed=seed,
            token_dim=token_dim,
        )
        self.rank, self.batch_size, self.num_workers, self.seed = rank, batch_size, num_workers, seed
        self.epoch, self.batches = 0, 0
        self.skipped = 0  # corrupt shards/samples skipped so far (skip_corrupt), this rank
        self._epoch_skips: dict[int, int] = {}

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """All batches of one epoch of this rank, in order (also used by tests)."""
        return _epoch_batches(self.spec, epoch, self.num_workers)

    def _next_item(self) -> dict:
        if self._it is None:
            self._it = self.epoch_batches(self.epoch)
            self._epoch_skips = {}
        return next(self._it)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> dict:
        empty_epochs = 0
        while True:
            try:
                item = self._next_item()
            except StopIteration:
                if self.batches == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise DataError(
                            f"data.shards: rank {self.rank} read a whole epoch without one full batch of "
                            f"{self.batch_size}; need at least batch_size samples per worker"
                        ) from None
                self.skipped += sum(self._epoch_skips.values())
                self.epoch, self.batches, self._it = self.epoch + 1, 0, None
                continue
            if "end_of_worker" in item:
                self._epoch_skips[int(item["end_of_worker"])] = int(item["skipped"])
                continue
            self.batches += 1
            return item

    def close(self) -> None:
        """Stop the DataLoader workers now (left to the garbage collector, their shutdown waits ~5 s each)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def __del__(self) -> None:
        self.close()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at (epoch, batches): the epoch's first `batches` batches are read again and dropped."""
        self.close()
        self.epoch, self.skipped = int(state["epoch"]), int(state["skipped"])
        self.batches = 0
        for _ in range(int(state["batches"])):
            next(self)
        if self.epoch != int(state["epoch"]):
            raise DataError(f"data stream: could not replay {state['batches']} batches of epoch {state['epoch']}")


# -- tokenising an image folder (adapt stage input) -----------------------------------------------------------------
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG"}


def list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageNet layout: one sub-folder per class (sorted names -> class ids 0..K-1). Returns (path, label), classes."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"images: {str(root)!r} has no class sub-folders (expected <root>/<class>/<image>)")
    items = [
        (p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir()) if p.suffix in _IMAGE_EXT
    ]
    if not items:
        raise DataError(f"images: no image files ({sorted(_IMAGE_EXT)}) under {str(root)!r}")
    return items, classes


def load_image(path: Path, resolution: int) -> Tensor:
    """Center crop to a square, resize to `resolution`, scale to [-1, 1].  Shapes: -> (3, H, W) float32."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tokenize_image_folder(
    encode: Callable[[Tensor], Tensor],
    images: Path,
    out_dir: Path,
    *,
    resolution: int,
    vocab_size: int,
    shard_size: int,
    batch_size: int,
    meta: Mapping[str, Any],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, int]:
    """Encode an image folder into token shards for the `adapt` stage (same format as gen-data; resumable).

    `encode(images (B, 3, H, W) in [-1, 1]) -> ids (B, N)` is the family's VQ tokenizer.
    """
    items, classes = list_image_folder(images)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(len(items), shard_size)
    written = skipped = 0
    for j in range(rank, len(plan), world_size):
        path = out_dir / SHARD_PATTERN.format(j)
        if path.is_file():
            skipped += 1
            continue
        chunk = items[j * shard_size : j * shard_size + plan[j]]
        ids = []
        for i in range(0, len(chunk), batch_size):
            batch = torch.stack([load_image(p, resolution) for p, _ in chunk[i : i + batch_size]]).to(device)
            with torch.no_grad():
                ids.append(encode(batch).cpu())
        labels = torch.tensor([c for _, c in chunk])
        write_shard(
            path,
            torch.cat(ids),
            labels,
            {**meta, "kind": "image-codes", "vocab_size": vocab_size, "num_classes": len(classes), "shard": j},
        )
        written += 1
        logger.info("tokenize: wrote %s (%d images)", path.name, len(chunk))
    return {"written": written, "skipped": skipped, "classes": len(classes)}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dd2_train.data tokenize --config CFG --images DIR --out DIR`: image folder -> adapt shards."""
    parser = argparse.ArgumentParser(prog="python -m dd2_train.data", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenize", help="encode an ImageNet-style folder with the teacher family's VQ tokenizer")
    tok.add_argument("--config", required=True, help="TrainConfig file naming the teacher (family, vq_ckpt)")
    tok.add_argument("--images", required=True, type=Path, help="<root>/<class>/<image> folder")
    tok.add_argument("--out", required=True, type=Path, help="output folder of shard-NNNNNN.tar")
    tok.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    tok.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    tok.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)

    from dd2_train.build import build_tokenizer
    from dd2_train.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.set)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    tokenizer = build_tokenizer(cfg.teacher, device=device)
    counts = tokenize_image_folder(
        tokenizer.encode,
        args.images,
        args.out,
        resolution=tokenizer.resolution,
        vocab_size=tokenizer.vocab_size,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        meta={"teacher": cfg.teacher.family, "size": cfg.teacher.size, "num_tokens": tokenizer.num_tokens},
        rank=rank,
        world_size=world,
        device=device,
    )
    logger.info("tokenize: %s", json.dumps(counts))


if __name__ == "__main__":
    main()
