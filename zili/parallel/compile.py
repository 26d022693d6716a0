"""torch.compile per decoder block, applied from outside the model (`training.compile = true`).

Each block is compiled in place with `nn.Module.compile()`: no wrapper module is added, so parameter names
(`blocks.N.attn.q_proj.weight`, ...) stay exactly as they are for checkpoints and Hugging Face adapters, and
the blocks remain plain `nn.Module`s that FSDP can wrap. All blocks share one compiled graph. Generation
(a KV cache, one token at a time) runs eagerly: `zili.infer.generate` sets the compiler's eager stance.

On CPU the wide linear layers also take `zili.cpu.use_row_major_weight_grads` (a faster weight gradient
that only pays off compiled).
"""

from __future__ import annotations

from torch import nn

from zili import cpu


def compile_model(model: nn.Module, device_type: str) -> None:
    """Compile every block of `model.blocks` in place for training on `device_type`."""
    for block in model.blocks.values():
        if device_type == "cpu":
            cpu.use_row_major_weight_grads(block)
        block.compile()
