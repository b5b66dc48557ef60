import tarfile
from collections import Counter, defaultdict

import pytest
import torch
from imagefiles import save_image

pytest.importorskip("webdataset", reason="shards need webdataset: pip install 'homediff[data]'")

from homediff.data import DataConfig, ShardDataset, ShardProgress, make_loader, pack_folder  # noqa: E402
from homediff.data.shards import shard_list  # noqa: E402
from homediff.errors import ConfigError, HomediffError  # noqa: E402

CONFIG = DataConfig(size=8, captions={"caption_dropout": 0.0})


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for i in range(23):
        save_image(root / ("2_sub" if i % 3 == 0 else ".") / f"img{i:02d}.png", 8, 8 + i % 5,
                   seed=i, caption=f"caption {i}")
    return root


def path_of(key: str) -> str:
    return key.rsplit(":", 1)[1]


def test_pack_writes_every_image_once_with_its_bytes_unchanged(folder, tmp_path):
    paths, written = pack_folder(folder, tmp_path / "shards", shard_size=5, seed=1)
    assert written == 23 and [p.name for p in paths] == [f"shard-{i:06d}.tar" for i in range(5)]
    members = {}
    for path in paths:
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    sources = [m for m in members if m.endswith(".path")]
    assert len(sources) == 23
    for name in sources:
        key, source = name[:-len(".path")], members[name].decode()
        assert members[f"{key}.png"] == (folder / source).read_bytes()
        assert members[f"{key}.txt"] == (folder / source).with_suffix(".txt").read_bytes()
    with pytest.raises(ConfigError, match="shard-size"):
        pack_folder(folder, tmp_path / "x", shard_size=0)


def test_pack_refuses_a_folder_that_holds_files(folder, tmp_path):
    """Packing again with bigger shards into the same folder would leave the old higher-numbered
    shards beside the new ones, and training would read both."""
    pack_folder(folder, tmp_path / "shards", shard_size=5)
    with pytest.raises(HomediffError, match="not empty; pack into a new folder"):
        pack_folder(folder, tmp_path / "shards", shard_size=50)
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 5


def keys_seen(shards, ranks, workers, epochs=1, batch_size=1):
    seen = []
    for rank in range(ranks):
        dataset = ShardDataset(shards, CONFIG, seed=4, epochs=epochs, rank=rank, world_size=ranks)
        for batch in make_loader(dataset, batch_size=batch_size, workers=workers):
            seen += [(batch["state"][2], path_of(k)) for k in batch["key"]]
    return seen


@pytest.mark.parametrize("shard_size", [5, 12])  # 5 shards ≥ 4 workers; 2 shards < 4 workers
def test_two_ranks_times_two_workers_see_every_sample_once_per_epoch(folder, tmp_path, shard_size):
    pack_folder(folder, tmp_path / "shards", shard_size=shard_size)
    seen = keys_seen(tmp_path / "shards", ranks=2, workers=2, epochs=2)
    expected = {str(p.relative_to(folder)) for p in folder.rglob("*.png")}
    for epoch in (0, 1):
        counts = Counter(key for e, key in seen if e == epoch)
        assert set(counts) == expected and set(counts.values()) == {1}


def by_worker(batches):
    streams = defaultdict(list)
    for batch in batches:
        streams[batch["state"][0]].append(batch["key"])
    return streams


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_where_it_stopped(folder, tmp_path, workers):
    pack_folder(folder, tmp_path / "shards", shard_size=5)

    def loader(state=None):
        dataset = ShardDataset(tmp_path / "shards", CONFIG, seed=9, epochs=2)
        if state:
            dataset.load_state_dict(state)
        return make_loader(dataset, batch_size=2, workers=workers)

    full = list(loader())
    progress, iterator = ShardProgress(), iter(loader())
    for _ in range(7):
        progress.update(next(iterator))
    del iterator
    saved = ShardProgress()
    saved.load_state_dict(progress.state_dict())  # e.g. through a checkpoint
    rest = list(loader(saved.state_dict()))
    if workers == 0:
        assert [b["key"] for b in rest] == [b["key"] for b in full[7:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[7:]))
    else:  # each worker's stream continues exactly; the interleaving may start with either
        done = Counter(b["state"][0] for b in full[:7])
        expected = {gid: keys[done[gid]:] for gid, keys in by_worker(full).items()}
        assert dict(by_worker(rest)) == {g: k for g, k in expected.items() if k}


def test_resuming_with_other_worker_counts_is_refused(folder, tmp_path):
    pack_folder(folder, tmp_path / "shards", shard_size=5)
    dataset = ShardDataset(tmp_path / "shards", CONFIG, epochs=1)
    dataset.load_state_dict({"world": 4, "positions": {"0": [0, 3]}})
    with pytest.raises(HomediffError, match="same numbers"):
        next(iter(dataset))
    fresh = ShardDataset(tmp_path / "shards", CONFIG, epochs=1)
    fresh.load_state_dict(ShardProgress().state_dict())  # nothing consumed yet: from the start
    assert len(list(fresh)) == 23


def test_bad_samples_and_a_bad_shard_are_skipped(folder, tmp_path):
    from webdataset import TarWriter
    shards = tmp_path / "shards"
    shards.mkdir()
    good = (folder / "img01.png").read_bytes()
    with TarWriter(str(shards / "a.tar"), encoder=False) as writer:
        writer.write({"__key__": "good", "png": good, "txt": b"fine"})
        writer.write({"__key__": "empty", "png": b"", "txt": b"x"})
        writer.write({"__key__": "captiononly", "txt": b"no image here"})
        writer.write({"__key__": "nocaption", "jpg": (folder / "img02.png").read_bytes()})
    (shards / "b.tar").write_bytes(b"this is not a tar file" * 50)
    dataset = ShardDataset(shards, CONFIG, epochs=1)
    samples = list(dataset)
    assert sorted(s["key"].rsplit(":", 1)[1] for s in samples) == ["good", "nocaption"]
    assert dataset.problems.counts["empty"] == 1 and dataset.problems.counts["no-image"] == 1
    assert dataset.problems.counts["bad-shard"] == 1
    assert dataset.problems.counts["missing-caption"] == 1
    assert sum(len(s["problems"]) for s in samples) == 4


def test_shard_list_accepts_folders_globs_braces_and_lists(tmp_path):
    for i in range(3):
        (tmp_path / f"data-{i:03d}.tar").touch()
    names = [str(tmp_path / f"data-{i:03d}.tar") for i in range(3)]
    assert shard_list(tmp_path) == names
    assert shard_list(str(tmp_path / "data-*.tar")) == names
    assert shard_list(str(tmp_path / "data-{000..001}.tar")) == names[:2]
    assert shard_list(names[1:]) == names[1:]
    with pytest.raises(HomediffError, match="no shards"):
        shard_list(tmp_path / "empty-folder-that-does-not-exist-*.tar")


def test_unreadable_shards_end_the_stream_with_a_clear_error(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"\0not a tar" * 100)
    with pytest.raises(HomediffError, match="found no samples"):
        next(iter(ShardDataset(tmp_path, CONFIG)))
