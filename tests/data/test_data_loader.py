import pytest
import torch
from imagefiles import save_image
from PIL import Image

from homediff.data import DataConfig, EpochSampler, FolderDataset, collate, hflip, make_loader
from homediff.data.crop import shifted_square_crop, to_tensor
from homediff.errors import ConfigError, HomediffError
from homediff.geometry import crop_window

#: a window's coordinates are float32 within [-1, 1], a rounding or two of ½ ulp of 1 from exact;
#: mirroring (x ↦ −x) is exact, so a mirrored window and a flipped one agree within 2·eps32
MIRRORED = dict(rtol=0, atol=2 * torch.finfo(torch.float32).eps)


def test_flip_mirrors_the_crop_and_its_window():
    full_h, full_w, size = 8, 20, 8
    for left in range(full_w - size + 1):
        pos = crop_window(full_h, full_w, 0, left, size, size)
        image = torch.arange(3 * size * size, dtype=torch.float32).view(3, size, size)
        flipped, flipped_pos = hflip(image, pos)
        assert torch.equal(flipped, image.flip(-1))
        mirrored = crop_window(full_h, full_w, 0, full_w - size - left, size, size)
        assert torch.allclose(flipped_pos, mirrored, **MIRRORED)
        twice = hflip(flipped, flipped_pos)
        assert torch.equal(twice[0], image) and torch.equal(twice[1], pos)


def test_flipped_crop_is_the_mirrored_window_of_the_mirrored_image(tmp_path):
    image = Image.open(save_image(tmp_path / "wide.png", 16, 40)).convert("RGB")
    whole_mirror = to_tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        crop = shifted_square_crop(image, 16, "random", generator)
        left = next(o for o in range(25)
                    if torch.equal(crop.pos, crop_window(16, 40, 0, o, 16, 16)))
        flipped, pos = hflip(crop.image, crop.pos)
        mirrored = 40 - 16 - left
        assert torch.equal(flipped, whole_mirror[:, :, mirrored:mirrored + 16])
        assert torch.allclose(pos, crop_window(16, 40, 0, mirrored, 16, 16), **MIRRORED)


def test_flip_probability_in_the_dataset(tmp_path):
    save_image(tmp_path / "wide.png", 16, 48, caption="x")
    always = FolderDataset(tmp_path, DataConfig(size=16, crop="center", flip=1.0), cache=False)[0]
    never = FolderDataset(tmp_path, DataConfig(size=16, crop="center"), cache=False)[0]
    assert torch.allclose(always["image"], never["image"].flip(-1))
    mirrored_x = -never["pos"].view(16, 16, 2).flip(1)[..., 1].reshape(-1)
    assert torch.allclose(always["pos"][:, 1], mirrored_x)


def sample(size=4, caption="c", key="k", problems=(), aspect=0.5):
    return {"image": torch.zeros(3, size, size), "pos": torch.zeros(size * size, 2),
            "aspect": aspect, "caption": caption, "key": key, "problems": list(problems)}


def test_collate_stacks_and_counts_problems():
    batch = collate([sample(caption="a", problems=["upscaled"]),
                     sample(caption="b", problems=["upscaled", "empty"], aspect=-1.0)])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["pos"].shape == (2, 16, 2)
    assert batch["aspect"].tolist() == [0.5, -1.0] and batch["aspect"].dtype == torch.float32
    assert batch["caption"] == ["a", "b"] and batch["problems"] == {"upscaled": 2, "empty": 1}
    with pytest.raises(HomediffError, match="differ in size"):
        collate([sample(4), sample(8)])


def test_epoch_sampler_splits_ranks_without_overlap_and_reshuffles():
    n = 10
    epoch0 = [list(EpochSampler(n, seed=3, rank=r, world_size=3)) for r in range(3)]
    flat = [i for part in epoch0 for i in part]
    assert all(len(part) == 3 for part in epoch0) and len(set(flat)) == 9
    assert all(0 <= i < n for i in flat)
    sampler = EpochSampler(n, seed=3, rank=0, world_size=1)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n, 2 * n))
    assert [i - n for i in second] != first
    with pytest.raises(ConfigError):
        EpochSampler(2, rank=0, world_size=3)


def test_epoch_sampler_resumes_inside_an_epoch():
    sampler = EpochSampler(12, seed=1, rank=1, world_size=2)
    sampler.set_epoch(3)
    whole = list(sampler)
    sampler.set_epoch(3, start=8)  # the samples both ranks have taken: 4 each
    assert len(sampler) == 2 and list(sampler) == whole[4:]
    assert len(sampler) == 6 and min(sampler) >= 4 * 12  # then on to epoch 4, from its start


@pytest.mark.parametrize("n, batch, world", [(5, 3, 2), (8, 12, 1), (2, 3, 3), (4, 2, 3)])
def test_an_epoch_smaller_than_a_batch_fills_it_from_the_next_epochs(n, batch, world):
    """With n < batch · world no epoch gives a batch: each pass is one batch per rank instead,
    dealt like an epoch from the shuffled epochs laid end to end, and goes on where it ended."""
    single = EpochSampler(n, seed=4, rank=0, world_size=1)
    stream = [i for epoch in range(2 * batch * world) for i in list(single)]  # epoch e: e·n + order
    for epoch, start in ((0, 0), (1, n - 1), (2, 1)):
        passes = []
        for rank in range(world):
            sampler = EpochSampler(n, seed=4, rank=rank, world_size=world, batch_size=batch)
            sampler.set_epoch(epoch, start)
            first = list(sampler)
            assert len(first) == batch and first == stream[epoch * n + start + rank::world][:batch]
            passes.append(list(sampler))  # the next pass goes on from there
        taken = epoch * n + start + batch * world
        assert [i for k in range(batch) for rank in range(world) for i in [passes[rank][k]]] == (
            stream[taken:taken + batch * world])


def test_loader_with_two_workers_matches_no_workers(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"{i}.png", 16, 24 + 4 * i, seed=i, caption=f"tag{i}, more")
    config = DataConfig(size=16, flip=0.5)
    dataset = FolderDataset(tmp_path, config, seed=1, cache=False)
    runs = []
    for workers in (0, 2):
        loader = make_loader(dataset, batch_size=3, workers=workers, seed=5)
        runs.append([batch for _ in range(2) for batch in loader])
    assert len(runs[0]) == len(runs[1]) == 4
    for a, b in zip(*runs):
        assert a["key"] == b["key"] and a["caption"] == b["caption"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["pos"], b["pos"])
    keys = [k for batch in runs[0][:2] for k in batch["key"]]
    assert len(set(keys)) == 6  # one epoch shows every image once


def test_loader_rejects_a_bad_batch_size(tmp_path):
    save_image(tmp_path / "a.png", caption="a")
    with pytest.raises(ConfigError, match="batch size"):
        make_loader(FolderDataset(tmp_path, cache=False), batch_size=0)
