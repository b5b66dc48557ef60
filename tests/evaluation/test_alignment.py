"""The camera measurement on synthetic scenes with known moves (``camera_scenes``): rendered for the
canonical square view and for camera edits exactly as the position map asks, ``align`` must recover
the edit."""

import math

import pytest
import torch

from camera_scenes import scene, view
from homediff.evaluation.alignment import (MIN_OVERLAP, Camera, align, predict, similarity,
                                           similarity_at)


@pytest.mark.parametrize("cam", [Camera(x=0.2), Camera(x=-0.4), Camera(y=0.4), Camera(y=-0.2),
                                 Camera(zoom=1.5), Camera(zoom=0.7), Camera(zoom=1.3, x=0.3, y=-0.1)])
def test_align_recovers_known_shifts_and_zooms(cam):
    field = scene(1)
    found = align(view(field, 32, 32), view(field, 32, 32, cam))
    assert found.camera.zoom == pytest.approx(cam.zoom, rel=0.01)
    assert found.camera.x == pytest.approx(cam.x, abs=0.01)
    assert found.camera.y == pytest.approx(cam.y, abs=0.01)
    assert found.similarity > 0.99


@pytest.mark.parametrize("height,width", [(32, 64), (64, 32), (32, 48)])
def test_align_finds_the_square_view_inside_a_wide_frame(height, width):
    field = scene(2)
    found = align(view(field, 32, 32), view(field, height, width))
    assert math.log(found.camera.zoom) == pytest.approx(0.0, abs=0.01)
    assert (found.camera.x, found.camera.y) == pytest.approx((0.0, 0.0), abs=0.01)


def test_large_images_are_measured_at_the_analysis_size():
    field = scene(3)
    cam = Camera(zoom=1.2, x=-0.25)
    found = align(view(field, 128, 128), view(field, 128, 128, cam))
    assert found.camera.zoom == pytest.approx(cam.zoom, rel=0.01)
    assert found.camera.x == pytest.approx(cam.x, abs=0.01)


def test_unrelated_scenes_score_below_the_same_scene():
    same, other = scene(4), scene(5)
    cam = Camera(x=0.4)
    canonical = view(same, 32, 32)
    consistent = align(canonical, view(same, 32, 32, cam)).similarity
    baseline = align(canonical, view(other, 32, 32, cam)).similarity
    assert consistent > 0.99 and baseline < consistent - 0.2
    assert similarity_at(canonical, view(same, 32, 32, cam), cam) > 0.99
    assert similarity_at(canonical, view(other, 32, 32, cam), cam) < 0.8


def test_prediction_is_the_canonical_view_on_its_own_grid():
    canonical = view(scene(6), 16, 16)
    pred, mask = predict(canonical, torch.zeros(1, 3), 16, 16)
    assert torch.equal(pred[0], canonical) and bool(mask.all())


def test_correlation_is_pearson_over_the_mask_and_refuses_small_overlaps():
    g = torch.Generator().manual_seed(0)
    image, pred = torch.rand(3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :, :4] = True  # half the image
    mask[1, :2, :2] = True  # below MIN_OVERLAP
    corr, overlap = similarity(image, pred.double(), mask)
    a, b = image[:, :, :4].flatten().double(), pred[0, :, :, :4].flatten().double()
    expected = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert float(corr[0]) == pytest.approx(float(expected), abs=1e-12)
    assert overlap.tolist() == [0.5, 4 / 64] and 4 / 64 < MIN_OVERLAP and float(corr[1]) == -1
