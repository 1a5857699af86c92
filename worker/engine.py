"""The Chroma engine: local paths in, images out. Knows nothing of Celery or S3.

``Engine.load()`` reads the LoRA-independent parts once (tokenizer, T5, VAE) and the base
transformer weights into host memory; ``Engine.generate()`` gets (or builds) the fused variant for
the request's LoRA stack and renders each resolved prompt. How each step must be computed to give
ai-toolkit's pixels is written in docs/sampling.md; the fused variants in docs/architecture.md.

Speed recipe (``Recipe``, one flag per optimisation so the benchmark can switch each off):
``drop_padding`` (exact: the masked padding tokens are removed, attention runs unmasked),
``batch_cfg`` (both guidance branches in one pass, see ``ChromaTransformer.forward_batch``),
``compile`` (blocks compiled once per worker, shared by every variant, dynamic token counts),
``attention`` (the fused attention kernel), ``working_copy`` (the variant being rendered keeps
its float8 weight-only weights dequantized, see ``worker.variants.working_copy``), ``kernels``
(each block's q/k/v preparation as one Triton kernel, ``worker.kernels``). None of them
changes the quantization: "float8" stays the reference's weight-only numerics; "float8-fast"
(opt-in, lossy) adds float8 activations.

Out-of-memory frees memory and fails the request (a render first evicts the other cached variants
and tries once more); a broken CUDA context becomes ``DeviceLost`` (``worker.device``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tasks.errors import InvalidRequest, OutOfMemory
from tasks.results import Progress
from tasks.schemas import SIZE_MULTIPLE, ResolvedPrompt
from tasks.settings import (
    Attention,
    DType,
    NegativePrompt,
    Quantization,
    Settings,
    SettingsError,
    Switch,
    TextPadding,
)
from worker import device as dev
from worker import memory, sampling
from worker.blocks import Blocks
from worker.checkpoint import load_transformer
from worker.components import load_text_encoder, load_tokenizer, load_vae, quantize_float8
from worker.lora import ParsedLora, parse_lora
from worker.sources import Sources, fingerprint, resolve
from worker.variants import BaseWeights, Variant, VariantCache, VariantKey, timed_build, working_copy

log = logging.getLogger(__name__)

PARSED_LORAS_KEPT = 8
TEXT_EMBEDDINGS_KEPT = 16
ProgressFn = Callable[[Progress], None]
# What the engine says while it loads (component, what it does), for a command line to show.
LoadReport = Callable[[str], None]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; every field but ``sources`` is named like its ``Settings`` field."""

    sources: Sources
    quantization: Quantization = Quantization.FLOAT8
    dtype: DType = DType.AUTO
    device: str = "auto"
    compile: bool = True
    variant_cache_bytes: int = 0
    rope_axes: tuple[int, ...] | None = None
    text_padding: TextPadding = TextPadding.AUTO  # mask on the CPU, drop on CUDA
    batch_cfg: bool = True  # both guidance branches in one pass (needs the padding dropped)
    attention: Attention = Attention.CUDNN  # the SDPA kernel on CUDA
    working_copy: Switch = Switch.AUTO  # the active variant dequantized once (on with CUDA)
    kernels: Switch = Switch.AUTO  # Triton q/k/v kernels (worker.kernels), on with CUDA and Triton
    negative_prompt: NegativePrompt = NegativePrompt.HONOR

    def __post_init__(self) -> None:
        # Plain strings (tests, the bench) become the settings' enums; a wrong one raises here.
        for name, kind in (
            ("quantization", Quantization),
            ("dtype", DType),
            ("text_padding", TextPadding),
            ("attention", Attention),
            ("working_copy", Switch),
            ("kernels", Switch),
            ("negative_prompt", NegativePrompt),
        ):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(member.value for member in kind)
                raise SettingsError(name, f"{value!r}; choose one of {choices}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "sources"]
        return cls(sources=pick_sources(settings), **{name: getattr(settings, name) for name in names})


def pick_sources(settings: Settings) -> Sources:
    return Sources(settings.transformer, settings.text_encoder, settings.tokenizer, settings.vae)


@dataclass(frozen=True)
class Recipe:
    """How the denoising loop runs; every flag keeps the quantization's numerics (for
    "float8-fast", ``kernels`` adds the image layers' bias after the float8 matmul's rounding
    rather than inside it: a difference at bf16 rounding, see ``chroma_model.product``)."""

    drop_padding: bool
    batch_cfg: bool
    compile: bool
    attention: Attention
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


def make_recipe(config: EngineConfig, device: torch.device) -> Recipe:
    """The recipe the settings ask for on this device; refuses what the device cannot run."""
    cuda = device.type == "cuda"
    if config.kernels is Switch.ON and not (cuda and dev.triton_available()):
        raise SettingsError(
            "kernels",
            f"'on' needs a CUDA device and Triton (it comes with CUDA builds of torch) and the device is "
            f"{device}; use 'auto' (on where they run) or 'off'",
        )
    padding = config.text_padding
    return Recipe(
        # Dropping the masked padding tokens is exact arithmetic and lets attention run unmasked
        # (fast kernels); masking all 512 reproduces the reference's rounding bit for bit.
        drop_padding=padding is TextPadding.DROP or (padding is TextPadding.AUTO and cuda),
        batch_cfg=config.batch_cfg,
        compile=config.compile and cuda,
        attention=config.attention if cuda else Attention.AUTO,  # kernel names mean nothing on a CPU
        # An unquantized model has nothing to dequantize.
        working_copy=config.quantization.is_float8
        and (config.working_copy is Switch.ON or (config.working_copy is Switch.AUTO and cuda)),
        kernels=config.kernels is Switch.ON
        or (config.kernels is Switch.AUTO and cuda and dev.triton_available()),
    )


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
        self.recipe = make_recipe(config, self.device)
        self.blocks = dataclasses.replace(self.recipe, compile=False).blocks()  # compiled in load()
        self.loaded = False
        self.fingerprints: dict[str, str] = {}
        self.load_seconds: dict[str, float] = {}
        self._texts: dict[str, sampling.TextEmbedding] = {}  # recent negative prompts' embeddings
        self._parsed: dict[str, ParsedLora] = {}  # LoRA sha256 -> parsed file (a few, most recent)
        self._working: tuple[VariantKey, torch.nn.Module] | None = None  # the active variant, dequantized

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
        t1 = time.perf_counter()
        say(f"transformer: reading {describe_size(paths['transformer'])} from {paths['transformer']}")
        try:
            cfg, state = load_transformer(paths["transformer"], self.config.rope_axes)
        except ValueError as exc:  # the checkpoint's shapes and the RoPE setting disagree
            raise SettingsError("rope_axes", str(exc)) from exc
        t2 = time.perf_counter()
        # The base weights go to (pinned) host memory while T5 and the VAE load: both wait on
        # memory and the disk, not on each other.
        pin = self.device.type == "cuda"
        say(f"transformer: {'pinning' if pin else 'keeping'} the base weights in host memory")
        keeping = _Background(lambda: BaseWeights(cfg, state, self.dtype, pin=pin))
        say(f"text encoder: loading {describe_size(paths['text_encoder'])} from {paths['text_encoder']}")
        self.tokenizer = load_tokenizer(paths["tokenizer"])
        self.text_encoder = load_text_encoder(paths["text_encoder"], self.dtype, self.device)
        if self.config.quantization.is_float8:
            quantize_float8(self.text_encoder)  # T5 runs once per prompt: weight-only in both modes
        say(f"vae: loading {describe_size(paths['vae'])} from {paths['vae']}")
        self.vae = load_vae(paths["vae"], self.dtype, self.device)
        t3 = time.perf_counter()
        self.base = keeping.result()
        t4 = time.perf_counter()
        self._check_working_copy_fits()
        self.variants = VariantCache(self._variant_budget())
        self.blocks = self.recipe.blocks()
        self._texts = {"": sampling.encode_text(self.tokenizer, self.text_encoder, "")}
        self.load_seconds = {
            "resolve": t1 - t0,
            "weights_read": t2 - t1,
            "pin": keeping.seconds,  # alongside text_vae
            "text_vae": t3 - t2,
            "pin_wait": t4 - t3,
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

    def variant_key(self, loras: list[LoraInput]) -> VariantKey:
        return VariantKey(
            base=self.fingerprints["transformer"],
            quantization=self.config.quantization.value,
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
        self._working = None  # another variant's: it would only hold memory during the build
        self.variants.make_room(self._variant_bytes())

        def build() -> Variant:
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
                    on_progress(Progress(_i + 1, len(prompts), step, total, "denoise"))

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
            return dev.guard(self.device, lambda: self.render(variant, p, on_step))
        except OutOfMemory:
            if not self.variants.keep_only(variant.key):
                raise
            log.warning("out of memory rendering; evicted the other cached variants and retrying")
            self.release_memory()
            return dev.guard(self.device, lambda: self.render(variant, p, on_step))

    def unconditional(self, p: ResolvedPrompt) -> sampling.TextEmbedding | None:
        """The unconditional branch's text: the prompt's ``neg`` (ai-toolkit) or the empty prompt
        (the reference service), per ``negative_prompt``; None when guidance does not run."""
        if not sampling.uses_guidance(p.guidance_scale):
            return None
        text = p.neg if self.config.negative_prompt is NegativePrompt.HONOR else ""
        return self.encode(text, keep=True)

    def encode(self, text: str, keep: bool = False) -> sampling.TextEmbedding:
        """T5 embeddings of ``text``; ``keep`` remembers a few (negative prompts repeat)."""
        cached = self._texts.get(text)
        if cached is not None:
            return cached
        embedding = sampling.encode_text(self.tokenizer, self.text_encoder, text)
        if keep:
            self._texts[text] = embedding
            while len(self._texts) > TEXT_EMBEDDINGS_KEPT:
                oldest = next(key for key in self._texts if key != "")
                del self._texts[oldest]
        return embedding

    def render(
        self, variant: Variant, p: ResolvedPrompt, on_step: sampling.StepCallback | None = None
    ) -> Rendered:
        """One image: encode, denoise, decode. A non-finite result fails (``NonFiniteRender``)."""
        t0 = time.perf_counter()
        cond = self.encode(p.prompt)
        uncond = self.unconditional(p)
        dev.sync(self.device)
        t1 = time.perf_counter()
        latents = self.denoise(variant, p, cond, on_step, uncond=uncond)
        dev.sync(self.device)
        t2 = time.perf_counter()
        sampling.check_finite(latents, "latents", p.index)
        with sampling.autocast_for(self.device, self.dtype):
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
        uncond = uncond or self.unconditional(p)
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
                uncond,
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
        self._working = None
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

    def drop_working_copy(self) -> None:
        self._working = None

    @property
    def working_variant(self) -> VariantKey | None:
        """The key of the variant whose working copy is held, if any."""
        return None if self._working is None else self._working[0]

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
        variant, _ = self.get_variant([])
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


class _Background:
    """``fn()`` in a thread; ``result()`` waits for it and re-raises what it raised."""

    def __init__(self, fn: Callable[[], BaseWeights]):
        self.seconds = 0.0
        self._value: BaseWeights | None = None
        self._error: BaseException | None = None

        def run() -> None:
            start = time.perf_counter()
            try:
                self._value = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
                self._error = exc
            self.seconds = time.perf_counter() - start

        self._thread = threading.Thread(target=run, name="base-weights", daemon=True)
        self._thread.start()

    def result(self) -> BaseWeights:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def describe_size(path: Path) -> str:
    """A file's or folder's weight bytes, for a person: ``17.8 GB``."""
    files = list(path.rglob("*.safetensors")) if path.is_dir() else [path]
    size = sum(f.stat().st_size for f in files if f.is_file())
    if size <= 0:
        return "0 B"
    unit = min(int(math.log(size, 1000)), 4)
    return f"{size / 1000**unit:.1f} {['B', 'kB', 'MB', 'GB', 'TB'][unit]}"
