"""The UNet stage's data: what the UNet is trained on is a sample of the autoencoder's posterior, as in LDM."""

import logging

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


class WordTokens:
    """A trainable text encoder whose tokens are words, cut (or padded) to ``max_length``, with its tokenizer."""

    trainable = True

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.vocabulary: dict[str, int] = {}

    def tokenizer(self, prompts, truncation=True, verbose=True):
        return {"input_ids": [[self.vocabulary.setdefault(word, len(self.vocabulary) + 1) for word in prompt.split()]
                              for prompt in prompts]}

    def tokenize(self, prompts):
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, words in enumerate(self.tokenizer(prompts)["input_ids"]):
            ids[row, :len(words[:self.max_length])] = torch.tensor(words[:self.max_length], dtype=torch.long)
        return ids, (ids != 0).long()


def test_captions_cut_at_the_token_limit_get_one_warning_counting_those_that_merged(caplog):
    captions = ["a red circle on the left", "a red circle on the right", "a blue square on top", "a cat", "one two"]
    images = torch.zeros(len(captions), 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="ldm_train.train_unet"):
        encode_dataset(list(zip(images, captions)), Autoencoder(TINY_AUTOENCODER).eval(), WordTokens(4),
                       torch.device("cpu"), batch_size=8, show_progress=False)
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == ["3 of 6 distinct captions are longer than the text encoder's 4 tokens and were cut to 4, "
                        "and 2 of them now read the same as another caption; the words past the cut do not "
                        "condition the model"]


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
