import numpy as np
import pytest
import torch

from ldm_runtime.config import ScheduleConfig
from ldm_train.diffusion import ForwardProcess


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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_sample_as_diffusers_training_scripts_do(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", prediction_type=prediction_type)
    process = ForwardProcess(ScheduleConfig(prediction_type=prediction_type))
    prediction, target = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    timesteps = torch.tensor([0, 10, 200, 500, 999])
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3)).double()
    snr = compute_snr(reference, timesteps).double()  # diffusers' train_text_to_image.py, --snr_gamma 5
    weights = torch.stack([snr, 5.0 * torch.ones_like(snr)]).min(dim=0)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    assert weights.min() < 1 and weights.max() <= 1  # the low-noise timesteps weigh less
    expected = (per_sample * weights).mean()
    assert float(process.loss(prediction, target, timesteps, 5.0)) == pytest.approx(float(expected), rel=1e-5)
    plain = torch.nn.functional.mse_loss(prediction, target)
    assert float(process.loss(prediction, target, timesteps, 0.0)) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weighs_a_zero_snr_step_1(prediction_type):
    process = ForwardProcess(ScheduleConfig(prediction_type=prediction_type))
    process.alphas_cumprod[-1] = 0.0  # a zero-terminal-SNR schedule's last step
    prediction, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    weighted = process.loss(prediction, target, torch.tensor([999]), 5.0)
    assert torch.isfinite(weighted)
    assert float(weighted) == pytest.approx(float(torch.nn.functional.mse_loss(prediction, target)), rel=1e-6)
