"""``ldm-train unet --task inpaint``: the paper's inpainting UNet (latents, mask and masked image's latents in),
trained on random boxes and strokes; started from a text-to-image UNet (``--init-unet``) it is that model until it
trains; its masks are a pure function of the step's generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_runtime.checkpoint import load_model_config, load_state_dict_file
from ldm_runtime.config import inpainting_channels
from ldm_runtime.engines.torch_engine import TorchEngine
from ldm_runtime.models import UNet
from ldm_runtime.pipeline import GenerationRequest, Pipeline
from ldm_train.cli import main
from ldm_train.masks import WHOLE_IMAGE_SHARE, random_masks
from ldm_train.train_unet import initialise_unet, inpainting_conditioning
from tests.ldm_train.test_train_cli import UNET_FLAGS, autoencoder_dir  # noqa: F401 (a fixture)


def test_masks_are_boxes_and_strokes_or_the_whole_image_and_replay_from_the_generator(seed):
    masks = random_masks(200, 32, 24, torch.Generator().manual_seed(seed))
    again = random_masks(200, 32, 24, torch.Generator().manual_seed(seed))
    assert masks.shape == (200, 1, 32, 24) and torch.equal(masks, again)
    assert set(np.unique(masks.numpy())) <= {0.0, 1.0}
    whole = (masks.flatten(1).min(dim=1).values == 1).float().mean().item()
    assert abs(whole - WHOLE_IMAGE_SHARE) < 0.1, whole
    partial = masks[masks.flatten(1).min(dim=1).values == 0]
    covered = partial.flatten(1).mean(dim=1)
    assert covered.min() > 0 and covered.max() < 1  # every other mask repaints part of the image, never none
    assert not torch.equal(masks[:100], random_masks(100, 32, 24, torch.Generator().manual_seed(seed + 1)))


def test_an_inpainting_unet_started_from_a_text_unet_is_that_unet_whatever_the_mask(autoencoder_dir, tmp_path,
                                                                                    seed):
    text = tmp_path / "text"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(text), "--steps", "1"]) == 0
    config = load_model_config(text).unet
    channels = config.in_channels
    text_unet = UNet(config)
    load_state_dict_file(text_unet, text / "unet.safetensors")
    inpaint_config = config.__class__(**{**config.__dict__, "in_channels": inpainting_channels(channels)})
    inpaint_unet = UNet(inpaint_config)
    initialise_unet(inpaint_unet, text)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    extra = torch.randn(2, channels + 1, 8, 8, generator=generator)
    context = torch.randn(2, 4, config.context_dim, generator=generator)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        expected = text_unet(latents, torch.tensor([3, 700]), context, mask)
        got = inpaint_unet(torch.cat([latents, extra], dim=1), torch.tensor([3, 700]), context, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_inpaint_task_trains_a_unet_that_takes_the_mask_and_the_masked_image(autoencoder_dir, tmp_path,
                                                                                 capsys):
    text = tmp_path / "text"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(text), "--steps", "1"]) == 0
    out = tmp_path / "inpaint"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(out), "--steps", "2",
                 "--task", "inpaint", "--init-unet", str(text), "--sample-every", "2"]) == 0, capsys.readouterr().err
    config = load_model_config(out)
    assert config.inpainting and config.unet.in_channels == inpainting_channels(config.autoencoder.latent_channels)
    load_state_dict_file(UNet(config.unet), out / "unet.safetensors")
    assert (out / "samples" / "step_0000002.png").is_file()

    # what training feeds the UNet after the latents is what the runtime feeds it
    engine = TorchEngine(out, device="cpu")
    pipeline = Pipeline(engine)
    size = config.image_size
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
    mask = random_masks(1, size, size, generator)
    request = GenerationRequest(prompt="a red circle", seed=0, init_image=image,
                                mask=(mask[0, 0].numpy() * 255).astype(np.uint8))
    served = pipeline._inpainting_conditioning(request, torch.zeros(1))
    trained = inpainting_conditioning(engine.autoencoder, torch.from_numpy(image).permute(2, 0, 1)[None], mask,
                                      config, torch.device("cpu"))
    torch.testing.assert_close(trained, served, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--task", "outpaint"], "--task is 'outpaint'; expected one of text, inpaint"),
    (["--init-unet", "{ae}", "--channels", "16"], "--init-unet {ae}: its "),
])
def test_a_bad_task_or_an_init_unet_of_other_widths_is_one_line(autoencoder_dir, tmp_path, capsys, flags, message):
    text = tmp_path / "text"
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(text), "--steps", "1"]) == 0
    flags = [flag.replace("{ae}", str(text)) for flag in flags]
    capsys.readouterr()
    assert main(["unet", *UNET_FLAGS, "--autoencoder", str(autoencoder_dir), "--out", str(tmp_path / "o"),
                 "--steps", "1", *flags]) == 2
    last = capsys.readouterr().err.split("\n")[-2]  # after the text encoder's loading bar, where it got that far
    assert last.startswith(f"ldm-train: error: {message.replace('{ae}', str(text))}"), last
