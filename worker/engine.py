"""The Chroma engine: local paths in, images out. Knows nothing of Celery or S3.

``Engine.load()`` reads the LoRA-independent parts once (tokenizer, T5, VAE) and the base
transformer weights into host memory; ``Engine.generate()`` gets (or builds) the fused variant for
the request's LoRA stack and renders each resolved prompt. How each step must be computed to give
ai-toolkit's pixels is written in docs/sampling.md; the fused variants in docs/architecture.md.
Preview mode (``generate(..., preview=True)``) renders as ai-toolkit's training sampler did: a
quanto qfloat8 base built once, the LoRAs attached unmerged per render (``worker.preview``).

How the loop runs (the speed recipe) and the engine's settings are in ``worker.config``.

Out-of-memory frees memory and fails the request (a render first evicts the other cached variants
and tries once more); a broken CUDA context becomes ``DeviceLost`` (``worker.device``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tasks.errors import InvalidLora, InvalidRequest, OutOfMemory
from tasks.results import Progress
from tasks.schemas import ResolvedPrompt, snap_size
from tasks.settings import FAST_DTYPE, NegativePrompt, Quantization, SettingsError, Switch
from worker import device as dev
from worker import memory, preview, sampling
from worker.blocks import Blocks
from worker.checkpoint import load_transformer
from worker.components import (
    TextEncoder,
    describe_size,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    quantize_float8,
)
from worker.config import EngineConfig, Recipe, make_recipe
from worker.lora import ParsedLora, parse_lora
from worker.sources import fingerprint, resolve
from worker.variants import (
    ActiveCopy,
    BaseWeights,
    Variant,
    VariantCache,
    VariantKey,
    timed,
    timed_build,
    working_copy,
)

__all__ = ["Engine", "EngineConfig", "LoraInput", "Recipe", "make_recipe"]

log = logging.getLogger(__name__)
PREVIEW = preview.PREVIEW_QUANTIZATION

PARSED_LORAS_KEPT = 8
TEXT_EMBEDDINGS_KEPT = 16
ProgressFn = Callable[[Progress], None]
# What the engine says while it loads (component, what it does), for a command line to show.
LoadReport = Callable[[str], None]


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
    layers_merged: list[int]  # per LoRA: layers merged (fused) or attached unmerged (preview)
    timings: dict[str, float] = field(default_factory=dict)
    preview: bool = False


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = dev.pick_device(config.device)
        self.dtype = dev.pick_dtype(config.dtype, self.device)
        if config.quantization is Quantization.FLOAT8_FAST and not dev.has_float8_matmul(self.device):
            raise SettingsError(
                "quantization",
                "'float8-fast' needs float8 matmuls (a CUDA card of compute capability 8.9 or newer, e.g. "
                f"L4, H100) and {self.device} has none; use 'float8' (the default)",
            )
        if config.quantization is Quantization.FLOAT8_FAST and self.dtype is not torch.bfloat16:
            raise SettingsError("dtype", FAST_DTYPE.format(str(self.dtype).removeprefix("torch.")))
        self.recipe = make_recipe(config, self.device)
        self.blocks = dataclasses.replace(self.recipe, compile=False).blocks()  # compiled in load()
        self.loaded = False
        self.fingerprints: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        self.load_seconds: dict[str, float] = {}
        self._parsed: dict[str, ParsedLora] = {}  # LoRA sha256 -> parsed file (a few, most recent)
        self._refused: dict[str, str] = {}  # LoRA sha256 -> why parsing refused it (a few, most recent)
        self._working = ActiveCopy()  # the working copy of the variant being rendered
        self.previews = preview.PreviewParts(self.device, self.dtype, TEXT_EMBEDDINGS_KEPT)

    @property
    def drop_padding(self) -> bool:
        return self.recipe.drop_padding

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self, report: LoadReport | None = None) -> None:
        """Load T5, tokenizer, VAE and the base transformer weights; idempotent.

        A source that cannot be found raises ``SettingsError`` naming its setting."""
        if self.loaded:
            return
        say = report or (lambda _message: None)
        src = self.config.sources
        t0 = time.perf_counter()
        paths = {}
        for name in ("transformer", "text_encoder", "tokenizer", "vae"):
            paths[name] = resolve(getattr(src, name), setting=name)
        self.fingerprints = {name: fingerprint(path) for name, path in paths.items()}
        self.paths = paths
        t1 = time.perf_counter()
        say(f"transformer: {describe_size(paths['transformer'])} from {paths['transformer']}")
        try:
            cfg, state = load_transformer(paths["transformer"], self.config.rope_axes)
        except ValueError as exc:  # the checkpoint's shapes and the RoPE setting disagree
            raise SettingsError("rope_axes", str(exc)) from exc
        t2 = time.perf_counter()
        pin = self.device.type == "cuda"
        say("transformer: base weights kept in host memory" + (" (pinned in the background)" if pin else ""))
        self.base = BaseWeights(cfg, state, self.dtype, pin=pin)
        # Page-locked in the background from here: the worker serves before it is done. While it
        # runs, T5's load waits on it, but starting it after T5 slows the first variant's build as
        # much (bench/RESULTS.md run AB).
        self.base.start_pinning()
        del state
        t3 = time.perf_counter()
        say(f"text encoder: {describe_size(paths['text_encoder'])} from {paths['text_encoder']}")
        self.tokenizer = load_tokenizer(paths["tokenizer"])
        self.text_encoder = load_text_encoder(paths["text_encoder"], self.dtype, self.device)
        if self.config.quantization.is_float8:
            quantize_float8(self.text_encoder)  # T5 runs once per prompt: weight-only in both modes
        say(f"vae: {describe_size(paths['vae'])} from {paths['vae']}")
        self.vae = load_vae(paths["vae"], self.dtype, self.device)
        t4 = time.perf_counter()
        self._check_working_copy_fits()
        self.variants = VariantCache(self._variant_budget())
        self.blocks = self.recipe.blocks()
        t5 = time.perf_counter()
        self.texts = TextEncoder(self.tokenizer, self.text_encoder, kept=TEXT_EMBEDDINGS_KEPT)
        dev.sync(self.device)
        self.load_seconds = {
            "resolve": t1 - t0,
            "weights_read": t2 - t1,
            "base_weights": t3 - t2,
            "text_vae": t4 - t3,
            "blocks_setup": t5 - t4,
            "first_encode": time.perf_counter() - t5,  # the empty prompt, kept for every request
        }
        self.loaded = True
        log.info(
            "engine ready on %s (%s, %s): %s; transformer %s",
            self.device,
            self.dtype,
            self.config.quantization.value,
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

    def variant_key(self, loras: list[LoraInput], preview: bool = False) -> VariantKey:
        """The fused variant's key; in preview mode the quantized base's (LoRAs are attached later)."""
        return VariantKey(
            base=self.fingerprints["transformer"],
            quantization=PREVIEW if preview else self.config.quantization.value,
            dtype=str(self.dtype).removeprefix("torch."),
            loras=() if preview else tuple((lora.sha256, float(lora.multiplier)) for lora in loras),
        )

    def get_variant(self, loras: list[LoraInput], preview: bool = False) -> tuple[Variant, bool]:
        """The fused variant for this LoRA stack, or the preview's quantized base: (variant, hit)."""
        self.load()
        key = self.variant_key(loras, preview)
        cached = self.variants.get(key)
        if cached is not None:
            return cached, True
        parsed = [] if preview else self.parse_loras(loras)
        self._working.drop()  # another variant's: it would only hold memory during the build
        self.variants.make_room(self._variant_bytes())

        def build() -> Variant:
            if preview:
                return timed(key, self.device, lambda: self.previews.build_base(self.base), [])
            return timed_build(self.base, key, parsed, self.device)

        try:
            variant = dev.guard(self.device, build)
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
            variant = dev.guard(self.device, build)
        self.variants.put(variant)
        log.info(
            "built variant in %.2fs (%d merged layers)", variant.build_seconds, sum(variant.layers_merged)
        )
        return variant, False

    def preview_variant(self, loras: list[LoraInput]) -> tuple[Variant, bool]:
        """Preview mode: the quantized base (built once, cached) with ``loras`` attached unmerged:
        (variant, base cache hit). Loads the preview's T5 on first use."""
        self.preview_texts()
        base, hit = self.get_variant([], preview=True)
        parsed = self.parse_loras(loras)
        stack = [(lora.sha256, p, mult) for lora, (p, mult) in zip(loras, parsed, strict=True)]
        layers = [p.num_layers for p, _ in parsed]
        return dataclasses.replace(base, layers_merged=layers, attached=self.previews.attach(stack)), hit

    def preview_texts(self) -> TextEncoder:
        """The preview's T5; the device bytes it takes when it loads come out of an automatic budget."""
        self.load()
        texts, loaded = self.previews.text_encoder(self.paths["text_encoder"], self.tokenizer)
        if loaded and not self.config.variant_cache_bytes:
            self.variants.budget_bytes = max(self.variants.budget_bytes - loaded, self._variant_bytes())
            self.variants.make_room(0)
        return texts

    def parse_loras(self, loras: list[LoraInput]) -> list[tuple[ParsedLora, float]]:
        """Parsed files by content hash: a new multiplier for a known LoRA reads nothing again, and a
        file refused once is refused again at once (a crafted one can take seconds to read)."""
        out = []
        for lora in loras:
            if lora.sha256 in self._refused:
                raise InvalidLora(self._refused[lora.sha256], field=lora.field)
            try:
                parsed = self._parsed.pop(lora.sha256, None) or parse_lora(
                    lora.path, self.cfg, field=lora.field
                )
            except InvalidLora as exc:
                if not isinstance(exc.__cause__, OSError | RuntimeError):  # the bytes, not the reading
                    self._refused[lora.sha256] = exc.message
                    _keep_newest(self._refused, PARSED_LORAS_KEPT * 4)
                raise
            self._parsed[lora.sha256] = parsed
            # Errors of the merge name this request's field, not the one that parsed the file first.
            out.append((dataclasses.replace(parsed, field=lora.field), lora.multiplier))
        _keep_newest(self._parsed, PARSED_LORAS_KEPT)
        return out

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[ResolvedPrompt],
        loras: list[LoraInput],
        on_progress: ProgressFn | None = None,
        preview: bool | None = None,
    ) -> Generation:
        """Render every prompt with the variant for ``loras`` (``preview``: as ai-toolkit's training
        sampler; None: the configured default). Raises tasks.errors on failure."""
        self.load()
        preview = self.config.preview if preview is None else preview
        for p in prompts:
            if (snap_size(p.width, preview), snap_size(p.height, preview)) != (p.width, p.height):
                raise InvalidRequest(
                    f"size {p.width}x{p.height} is not snapped (resolve_prompts snaps it)", field="prompts"
                )
        t0 = time.perf_counter()
        if preview:
            variant, hit = dev.guard(self.device, lambda: self.preview_variant(loras))
        else:
            variant, hit = self.get_variant(loras)
        timings = {"variant": time.perf_counter() - t0}
        rendered = []
        for p in prompts:
            step_cb = None
            if on_progress is not None:

                def step_cb(step: int, total: int, _i: int = p.index) -> None:
                    on_progress(Progress(_i + 1, len(prompts), step, total, "denoise"))

            rendered.append(self._render_or_evict(variant, p, step_cb))
        info = self.variants.describe(variant, hit)
        return Generation(rendered, info, list(variant.layers_merged), timings, variant.preview)

    def _render_or_evict(self, variant: Variant, p: ResolvedPrompt, on_step) -> Rendered:
        """Render; out of memory with other variants cached evicts them and tries once more."""
        try:
            return dev.guard(self.device, lambda: self.render(variant, p, on_step))
        except OutOfMemory:
            if not self.variants.keep_only(variant.key):
                raise
            log.warning("out of memory rendering; evicted the other cached variants and retrying")
            self.release_memory()
            return dev.guard(self.device, lambda: self.render(variant, p, on_step))

    def unconditional(self, p: ResolvedPrompt, preview: bool = False) -> sampling.TextEmbedding | None:
        """The unconditional branch's text: the prompt's ``neg`` (ai-toolkit) or the empty prompt
        (the reference service), per ``negative_prompt``; None when guidance does not run."""
        if not sampling.uses_guidance(p.guidance_scale):
            return None
        text = p.neg if self.config.negative_prompt is NegativePrompt.HONOR else ""
        return self.encode(text, keep=True, preview=preview)

    def encode(self, text: str, keep: bool = False, preview: bool = False) -> sampling.TextEmbedding:
        """T5 embeddings of ``text`` (the preview's own T5 in preview mode); ``keep`` remembers a few."""
        return (self.preview_texts() if preview else self.texts).encode(text, keep)

    def render(
        self, variant: Variant, p: ResolvedPrompt, on_step: sampling.StepCallback | None = None
    ) -> Rendered:
        """One image: encode, denoise, decode. A non-finite result fails (``NonFiniteRender``)."""
        t0 = time.perf_counter()
        cond = self.encode(p.prompt, preview=variant.preview)
        uncond = self.unconditional(p, variant.preview)
        dev.sync(self.device)
        t1 = time.perf_counter()
        latents = self.denoise(variant, p, cond, on_step, uncond=uncond)
        dev.sync(self.device)
        t2 = time.perf_counter()
        sampling.check_finite(latents, "latents", p.index, limit=sampling.MAX_LATENT)
        with self._autocast(variant):
            image = sampling.decode(self.vae, latents, p.height, p.width, p.index)
        t3 = time.perf_counter()
        return Rendered(p, image, {"encode": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2})

    def denoise(
        self,
        variant: Variant,
        p: ResolvedPrompt,
        cond: sampling.TextEmbedding,
        on_step: sampling.StepCallback | None = None,
        recipe: Recipe | None = None,
        uncond: sampling.TextEmbedding | None = None,
    ):
        """The denoising loop alone -> packed latents. ``recipe`` overrides the engine's (benchmarks);
        ``uncond`` defaults to ``unconditional(p)``."""
        recipe = recipe or self.recipe
        uncond = uncond or self.unconditional(p, variant.preview)
        blocks = self.blocks_for(recipe)
        latents = sampling.pack(sampling.initial_noise(p.seed, p.height, p.width, self.dtype, self.device))
        ids = sampling.image_ids(p.height, p.width, self.dtype, self.device)
        scheduler = sampling.make_scheduler(p.sample_steps, latents.shape[1], self.device)
        model = self.model_for(variant, recipe)

        def model_fn(img, txt, pe, timestep, guidance, mask):
            return model(img, txt, pe, timestep, guidance, mask, blocks=blocks)

        def batch_fn(img, txts, pes, timestep, guidance):
            return model.forward_batch(img, txts, pes, timestep, guidance, blocks=blocks)

        with self._autocast(variant):
            return sampling.denoise(
                model_fn,
                latents,
                cond,
                uncond,
                p.guidance_scale,
                scheduler,
                self.cfg.axes_dim,
                ids,
                drop_padding=recipe.drop_padding,
                batch=batch_fn if recipe.batch_cfg else None,
                on_step=on_step,
            )

    def _autocast(self, variant: Variant):
        """The reference service samples under CUDA autocast; ai-toolkit's training sampler does not."""
        return nullcontext() if variant.preview else sampling.autocast_for(self.device, self.dtype)

    def model_for(self, variant: Variant, recipe: Recipe | None = None):
        """The module that renders ``variant``: its working copy when the recipe keeps one (one at a
        time, ``variants.ActiveCopy``), with the variant's unmerged LoRA layers (preview) attached."""
        return preview.with_loras(self._base_model_for(variant, recipe or self.recipe), variant.attached)

    def _base_model_for(self, variant: Variant, recipe: Recipe):
        if not recipe.working_copy:
            return variant.model
        make = preview.working_copy if variant.preview else working_copy
        return self._working.get(variant, make, self.release_memory)

    def drop_working_copy(self) -> None:
        self._working.drop()

    @property
    def working_variant(self) -> VariantKey | None:
        """The key of the variant whose working copy is held, if any."""
        return self._working.key

    def blocks_for(self, recipe: Recipe) -> Blocks:
        """Block runner for a recipe; the engine's own is made once in ``load()`` and kept."""
        if recipe == self.recipe:
            return self.blocks
        return recipe.blocks()

    def warmup(
        self, sizes: tuple[tuple[int, int], ...], steps: int = 2, guidances: tuple[float, ...] = (4.0, 1.0)
    ) -> dict[str, float]:
        """Compile and exercise the base variant so users never pay for it.

        Token counts are dynamic in the compiled graphs, so the first size compiles (once with
        guidance, once without) and the others only exercise the VAE and allocator at that size.
        The negative prompt differs from the empty one, so the batched pass sees two text lengths.
        """
        self.load()
        out = {}
        variant, _ = self.preview_variant([]) if self.config.preview else self.get_variant([])
        for width, height in sizes:
            for guidance in guidances:
                prompt = ResolvedPrompt(
                    0, "a warm-up prompt for the compiled graphs", "blurry", width, height, steps, guidance, 0
                )
                t0 = time.perf_counter()
                dev.guard(self.device, lambda prompt=prompt: self.render(variant, prompt))
                out[f"{width}x{height}/g{guidance:g}"] = time.perf_counter() - t0
        return out

    # -- memory ------------------------------------------------------------------------------

    def release_memory(self) -> None:
        dev.release_memory(self.device)

    def _variant_bytes(self) -> int:
        return memory.variant_bytes(self.base.state, self.config.quantization, self.dtype)

    def _working_bytes(self) -> int:
        return memory.working_copy_bytes(self.base.state, self.config.quantization, self.dtype)

    def _check_working_copy_fits(self) -> None:
        """With ``working_copy="auto"``, keep it only where the card also holds one variant and the
        reserve next to it (a 24 GB card does not); otherwise dequantize per forward as torchao does."""
        auto = self.config.working_copy is Switch.AUTO
        if not (self.recipe.working_copy and auto and self.device.type == "cuda"):
            return
        free, total = torch.cuda.mem_get_info(self.device)
        if not memory.working_copy_fits(free, total, self._working_bytes(), self._variant_bytes()):
            log.warning("working copy off: %.1f GiB free after loading is not enough", free / 2**30)
            self.recipe = dataclasses.replace(self.recipe, working_copy=False)

    def _variant_budget(self) -> int:
        if self.config.variant_cache_bytes:
            return self.config.variant_cache_bytes
        if self.device.type != "cuda":
            return memory.CPU_VARIANT_BUDGET
        free, total = torch.cuda.mem_get_info(self.device)
        working = self._working_bytes() if self.recipe.working_copy else 0
        return memory.variant_budget(free, total, working, self._variant_bytes())


def _keep_newest(entries: dict, count: int) -> None:
    """Drop the oldest entries of an insertion-ordered dict down to ``count``."""
    while len(entries) > count:
        entries.pop(next(iter(entries)))
