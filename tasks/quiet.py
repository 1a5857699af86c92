"""Third-party output a user cannot act on, hidden at the edges of each process.

``quiet(verbose)`` is called once where a process starts, before torch, transformers or diffusers
are imported: by ``chroma-worker`` (``tasks.cli.main``), by the worker's parent process before it
forks its pool (``worker.celery``) and by ``scripts/demo.py``. Nothing deeper in the code touches
warnings filters, log levels or progress bars. ``CHROMA_VERBOSE=1`` (``Settings.verbose``) leaves
everything as the libraries print it. Torch-free (it imports the hub client at most), so the command
calls it before it knows whether it will load the worker: ``validate`` still never imports torch.

What is hidden (torch 2.13 CPU, torchao 0.18, diffusers 0.42, transformers 5.17) and why nobody here
can act on it; errors still show:

- torchao logs ``Failed to load .../_C_mxfp8....so`` for CUDA kernels built for another Python or
  CUDA; float8 weight-only uses none of them;
- torch's pytree logs that torchao's ``register_constant`` on Enum classes is deprecated (torchao's
  to change);
- diffusers logs ``Unable to import `torchao` Tensor objects`` (torchao 0.18 moved classes that
  diffusers names for torchao-serialized checkpoints; ours are safetensors);
- transformers' weight-loading and shard-writing progress bars, and its loading notices ("tied
  weights");
- deprecation and future warnings raised inside torch, torchao, diffusers, transformers, the hub
  client, Celery and kombu (a warning raised from our own code is ours to fix, and still shows).

transformers, diffusers and torch's registered loggers (``torch._dynamo``, ``torch._inductor``)
set their own levels when first imported, overriding a level set before; their documented switches
(``TRANSFORMERS_VERBOSITY``, ``DIFFUSERS_VERBOSITY``, ``TORCH_LOGS``) are set here instead, only
where the user has not set them, so they hold whenever the import happens.
"""

from __future__ import annotations

import logging
import os
import warnings

from celery.exceptions import CDeprecationWarning, CPendingDeprecationWarning

# Plain loggers: their level holds whenever the library is imported.
LOGGERS = ("torchao", "torch.utils._pytree")
# Libraries that configure their logging on import, through their own switches.
LIBRARY_SWITCHES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TORCH_LOGS": "-dynamo,-inductor",
}
WARNING_MODULES = r"(torch|torchao|diffusers|transformers|huggingface_hub|celery|kombu)(\.|$)"
WARNING_CATEGORIES = (
    DeprecationWarning,
    PendingDeprecationWarning,
    FutureWarning,
    CDeprecationWarning,
    CPendingDeprecationWarning,
)


def quiet(verbose: bool = False) -> None:
    """Hide third-party noise in this process (and the processes it forks or starts), unless verbose."""
    if verbose:
        return
    for category in WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=WARNING_MODULES)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, value in LIBRARY_SWITCHES.items():
        os.environ.setdefault(name, value)
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ModuleNotFoundError:  # a web backend's install: no hub client, no progress bars to hide
        return
    disable_progress_bars()  # transformers reads this state when it is imported
