"""Loading transformers models by path or hub id, on the right device, with one-line errors.

Shared by every part that runs a model in-process (the ``hf`` and ``caption`` rewriters,
screening, the adapter's feature caches). Users pass a local folder or a hub id exactly as
``from_pretrained`` takes it; a model that cannot be found (no such folder, no network to the
hub) is a one-line error naming the model, not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from surd_builder.errors import InputError

DTYPES = ("auto", "float32", "float16", "bfloat16")
T = TypeVar("T")


def resolve_device(device: str) -> str:
    """``auto`` is the first CUDA GPU when there is one, else the CPU; anything else is passed
    to torch as given (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(
            f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {device}: this torch sees no CUDA GPU (use cpu or auto)")
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"--device {device}: there are {count} CUDA GPU(s), 0..{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available here (use cpu or auto)")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    return device


def resolve_dtype(dtype: str, device: str):
    """``auto`` is bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU
    (half precision on CPU is slow and, for generation, sometimes wrong)."""
    import torch

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (use one of: {', '.join(DTYPES)})")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: a dtype as plain text (it pickles, it prints), which
    :func:`resolve_dtype` takes back."""
    return str(dtype).removeprefix("torch.")


def check_local_model(model: str, what: str) -> None:
    """Fail before any work (and before importing torch) when ``model`` is clearly a local path
    that does not exist; hub ids are checked when they load."""
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise InputError(f"cannot load {what}: the folder {model} does not exist")


def load_pretrained(loader: Callable[..., T], model: str, what: str, **kwargs: Any) -> T:
    """``loader(model, **kwargs)`` (a ``from_pretrained``) with failures as one-line errors."""
    check_local_model(model, what)
    from transformers.utils import logging

    logging.disable_progress_bar()  # surd draws its own progress; one bar per load is noise
    try:
        return loader(model, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(
            f"cannot load {what} {model!r}: {first_line or type(error).__name__} "
            "(give a local folder, or a hub id on a machine that can reach the hub)"
        ) from None


def decode_rgb(images: list[bytes]) -> tuple[list[tuple[int, Any]], dict[int, str]]:
    """([(index, RGB PIL image)] of the images that decode, {index: error name} of the rest):
    one unreadable image fails alone, never its batch."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    decoded, failed = [], {}
    for index, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as image:  # turned as shown (EXIF orientation)
                decoded.append((index, ImageOps.exif_transpose(image).convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            failed[index] = type(error).__name__
    return decoded, failed


def batched(items: list[T], size: int) -> list[list[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
