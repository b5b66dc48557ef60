import json

import torch

from homediff.caching import (FileCache, MemoryCache, TensorShards, cache_key, cached_rows,
                              json_file_cache, tensor_file_cache)


def test_keys_depend_on_every_part_and_its_type():
    assert cache_key("a", 1) == cache_key("a", 1)
    assert len({cache_key("a", 1), cache_key("a", 2), cache_key("a", "1"), cache_key(["a", 1]),
                cache_key("a", 1, None)}) == 5


def test_tensor_shards_round_trip_and_reload(tmp_path):
    cache = TensorShards(tmp_path, shard_size=3)
    for i in range(7):
        cache.put(cache_key("row", i), torch.full((2, 2), float(i)))
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2  # 6 flushed, 1 pending
    cache.flush()
    again = TensorShards(tmp_path)
    assert len(again) == 7
    assert torch.equal(again.get(cache_key("row", 5)), torch.full((2, 2), 5.0, dtype=torch.float16))
    assert again.get(cache_key("row", 9)) is None


def test_cached_rows_computes_only_what_is_missing(tmp_path):
    calls = []

    def compute(indices):
        calls.append(list(indices))
        return [torch.tensor([float(i)]) for i in indices]

    for cache in (TensorShards(tmp_path), MemoryCache(8), tensor_file_cache(tmp_path / "files")):
        calls.clear()
        cached_rows(cache, ["a", "b"], compute)
        rows = cached_rows(cache, ["a", "b", "c"], compute)
        assert calls == [[0, 1], [2]], type(cache)
        assert rows.flatten().tolist() == [0.0, 1.0, 2.0]
    calls.clear()
    rows = cached_rows(MemoryCache(0), ["a", "b"], compute)  # keeps nothing, still answers
    assert rows.flatten().tolist() == [0.0, 1.0] and calls == [[0, 1]]


def test_memory_cache_keeps_the_most_recently_used():
    cache = MemoryCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now b is the oldest
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_file_cache_misses_on_a_damaged_entry_and_skips_an_unwritable_folder(tmp_path, caplog):
    cache = json_file_cache(tmp_path / "json")
    cache.put("k" * 64, {"x": [1, 2]})
    assert cache.get("k" * 64) == {"x": [1, 2]}
    cache.path("k" * 64).write_text("{not json")
    with caplog.at_level("INFO"):
        assert cache.get("k" * 64) is None
    assert "unreadable cache entry" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder should be
    unwritable = FileCache(blocked / "sub", ".json", json.loads, lambda v, p: p.write_text(v))
    with caplog.at_level("INFO"):
        unwritable.put("key", "value")
    assert "cannot write the cache" in caplog.text and unwritable.get("key") is None
    tensors = tensor_file_cache(tmp_path / "tensors")
    tensors.put("t", torch.arange(6.0).reshape(2, 3))
    assert torch.equal(tensors.get("t"), torch.arange(6.0).reshape(2, 3))
