import numpy as np
import pytest
import torch

from ldm_runtime.config import ScheduleConfig
from train.diffusion import ForwardProcess


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule=beta_schedule)
    ours = ForwardProcess(ScheduleConfig(beta_schedule=beta_schedule)).alphas_cumprod
    np.testing.assert_allclose(ours.numpy(), reference.alphas_cumprod.double().numpy(), rtol=1e-6)


def test_add_noise_matches_diffusers_per_sample_timesteps():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    latents, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    timesteps = torch.randint(0, 1000, (5,))
    ours = ForwardProcess(ScheduleConfig()).add_noise(latents, noise, timesteps)
    # diffusers takes sqrt(alpha_bar) in float32; ours come from float64 and are rounded once: a few ulps apart.
    torch.testing.assert_close(ours, reference.add_noise(latents, noise, timesteps), rtol=1e-5, atol=1e-5)


def test_v_prediction_target_matches_diffusers_velocity():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", prediction_type="v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([1, 500, 999])
    ours = ForwardProcess(ScheduleConfig(prediction_type="v_prediction")).target(latents, noise, timesteps)
    torch.testing.assert_close(ours, reference.get_velocity(latents, noise, timesteps), rtol=1e-5, atol=1e-6)
