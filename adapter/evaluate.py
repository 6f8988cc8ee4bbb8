"""``surd eval``: do narrative prompts work better with the adapter, without worse images?

For every case (the shipped suite in ``eval_prompts.toml``, a ``--prompts`` file, and narrative
prompts of the dataset's test split) and seed, an image is generated with and without the
adapter under the same seed. Measured, each with and without:

- **CLIP score**: cosine of image and narrative prompt embeddings (x100, floored at 0, as
  CLIPScore reports it);
- **semantic accuracy** per category (action, colour, counting): the share of images that CLIP,
  zero-shot, matches to "a photo of <attribute>" better than to every alternative;
- **CLIP-IQA** (Wang et al. 2023), the no-reference quality score as torchmetrics'
  ``CLIPImageQualityAssessment(model_name_or_path=<a CLIP>)`` computes it: softmax(100 x
  cosines with "Good photo." / "Bad photo.") of the first. With the judging CLIP, not
  torchmetrics' default RN50 ``clip_iqa`` weights, so values compare within surd runs;
- **FID / KID** against ``--reference`` images, on the same CLIP model's image features
  (Inception weights cannot be assumed offline; CLIP features are the better-correlated choice
  of Kynkaanniemi et al. 2023). Both need many images: with few, use KID.

Output: ``metrics.json``, ``report.html`` (no server needed: images are files beside it) and
``images/{with,without}/``.
"""

from __future__ import annotations

import html
import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter.metrics import (
    attribute_correct,
    clip_iqa,
    clip_score,
    frechet_distance,
    kernel_distance,
)
from surd_builder.errors import InputError

if TYPE_CHECKING:
    from adapter.generate import GenerateOptions

CATEGORIES = ("action", "colour", "counting")
IQA_PROMPTS = ("Good photo.", "Bad photo.")


@dataclass(frozen=True)
class EvalCase:
    prompt: str
    category: str  # action / colour / counting / test (the dataset's own prompts)
    attribute: str | None = None
    alternatives: tuple[str, ...] = ()


def load_suite(path: Path | None = None) -> list[EvalCase]:
    """The shipped suite, or the cases of a TOML file in the same format."""
    if path is None:
        text = resources.files("adapter").joinpath("eval_prompts.toml").read_text()
        where = "the shipped suite"
    else:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise InputError(f"--prompts {path}: {error.strerror}") from None
        where = str(path)
    try:
        rows = tomllib.loads(text).get("case", [])
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{where} is not valid TOML: {error}") from None
    cases = []
    for number, row in enumerate(rows, 1):
        missing = [key for key in ("prompt", "category") if not row.get(key)]
        if missing:
            raise InputError(f"{where}: case {number} lacks {', '.join(missing)}")
        attribute, alternatives = row.get("attribute"), row.get("alternatives", [])
        if attribute is not None and (not isinstance(attribute, str) or not attribute):
            raise InputError(f"{where}: case {number}: attribute must be a non-empty string")
        if not isinstance(alternatives, list) or not all(
            isinstance(a, str) and a for a in alternatives
        ):
            raise InputError(f"{where}: case {number}: alternatives must be a list of strings")
        if bool(attribute) != bool(alternatives):
            raise InputError(f"{where}: case {number}: give attribute and alternatives together")
        cases.append(
            EvalCase(str(row["prompt"]), str(row["category"]), attribute, tuple(alternatives))
        )
    if not cases:
        raise InputError(f"{where} has no [[case]] entries")
    return cases


# ---------------------------------------------------------------- the run


@dataclass
class EvalResult:
    cases: int
    images_per_variant: int
    metrics: dict[str, dict[str, Any]]  # variant -> metric -> value
    per_category: dict[str, dict[str, dict[str, float]]]  # category -> variant -> metric
    report: Path
    metrics_file: Path


def _features_of(images: list[Any], scorer: Any) -> np.ndarray:
    return scorer.image_features(images).numpy()


def evaluate(
    pipeline: Any,
    scorer: Any,
    cases: list[EvalCase],
    out: Path,
    options: GenerateOptions,
    reference_features: np.ndarray | None = None,
    progress: Any = None,
    settings: dict[str, Any] | None = None,
) -> EvalResult:
    """Generate, measure, write ``metrics.json`` and ``report.html`` into ``out``."""
    from adapter.generate import generate_images, save_png

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []  # one per (case, seed)
    features: dict[str, list[np.ndarray]] = {"with": [], "without": []}
    per_call = max(1, options.batch_size // len(options.seeds))  # prompts per chunk
    for first in range(0, len(cases), per_call):
        chunk = list(range(first, min(first + per_call, len(cases))))
        for variant, use_adapter in (("without", False), ("with", True)):
            prompts = [cases[number].prompt for number in chunk]
            images = generate_images(pipeline, prompts, options, use_adapter)
            keys = [(number, seed) for number in chunk for seed in options.seeds]
            for (number, seed), image in zip(keys, images, strict=True):
                path = out / "images" / variant / f"case-{number:03d}-seed{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(image, path)
            features[variant].append(_features_of(images, scorer))
        for number in chunk:
            for seed in options.seeds:
                rows.append({"case": number, "seed": seed})
        if progress is not None:
            progress(len(chunk))

    image_features = {v: np.concatenate(f) for v, f in features.items()}
    prompts = [cases[row["case"]].prompt for row in rows]
    prompt_features = scorer.text_features(prompts).numpy()
    good, bad = scorer.text_features(list(IQA_PROMPTS)).numpy()
    attributed = [i for i, row in enumerate(rows) if cases[row["case"]].attribute]
    option_features = None
    if attributed:
        texts = []
        for index in attributed:
            case = cases[rows[index]["case"]]
            texts += [f"a photo of {t}" for t in (case.attribute, *case.alternatives)]
        flat = scorer.text_features(texts).numpy()
        width = 1 + max(len(cases[rows[i]["case"]].alternatives) for i in attributed)
        option_features = _pad_options(flat, [cases[rows[i]["case"]] for i in attributed], width)

    per_row: dict[str, dict[str, np.ndarray]] = {}
    for variant, feats in image_features.items():
        values = {
            "clip_score": clip_score(feats, prompt_features),
            "clip_iqa": clip_iqa(feats, good, bad),
        }
        correct = np.full(len(rows), np.nan)
        if option_features is not None:
            correct[attributed] = attribute_correct(feats[attributed], option_features)
        values["semantic_accuracy"] = correct
        per_row[variant] = values

    metrics: dict[str, dict[str, Any]] = {}
    for variant, values in per_row.items():
        summary = {name: _mean(array) for name, array in values.items()}
        if reference_features is not None:
            reference = reference_features
            summary["fid_clip"] = frechet_distance(image_features[variant], reference)
            kid_mean, kid_std = kernel_distance(image_features[variant], reference)
            summary["kid_clip"], summary["kid_clip_std"] = kid_mean, kid_std
        metrics[variant] = summary
    categories = sorted({case.category for case in cases})
    per_category: dict[str, dict[str, dict[str, float]]] = {}
    for category in categories:
        chosen = np.array([cases[row["case"]].category == category for row in rows])
        per_category[category] = {
            variant: {name: _mean(array[chosen]) for name, array in values.items()}
            for variant, values in per_row.items()
        }

    result = EvalResult(
        cases=len(cases),
        images_per_variant=len(rows),
        metrics=metrics,
        per_category=per_category,
        report=out / "report.html",
        metrics_file=out / "metrics.json",
    )
    per_image = [
        {
            **row,
            "prompt": cases[row["case"]].prompt,
            "category": cases[row["case"]].category,
            **{
                f"{name}_{variant}": (None if np.isnan(v[name][i]) else float(v[name][i]))
                for variant, v in per_row.items()
                for name in v
            },
        }
        for i, row in enumerate(rows)
    ]
    document = {
        "settings": settings or {},
        "reference_images": 0 if reference_features is None else len(reference_features),
        "options": asdict(options),
        "cases": [asdict(case) for case in cases],
        "metrics": metrics,
        "per_category": per_category,
        "per_image": per_image,
    }
    from surd_builder.atomic import atomic_path, write_json_atomic

    write_json_atomic(document, result.metrics_file)
    with atomic_path(result.report) as temp:
        temp.write_text(render_report(cases, rows, document, out))
    return result


def _pad_options(flat: np.ndarray, cases: list[EvalCase], width: int) -> np.ndarray:
    """(N, width, d) with each case's options; missing options repeat a wrong one (never the
    true attribute), so a shorter list is judged among its own options only."""
    out = np.zeros((len(cases), width, flat.shape[1]), dtype=flat.dtype)
    start = 0
    for index, case in enumerate(cases):
        count = 1 + len(case.alternatives)
        options = flat[start : start + count]
        start += count
        out[index, :count] = options
        out[index, count:] = options[-1]
    return out


def _mean(array: np.ndarray) -> float | None:
    array = np.asarray(array, dtype=np.float64)
    valid = array[~np.isnan(array)]
    return float(valid.mean()) if len(valid) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def render_report(cases: list[EvalCase], rows: list[dict], document: dict, out: Path) -> str:
    """A self-contained HTML page: summary tables, then per category the images side by side.
    Only images that exist under ``out`` are referenced (relative paths)."""
    metrics, per_category = document["metrics"], document["per_category"]
    names = list(next(iter(metrics.values())).keys())
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>surd eval</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}img{width:192px}</style>",
        "<h1>SUR-adapter evaluation</h1>",
        f"<p>{len(cases)} prompts, seeds {document['options']['seeds']}, "
        f"{document['options']['num_inference_steps']} steps.</p>",
        "<h2>Overall</h2><table><tr><th>variant</th>" + head + "</tr>",
    ]
    for variant, values in metrics.items():
        cells = "".join(f"<td>{_fmt(values[n])}</td>" for n in names)
        parts.append(f"<tr><td>{variant} adapter</td>{cells}</tr>")
    parts.append("</table><h2>Per category</h2><table><tr><th>category</th><th>variant</th>")
    category_names = ["clip_score", "clip_iqa", "semantic_accuracy"]
    parts.append("".join(f"<th>{n}</th>" for n in category_names) + "</tr>")
    for category, variants in per_category.items():
        for variant, values in variants.items():
            cells = "".join(f"<td>{_fmt(values.get(n))}</td>" for n in category_names)
            parts.append(f"<tr><td>{html.escape(category)}</td><td>{variant}</td>{cells}</tr>")
    parts.append("</table>")
    for category in per_category:
        parts.append(f"<h2>{html.escape(category)}: without | with the adapter</h2><table>")
        for row in rows:
            case = cases[row["case"]]
            if case.category != category:
                continue
            cells = []
            for variant in ("without", "with"):
                relative = f"images/{variant}/case-{row['case']:03d}-seed{row['seed']}.png"
                if (out / relative).is_file():
                    cells.append(f"<td><img src='{relative}' alt='{variant}'></td>")
                else:
                    cells.append("<td>missing</td>")
            prompt = html.escape(case.prompt)
            parts.append(f"<tr><td>{prompt}<br>seed {row['seed']}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def reference_features(path: Path, limit: int, scorer: Any, batch_size: int = 64) -> np.ndarray:
    """CLIP image features of up to ``limit`` images from a folder of image files, or from the
    ``image`` column of the Parquet files under ``path``; decoded and embedded in batches, so
    only the (N, d) features are kept."""
    import pyarrow.parquet as pq

    from adapter.data import _image_bytes
    from surd_builder.models import decode_rgb

    path = Path(path)
    if not path.exists():
        raise InputError(f"--reference {path}: no such file or folder")

    def blobs() -> Any:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if file.suffix.lower() in IMAGE_SUFFIXES:
                yield file.read_bytes()
            elif file.suffix == ".parquet" and "image" in pq.read_schema(file).names:
                for batch in pq.ParquetFile(file).iter_batches(batch_size, columns=["image"]):
                    for cell in batch.column(0).to_pylist():
                        data = _image_bytes(cell)
                        if data:
                            yield data

    rows, pending = [], []
    for seen, data in enumerate(blobs()):
        if seen >= limit:
            break
        pending.append(data)
        if len(pending) == batch_size:
            rows.append(_embed(pending, scorer, decode_rgb))
            pending = []
    if pending:
        rows.append(_embed(pending, scorer, decode_rgb))
    rows = [row for row in rows if len(row)]
    features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    if len(features) < 2:
        raise InputError(f"--reference {path}: fewer than 2 readable images")
    return features


def _embed(blobs: list[bytes], scorer: Any, decode: Any) -> np.ndarray:
    decoded, _failed = decode(blobs)
    if not decoded:
        return np.zeros((0, 0), np.float32)
    return scorer.image_features([image for _, image in decoded]).numpy()
