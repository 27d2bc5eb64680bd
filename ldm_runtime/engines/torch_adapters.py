"""Per-row LoRA on a torch network: forward hooks that add ``up_i @ (down_i @ x_i)`` to each row i of an adapted
linear layer or convolution (``ldm_runtime.adapters`` says why rows and not weights).

``RowLora(network, keys).rows({key: (down, up)})`` is a context in which the modules of ``keys`` (state-dict keys
of their weights) add, per row, down (B, R, in) then up (B, out, R); a kh x kw convolution's down is
(B, R, in * kh * kw), run as one grouped convolution over the batch (LoCon). Modules without factors in the
context run as they are. The torch engine and ldm-export's slot graphs (``SlotUNet``) share it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_runtime.adapters import AdapterChoice, LoadedAdapter, Targets, row_factors, targets_from_shapes

Factors = tuple[torch.Tensor, torch.Tensor]  # down (B, R, in[*kh*kw]), up (B, out, R)


def is_pointwise(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer or a 1x1, stride-1, unpadded, ungrouped convolution: what a slot graph
    adapts with two matmuls."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.groups == 1)


def lora_delta(module: nn.Module, inputs: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The per-row change of ``module``'s output on ``inputs`` (B, ...): ``up[i] @ down[i] @ x_i``."""
    batch = inputs.shape[0]
    if isinstance(module, nn.Linear):
        hidden = torch.bmm(inputs.reshape(batch, -1, inputs.shape[-1]), down.transpose(1, 2))
        return torch.bmm(hidden, up.transpose(1, 2)).reshape(*inputs.shape[:-1], up.shape[1])
    if is_pointwise(module):
        hidden = torch.bmm(down, inputs.flatten(2))
        return torch.bmm(up, hidden).reshape(batch, up.shape[1], *inputs.shape[2:])
    kernel = module.kernel_size
    weight = down.reshape(batch * down.shape[1], inputs.shape[1], *kernel)
    hidden = F.conv2d(inputs.reshape(1, -1, *inputs.shape[2:]), weight, None, module.stride, module.padding,
                      module.dilation, groups=batch)
    return torch.bmm(up, hidden.reshape(batch, down.shape[1], -1)).reshape(batch, up.shape[1], *hidden.shape[2:])


class RowLora:
    """Forward hooks on the modules of ``network`` whose weights ``keys`` name (state-dict keys ending in
    ".weight"), adding per-row LoRA changes inside ``rows``."""

    def __init__(self, network: nn.Module, keys: Iterable[str]):
        self.modules = {key: network.get_submodule(key.removesuffix(".weight")) for key in keys}
        for module in self.modules.values():
            assert isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1, module
        self._active: dict[nn.Module, Factors] = {}
        self._handles = [module.register_forward_hook(self._hook) for module in self.modules.values()]

    @contextlib.contextmanager
    def rows(self, factors: Mapping[str, Factors]) -> Iterator[None]:
        """Apply ``factors`` {weight key: (down, up)} to the rows of the calls made inside."""
        self._active = {self.modules[key]: value for key, value in factors.items()}
        try:
            yield
        finally:
            self._active = {}

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        factors = self._active.get(module)
        if factors is None:
            return None
        return output + lora_delta(module, inputs[0], *factors).to(output.dtype)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def network_targets(network: nn.Module, prefix: str = "") -> Targets:
    """The ``Targets`` of a torch network: the weights of its linear layers and ungrouped convolutions."""
    return targets_from_shapes({f"{name}.weight": tuple(module.weight.shape) for name, module in network.named_modules()
                                if isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1},
                               prefix)


class AdapterRows:
    """The adapters of one network made into per-row factors: ``factors(choices)`` -> {weight key: (down, up)}
    on ``device`` in ``dtype`` for a call whose rows chose ``choices`` (a module no row adapts is left out; a row
    that does not adapt it gets zeros). Recent batches' factors are kept, as a server repeats its mixes."""

    CACHED_MIXES = 32

    def __init__(self, network: str, adapters: Mapping[str, LoadedAdapter], rank: int, device: torch.device,
                 dtype: torch.dtype):
        self.network, self.adapters, self.rank, self.device, self.dtype = network, adapters, rank, device, dtype
        self.keys = sorted({key for adapter in adapters.values() for net, key in adapter.modules if net == network})
        self._cache: dict[tuple[AdapterChoice, ...], dict[str, Factors]] = {}

    def adapts(self, choices: Sequence[AdapterChoice]) -> bool:
        """Whether any row of ``choices`` names an adapter with modules in this network."""
        return any(self.network in self.adapters[name].networks for choice in choices for name, _ in choice)

    def factors(self, choices: Sequence[AdapterChoice]) -> dict[str, Factors]:
        mix = tuple(choices)
        cached = self._cache.get(mix)
        if cached is not None:
            return cached
        if len(self._cache) >= self.CACHED_MIXES:
            self._cache.clear()
        factors = {}
        for key in self.keys:
            rows = [row_factors((self.network, key), choice, self.adapters, self.rank) for choice in mix]
            present = next((row for row in rows if row is not None), None)
            if present is None:
                continue
            zeros = (np.zeros_like(present[0]), np.zeros_like(present[1]))
            downs, ups = zip(*(zeros if row is None else row for row in rows))
            factors[key] = tuple(torch.from_numpy(np.stack(part)).to(self.device, self.dtype) for part in (downs, ups))
        self._cache[mix] = factors
        return factors
