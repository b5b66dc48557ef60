import pytest
import torch
from tiny_components import tiny_vae

from homediff.encoders.autoencoders import KLAutoencoder, PixelAutoencoder, load_autoencoder
from homediff.errors import CheckpointError, ConfigError

MEAN, STD = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 4.0]
EPS32 = torch.finfo(torch.float32).eps


def images(n=3, h=8, w=12, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_identity_and_unshuffle_round_trip():
    x = images()
    assert torch.equal(PixelAutoencoder().encode(x), x)
    ae = PixelAutoencoder(factor=2)
    z = ae.encode(x)
    assert (ae.channels, ae.factor) == (12, 2) and z.shape == (3, 12, 4, 6)
    assert torch.equal(z[:, :4, 0, 0].flatten(), x[:, 0, :2, :2].flatten(1).flatten())
    assert torch.equal(ae.decode(z), x)


def test_pixel_save_and_load(tmp_path):
    PixelAutoencoder(factor=4, image_channels=1).save_pretrained(tmp_path)
    ae = load_autoencoder(tmp_path)
    assert isinstance(ae, PixelAutoencoder) and (ae.channels, ae.factor) == (16, 4)
    assert load_autoencoder("pixel", factor=2).channels == 12
    with pytest.raises(ConfigError, match="factor and image_channels must be positive"):
        PixelAutoencoder(factor=0)


def test_kl_normalises_per_channel_with_the_config_statistics():
    """encode is (z − mean) / std and decode undoes it before the VAE's decoder.

    The VAE runs in float64 here; the autoencoder normalises in float32 by design. encode rounds
    z to float32, subtracts and divides: three roundings of ½ ulp, each at most eps32/2 of
    |z|/std or of the result, so |error| ≤ eps32·(|z|/std + |result|) per element. decode is
    checked against the VAE's decoder fed z·std + mean as the autoencoder rounds it (float32):
    the same float64 decoder on the same input, up to the decoded image's rounding to float32.
    """
    vae = tiny_vae(latents_mean=MEAN, latents_std=STD).double()
    ae = KLAutoencoder(vae, sample=False)
    assert (ae.channels, ae.factor) == (4, 2)
    x = images()
    z = vae.encode(x.double()).latent_dist.mode()
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    encoded = ae.encode(x)
    assert encoded.shape == (3, 4, 4, 6) and encoded.dtype == torch.float32 and not encoded.requires_grad
    expected = (z - mean) / std
    assert ((encoded - expected).abs() <= EPS32 * (z.abs() / std + expected.abs())).all()
    decoded = vae.decode((encoded * std + mean).double()).sample
    assert ((ae.decode(encoded) - decoded).abs() <= EPS32 * decoded.abs()).all()


def test_kl_falls_back_to_scaling_and_shift_factors():
    ae = KLAutoencoder(tiny_vae(scaling_factor=0.25, shift_factor=0.5))
    assert torch.equal(ae.mean.flatten(), torch.full((4,), 0.5))
    assert torch.equal(ae.std.flatten(), torch.full((4,), 4.0))
    plain = KLAutoencoder(tiny_vae(scaling_factor=0.25))
    assert torch.equal(plain.mean.flatten(), torch.zeros(4))


def test_kl_encodes_in_batches_and_samples_from_the_generator():
    """Chunks of 1 and of 4 images encode alike. In float64 the VAE's two batchings differ by
    ~1e-15; rounding z to float32 can then land one ulp apart, and the float32 normalisation
    (two roundings) adds at most an ulp of the result: 2 ulps of the largest latent."""
    vae = tiny_vae().double()
    x = images(n=5)
    one, four = KLAutoencoder(vae, sample=False, batch_size=1), KLAutoencoder(vae, sample=False)
    expected = four.encode(x)
    assert (one.encode(x) - expected).abs().max() <= 2 * EPS32 * expected.abs().max()
    stochastic = KLAutoencoder(vae, batch_size=2)
    a = stochastic.encode(x, torch.Generator().manual_seed(1))
    b = stochastic.encode(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, four.encode(x))


def test_kl_save_and_load_keep_weights_and_statistics(tmp_path):
    ae = KLAutoencoder(tiny_vae(), mean=MEAN, std=STD, sample=False)
    ae.save_pretrained(tmp_path)
    loaded = load_autoencoder(tmp_path)
    assert isinstance(loaded, KLAutoencoder) and not loaded.sample
    assert torch.equal(loaded.std.flatten(), torch.tensor(STD))
    x = images(n=2)
    assert torch.equal(loaded.encode(x), ae.encode(x))
    # a plain diffusers folder loads too, with its config's statistics
    ae.vae.save_pretrained(tmp_path / "plain")
    assert torch.equal(load_autoencoder(tmp_path / "plain").mean.flatten(), torch.zeros(4))


def test_kl_from_weights_checks_them(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path)
    state = vae.state_dict()
    ae = KLAutoencoder.from_weights(tmp_path, state, mean=MEAN, std=STD)
    assert torch.equal(ae.vae.state_dict()["decoder.conv_out.weight"], state["decoder.conv_out.weight"])
    del state["decoder.conv_out.weight"]
    with pytest.raises(CheckpointError, match="missing.*decoder.conv_out.weight"):
        KLAutoencoder.from_weights(tmp_path, state)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="need 1 or 4 values"):
        KLAutoencoder(tiny_vae(), mean=[0, 0], std=[1, 1])
    with pytest.raises(CheckpointError, match="cannot load the VAE"):
        load_autoencoder(tmp_path / "absent")
    (tmp_path / "autoencoder.json").write_text('{"type": "vqgan"}')
    with pytest.raises(ConfigError, match="unknown autoencoder type 'vqgan'"):
        load_autoencoder(tmp_path)
