"""Gradient checkpointing (Chen et al. 2016) of a host's blocks, only while the training loss is taken.

A word needs no weight gradient, but its gradient must pass back through the whole UNet, so by
default every activation of the forward pass is kept for the backward pass. Inside `recomputed`,
each block named by the host keeps only its inputs and recomputes its own activations when the
backward pass reaches it: memory falls to about one block's activations, for about one more forward
pass of time. The blocks' forwards are patched on the instances and restored on exit, so a model the
host shares with its UI is left exactly as it was (the patch never outlives the loss).
Non-reentrant checkpointing (torch.utils.checkpoint, use_reentrant=False) passes keyword arguments
and gradients that reach only some inputs, as the UNet's blocks need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("auto", "fast", "low")


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def recomputed(blocks: Iterable[torch.nn.Module], enabled: bool = True) -> Iterator[None]:
    """Within the block, each of `blocks` recomputes its activations in the backward pass."""
    patched = []
    try:
        if enabled:
            for block in blocks:
                own = block.__dict__.get("forward")  # an instance-level forward someone else set, if any
                block.forward = _checkpointed(block.forward)
                patched.append((block, own))
        yield
    finally:
        for block, own in reversed(patched):
            if own is None:
                del block.forward
            else:
                block.forward = own
