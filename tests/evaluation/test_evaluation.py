import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from homediff import evaluation as evaluate
from homediff.datasets.shapes import build_shapes_dataset
from homediff.errors import HomediffError
from homediff.evaluation import (EvalSettings, caption_ranks, frechet_distance, topk_accuracy,
                                 topk_standard_error)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ranks_take_each_captions_best_image_and_ties_favour_the_prompt():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    names = ["a", "b", "b", "c"]
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    ranks = caption_ranks(queries, ["a", "b", "a", "b", "b"], gallery, names)
    # b scores 0.77 against the first query through its image (1, 1): second after a's 0.995
    assert ranks.tolist() == [1, 2, 2, 1, 2]
    assert topk_accuracy(ranks, [1, 2, 3]) == [0.4, 1.0, 1.0]
    assert caption_ranks(torch.ones(1, 2), ["a"], torch.ones(2, 2), ["b", "a"]).tolist() == [1]
    with pytest.raises(ValueError, match="no gallery image"):
        caption_ranks(queries[:1], ["z"], gallery, names)


def test_standard_error_counts_each_caption_once():
    ranks = torch.tensor([1, 3, 1, 1, 2, 2])
    captions = ["a", "a", "b", "b", "c", "c"]
    # per-caption top-1 accuracy 0.5, 1, 0: sample std 0.5 over sqrt(3) captions
    assert topk_standard_error(ranks, captions, [1, 3]) == [pytest.approx(0.5 / 3 ** 0.5), 0.0]
    assert topk_standard_error(ranks[:2], captions[:2], [1]) == [None]


def test_retrieval_is_perfect_on_the_gallery_itself_and_chance_on_random_queries():
    generator = torch.Generator().manual_seed(0)
    gallery = torch.randn(50, 64, generator=generator)
    names = [f"caption {i}" for i in range(50)]
    assert topk_accuracy(caption_ranks(gallery, names, gallery, names), [1]) == [1.0]
    queries = torch.randn(4000, 64, generator=generator)
    prompts = [names[i % 50] for i in range(4000)]
    top1, top5 = topk_accuracy(caption_ranks(queries, prompts, gallery, names), [1, 5])
    assert top1 == pytest.approx(1 / 50, abs=0.007)  # 3 standard errors
    assert top5 == pytest.approx(5 / 50, abs=0.015)


def test_pixel_features_compare_images_by_their_correlation():
    """Cosine similarity of pixel features is the Pearson correlation of the downsampled images:
    1 for an image and a brighter, more contrasted copy, −1 for its negative, near 0 for noise."""
    from homediff.evaluation.fidelity import pixel_net

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = pixel_net(8).extract(torch.cat([image, 0.5 * image + 0.2, -image, other]).double())
    assert features.shape == (4, 3 * 8 * 8)
    cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(features, dim=1).T
    pooled = torch.nn.functional.avg_pool2d(torch.cat([image, other]).double(), 4).flatten(1)
    assert cos[0, 1] == pytest.approx(1.0, abs=1e-12) and cos[0, 2] == pytest.approx(-1.0, abs=1e-12)
    assert cos[0, 3] == pytest.approx(torch.corrcoef(pooled)[0, 1].item(), abs=1e-12)


def test_one_off_captions_are_those_whose_base_has_no_variant():
    from homediff.evaluation.common import one_off_captions

    known = ["medal", "woman", "woman: dark skin tone", "woman: light skin tone", "plug", "flag: France",
             "flag: Japan"]
    assert one_off_captions(["medal", "woman: dark skin tone", "woman", "flag: Japan", "plug"], known) == {
        "medal", "plug"}


def test_frechet_distance_of_gaussians():
    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(4000, 8, generator=generator, dtype=torch.float64)
         @ torch.randn(8, 8, generator=generator, dtype=torch.float64))
    # frechet_distance works in float64 through eigendecompositions, each eigenvalue within
    # n·eps64·‖M‖ (n = 8); for two sets with the same covariance Σ the cross term sums the square
    # roots of the eigenvalues of Σ^½ Σ Σ^½ = Σ² (≥ λmin²), which magnifies that by 1/(2·λmin):
    # with Σ^½ computed the same way, twice n terms of n·eps64·λmax²/(2·λmin)
    values = torch.linalg.eigvalsh(torch.cov(a.T))
    tolerance = 2 * 8 * 8 * torch.finfo(torch.float64).eps * float(values.max() ** 2 / (2 * values.min()))
    assert frechet_distance(a, a) == pytest.approx(0, abs=tolerance)
    shift = torch.arange(8.0, dtype=torch.float64) / 4
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), abs=tolerance)
    distances = [frechet_distance(a, a + s * shift) for s in (0.5, 1, 2)]
    assert distances == sorted(distances)
    wide = torch.randn(4000, 8, generator=generator) * 2  # N(0, 4I) against N(0, I): 8·(1 + 4 − 4)
    narrow = torch.randn(4000, 8, generator=generator)
    assert frechet_distance(narrow, wide) == pytest.approx(8, rel=0.1)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_held_out_captions_bring_their_nearest_seen_captions_as_distractors():
    train = {c: [] for c in ["OK hand: light skin tone", "OK hand: dark skin tone", "rocket",
                             "waving hand: medium skin tone", "cat face", "red apple"]}
    held = {"OK hand: medium skin tone": []}
    settings = EvalSettings(seen=2, distractors=3, seed=1)
    seen, heldout, distractors = evaluate.choose_captions(train, held, settings)
    assert heldout == ["OK hand: medium skin tone"] and len(seen) == 2
    assert set(seen) | set(distractors) >= {"OK hand: light skin tone", "OK hand: dark skin tone",
                                            "waving hand: medium skin tone"}
    assert not set(seen) & set(distractors)
    assert evaluate.choose_captions(train, held, settings)[0] == seen  # seeded


def test_evaluation_captions_follow_the_data_mix():
    """A caption with many images (a single shape) is drawn far more often than one-image captions."""
    train = {"a red circle": [Path(f"{i}.png") for i in range(60)],
             **{f"a red circle above a blue square {i}": [Path("x.png")] for i in range(20)}}
    picks = [evaluate.choose_captions(train, {}, EvalSettings(seen=3, seed=seed))[0]
             for seed in range(20)]
    assert sum("a red circle" in seen for seen in picks) >= 18
    assert all(len(seen) == 3 == len(set(seen)) for seen in picks)


class Oracle:
    """A stand-in pipeline that "generates" each prompt's first reference image (or noise)."""

    sample_size, device = 32, torch.device("cpu")

    def __init__(self, data, noise=False):
        train, held = evaluate.read_split(data)
        self.refs = {c: paths[0] for c, paths in (train | held).items()}
        self.noise, self.calls = noise, []

    def check_size(self, height, width):
        pass

    def set_progress_bar_config(self, **options):
        pass

    def __call__(self, prompts, height, width, num_images_per_prompt, generator, **settings):
        self.calls.append(settings)
        if self.noise:
            return SimpleNamespace(images=torch.stack([torch.rand(3, height, width, generator=g)
                                                       for g in generator]))
        images = [evaluate.load_image(self.refs[p], height) for p in prompts
                  for _ in range(num_images_per_prompt)]
        return SimpleNamespace(images=(torch.stack(images) + 1) / 2)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    build_shapes_dataset(root, size=32, count=30, heldout=8, seed=0)
    return root


FAST = dict(per_caption=1, seen=10, heldout=4, distractors=2, feature_size=64, cache=False)


def test_fidelity_of_a_model_that_returns_the_references(shapes_data, tmp_path):
    pipe = Oracle(shapes_data)
    report = evaluate.evaluate_fidelity(pipe, shapes_data, EvalSettings(**FAST, steps=3),
                                        out=tmp_path)
    assert pipe.calls[0]["num_inference_steps"] == 3 and pipe.calls[0]["output_type"] == "pt"
    for split, captions in (("seen", 10), ("heldout", 4)):
        for found in (report, report["pixels"]):  # EfficientNet features, then pixels
            assert found[split]["captions"] == found[split]["images"] == captions
            assert found[split]["topk"][0] == found[split]["ceiling"][0] == 1.0
    # shapes captions share no base: every seen caption is one-off
    assert report["seen_one_off"]["captions"] == 10 and report["seen_variants"]["captions"] == 0
    gallery = report["gallery"]["captions"]
    assert 14 <= gallery <= 14 + 8 and report["chance"][4] == pytest.approx(5 / gallery)
    assert report["fd"]["generated"] == pytest.approx(report["fd"]["round_trip"], abs=1e-3)
    assert report["fd"]["generated"] < 1e-2 and report["fd"]["samples"] == [14, 14]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["eval-samples.png", "eval-topk.png", "eval.json", "eval.md"]
    assert json.loads((tmp_path / "eval.json").read_text())["seen"]["topk"][0] == 1.0
    table = (tmp_path / "eval.md").read_text()
    assert "| top-1 retrieval | 100.0% ± 0.0 | 100.0% | 100.0% ± 0.0 | 100.0% |" in table
    assert "FD-EffNetLite0" in table and "not FID" in table
    assert "by the images' pixels at 16×16" in table
    assert "| top-5, seen one-off (10 captions) | 100.0% ± 0.0 | 100.0% | | | " in table


def test_noise_is_far_from_the_references(shapes_data):
    report = evaluate.evaluate_fidelity(Oracle(shapes_data, noise=True), shapes_data,
                                        EvalSettings(**{**FAST, "per_caption": 2}))
    assert report["seen"]["images"] == 20
    for found in (report, report["pixels"]):
        assert found["seen"]["topk"][0] <= 0.3 and found["heldout"]["topk"][0] <= 0.5
    assert report["fd"]["generated"] > 10 * max(report["fd"]["round_trip"], 1.0)


def test_shapes_scores_of_a_model_that_returns_the_references(shapes_data, tmp_path):
    report = evaluate.evaluate_shapes(Oracle(shapes_data), shapes_data,
                                      EvalSettings(**{**FAST, "per_caption": 2}), out=tmp_path)
    for split in ("seen", "heldout"):
        assert report[split]["rates"]["colour"] == report[split]["rates"]["shape"] == 1.0
        assert report[split]["rates"]["all"] == report[split]["ceiling"]["all"] == 1.0
        assert sum(len(r) for r in [report[split]["by_kind"]]) >= 1
    assert report["chance"]["all"] < 0.5
    table = (tmp_path / "shapes.md").read_text()
    assert "| colour | 100.0% | 100.0% | 100.0% | 100.0% |" in table
    assert (tmp_path / "shapes-samples.png").is_file()


def test_data_without_a_heldout_folder_is_explained(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(HomediffError, match="no heldout/ folder"):
        evaluate.read_split(tmp_path)


def test_settings_are_checked():
    with pytest.raises(HomediffError, match="per-caption must be at least 1"):
        EvalSettings(per_caption=0).check()


def test_one_split_alone_still_reports(shapes_data):
    report = evaluate.evaluate_fidelity(Oracle(shapes_data), shapes_data,
                                        EvalSettings(**{**FAST, "seen": 0, "heldout": 1}))
    assert report["seen"]["topk"][0] is None and report["heldout"]["topk"][0] == 1.0
    assert report["fd"]["generated"] is None  # one image is no distribution
    assert "| top-1 retrieval | – | – | 100.0% |" in evaluate.markdown(report)
    with pytest.raises(HomediffError, match="no evaluation captions"):
        evaluate.evaluate_fidelity(Oracle(shapes_data), shapes_data,
                                   EvalSettings(**{**FAST, "seen": 0, "heldout": 0}))
