"""The Chroma engine: local paths in, images out. Knows nothing of Celery or S3.

``Engine.load()`` reads the LoRA-independent parts once (tokenizer, T5, VAE) and the base
transformer weights into host memory; ``Engine.generate()`` gets (or builds) the fused variant for
the request's LoRA stack and renders each resolved prompt.

Speed recipe (``Recipe``, one flag per optimisation so the benchmark can switch each off):
``drop_padding`` (exact: the masked padding tokens are removed, attention runs unmasked),
``batch_cfg`` (both guidance branches in one pass, see ``ChromaTransformer.forward_batch``),
``compile`` (blocks compiled once per worker, shared by every variant, dynamic token counts),
``attention`` (the fused attention kernel), ``working_copy`` (the variant being rendered keeps
its float8 weight-only weights dequantized, see ``worker.variants.working_copy``), ``kernels``
(each block's q/k/v preparation as one Triton kernel, ``worker.kernels``). None of them
changes the quantization: "float8" stays the reference's weight-only numerics; "float8-fast"
(opt-in, lossy) adds float8 activations.

Device failures are translated here: out-of-memory frees memory and fails the request (a render
first evicts the other cached variants and tries once more); anything that leaves the CUDA context
unusable becomes ``DeviceLost`` so the process can exit and be replaced.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tasks.errors import DeviceLost, InvalidRequest, OutOfMemory
from tasks.schemas import SIZE_MULTIPLE, ResolvedPrompt
from worker import sampling
from worker.checkpoint import load_transformer
from worker.chroma_model import Blocks
from worker.components import (
    Sources,
    fingerprint,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    quantize_float8,
    quantizes_activations,
    resolve,
)
from worker.lora import ParsedLora, parse_lora
from worker.variants import (
    BaseWeights,
    Variant,
    VariantCache,
    VariantKey,
    timed_build,
    working_copy,
)

log = logging.getLogger(__name__)

QUANTIZATIONS = ("float8", "float8-fast", "none")
FLOAT8 = ("float8", "float8-fast")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PARSED_LORAS_KEPT = 8
# (prompt index, prompts, step, steps) -> None
ProgressFn = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class EngineConfig:
    sources: Sources
    quantization: str = "float8"
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = True
    variant_cache_bytes: int = 0
    rope_axes: tuple[int, ...] | None = None
    text_padding: str = "auto"  # "mask" | "drop" | "auto" (mask on the CPU, drop on CUDA)
    batch_cfg: bool = True  # both guidance branches in one pass (needs the padding dropped)
    attention: str = "cudnn"  # SDPA kernel on CUDA: cudnn | flash | efficient | math | auto (PyTorch's)
    working_copy: str = "auto"  # "on" | "off" | "auto" (on with CUDA): active variant dequantized once
    kernels: str = "auto"  # Triton q/k/v kernels (worker.kernels): "on" | "off" | "auto" (on with CUDA)

    @classmethod
    def from_settings(cls, settings) -> EngineConfig:  # settings: tasks.settings.Settings
        axes = tuple(int(a) for a in settings.rope_axes.split(",") if a.strip()) or None
        return cls(
            sources=Sources(settings.transformer, settings.text_encoder, settings.tokenizer, settings.vae),
            quantization=settings.quantization,
            dtype=settings.dtype,
            device=settings.device,
            compile=settings.compile,
            variant_cache_bytes=settings.variant_cache_bytes,
            rope_axes=axes,
            text_padding=settings.text_padding,
            batch_cfg=settings.batch_cfg,
            attention=settings.attention,
            working_copy=settings.working_copy,
            kernels=settings.kernels,
        )


@dataclass(frozen=True)
class Recipe:
    """How the denoising loop runs; every flag keeps the quantization's numerics (for
    "float8-fast", ``kernels`` adds the image layers' bias after the float8 matmul's rounding
    rather than inside it: a difference at bf16 rounding, see ``chroma_model.product``)."""

    drop_padding: bool
    batch_cfg: bool
    compile: bool
    attention: str
    working_copy: bool = False
    kernels: bool = False

    def blocks(self) -> Blocks:
        """A block runner for this recipe (compiled graphs are traced on its first use)."""
        return Blocks(self.compile, self.attention, self.kernels)


@dataclass(frozen=True)
class LoraInput:
    """A LoRA file already on local disk, identified by content."""

    path: Path
    sha256: str
    multiplier: float
    field: str = "loras"


@dataclass
class Rendered:
    prompt: ResolvedPrompt
    image: Image.Image
    timings: dict[str, float]


@dataclass
class Generation:
    images: list[Rendered]
    variant: dict
    layers_merged: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    def __init__(self, config: EngineConfig):
        if config.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization {config.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
            )
        self.config = config
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.device)
        if config.quantization == "float8-fast" and not _has_float8_matmul(self.device):
            raise ValueError(
                "quantization 'float8-fast' needs float8 matmuls (a CUDA card of compute capability 8.9 "
                f"or newer, e.g. L4, H100) and {self.device} has none; use 'float8' (the default)"
            )
        if config.text_padding not in ("auto", "mask", "drop"):
            raise ValueError(f"text_padding {config.text_padding!r}; choose auto, mask or drop")
        if config.working_copy not in ("auto", "on", "off"):
            raise ValueError(f"working_copy {config.working_copy!r}; choose auto, on or off")
        if config.kernels not in ("auto", "on", "off"):
            raise ValueError(f"kernels {config.kernels!r}; choose auto, on or off")
        cuda = self.device.type == "cuda"
        if config.kernels == "on" and not (cuda and _triton_available()):
            raise ValueError(
                f"kernels 'on' needs a CUDA device and Triton (it comes with CUDA builds of torch); "
                f"the device is {self.device}; use 'auto' (on where they run) or 'off'"
            )
        # Dropping the masked padding tokens is exact arithmetic and lets attention run unmasked
        # (fast kernels); masking all 512 reproduces the reference's rounding bit for bit.
        padding = config.text_padding
        drop = padding == "drop" or (padding == "auto" and cuda)
        self.recipe = Recipe(
            drop_padding=drop,
            batch_cfg=config.batch_cfg,
            compile=config.compile and cuda,
            attention=config.attention if cuda else "auto",  # the CUDA kernels' names mean nothing on a CPU
            # An unquantized model has nothing to dequantize.
            working_copy=config.quantization in FLOAT8
            and (config.working_copy == "on" or (config.working_copy == "auto" and cuda)),
            kernels=config.kernels == "on" or (config.kernels == "auto" and cuda and _triton_available()),
        )
        self.blocks = dataclasses.replace(self.recipe, compile=False).blocks()  # compiled in load()
        self.loaded = False
        self.fingerprints: dict[str, str] = {}
        self.load_seconds: dict[str, float] = {}
        self._uncond: sampling.TextEmbedding | None = None
        self._parsed: dict[str, ParsedLora] = {}  # LoRA sha256 -> parsed file (a few, most recent)
        self._working: tuple[VariantKey, torch.nn.Module] | None = None  # the active variant, dequantized

    @property
    def drop_padding(self) -> bool:
        return self.recipe.drop_padding

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load T5, tokenizer, VAE and the base transformer weights; idempotent."""
        if self.loaded:
            return
        src = self.config.sources
        t0 = time.perf_counter()
        paths = {
            name: resolve(getattr(src, name)) for name in ("transformer", "text_encoder", "tokenizer", "vae")
        }
        self.fingerprints = {name: fingerprint(path) for name, path in paths.items()}
        t1 = time.perf_counter()
        cfg, state = load_transformer(paths["transformer"], self.config.rope_axes)
        self.base = BaseWeights(cfg, state, self.dtype, pin=self.device.type == "cuda")
        del state
        t2 = time.perf_counter()
        self.tokenizer = load_tokenizer(paths["tokenizer"])
        self.text_encoder = load_text_encoder(paths["text_encoder"], self.dtype, self.device)
        if self.config.quantization in FLOAT8:
            quantize_float8(self.text_encoder)  # T5 runs once per prompt: weight-only in both modes
        self.vae = load_vae(paths["vae"], self.dtype, self.device)
        t3 = time.perf_counter()
        self._check_working_copy_fits()
        self.variants = VariantCache(self._variant_budget())
        self.blocks = self.recipe.blocks()
        self._uncond = sampling.encode_text(self.tokenizer, self.text_encoder, "")
        self.load_seconds = {"resolve": t1 - t0, "transformer": t2 - t1, "text_vae": t3 - t2}
        self.loaded = True
        log.info(
            "engine ready on %s (%s, %s): %s; transformer %s",
            self.device,
            self.dtype,
            self.config.quantization,
            {k: round(v, 2) for k, v in self.load_seconds.items()},
            cfg,
        )

    @property
    def cfg(self):
        return self.base.cfg

    def component_info(self) -> dict[str, str]:
        src = self.config.sources
        return {
            name: f"{getattr(src, name)}#{self.fingerprints.get(name, '')}"
            for name in ("transformer", "text_encoder", "tokenizer", "vae")
        }

    # -- variants ----------------------------------------------------------------------------

    def variant_key(self, loras: list[LoraInput]) -> VariantKey:
        return VariantKey(
            base=self.fingerprints["transformer"],
            quantization=self.config.quantization,
            dtype=str(self.dtype).removeprefix("torch."),
            loras=tuple((lora.sha256, float(lora.multiplier)) for lora in loras),
        )

    def get_variant(self, loras: list[LoraInput]) -> tuple[Variant, bool]:
        """The fused variant for this LoRA stack: (variant, cache hit)."""
        self.load()
        key = self.variant_key(loras)
        cached = self.variants.get(key)
        if cached is not None:
            return cached, True
        parsed = self.parse_loras(loras)
        self._drop_working_copy()  # another variant's: it would only hold memory during the build
        self.variants.make_room(self._estimate_bytes())

        def build() -> Variant:
            return timed_build(self.base, key, parsed, self.device)

        try:
            variant = self._guard(build)
        except OutOfMemory:
            if not len(self.variants):
                raise
            # The budget was too generous for what else holds memory: without this, every later
            # new variant would fail the same way while the cache stays full.
            log.warning(
                "out of memory building a variant; evicting %d cached and retrying", len(self.variants)
            )
            self.variants.clear()
            self.release_memory()
            variant = self._guard(build)
        self.variants.put(variant)
        log.info(
            "built variant in %.2fs (%d merged layers)", variant.build_seconds, sum(variant.layers_merged)
        )
        return variant, False

    def parse_loras(self, loras: list[LoraInput]) -> list[tuple[ParsedLora, float]]:
        """Parsed files by content hash: a new multiplier for a known LoRA reads nothing again."""
        out = []
        for lora in loras:
            parsed = self._parsed.pop(lora.sha256, None) or parse_lora(lora.path, self.cfg, field=lora.field)
            self._parsed[lora.sha256] = parsed
            out.append((parsed, lora.multiplier))
        while len(self._parsed) > PARSED_LORAS_KEPT:
            self._parsed.pop(next(iter(self._parsed)))
        return out

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[ResolvedPrompt],
        loras: list[LoraInput],
        on_progress: ProgressFn | None = None,
    ) -> Generation:
        """Render every prompt with the variant for ``loras``. Raises tasks.errors on failure."""
        self.load()
        for p in prompts:
            if p.width % SIZE_MULTIPLE or p.height % SIZE_MULTIPLE:
                raise InvalidRequest(
                    f"size must be a multiple of {SIZE_MULTIPLE} (resolve_prompts snaps it)", field="prompts"
                )
        t0 = time.perf_counter()
        variant, hit = self.get_variant(loras)
        timings = {"variant": time.perf_counter() - t0}
        rendered = []
        for p in prompts:
            step_cb = None
            if on_progress is not None:

                def step_cb(step: int, total: int, _i: int = p.index) -> None:
                    on_progress(_i, len(prompts), step, total)

            rendered.append(self._render_or_evict(variant, p, step_cb))
        info = {
            "cache_hit": hit,
            "build_seconds": round(variant.build_seconds, 4),
            "variants_cached": len(self.variants),
            "cache_bytes": self.variants.nbytes,
            "evictions": self.variants.evictions,
            "key": {
                "base": variant.key.base,
                "quantization": variant.key.quantization,
                "dtype": variant.key.dtype,
                "loras": [list(item) for item in variant.key.loras],
            },
        }
        return Generation(rendered, info, list(variant.layers_merged), timings)

    def _render_or_evict(self, variant: Variant, p: ResolvedPrompt, on_step) -> Rendered:
        """Render; out of memory with other variants cached evicts them and tries once more."""
        try:
            return self._guard(lambda: self.render(variant, p, on_step))
        except OutOfMemory:
            if not self.variants.keep_only(variant.key):
                raise
            log.warning("out of memory rendering; evicted the other cached variants and retrying")
            self.release_memory()
            return self._guard(lambda: self.render(variant, p, on_step))

    def render(
        self, variant: Variant, p: ResolvedPrompt, on_step: sampling.StepCallback | None = None
    ) -> Rendered:
        """One image: encode, denoise, decode."""
        sync = self._sync
        t0 = time.perf_counter()
        cond = sampling.encode_text(self.tokenizer, self.text_encoder, p.prompt)
        sync()
        t1 = time.perf_counter()
        latents = self.denoise(variant, p, cond, on_step)
        sync()
        t2 = time.perf_counter()
        with sampling.autocast_for(self.device, self.dtype):
            image = sampling.decode(self.vae, latents, p.height, p.width)
        t3 = time.perf_counter()
        return Rendered(p, image, {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2})

    def denoise(
        self,
        variant: Variant,
        p: ResolvedPrompt,
        cond: sampling.TextEmbedding,
        on_step: sampling.StepCallback | None = None,
        recipe: Recipe | None = None,
    ):
        """The denoising loop alone -> packed latents. ``recipe`` overrides the engine's (benchmarks)."""
        recipe = recipe or self.recipe
        blocks = self.blocks_for(recipe)
        latents = sampling.pack(sampling.initial_noise(p.seed, p.height, p.width, self.dtype, self.device))
        ids = sampling.image_ids(p.height, p.width, self.dtype, self.device)
        scheduler = sampling.make_scheduler(p.sample_steps, latents.shape[1], self.device)
        model = self.model_for(variant, recipe)

        def model_fn(img, txt, pe, timestep, guidance, mask):
            return model(img, txt, pe, timestep, guidance, mask, blocks=blocks)

        def batch_fn(img, txts, pes, timestep, guidance):
            return model.forward_batch(img, txts, pes, timestep, guidance, blocks=blocks)

        with sampling.autocast_for(self.device, self.dtype):
            return sampling.denoise(
                model_fn,
                latents,
                cond,
                self._uncond,
                p.guidance_scale,
                scheduler,
                self.cfg.axes_dim,
                ids,
                drop_padding=recipe.drop_padding,
                batch=batch_fn if recipe.batch_cfg else None,
                on_step=on_step,
            )

    def model_for(self, variant: Variant, recipe: Recipe | None = None):
        """The module that renders ``variant``: its working copy when the recipe keeps one.

        One working copy exists at a time (the previous one is dropped before the next is made),
        so switching variants never holds two.
        """
        recipe = recipe or self.recipe
        if not recipe.working_copy:
            return variant.model
        if self._working is not None and self._working[0] == variant.key:
            return self._working[1]
        self._drop_working_copy()
        try:
            copy = working_copy(variant.model)
        except torch.OutOfMemoryError:
            copy = None  # leave the except block before freeing: its traceback holds the partial copy
        if copy is None:
            log.warning("no room for the working copy; this render dequantizes per forward")
            self.release_memory()
            return variant.model
        self._working = (variant.key, copy)
        return copy

    def _drop_working_copy(self) -> None:
        self._working = None

    def blocks_for(self, recipe: Recipe) -> Blocks:
        """Block runner for a recipe; the engine's own is made once in ``load()`` and kept."""
        if recipe == self.recipe:
            return self.blocks
        return recipe.blocks()

    def warmup(
        self, sizes: list[tuple[int, int]], steps: int = 2, guidances: tuple[float, ...] = (4.0, 1.0)
    ) -> dict[str, float]:
        """Compile and exercise the base variant so users never pay for it.

        Token counts are dynamic in the compiled graphs, so the first size compiles (once with
        guidance, once without) and the others only exercise the VAE and allocator at that size.
        """
        self.load()
        out = {}
        variant, _ = self.get_variant([])
        for width, height in sizes:
            for guidance in guidances:
                prompt = ResolvedPrompt(
                    0, "a warm-up prompt for the compiled graphs", "", width, height, steps, guidance, 0
                )
                t0 = time.perf_counter()
                self._guard(lambda prompt=prompt: self.render(variant, prompt))
                out[f"{width}x{height}/g{guidance:g}"] = time.perf_counter() - t0
        return out

    # -- device health -----------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _guard(self, fn):
        """Run device work; map OOM to OutOfMemory (after freeing) and broken contexts to DeviceLost."""
        try:
            return fn()
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the failed work's tensors
        except RuntimeError as exc:
            if self.device.type == "cuda" and is_device_lost(exc):
                raise DeviceLost(f"CUDA context is unusable: {exc}") from exc
            raise
        self.release_memory()
        raise OutOfMemory(
            "the request did not fit in device memory; use a smaller width/height or fewer LoRAs"
        )

    def release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_working_copy_fits(self) -> None:
        """With ``working_copy="auto"``, keep it only where the card also holds one variant and the
        reserve next to it (a 24 GB card does not); otherwise dequantize per forward as torchao does."""
        auto = self.config.working_copy == "auto"
        if not (self.recipe.working_copy and auto and self.device.type == "cuda"):
            return
        free, total = torch.cuda.mem_get_info(self.device)
        needed = self._working_copy_bytes() + self._estimate_bytes() + self._reserve_bytes(total)
        if free < needed:
            log.warning(
                "working copy off: %.1f GiB free after loading, %.1f GiB needed with one variant",
                free / 2**30,
                needed / 2**30,
            )
            self.recipe = dataclasses.replace(self.recipe, working_copy=False)

    @staticmethod
    def _reserve_bytes(total: int) -> int:
        """Kept free for activations and the VAE: the larger of 8 GiB and 10% of the card."""
        return max(8 * 2**30, total // 10)

    def _variant_budget(self) -> int:
        """Device bytes for cached variants: what is free after loading, less the working copy
        and a reserve for activations and the VAE (the larger of 8 GiB and 10% of the card)."""
        if self.config.variant_cache_bytes:
            return self.config.variant_cache_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            working = self._working_copy_bytes() if self.recipe.working_copy else 0
            return max(free - working - self._reserve_bytes(total), self._estimate_bytes())
        return 8 * 2**30

    def _estimate_bytes(self) -> int:
        per_weight = 1 if self.config.quantization in FLOAT8 else self.dtype.itemsize
        return sum(t.numel() for t in self.base.state.values()) * per_weight

    def _working_copy_bytes(self) -> int:
        """Device bytes of a working copy: each float8 weight-only Linear weight in the compute dtype."""
        if self.config.quantization not in FLOAT8:
            return 0
        fast = self.config.quantization == "float8-fast"
        count = sum(
            t.numel()
            for name, t in self.base.state.items()
            if name.endswith(".weight") and not (fast and quantizes_activations(name.removesuffix(".weight")))
        )
        return count * self.dtype.itemsize


DEVICE_LOST_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "CUDA error: an illegal instruction",
    "misaligned address",
    "uncorrectable ECC",
    "CUDA-capable device(s) is/are busy or unavailable",
    "context is destroyed",
)


def is_device_lost(exc: BaseException) -> bool:
    """A sticky CUDA error (or a failing probe) means this process can do no more device work."""
    text = str(exc)
    if any(marker in text for marker in DEVICE_LOST_MARKERS):
        return True
    return "CUDA error" in text and not probe_device()


def probe_device() -> bool:
    """Synchronize and run one tiny operation; False when the context is poisoned."""
    try:
        torch.cuda.synchronize()
        value = (torch.ones(1, device="cuda") + 1).item()
        return value == 2.0
    except RuntimeError:
        return False


def _triton_available() -> bool:
    from worker import kernels  # imports Triton: only when the kernels are asked for

    return kernels.available()


def _has_float8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
