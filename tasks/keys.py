"""Object-key rules: what a request's LoRA path and a task id may hold, checked before anything is
enqueued. ``storage.keys`` applies the same rules again where keys are built (a last guard).

::

    LoRA     s3://<lora bucket>/<lora prefix>/<path>     (path relative to the prefix)
             s3://<bucket>/<key>                          (path given as an s3:// URI)
    outputs  <output prefix>/<task id>/...                (task id: one safe key segment)

A key is at most ``MAX_KEY_BYTES`` bytes of UTF-8, the LoRA prefix included. Characters that S3's
XML listings cannot carry or that change how a key looks in a log (control characters, line
separators, invisible formatting such as bidirectional overrides, lone surrogates) are refused, as
are backslashes, ``.``/``..`` segments and absolute paths.
"""

from __future__ import annotations

import re
import unicodedata

from tasks.request_text import quoted, shown, utf8_bytes

MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes
MAX_TASK_ID_CHARS = 128
LORA_SUFFIX = ".safetensors"

S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$", re.DOTALL)
# A URL (``scheme://...``) or a well-known scheme written without slashes (``file:/etc/x``). A colon
# anywhere else is an ordinary character of an S3 key (``run:v2/lora.safetensors``).
_SCHEME = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|(?:s3|s3a|s3n|file|https?|ftp|data|gs|hf|az|abfss?|wasbs?):)",
    re.IGNORECASE,
)
_TASK_ID = re.compile(r"[A-Za-z0-9_.\-]+")
# Unicode categories refused in keys: what a listing, a terminal or a log line would mangle.
_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


def check_lora_path_shape(path: str) -> None:
    """Reject anything but a relative key or an ``s3://bucket/key`` URI, with no traversal."""
    if "\\" in path:
        raise ValueError("LoRA path contains a backslash; use '/' between parts, like 'job/lora.safetensors'")
    odd = first_refused_character(path)
    if odd is not None:
        index, what = odd
        raise ValueError(
            f"LoRA path contains {what} (U+{ord(path[index]):04X}) at character {index}; "
            "use a plain key like 'job/lora.safetensors'"
        )
    if re.match(r"^[A-Za-z]:", path):
        raise ValueError(
            "LoRA path is a local drive path; upload the file and give its key relative to the LoRA prefix"
        )
    key = path
    if _SCHEME.match(path):
        match = S3_URI.match(path)
        if not match:
            raise ValueError(_unfetched_url(path))
        key = match.group("key")
        if key.startswith("/"):
            raise ValueError("LoRA path has '//' after its bucket; write s3://bucket/key with one '/'")
    if key.startswith("/"):
        raise ValueError("LoRA path is absolute; give a key relative to the LoRA prefix")
    if has_bad_segment(key):
        raise ValueError("LoRA path has an empty, '.' or '..' segment; give a plain key without traversal")
    if not key.endswith(LORA_SUFFIX):
        raise ValueError("LoRA path must name a .safetensors file (nothing pickled is loaded)")


def _unfetched_url(path: str) -> str:
    """Why a URL-shaped LoRA path is not an ``s3://bucket/key`` this worker reads."""
    scheme, _, rest = path.partition("://")
    if scheme.lower() == "s3":
        if scheme != "s3":
            return "LoRA path's scheme must be written 's3://' (lowercase), like s3://bucket/job/lora.safetensors"
        bucket, _, key = rest.partition("/")
        if not key:
            return "LoRA path names a bucket but no key; give s3://bucket/job/lora.safetensors"
        return (
            f"LoRA path's bucket {quoted(bucket, 70)} is not a bucket name (3-63 lowercase letters, "
            "digits, '.' and '-'); give s3://bucket/key"
        )
    return (
        "LoRA path must be a key relative to the LoRA prefix or s3://bucket/key; "
        "other URL schemes are not fetched"
    )


def first_refused_character(text: str) -> tuple[int, str] | None:
    """(index, what it is) of the first character a key may not hold, or None."""
    for index, char in enumerate(text):
        if char.isascii():
            if char.isprintable():
                continue
            return index, "a control character (NUL, newline, tab, ...)"
        what = _REFUSED_CATEGORIES.get(unicodedata.category(char))
        if what is None and (0xFDD0 <= ord(char) <= 0xFDEF or ord(char) & 0xFFFE == 0xFFFE):
            what = "a noncharacter"
        if what is not None:
            return index, what
    return None


def lora_bucket(path: str) -> str | None:
    """The bucket an ``s3://`` LoRA path names, or None for a key under the configured prefix."""
    match = S3_URI.match(path)
    return match.group("bucket") if match else None


def lora_key(path: str, lora_prefix: str) -> str:
    """The object key a (shape-checked) LoRA path reads: the URI's key, or ``<prefix>/<path>``."""
    match = S3_URI.match(path)
    return match.group("key") if match else join_key(lora_prefix, path)


def lora_object_key(path: str, lora_prefix: str) -> str:
    """``lora_key(path, lora_prefix)`` without judging the prefix (a setting: the worker refuses a
    bad one where it builds the key)."""
    match = S3_URI.match(path)
    if match:
        return match.group("key")
    prefix = lora_prefix.strip("/")
    return f"{prefix}/{path}" if prefix else path


def lora_key_bytes(path: str, lora_prefix: str) -> int:
    return key_bytes(lora_object_key(path, lora_prefix))


def key_bytes(key: str) -> int:
    """The length S3 counts: UTF-8 bytes (a lone surrogate counted as its 3 bytes, then refused)."""
    return utf8_bytes(key)


def has_bad_segment(path: str) -> bool:
    """Whether a ``/``-separated path has an empty, ``.`` or ``..`` segment."""
    return any(part in ("", ".", "..") for part in path.split("/"))


def join_key(prefix: str, rest: str) -> str:
    """``prefix/rest`` with the prefix's outer slashes dropped; an empty prefix adds nothing."""
    clean = prefix.strip("/")
    if clean and has_bad_segment(clean):
        raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' segment")
    return f"{clean}/{rest}" if clean else rest


def check_task_id(task_id: str) -> str:
    """``task_id`` if it is safe as one key segment (letters, digits, ``_.-``; no ``..``; <= 128)."""
    if (
        not isinstance(task_id, str)
        or not 0 < len(task_id) <= MAX_TASK_ID_CHARS
        or not _TASK_ID.fullmatch(task_id)
        or ".." in task_id
        or task_id == "."
    ):
        raise ValueError(
            f"task id must be 1-{MAX_TASK_ID_CHARS} characters of letters, digits, '_', '.' or '-' "
            f"without '..' (a UUID works), got {shown(task_id, ascii_only=True)}"
        )
    return task_id
