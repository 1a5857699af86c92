"""How the transformer blocks run: eagerly, or compiled once and shared by every fused variant.

``Blocks`` wraps two plain functions (one per block class) in ``torch.compile``: every block of
every variant goes through the same compiled code with its weights passed as inputs, so a new LoRA
variant costs no recompile, and token counts are marked dynamic, so a new prompt length or
resolution reuses the graph too. It also picks the fused attention kernel and, where they run,
the Triton q/k/v kernels (``worker.kernels``), whose tables it makes once per forward.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from tasks.settings import Attention

# What the q/k/v kernels read besides each block's weights, made once per forward (``Blocks.tables``):
# the packed RoPE table, and the output rows of the double block's image and text streams. None
# where the kernels do not run, and the blocks take the plain path.
KernelTables = tuple[Tensor, Tensor, Tensor]


def packed_rope(pes: tuple[Tensor, ...]) -> Tensor:
    """The segments' RoPE tables, one row per token of the packed stream: (rows, D/2, 2, 2)."""
    return torch.cat([pe.reshape(-1, *pe.shape[-3:]) for pe in pes])


def run_double(block, img, txt, pes, img_mod, txt_mod, mask, tables=None):
    return block(img, txt, pes, img_mod, txt_mod, mask, tables)


def run_single(block, x, pes, mod, mask, tables=None):
    return block(x, pes, mod, mask, tables)


class Blocks:
    """Runs the transformer blocks: eagerly, or compiled once and shared by every variant.

    ``compile=True`` wraps two plain functions (one per block class) in ``torch.compile``: every
    block of every fused variant goes through the same compiled code, its weights passed as
    inputs, so a new LoRA variant costs no recompile. Token counts are marked dynamic, so a new
    prompt length or resolution reuses the graph as well. ``attention`` picks the fused attention
    kernel (PyTorch's choice when "auto"); it is fixed when a graph is traced. ``kernels`` runs each
    block's q/k/v preparation as one Triton kernel (``worker.kernels``), with the tables it reads
    made once per forward (``tables``); it needs Triton and a device it runs on. ``backend`` is
    ``torch.compile``'s ("eager" traces the graphs without generating code: the CPU tests).
    """

    def __init__(
        self,
        compile: bool = False,
        attention: Attention = Attention.AUTO,
        kernels: bool = False,
        backend: str = "inductor",
    ):
        self.compiled = compile
        self.attention = Attention(attention)
        self.kernels = kernels
        if compile:
            import torch.fx.experimental._config as fx_config

            # Equal token counts (e.g. two prompts of one length) must not be fused into one symbol,
            # or the next pair of different lengths recompiles.
            fx_config.use_duck_shape = False
            self._double = torch.compile(run_double, dynamic=None, backend=backend)
            self._single = torch.compile(run_single, dynamic=None, backend=backend)
        else:
            self._double, self._single = run_double, run_single

    def tables(self, pes: tuple[Tensor, ...], image_len, mask: Tensor | None) -> KernelTables | None:
        """What the kernels need besides the weights, once per forward rather than per block; None
        where they do not run: not asked for, an attention mask, a head size not a power of two."""
        head_dim = 2 * pes[0].shape[-3]  # RoPE tables: (B, 1, tokens, D/2, 2, 2)
        if not self.kernels or mask is not None or head_dim & (head_dim - 1):
            return None
        from worker.kernels import joint_rows  # imports Triton: only where the kernels run

        lengths = [pe.shape[2] - image_len for pe in pes]
        return (packed_rope(pes), *joint_rows(lengths, image_len, pes[0].device))

    def double(self, block, img, txt, pes, img_mod, txt_mod, mask, tables=None):
        if self.compiled:
            _mark_tokens(img, txt, *pes, tables=tables)
        return self._double(block, img, txt, pes, img_mod, txt_mod, mask, tables)

    def single(self, block, x, pes, mod, mask, tables=None):
        if self.compiled:
            _mark_tokens(x, None, *pes, tables=tables)
        return self._single(block, x, pes, mod, mask, tables)

    def context(self):
        if self.attention is Attention.AUTO:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = {
            Attention.CUDNN: SDPBackend.CUDNN_ATTENTION,
            Attention.FLASH: SDPBackend.FLASH_ATTENTION,
            Attention.EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
            Attention.MATH: SDPBackend.MATH,
        }
        first = order.pop(self.attention)
        return sdpa_kernel([first, *order.values()], set_priority=True)


EAGER = Blocks()


def _mark_tokens(
    stream: Tensor, txt: Tensor | None, *pes: Tensor, tables: KernelTables | None = None
) -> None:
    """Token axes are dynamic: one graph serves every prompt length and resolution."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(stream, 1)
    if txt is not None:
        mark(txt, 1)
    for pe in pes:
        mark(pe, 2)
    for table in tables or ():
        mark(table, 0)
