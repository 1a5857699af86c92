"""cuDNN's float8 attention on Hopper, as a speed lever for float8-fast.

PyTorch routes float8 ``scaled_dot_product_attention`` only to FlashAttention 3's own package,
which does not install from the index; cuDNN's backend has a float8 SDPA forward for Hopper, which
its frontend's Python graph API (``nvidia-cudnn-frontend``, a 2 MB wheel that loads the cuDNN torch
already ships) reaches. On Hopper that forward takes q, k and v in e4m3 with one scale per tensor
and writes its output in e4m3 too: a plan asking for a bf16 output (``out_bf16``) was refused on an
H200 with cuDNN 9.19 (bench/RESULTS.md run AA).

What ``Float8Attention`` computes for one guidance segment (rows of the token-major
``(rows, 3, heads, dim)`` buffer the q/k/v kernels write, as e4m3 with the scales below):

- q, k, v divided by their scale ``amax / 448`` and rounded to e4m3 (``quantize``);
- ``S = q8 @ k8^T * (sq * sk / sqrt(d))``, softmax in float32, the probabilities multiplied by 448
  and rounded to e4m3 (``scale_s``), ``O = P8 @ v8 * sv / 448``;
- ``O`` written in e4m3 in units of ``sv`` (``scale_o = 1 / sv``: ``|O| <= max|v|``, so it fits),
  token-major (rows, heads, dim); ``O8 * sv`` is the attention output.

A graph is built once per segment length (cuDNN plans by shape) and kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

E4M3_MAX = 448.0
SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")


def quantize(t: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``t`` in e4m3 with one float32 scale (a (1, 1, 1, 1) tensor): ``t8 * scale ~= t``."""
    if amax is None:
        amax = t.abs().amax().float()
    scale = (amax.clamp(min=1e-12) / E4M3_MAX).reshape(1, 1, 1, 1)
    return (t.float() / scale.reshape(())).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Attention:
    """One cuDNN float8 SDPA plan: ``heads`` x ``tokens`` x ``dim``, q/k/v read from (tokens, 3,
    heads, dim) e4m3 rows, the output written (tokens, heads, dim) e4m3; with ``head_major``, q, k
    and v are three contiguous (heads, tokens, dim) tensors and so is the output."""

    def __init__(
        self,
        tokens: int,
        heads: int,
        dim: int,
        device: torch.device,
        head_major: bool = False,
        out_bf16=False,
    ):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(
            io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle
        )
        shape = [1, heads, tokens, dim]
        in_stride = [tokens * 3 * heads * dim, dim, 3 * heads * dim, 1]
        self.out_stride = [tokens * heads * dim, dim, heads * dim, 1]
        if head_major:
            in_stride = self.out_stride = [heads * tokens * dim, tokens * dim, dim, 1]
        self.q, self.k, self.v = (
            graph.tensor(name=n, dim=shape, stride=in_stride, data_type=e4m3) for n in ("q", "k", "v")
        )
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        self.scalars = [graph.tensor(name=n, **scalar) for n in SCALARS]
        args = dict(zip(SCALARS, self.scalars, strict=True))
        try:
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=self.q, k=self.k, v=self.v, generate_stats=False, attn_scale=1.0 / math.sqrt(dim),
                use_causal_mask=False, name="sdpa", **args,
            )  # fmt: skip
        except TypeError:  # frontends before 1.13 name it is_inference
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=self.q, k=self.k, v=self.v, is_inference=True, attn_scale=1.0 / math.sqrt(dim),
                use_causal_mask=False, name="sdpa", **args,
            )  # fmt: skip
        o.set_output(True).set_dim(shape).set_stride(self.out_stride)
        o.set_data_type(cudnn.data_type.BFLOAT16 if out_bf16 else e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        self.o, self.amax_s, self.amax_o = o, amax_s, amax_o
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        self.amax_buffers = torch.empty(2, 1, 1, 1, 1, device=device, dtype=torch.float32)
        self.s_scales = (
            torch.full((1, 1, 1, 1), 1.0 / E4M3_MAX, device=device),
            torch.full((1, 1, 1, 1), E4M3_MAX, device=device),
        )
        self.shape = (heads, tokens, dim) if head_major else (tokens, heads, dim)
        self.head_major = head_major

    def __call__(self, rows8: Tensor, sq: Tensor, sk: Tensor, sv: Tensor, out: Tensor, inv_sv: Tensor):
        """``rows8``: (tokens, 3, heads, dim) e4m3 (a row range of the packed buffer, contiguous),
        or (3, heads, tokens, dim) with ``head_major``; ``out``: ``self.shape`` e4m3, written in
        units of ``sv`` (``inv_sv = 1 / sv``)."""
        assert rows8.is_contiguous() and out.is_contiguous() and tuple(out.shape) == self.shape
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(rows8.device).cuda_stream)
        q, k, v = rows8.unbind(0 if self.head_major else 1)  # views at q, k and v's first element
        pack = {
            self.q: q,
            self.k: k,
            self.v: v,
            self.scalars[0]: sq,
            self.scalars[1]: sk,
            self.scalars[2]: sv,
            self.scalars[3]: self.s_scales[0],
            self.scalars[4]: self.s_scales[1],
            self.scalars[5]: inv_sv,
            self.o: out,
            self.amax_s: self.amax_buffers[0],
            self.amax_o: self.amax_buffers[1],
        }
        self.graph.execute(pack, self.workspace, handle=self.handle)


_PLANS: dict = {}


def plan(tokens: int, heads: int, dim: int, device: torch.device, head_major: bool = False):
    key = (tokens, heads, dim, device, head_major)
    if key not in _PLANS:
        _PLANS[key] = Float8Attention(tokens, heads, dim, device, head_major)
    return _PLANS[key]


def attend(heads8: Tensor, lengths: list, sq: Tensor, sk: Tensor, sv: Tensor) -> Tensor:
    """Both segments of a (rows, 3, heads, dim) e4m3 buffer -> (rows, heads * dim) bf16."""
    rows, _, heads, dim = heads8.shape
    out = torch.empty(rows, heads, dim, device=heads8.device, dtype=torch.float8_e4m3fn)
    inv_sv = 1.0 / sv
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        plan(n, heads, dim, heads8.device)(heads8[part], sq, sk, sv, out[part], inv_sv)
        start += n
    return (out.float() * sv.reshape(())).to(torch.bfloat16).reshape(rows, heads * dim)


def quantize_heads(heads: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, 3, heads, dim) bf16 -> the same in e4m3, one scale each for q, k and v."""
    amax = heads.abs().amax(dim=(0, 2, 3)).float()  # (3,)
    scales = (amax.clamp(min=1e-12) / E4M3_MAX).reshape(3, 1, 1, 1, 1)
    out = (heads.float() / scales.reshape(1, 3, 1, 1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return out, scales[0], scales[1], scales[2]
