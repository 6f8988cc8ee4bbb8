"""One training step of the SUR-adapter from cached inputs, and the order samples are seen in.

Everything random in a step is a function of (seed, global micro-batch) alone: which samples
(:func:`micro_batch_indices`, a seeded permutation per epoch) and, from :func:`step_generator`,
the random inputs of the whole global micro-batch (:func:`draw_step_noise`: mirrored or not, the
latent sample, the noise, the timesteps), of which each process takes the rows of its samples.
Hence:

- a run resumed from a checkpoint at step ``s`` sees exactly what an uninterrupted run saw after
  ``s``: no sampler or RNG state has to be saved for that;
- ``N`` processes with batch ``B`` see bit-identical samples and random inputs to one process
  with batch ``N * B``, so they train the same adapter up to the order of the gradient
  all-reduce's sums (dropout aside: it draws from each process's own RNG).

Each process draws ``N`` times the random numbers it uses; they are a few small tensors per
sample, nothing next to a UNet step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapter.losses import (
    LossTerms,
    distillation_loss,
    noise_prediction_loss,
    prompt_alignment_loss,
    total_loss,
)


class InMemoryRows:
    """An array kept in memory with :class:`adapter.cache.CacheRows`' ``gather`` (tests,
    benchmarks, small sets)."""

    def __init__(self, array: np.ndarray | torch.Tensor):
        self.array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        self.shape, self.dtype = tuple(self.array.shape[1:]), self.array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self.array[indices]
        np.take(self.array, indices, axis=0, out=out)
        return out


Rows = Any  # CacheRows (memory-mapped) or InMemoryRows: len(), .shape, .dtype, .gather()


class RecordPart:
    """Part of each record of ``rows``: ``record[first:last, :width]`` (one row squeezed when
    ``last`` is None), with ``gather`` like the rows' own. SDXL's text record keeps the token
    states and the pooled embedding together (:func:`adapter.frozen_inputs.split_text_record`);
    these views give the set each on its own."""

    def __init__(self, rows: Rows, first: int, last: int | None, width: int):
        self.rows, self.first, self.last, self.width = rows, first, last, width
        tokens = () if last is None else (last - first,)
        self.shape, self.dtype = (*tokens, width), rows.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices: np.ndarray) -> RecordPart:
        return RecordPart(self.rows.select(indices), self.first, self.last, self.width)

    def gather(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        records = self.rows.gather(indices)
        if self.last is None:
            part = records[:, self.first, : self.width]
        else:
            part = records[:, self.first : self.last, : self.width]
        if out is None:
            return np.ascontiguousarray(part)
        out[...] = part
        return out


class _HostBuffers:
    """Page-locked host buffers a batch is gathered into before its copy to the GPU, two per
    shape taken in turn: the copy of one runs (non-blocking) while the next batch is gathered
    into the other, and a buffer is written again only once its last copy has finished (an
    event, not a device-wide sync)."""

    def __init__(self) -> None:
        self.slots: dict[tuple, list[torch.Tensor]] = {}
        self.turn: dict[tuple, int] = {}
        self.copies: dict[int, Any] = {}  # buffer address -> the event after its last copy

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        key = (shape, str(dtype))
        if key not in self.slots:
            torch_dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
            self.slots[key] = [torch.empty(shape, dtype=torch_dtype, pin_memory=True)
                               for _ in range(2)]  # fmt: skip
            self.turn[key] = 0
        buffer = self.slots[key][self.turn[key]]
        self.turn[key] = 1 - self.turn[key]
        copy = self.copies.get(buffer.data_ptr())
        if copy is not None:
            copy.synchronize()
        return buffer

    def copied(self, buffer: torch.Tensor, device: Any) -> torch.Tensor:
        moved = buffer.to(device, non_blocking=True)
        self.copies[buffer.data_ptr()] = torch.cuda.Event()
        self.copies[buffer.data_ptr()].record()
        return moved


@dataclass
class CachedSet:
    """A split's frozen inputs, row-aligned, left where they are (memory-mapped cache files, see
    :class:`adapter.cache.CacheRows`); a batch is gathered by index. Tensors or arrays are
    accepted too (kept in memory). float16 except the LLM vectors and time ids (float32). SDXL
    sets the last three."""

    latent_moments: Rows  # (N, 2C, h, w): mean and log-variance
    flipped_moments: Rows | None  # the same for the mirrored images (random flip on)
    narrative_embeds: Rows  # (N, 77, d)
    keyword_embeds: Rows  # (N, 77, d)
    llm_features: Rows  # (N, llm_dim) float32
    narrative_pooled: Rows | None = None  # (N, pooled_dim): SDXL's pooled text embedding
    keyword_pooled: Rows | None = None  # (N, pooled_dim)
    time_ids: Rows | None = None  # (N, 2, 6) float32: SDXL's add_time_ids, plain and mirrored

    def __post_init__(self) -> None:
        for name in ("latent_moments", "flipped_moments", "narrative_embeds", "keyword_embeds",
                     "llm_features", "narrative_pooled", "keyword_pooled",
                     "time_ids"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, np.ndarray | torch.Tensor):
                setattr(self, name, InMemoryRows(value))
        self._buffers: _HostBuffers | None = None

    def __len__(self) -> int:
        return len(self.latent_moments)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one latent sample (C, h, w): half the cached moments' channels."""
        channels, *spatial = self.latent_moments.shape
        return (channels // 2, *spatial)

    @property
    def llm_dim(self) -> int:
        return int(self.llm_features.shape[0])

    def batch(
        self, indices: torch.Tensor | np.ndarray, flips: torch.Tensor | None, device: Any
    ) -> dict[str, torch.Tensor]:
        """The rows ``indices`` on ``device``, the mirrored latents (and SDXL's time ids of the
        mirrored crop) where ``flips``. For a GPU they are gathered into page-locked memory and
        copied without blocking."""
        rows = np.asarray(indices, dtype=np.int64)
        pinned = torch.device(device).type == "cuda"
        if pinned and self._buffers is None:
            self._buffers = _HostBuffers()
        sources = {
            "latent_moments": self.latent_moments,
            "narrative_embeds": self.narrative_embeds,
            "keyword_embeds": self.keyword_embeds,
            "llm_features": self.llm_features,
        }
        for name in ("narrative_pooled", "keyword_pooled"):
            if getattr(self, name) is not None:
                sources[name] = getattr(self, name)
        out: dict[str, torch.Tensor] = {}
        if self.time_ids is not None:  # 6 numbers a sample: gathered plainly
            both = self.time_ids.gather(rows)
            mirrored = np.zeros(len(rows), np.int64) if flips is None else np.asarray(flips, int)
            chosen = both[np.arange(len(rows)), mirrored]
            out["time_ids"] = torch.from_numpy(np.ascontiguousarray(chosen)).to(device)
        for name, source in sources.items():
            shape = (len(rows), *source.shape)
            host = self._buffers.take(shape, source.dtype) if pinned else None
            array = None if host is None else host.numpy()
            if name == "latent_moments" and flips is not None and self.flipped_moments is not None:
                mirrored = np.asarray(flips, dtype=bool)
                if array is None:
                    array = np.empty(shape, source.dtype)
                if (~mirrored).any():
                    array[~mirrored] = source.gather(rows[~mirrored])
                if mirrored.any():
                    array[mirrored] = self.flipped_moments.gather(rows[mirrored])
            else:
                array = source.gather(rows, out=array)
            if host is not None:
                out[name] = self._buffers.copied(host, device)
            else:
                out[name] = torch.from_numpy(np.ascontiguousarray(array)).to(device)
        return out


def step_generator(
    seed: int, micro_batch: int, stream: int = 0, device: Any = "cpu"
) -> torch.Generator:
    """A generator seeded by (seed, micro-batch, stream). Training uses stream 0 on every
    process (all draw the global micro-batch's randomness, see :func:`draw_step_noise`); other
    streams are independent of it."""
    mixed = (seed * 1_000_003 + micro_batch) * 4099 + stream
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


@dataclass
class StepNoise:
    """The random inputs of a micro-batch, one row per sample."""

    flips: torch.Tensor | None  # (rows,) bool: mirror the image (random flip on)
    latent_noise: torch.Tensor  # (rows, C, h, w): samples the cached latent distribution
    noise: torch.Tensor  # (rows, C, h, w): the diffusion noise
    timesteps: torch.Tensor  # (rows,) int64

    def rows(self, start: int, stop: int) -> StepNoise:
        flips = None if self.flips is None else self.flips[start:stop]
        return StepNoise(
            flips, self.latent_noise[start:stop], self.noise[start:stop],
            self.timesteps[start:stop],
        )  # fmt: skip


def draw_step_noise(
    generator: torch.Generator,
    rows: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    random_flip: bool,
    device: Any,
    flip_generator: torch.Generator | None = None,
) -> StepNoise:
    """The random inputs of ``rows`` samples, drawn in a fixed order (latent sample, noise,
    timesteps) from ``generator`` (on ``device``), and the flips from ``flip_generator`` on the
    CPU: which cached latents a batch gathers is decided on the host, so reading them never
    waits for the GPU (a flip drawn there would cost a device-to-host sync every step).
    Training draws those of the whole global micro-batch on every process and each process
    keeps its rows (:meth:`StepNoise.rows`), so what a sample gets does not depend on the
    number of processes. One process draws exactly what it did when every process drew only its
    own rows."""
    flips = None
    if random_flip:
        if flip_generator is None:
            raise ValueError("random flips need a flip_generator (on the CPU)")
        flips = torch.rand(rows, generator=flip_generator) < 0.5
    shape = (rows, *latent_shape)
    latent_noise = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    timesteps = torch.randint(0, num_train_timesteps, (rows,), generator=generator, device=device)
    return StepNoise(flips, latent_noise, noise, timesteps)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The permutation of epoch ``epoch`` (kept: every micro-batch of the epoch asks for it)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def micro_batch_indices(
    micro_batch: int, batch_size: int, world_size: int, rank: int, num_samples: int, seed: int
) -> np.ndarray:
    """The sample indices rank ``rank`` trains on in global micro-batch ``micro_batch``.

    Samples are an endless stream of epochs, each a permutation seeded by (seed, epoch); a
    micro-batch is the next ``batch_size * world_size`` of the stream, split between ranks. A
    batch may straddle two epochs, so no sample is dropped and every step has a full batch."""
    per_step = batch_size * world_size
    start = micro_batch * per_step + rank * batch_size
    positions = np.arange(start, start + batch_size)
    epochs, offsets = np.divmod(positions, num_samples)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = epoch_order(seed, int(epoch), num_samples)
        chosen = epochs == epoch
        out[chosen] = order[offsets[chosen]]
    return out


@dataclass
class LossSettings:
    eta_llm: float = 1e-5
    eta_prompt: float = 1e-5
    temperature: float = 1.0
    min_snr_gamma: float | None = None
    prediction_type: str = "epsilon"
    # False: the UNet is conditioned on a detached copy of the adapter's output, so the quality
    # loss is computed (and logged) but trains nothing, as in the released code (its
    # ``torch.tensor(...)`` rebuilt the condition); only the two KL terms train the adapter
    quality_reaches_adapter: bool = True


def sample_latents(
    moments: torch.Tensor,
    generator: torch.Generator | None,
    scaling: float,
    shift: float | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """A sample of the cached latent distribution, scaled as the UNet expects: with ``noise``
    (a standard normal of the latents' shape) if given, else with a draw from ``generator``."""
    mean, logvar = moments.float().chunk(2, dim=1)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    latents = mean + torch.exp(0.5 * logvar) * noise
    if shift is not None:
        latents = latents - shift
    return latents * scaling


def compute_losses(
    adapter: Any,
    unet: Any,
    noise_scheduler: Any,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator | None,
    settings: LossSettings,
    scaling: float,
    shift: float | None = None,
    step_noise: StepNoise | None = None,
) -> LossTerms:
    """The three losses of one micro-batch. ``adapter`` may be wrapped (DDP); the graph runs
    from the adapter's output through the frozen UNet, so the quality loss trains the adapter.

    The random inputs are ``step_noise`` (its rows match the batch's) if given, else drawn from
    ``generator`` in :func:`draw_step_noise`'s order (training passes the rows of the global
    draw; held-out losses and benchmarks pass a generator)."""
    moments = batch["latent_moments"]
    if step_noise is None:
        channels, *spatial = moments.shape[1:]
        step_noise = draw_step_noise(
            generator, moments.shape[0], (channels // 2, *spatial),
            noise_scheduler.config.num_train_timesteps, False, moments.device,
        )  # fmt: skip
    latents = sample_latents(moments, None, scaling, shift, step_noise.latent_noise)
    noise, timesteps = step_noise.noise, step_noise.timesteps
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if settings.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pooled = batch.get("narrative_pooled")
    output = adapter(
        batch["narrative_embeds"].float(), llm_features=batch["llm_features"],
        pooled_embeds=None if pooled is None else pooled.float(),
    )  # fmt: skip
    condition = output.prompt_embeds.to(unet.dtype)
    added = None
    if pooled is not None:  # SDXL: the pooled embedding and time ids enter the time embedding
        added = {"text_embeds": output.pooled_embeds.to(unet.dtype),
                 "time_ids": batch["time_ids"].to(unet.dtype)}  # fmt: skip
    if not settings.quality_reaches_adapter:
        condition = condition.detach()
        added = None if added is None else {k: v.detach() for k, v in added.items()}
    prediction = unet(noisy.to(unet.dtype), timesteps, condition, added_cond_kwargs=added).sample
    snr = None
    if settings.min_snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
    quality = noise_prediction_loss(
        prediction, target, snr, settings.min_snr_gamma, settings.prediction_type
    )
    distillation = distillation_loss(output.encoded, output.llm_projected, settings.temperature)
    keyword_pooled = batch.get("keyword_pooled")
    alignment = prompt_alignment_loss(
        output.prompt_embeds, batch["keyword_embeds"].float(), settings.temperature,
        output.pooled_embeds, None if keyword_pooled is None else keyword_pooled.float(),
    )  # fmt: skip
    return total_loss(quality, distillation, alignment, settings.eta_llm, settings.eta_prompt)
