"""Multiply-adds of one UNet row, the share of them that projects the prompt into cross-attention keys and values
(the same on every sampling step of a request), and the share the UNet's shallow part alone takes (what a step
between whole steps costs under feature caching, ``cache_interval``).

    python benchmarks/count_unet_macs.py --checkpoint models/shapes-demo
    python benchmarks/count_unet_macs.py --preset sd15 --latent-size 16

Counted with torch's ``FlopCounterMode`` (every op of one forward call at batch 1) and forward hooks on the
``attn2.to_k`` / ``attn2.to_v`` layers; a preset is built with random weights (the count does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint dir")
    source.add_argument("--preset", help="a model preset (ldm_runtime.config.preset), random weights")
    parser.add_argument("--latent-size", type=int, default=None, help="default: the model's image size / f")
    args = parser.parse_args()

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if args.checkpoint:
        from ldm_runtime.checkpoint import load_checkpoint

        networks = load_checkpoint(args.checkpoint)
        unet, config = networks.unet, networks.config
    else:
        from ldm_runtime.config import preset
        from ldm_runtime.models import UNet

        config = preset(args.preset)
        unet = UNet(config.unet).eval()
    key_value_macs = [0]

    def count(module, inputs, output):
        key_value_macs[0] += output.numel() * module.in_features

    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            module.register_forward_hook(count)
    size = args.latent_size or config.image_size // config.autoencoder.factor
    length, width = config.text_encoder.max_length, config.unet.context_dim
    inputs = (torch.randn(1, config.autoencoder.latent_channels, size, size), torch.tensor([500]),
              torch.randn(1, length, width), torch.ones(1, length, dtype=torch.bool))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*inputs)
    total = counter.get_total_flops() / 2
    with torch.no_grad():
        _, deep_features = unet.forward_with_deep_features(*inputs)
        with FlopCounterMode(display=False) as shallow_counter:
            unet.forward_shallow(*inputs, deep_features)
    shallow = shallow_counter.get_total_flops() / 2
    print(f"one UNet row at {size}x{size} latents: {total / 1e6:.1f} MMAC; cross-attention keys and values of the "
          f"prompt: {key_value_macs[0] / 1e6:.1f} MMAC ({100 * key_value_macs[0] / total:.1f}%); the shallow part "
          f"alone: {shallow / 1e6:.1f} MMAC ({100 * shallow / total:.1f}%)")


if __name__ == "__main__":
    main()
