"""WebDataset shards: writer resumability, exactly-once reading over ranks x workers, pipe/http URLs, corrupt data."""

import functools
import http.server
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dd2_train.data import (
    DataError,
    TokenStream,
    read_shard_meta,
    tokenize_image_folder,
    write_shard,
    write_teacher_samples,
)

N, V, K = 4, 64, 3  # tokens, codebook, classes
META = {"kind": "test", "num_tokens": N, "vocab_size": V, "num_classes": K}


def _make_shards(folder: Path, shards: int = 8, per: int = 16) -> Path:
    """Sample j*per + k has ids [s % V, s // V, 0, 1] so that every sample is identifiable from its ids."""
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(shards):
        s = torch.arange(j * per, (j + 1) * per)
        ids = torch.stack([s % V, s // V, torch.zeros_like(s), torch.ones_like(s)], dim=1)
        write_shard(folder / f"shard-{j:06d}.tar", ids, s % K, {**META, "shard": j})
    return folder


def _ids(batch) -> list[int]:
    return (batch["ids"][:, 0] + V * batch["ids"][:, 1]).tolist()


def _stream(shards, **kw) -> TokenStream:
    opts = {"batch_size": 4, "num_tokens": N, "vocab_size": V, "num_classes": K, "shuffle_buffer": 8, "seed": 1}
    return TokenStream(shards, **(opts | kw))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _make_shards(tmp_path_factory.mktemp("shards"))


def test_two_ranks_two_workers_see_each_sample_exactly_once(shards):
    for epoch in range(2):  # shards are reshuffled over ranks every epoch, identically on every rank
        seen = []
        for rank in range(2):
            stream = _stream(str(shards), rank=rank, world_size=2, num_workers=2)
            got = [i for b in stream.epoch_batches(epoch) if "ids" in b for i in _ids(b)]
            assert len(got) == len(set(got)) == 64  # half the data, no repeats
            seen.append(set(got))
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(128))
    batch = next(_stream(str(shards), rank=0, world_size=2, num_workers=2))
    assert batch["ids"].shape == (4, N) and batch["ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], torch.tensor(_ids(batch)) % K)


def test_pipe_and_http_urls_stream_the_same_samples(shards):
    urls = [f"pipe:cat {p}" for p in sorted(shards.glob("*.tar"))]
    assert sorted(i for b in _stream(urls).epoch_batches(0) if "ids" in b for i in _ids(b)) == list(range(128))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000007}}.tar"
        got = [i for b in _stream(url, num_workers=2).epoch_batches(0) if "ids" in b for i in _ids(b)]
        assert sorted(got) == list(range(128))
        assert read_shard_meta(url.replace("{000000..000007}", "000003"))["shard"] == 3
    finally:
        server.shutdown()
        server.server_close()


def test_resume_position_replays_exactly(shards):
    a = _stream(str(shards), num_workers=2)
    for _ in range(27):  # 32 batches per epoch: stop near the end of epoch 0
        next(a)
    state = a.state_dict()
    rest = [_ids(next(a)) for _ in range(12)]  # crosses into epoch 1
    a.close()
    assert a.epoch == 1
    b = _stream(str(shards), num_workers=2)
    b.load_state_dict(state)
    assert [_ids(next(b)) for _ in range(12)] == rest
    b.close()


def test_corrupt_shard_is_a_clear_error_or_a_counted_skip(tmp_path, caplog):
    folder = _make_shards(tmp_path / "s", shards=4)
    bad = folder / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated mid-member
    with pytest.raises(DataError, match=r"shard-000002.tar.*corrupt or truncated.*skip_corrupt"):
        list(_stream(str(folder), shard_shuffle=False).epoch_batches(0))
    stream = _stream(str(folder), shard_shuffle=False, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="dd2_train.data"):
        got = [i for _ in range(20) for i in _ids(next(stream))]  # crosses the epoch end: the count is final
    assert stream.skipped >= 1
    assert any("skipping corrupt data in" in r.message and "shard-000002" in r.message for r in caplog.records)
    assert set(got) <= set(range(64)) and all(not 32 <= i < 48 or i < 32 + 5 for i in got)  # only intact samples


def test_invalid_samples_are_never_batched(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    write_shard(
        folder / "shard-000000.tar", torch.zeros(8, N, dtype=torch.long), torch.zeros(8, dtype=torch.long), META
    )
    write_shard(folder / "shard-000001.tar", torch.full((8, N), V + 5), torch.zeros(8, dtype=torch.long), META)
    with pytest.raises(DataError, match=r"shard-000001.tar:00000000: ids outside \[0, 64\)"):
        list(_stream(str(folder), shard_shuffle=False, shuffle_buffer=0).epoch_batches(0))
    stream = _stream(str(folder), shard_shuffle=False, shuffle_buffer=0, skip_corrupt=True)
    batches = [b for b in stream.epoch_batches(0) if "ids" in b]
    assert len(batches) == 2 and all(int(b["ids"].max()) < V for b in batches)
    with pytest.raises(DataError, match="need at least one shard per worker"):
        _stream(str(folder), world_size=2, num_workers=2)


def test_gen_data_writer_is_resumable_and_deterministic(tmp_path):
    calls = []

    def sample(labels, g):
        calls.append(labels.shape[0])
        return torch.randint(V, (labels.shape[0], N), generator=g)

    kw = {"num_samples": 100, "shard_size": 30, "batch_size": 16, "num_classes": K, "meta": META, "seed": 7}
    out = tmp_path / "shards"
    counts = write_teacher_samples(sample, out, **kw, rank=0, world_size=2, device=torch.device("cpu"))
    assert counts == {"written": 2, "skipped": 0, "shards": 2}  # shards 0 and 2 of 0..3 (30, 30, 30, 10)
    first = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000001.tar.partial").write_bytes(b"half a shard")  # rank 1 was killed while writing
    write_teacher_samples(sample, out, **kw, rank=1, world_size=2, device=torch.device("cpu"))
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{j:06d}.tar" for j in range(4)]
    calls.clear()
    counts = write_teacher_samples(sample, out, **kw, rank=0, world_size=2, device=torch.device("cpu"))
    assert counts == {"written": 0, "skipped": 2, "shards": 2} and calls == []
    # the same shard comes out identical when rewritten, whatever the world size
    (out / "shard-000000.tar").unlink()
    write_teacher_samples(sample, out, **kw, rank=0, world_size=1, device=torch.device("cpu"))
    ids = [
        b["ids"]
        for b in _stream(
            str(out / "shard-000000.tar"), shard_shuffle=False, shuffle_buffer=0, batch_size=30
        ).epoch_batches(0)
        if "ids" in b
    ]
    assert len(first) > 0 and ids[0].shape == (30, N)
    meta = read_shard_meta(str(out / "shard-000003.tar"))
    assert meta["count"] == 10 and meta["shard"] == 3 and meta["vocab_size"] == V
    with pytest.raises(DataError, match="written with other settings"):
        write_teacher_samples(
            sample, out, **(kw | {"meta": META | {"num_classes": 5}}), rank=0, world_size=1, device=torch.device("cpu")
        )


def test_tokenize_image_folder(tmp_path):
    from PIL import Image

    for c, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        (tmp_path / "img" / f"class{c}").mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (24 + 8 * k, 16), color).save(tmp_path / "img" / f"class{c}" / f"{k}.png")

    def encode(images):  # a 2x2 "tokenizer": the quantised mean red value of each quadrant
        q = torch.nn.functional.avg_pool2d(images[:, :1], 4).flatten(1)  # (B, 4) in [-1, 1]
        return ((q + 1) / 2 * (V - 1)).round().long()

    counts = tokenize_image_folder(
        encode,
        tmp_path / "img",
        tmp_path / "codes",
        resolution=8,
        vocab_size=V,
        shard_size=4,
        batch_size=2,
        meta={"num_tokens": N},
    )
    assert counts == {"written": 2, "skipped": 0, "classes": 2}
    stream = _stream(str(tmp_path / "codes"), batch_size=1, shuffle_buffer=0, shard_shuffle=False)
    rows = [(b["ids"][0].tolist(), int(b["labels"][0])) for b in stream.epoch_batches(0) if "ids" in b]
    assert rows == [([V - 1] * N, 0)] * 3 + [([0] * N, 1)] * 3
    assert np.isclose(read_shard_meta(str(tmp_path / "codes" / "shard-000000.tar"))["count"], 4)
