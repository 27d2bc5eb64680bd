"""The UNet stage's data: what the UNet is trained on is a sample of the autoencoder's posterior, as in LDM."""

import torch

from ldm_runtime.config import AutoencoderConfig
from ldm_runtime.models import Autoencoder
from ldm_train.train_unet import encode_dataset, training_latents

TINY_AUTOENCODER = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                     num_groups=4)


class CaptionsOnly:
    """The part of a trainable text encoder that ``encode_dataset`` uses: tokens for each distinct caption."""

    trainable = True

    def tokenize(self, prompts):
        return torch.zeros(len(prompts), 4, dtype=torch.long), torch.ones(len(prompts), 4, dtype=torch.long)


def test_unet_training_latents_are_posterior_samples_with_the_posterior_spread(seed):
    torch.manual_seed(seed)
    autoencoder = Autoencoder(TINY_AUTOENCODER).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    dataset = [(image, f"caption {index}") for index, image in enumerate(images)]

    data = encode_dataset(dataset, autoencoder, CaptionsOnly(), torch.device("cpu"), batch_size=2,
                          show_progress=False)

    with torch.no_grad():
        posterior = autoencoder.encode(images)
    posterior_std = torch.exp(0.5 * posterior.logvar)
    assert posterior_std.min() > 0.1  # a spread worth sampling, so zeros cannot pass
    torch.testing.assert_close(data.latent_mean, posterior.mean)
    torch.testing.assert_close(data.latent_std, posterior_std)

    scale, draws = 0.7, 4000
    indices = torch.tensor([0, 2])
    generator = torch.Generator().manual_seed(seed)
    latents = torch.stack([training_latents(data, indices, generator, scale) for _ in range(draws)])
    spread = latents.std(dim=0)
    # The std of a 4000-draw sample std is 1.1 % of the true std: 10 % over every element is a loose bound.
    torch.testing.assert_close(spread, scale * posterior_std[indices], rtol=0.1, atol=0)
    torch.testing.assert_close(latents.mean(dim=0), scale * posterior.mean[indices],
                               rtol=0, atol=0.1 * scale * float(posterior_std.max()))


def test_vq_autoencoder_posterior_is_a_point_mass_with_zero_spread(seed):
    torch.manual_seed(seed)
    config = AutoencoderConfig(**{**TINY_AUTOENCODER.__dict__, "kind": "vq", "codebook_size": 16})
    autoencoder = Autoencoder(config).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    data = encode_dataset([(image, "") for image in images], autoencoder, CaptionsOnly(), torch.device("cpu"),
                          batch_size=2, show_progress=False)
    assert torch.count_nonzero(data.latent_std) == 0
    latents = training_latents(data, torch.tensor([0, 1]), torch.Generator().manual_seed(seed), 2.0)
    torch.testing.assert_close(latents, 2.0 * data.latent_mean)


def test_a_setting_an_older_checkpoint_does_not_record_resumes_at_its_default(tmp_path):
    import dataclasses

    import pytest

    from ldm_runtime.errors import ConfigError
    from ldm_train.run import UNetSettings, check_resume_settings

    current = UNetSettings(out=str(tmp_path / "unet"), autoencoder="runs/ae", steps=4)
    saved = current.to_dict()
    del saved["min_snr_gamma"]  # written before the flag existed: those runs weighed every sample alike
    check_resume_settings(saved, current, tmp_path, 2)
    with pytest.raises(ConfigError, match=r"changed settings \(min_snr_gamma: 0.0 -> 5.0\)"):
        check_resume_settings(saved, dataclasses.replace(current, min_snr_gamma=5.0), tmp_path, 2)
