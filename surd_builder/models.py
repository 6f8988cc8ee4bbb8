"""Loading transformers models by path or hub id, on the right device, with one-line errors.

Shared by every part that runs a model in-process (the ``hf`` and ``caption`` rewriters,
screening, the adapter's feature caches and pipeline). Users pass a local folder or a hub id
exactly as ``from_pretrained`` takes it; a model that cannot be found (no such folder, no network
to the hub) is a one-line error naming the model, not a traceback.

The hub is probed once per process, before the first hub id loads (one HEAD request to
``HF_ENDPOINT``, default https://huggingface.co, with a timeout of ``HF_HUB_ETAG_TIMEOUT`` or
:data:`HUB_PROBE_TIMEOUT` seconds). When it cannot be reached, hub ids load from the local hub
cache alone (``local_files_only``), so no request is retried for minutes, and a model missing
from the cache is one line naming it and the ways out: a local folder, ``HF_HUB_OFFLINE=1`` with
a copied hub cache, or a mirror in ``HF_ENDPOINT``. ``HF_HUB_OFFLINE=1`` skips the probe (the
cache alone, the same one line for a model it lacks). Both checks need no torch, so the loaders
(:func:`check_hub_model`) make them before importing it. A name that is no hub id (a path, a
file, ``a/b/c``) and no folder here fails before either, naming the folder; no message shows the
``user:password@`` of an endpoint (:func:`without_credentials`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from surd_builder.errors import InputError

DTYPES = ("auto", "float32", "float16", "bfloat16")
T = TypeVar("T")
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"
HUB_PROBE_TIMEOUT = 5.0  # seconds; HF_HUB_ETAG_TIMEOUT overrides it
HUB_FIXES = (
    "give a local folder, copy a hub cache that has it here (HF_HUB_CACHE; HF_HUB_OFFLINE=1 "
    "then uses it without asking the hub), or set HF_ENDPOINT to a reachable mirror"
)
OFFLINE_FIXES = (
    "give a local folder, copy a hub cache that has it here (HF_HUB_CACHE), or unset "
    "HF_HUB_OFFLINE where the hub or a mirror (HF_ENDPOINT) can be reached"
)
# Phrases of transformers'/diffusers' errors that mean "not cached, and the hub was not asked or
# not reached" (their exception types differ across versions; these words have not).
_OFFLINE_MARKERS = ("couldn't connect", "not fully cached", "cached files", "local_files_only",
                    "outgoing traffic has been disabled", "offline mode")  # fmt: skip
# A hub id as huggingface_hub's ``validate_repo_id`` takes it: ``name`` or ``namespace/name``,
# each of ASCII letters, digits, ``-``, ``_`` and ``.``, starting and ending with a letter, digit
# or ``_``, at most 96 characters; no ``--`` or ``..``, not ending in ``.git``.
_HUB_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)
_URL_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")
_probe_lock = threading.Lock()
_probe_results: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not


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
    """Fail before any work (and before importing torch) when ``model`` can only be a local
    folder and is not one: a path (``/``, ``./``, ``../``, ``~``) that does not exist, a file,
    or a name that is not a hub id either (see :func:`could_be_hub_id`). Hub ids are checked
    when they load (:func:`check_hub_model`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise InputError(
            f"cannot load {what}: the folder {model} does not exist ({model} is a file)"
        )
    if model.startswith(("/", "./", "../", "~")):
        raise InputError(f"cannot load {what}: the folder {model} does not exist")
    if not could_be_hub_id(model):
        raise InputError(
            f"cannot load {what}: the folder {model} does not exist, and {model!r} is not a "
            "hub id (name or namespace/name)"
        )


def could_be_hub_id(model: str) -> bool:
    """Whether the hub would take ``model`` as a model id (huggingface_hub's
    ``validate_repo_id``): ``name`` or ``namespace/name``; never a path form."""
    return (
        _HUB_ID.fullmatch(model) is not None
        and "--" not in model
        and ".." not in model
        and not model.endswith(".git")
    )


def without_credentials(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it left out: what errors and the
    manifest show of an endpoint (``https://user:secret@host/v1`` -> ``https://host/v1``)."""
    return _URL_USERINFO.sub("", text)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: hub ids load from the cache."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT).rstrip("/")


def is_hub_id(model: str) -> bool:
    """Not a file or folder here, so ``from_pretrained`` looks it up on the hub."""
    return not Path(model).expanduser().exists()


def _probe_timeout() -> float:
    """``HF_HUB_ETAG_TIMEOUT`` when it is a positive number of seconds, else
    :data:`HUB_PROBE_TIMEOUT` (huggingface_hub, too, takes 0 for its default)."""
    try:
        seconds = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT)
    except ValueError:
        return HUB_PROBE_TIMEOUT
    return seconds if math.isfinite(seconds) and seconds > 0 else HUB_PROBE_TIMEOUT


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts, of Python and of the HTTP clients huggingface_hub uses
    (httpx2 now, requests before 1.0); ``OfflineModeIsEnabled`` is a ``ConnectionError``."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        with contextlib.suppress(ImportError):
            module = __import__(module_name)
            errors += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(errors)


def _network_reason(error: BaseException, timeout: float) -> str:
    if "timeout" in type(error).__name__.lower():
        return f"no answer in {timeout:g} s; HF_HUB_ETAG_TIMEOUT sets the wait"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached, or ``None`` when it answers (any HTTP status).
    Asked once per process and endpoint: one HEAD request with a short timeout."""
    endpoint = hub_endpoint()
    with _probe_lock:
        if endpoint not in _probe_results:
            _probe_results[endpoint] = _probe(endpoint)
        return _probe_results[endpoint]


def _probe(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    timeout = _probe_timeout()
    try:
        get_session().head(endpoint, timeout=timeout)
    except (OSError, *_network_errors()) as error:
        return _network_reason(error, timeout)
    return None


def _offline_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the files are not cached and the hub was not
    asked or not reached, rather than e.g. "no such repository"."""
    network = _network_errors()
    seen: BaseException | None = error
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return False
        if isinstance(seen, network) or type(seen).__name__ == "LocalEntryNotFoundError":
            return True
        if any(marker in str(seen).lower() for marker in _OFFLINE_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).replace("Please check out the root cause in the stacktrace above.", "")
    text = text.strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def in_hub_cache(model: str) -> bool:
    """Whether the local hub cache holds a snapshot of ``model`` (what ``local_files_only``
    then loads; a partial one fails there, naming what is missing)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _hub_problem() -> tuple[str, str] | None:
    """(why hub ids cannot be fetched, the ways out): ``HF_HUB_OFFLINE`` is set, or the hub
    cannot be reached; ``None`` when the hub answers."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set", OFFLINE_FIXES
    reason = hub_unreachable()
    if reason is not None:
        return f"the hub at {hub_endpoint()} cannot be reached ({reason})", HUB_FIXES
    return None


def _not_cached(model: str, what: str, problem: tuple[str, str], how: str = "") -> InputError:
    why, fixes = problem
    return InputError(
        without_credentials(
            f"cannot load {what} {model!r}: it is not {how}in the local hub cache and {why}; "
            f"{fixes}"
        )
    )


def check_hub_model(model: str, what: str) -> bool:
    """For a hub id that cannot be fetched (``HF_HUB_OFFLINE``, or the hub cannot be reached):
    ``True`` (load it with ``local_files_only``) when the hub cache has it, else a one-line
    :class:`InputError` naming it and the ways out. ``False`` for local folders and when the
    hub answers. A name that can only be a local folder and is not one fails first
    (:func:`check_local_model`), without asking the hub. Needs no torch: model loaders call it
    first, so a model that cannot load fails in a second, not after importing torch."""
    check_local_model(model, what)
    if not is_hub_id(model):
        return False
    problem = _hub_problem()
    if problem is None:
        return False
    if not in_hub_cache(model):
        raise _not_cached(model, what, problem)
    return True


def load_pretrained(loader: Callable[..., T], model: str, what: str, **kwargs: Any) -> T:
    """``loader(model, **kwargs)`` (a ``from_pretrained``) with failures as one-line errors;
    a hub id loads from the local hub cache alone when the hub cannot be reached."""
    cache_only = check_hub_model(model, what)
    if cache_only:
        kwargs["local_files_only"] = True  # the cache or nothing: no retries for minutes
    from transformers.utils import logging

    logging.disable_progress_bar()  # surd draws its own progress; one bar per load is noise
    try:
        return loader(model, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError, *_network_errors()) as error:
        if is_hub_id(model) and (cache_only or _offline_error(error)):
            # the hub answered the probe, not this model's requests (a proxy, a partial mirror)
            problem = _hub_problem() or (
                f"the hub at {hub_endpoint()} did not serve it ({_first_line(error)})",
                HUB_FIXES,
            )
            raise _not_cached(model, what, problem, "(fully) ") from None
        raise InputError(
            without_credentials(
                f"cannot load {what} {model!r}: {_first_line(error)} "
                "(give a local folder, or a hub id on a machine that can reach the hub)"
            )
        ) from None


def decode_rgb(images: list[bytes]) -> tuple[list[tuple[int, Any]], dict[int, str]]:
    """([(index, RGB PIL image)] of the images that decode, {index: error name} of the rest):
    one unreadable image fails alone, never its batch. Pixels as a viewer shows them
    (:func:`surd_builder.viewing.viewed_rgb`: turned, 16-bit scaled, transparency on white)."""
    from surd_builder.viewing import UnreadableImage, viewed_rgb

    decoded, failed = [], {}
    for index, data in enumerate(images):
        try:
            decoded.append((index, viewed_rgb(data)))
        except UnreadableImage as error:
            failed[index] = str(error)
    return decoded, failed


def batched(items: list[T], size: int) -> list[list[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
