"""An aesthetic score: a LAION-style head over a sample's CLIP image embedding.

The heads LAION published read the L2-normalised CLIP image embedding and predict how much people
like the picture on average (about 1..10, higher is better). Two formats, both plain PyTorch state
dicts (``.pth``) or the same tensors in a ``.safetensors`` file:

- the "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor, e.g.
  ``sac+logos+ava1-l14-linearMSE.pth``, the one LAION-Aesthetics V2 was scored with): an MLP
  ``layers`` = Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
  Linear(64, 16), Linear(16, 1), keys ``layers.{0,2,4,6,7}.{weight,bias}``; its ``reluMSE``
  variants put a ReLU after every Linear but the last (keys ``layers.{0,3,6,9,11}.*``);
- the LAION-Aesthetics V1 linear heads (LAION-AI/aesthetic-predictor,
  ``sa_0_4_vit_l_14_linear.pth``): one Linear(d, 1), keys ``weight`` and ``bias``.

The widths are read from the tensors, so a head trained on ViT-B/32 (d = 512) works as well as
one on ViT-L/14 (d = 768); the CLIP model must give embeddings of the head's input width, which
is checked before any work (a one-line error otherwise). Files are read with
``torch.load(weights_only=True)``: tensors only, never pickled code. The head's identity in the
screening cache key is the SHA-256 of the file's bytes.

Dropout is the identity at inference, and the head runs on the CPU in float32: a few matrix
products per batch, next to a CLIP forward pass.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surd_builder.errors import InputError

# Linear indices in the improved predictor's ``nn.Sequential`` (the Dropouts and ReLUs between
# them have no parameters): which layout a state dict has decides whether ReLUs run between.
MLP_LAYOUTS = {(0, 2, 4, 6, 7): False, (0, 3, 6, 9, 11): True}  # indices -> ReLU between
_MLP_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


@dataclass(frozen=True)
class HeadWeights:
    """The Linear layers of a head, first to last, and whether a ReLU follows each but the
    last."""

    layers: tuple[tuple[Any, Any], ...]  # (weight (out, in), bias (out,)), float32 CPU tensors
    relu: bool

    @property
    def input_width(self) -> int:
        return int(self.layers[0][0].shape[1])


class AestheticHead:
    """``--aesthetic-model``: a LAION-style aesthetic head read from ``path`` (lazily, once per
    worker; the object pickles without its tensors)."""

    def __init__(self, path: str):
        self.path = str(path)
        self.sha256 = hashlib.sha256(_read(self.path)).hexdigest()
        self._loaded: HeadWeights | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def identity(self) -> str:
        """What the screening cache key records: the file's content, not its name."""
        return f"sha256:{self.sha256}"

    def load(self) -> HeadWeights:
        if self._loaded is None:
            data = _read(self.path)
            if hashlib.sha256(data).hexdigest() != self.sha256:
                raise InputError(
                    f"--aesthetic-model {self.path} changed while screening ran; run again"
                )
            self._loaded = parse_head(load_state_dict(data, self.path), self.path)
        return self._loaded

    @property
    def input_width(self) -> int:
        return self.load().input_width

    def check_clip_width(self, clip_model: str, width: int) -> None:
        """A one-line error when ``clip_model``'s image embeddings are not ``width`` wide."""
        expected = self.input_width
        if width != expected:
            raise InputError(
                f"--aesthetic-model {self.path} reads {expected}-wide CLIP image embeddings, but "
                f"--clip-model {clip_model} gives {width}-wide ones (give the CLIP the head was "
                f"trained on: {_clip_for(expected)})"
            )

    def check_clip(self, clip: Any) -> None:
        """The same check from the CLIP model's config alone (``projection_dim``): no weights
        loaded, so it runs on the driver before any work."""
        from transformers import AutoConfig

        from surd_builder.models import load_pretrained

        config = load_pretrained(AutoConfig.from_pretrained, clip.model, "CLIP model")
        width = getattr(config, "projection_dim", None)
        if isinstance(width, int):
            self.check_clip_width(clip.model, width)

    def scores(self, embeddings: list[Any]) -> list[float | None]:
        """The head's score for each image embedding (1-D tensors; None stays None)."""
        import torch

        weights = self.load()
        present = [index for index, row in enumerate(embeddings) if row is not None]
        results: list[float | None] = [None] * len(embeddings)
        if not present:
            return results
        x = torch.stack([embeddings[index].float().cpu() for index in present])
        if x.shape[1] != weights.input_width:
            raise InputError(
                f"--aesthetic-model {self.path} reads {weights.input_width}-wide CLIP image "
                f"embeddings, but the CLIP model gives {x.shape[1]}-wide ones"
            )
        x = torch.nn.functional.normalize(x, dim=-1)  # what the heads were trained on
        with torch.inference_mode():
            for position, (weight, bias) in enumerate(weights.layers):
                x = torch.nn.functional.linear(x, weight, bias)
                if weights.relu and position < len(weights.layers) - 1:
                    x = torch.relu(x)
        for index, value in zip(present, x[:, 0].tolist(), strict=True):
            results[index] = value
        return results


def _read(path: str) -> bytes:
    file = Path(path).expanduser()
    if not file.is_file():
        where = "is a folder" if file.is_dir() else "does not exist"
        raise InputError(f"--aesthetic-model {path} {where} (give the head's .pth or .safetensors)")
    try:
        return file.read_bytes()
    except OSError as error:
        raise InputError(f"--aesthetic-model {path}: cannot read it ({error.strerror})") from None


def _clip_for(width: int) -> str:
    known = {768: "ViT-L/14, e.g. openai/clip-vit-large-patch14", 512: "ViT-B/32 or ViT-B/16"}
    return known.get(width, f"one with {width}-wide image embeddings")


def load_state_dict(data: bytes, path: str) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file or of a ``torch.save``d state dict (tensors only:
    ``weights_only=True``)."""
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load

            state: Any = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a user's file: whatever the loader says, as one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"--aesthetic-model {path} is not a state dict of tensors ({first[:200]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning-style checkpoint holding the state dict
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise InputError(f"--aesthetic-model {path} is not a state dict of tensors")
    return state


def parse_head(state: dict[str, Any], path: str) -> HeadWeights:
    """The head's layers from its state dict, with the widths read from the tensors."""
    keys = set(state)
    if keys in ({"weight", "bias"}, {"weight"}):  # LAION-Aesthetics V1: one Linear
        layers, relu = [(state["weight"], state.get("bias"))], False
    else:
        matched = [_MLP_KEY.fullmatch(key) for key in sorted(keys)]
        if not keys or not all(matched):
            found = ", ".join(sorted(keys)[:6]) + (", ..." if len(keys) > 6 else "")
            raise InputError(
                f"--aesthetic-model {path} is not a LAION aesthetic head: expected weight/bias "
                f"(a linear head) or layers.N.weight/bias (the improved predictor's MLP), found "
                f"{found or 'no tensors'}"
            )
        indices = tuple(sorted({int(match.group(1)) for match in matched if match}))
        if indices not in MLP_LAYOUTS:
            found = ",".join(map(str, indices))
            layouts = " or ".join(",".join(map(str, known)) for known in MLP_LAYOUTS)
            raise InputError(
                f"--aesthetic-model {path}: Linear layers at layers.{{{found}}} are not the "
                f"improved predictor's layout (layers.{{{layouts}}})"
            )
        layers = [(state.get(f"layers.{i}.weight"), state.get(f"layers.{i}.bias")) for i in indices]
        relu = MLP_LAYOUTS[indices]
    checked = []
    width = None
    for position, (weight, bias) in enumerate(layers):
        where = f"--aesthetic-model {path}: layer {position + 1} of {len(layers)}"
        if weight is None or weight.ndim != 2 or not weight.is_floating_point():
            raise InputError(f"{where} has no 2-D floating-point weight")
        out_width, in_width = weight.shape
        if width is not None and in_width != width:
            raise InputError(f"{where} reads {in_width} values, the layer before gives {width}")
        if bias is not None and tuple(bias.shape) != (out_width,):
            raise InputError(f"{where} has a bias of shape {tuple(bias.shape)}, not ({out_width},)")
        checked.append((weight.float().cpu(), None if bias is None else bias.float().cpu()))
        width = out_width
    if width != 1:
        raise InputError(f"--aesthetic-model {path} gives {width} values, not one score")
    return HeadWeights(tuple(checked), relu)
