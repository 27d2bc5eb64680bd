"""``ldm-train lora``: the adapter it writes is the one it trained (the file, fused by ``ldm-import --lora``'s code,
gives the UNet it trained with the adapter applied, alpha included), the base model is left as it was, captions
are rewritten word by word, and every bad flag is one line."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ldm_export.lora import AdapterFile, fuse_checkpoint
from ldm_runtime.checkpoint import UNET_WEIGHTS, load_checkpoint
from ldm_runtime.files import sha256_file
from ldm_train.cli import main
from ldm_train.train_lora import add_lora, caption_replacements, rewrite_caption
from tests.ldm_export.tiny_checkpoint import TINY_CONFIG, shared_tiny_checkpoint

QUICK = ["--data", "shapes:16", "--steps", "3", "--batch-size", "8", "--learning-rate", "5e-2", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


def unet_output(unet, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = TINY_CONFIG.unet
    latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 5, config.context_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 900]), context, torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("rank, alpha", [(2, None), (3, 12.0)])
def test_the_adapter_fused_by_ldm_import_is_the_unet_it_trained(base, tmp_path, rank, alpha, capsys):
    out = tmp_path / "adapter.safetensors"
    before = sha256_file(base / UNET_WEIGHTS)
    flags = ["--rank", str(rank)] + ([] if alpha is None else ["--alpha", str(alpha)])
    assert main(["lora", "--base", str(base), "--out", str(out), *QUICK, *flags]) == 0, capsys.readouterr().err
    assert sha256_file(base / UNET_WEIGHTS) == before  # the base model is not changed
    with safe_open(str(out), "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        metadata = file.metadata()
    assert tensors and all(key.startswith("unet.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
                           for key in tensors)
    ups = [tensor for key, tensor in tensors.items() if key.endswith("lora_B.weight")]
    assert any(tensor.abs().max() > 0 for tensor in ups), "the up weights start at zero and must have trained"
    assert metadata["ldm_base_unet_sha256"] == before

    fused_dir = fuse_checkpoint(base, tmp_path / "fused", [AdapterFile(out, 1.0)])
    fused = load_checkpoint(fused_dir).unet
    trained = load_checkpoint(base).unet
    wrapped = add_lora(trained, ("to_q", "to_k", "to_v", "to_out.0"), rank, alpha or rank)
    for name, layer in wrapped.items():
        layer.down.weight.data = tensors[f"unet.{name}.lora_A.weight"]
        layer.up.weight.data = tensors[f"unet.{name}.lora_B.weight"]
    expected, got = unet_output(trained, 0), unet_output(fused, 0)
    assert not torch.allclose(unet_output(load_checkpoint(base).unet, 0), expected, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_captions_are_rewritten_whole_word_in_order():
    replacements = caption_replacements(("green background=zorp background", "zorp=blick", "red=crimson"))
    assert rewrite_caption("a red circle, on a green background", replacements) == \
        "a crimson circle, on a blick background"
    assert rewrite_caption("a reddish square on green backgrounds", replacements) == \
        "a reddish square on green backgrounds"


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank is 0; expected a positive integer"),
    (["--alpha", "-1"], "--alpha is -1.0; expected a finite number above 0"),
    (["--caption-replace", "green"], "--caption-replace is 'green'; expected OLD=NEW"),
    (["--targets", "to_q,,x"], "--targets is 'to_q,,x'; expected module name endings"),
    (["--targets", "no_such_layer"], "--targets no_such_layer names no linear layer of the UNet"),
])
def test_a_bad_flag_is_one_line(base, tmp_path, capsys, flags, message):
    out = tmp_path / "adapter.safetensors"
    assert main(["lora", "--base", str(base), "--out", str(out), *QUICK, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ldm-train: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_an_existing_out_a_wrong_suffix_or_a_missing_base_is_one_line(base, tmp_path, capsys):
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(b"kept")
    assert main(["lora", "--base", str(base), "--out", str(out), *QUICK]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"kept"
    assert main(["lora", "--base", str(base), "--out", str(tmp_path / "adapter.pt"), *QUICK]) == 2
    assert "expected a path ending in .safetensors" in capsys.readouterr().err
    assert main(["lora", "--base", str(tmp_path / "none"), "--out", str(tmp_path / "a.safetensors"), *QUICK]) == 2
    assert f"--base {tmp_path / 'none'} is not a checkpoint dir" in capsys.readouterr().err
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    assert main(["lora", "--base", str(base), "--out", str(folder), "--overwrite", *QUICK]) == 2
    assert f"--out {folder} is a folder; expected the path of an adapter file" in capsys.readouterr().err
