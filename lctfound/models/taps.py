"""Reading intermediate U-Net activations (the feature hook points) with forward hooks."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def tap_up_blocks(unet: nn.Module, blocks: Sequence[int], detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every U-Net forward stores the outputs of ``up_blocks[b]`` in the yielded dict.

    ``detach=False`` keeps the graph, for tasks that fine-tune the backbone through its features.
    The hooks are removed on exit, so the U-Net is left exactly as it was.
    """
    captured: dict[int, torch.Tensor] = {}

    def hook_for(block: int):
        def store(_module, _inputs, output):
            value = output[0] if isinstance(output, tuple) else output
            captured[block] = value.detach() if detach else value
        return store

    handles = [unet.up_blocks[b].register_forward_hook(hook_for(b)) for b in blocks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
