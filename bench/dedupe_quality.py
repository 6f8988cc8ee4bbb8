"""Benchmark: how well ``surd build dedupe`` tells copies from distinct images (run by hand).

    .venv/bin/python bench/dedupe_quality.py --json bench-dedupe-quality.json

Every image is generated here (no data sets): so is the truth of which images are copies.

1. **flat**: false merges among ``--flat`` distinct flat synthetic images (shapes, text and
   gradients on plain backgrounds, 128 px PNG, like ``surd demo``'s). Images come in families
   that share their geometry and differ in colours or shape kind, so many share a pHash by
   construction; any two images differ in a colour, the shape kind, the shapes' cells or size,
   the text's row or size, or the gradient. Counted: samples marked as duplicates, with the pHash
   alone, with the colour check, with variants and with both.
2. **copies**: true copies (resize to 50%, JPEG q40/q60/q95, Gaussian blur 1 px, brightness
   +-8%) of flat images and of photo-like images (512 px: smooth random colour fields, shapes,
   noise): the share that ends up in its original's cluster, with and without the colour check,
   and merges between different originals.
3. **variants**: mirrored and cropped re-posts of photo-like images (flip; 5-20% cut from a corner;
   5-20% border; 10% from one side; all re-encoded, some resized): the share found, without and
   with the variant hashes (and with ``--crop`` fractions other than the default, to choose it).
4. **demo**: distinct images of ``surd demo`` (200 per seed, the quickstart's default count)
   marked, with the pHash alone and with the colour check, through the real stages (ingest,
   hash, dedupe --dry-run).
5. **text** (a limit, shown not hidden): pairs of text images in the same colours and place that
   differ only in the word: how many are merged. Mean colours cannot tell these apart.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipelines.dedupe as dd  # noqa: E402
import pipelines.perceptual as pp  # noqa: E402

PALETTE = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 130, 180),
    "brown": (120, 75, 40),
    "grey": (128, 128, 128),
    "navy": (20, 30, 100),
    "lime": (170, 230, 50),
    "teal": (20, 120, 120),
    "beige": (225, 205, 160),
    "maroon": (110, 20, 40),
    "olive": (120, 120, 30),
    "sky": (120, 180, 240),
    "mint": (160, 230, 190),
    "lavender": (190, 170, 230),
    "coral": (250, 120, 100),
    "gold": (200, 160, 40),
    "slate": (70, 90, 110),
}
WORDS = ("SALE", "OPEN", "MENU", "JAZZ", "WAVE", "NOVA", "ECHO", "ZONE", "BOLD", "MINT", "ROCK")
SHAPES = ("circle", "square", "triangle", "ring")
TEXT_ROWS = (0.1, 0.3, 0.5, 0.7)


def encode(image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def draw_shapes(draw, cells: tuple, radius: float, shape: str, colour, size: int) -> None:
    for cell in cells:
        row, col = divmod(cell, 3)
        cx, cy, r = (col + 0.5) / 3 * size, (row + 0.5) / 3 * size, radius * size
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "ring":
            draw.ellipse(box, outline=colour, width=max(3, round(r * 0.35)))
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def render_flat(spec: dict, size: int = 128):
    from PIL import Image, ImageDraw, ImageFont

    if spec["kind"] == "gradient":
        t = np.linspace(0.0, 1.0, size)
        ramp = {
            "h": np.tile(t, (size, 1)),
            "v": np.tile(t[:, None], (1, size)),
            "d": (t[None, :] + t[:, None]) / 2,
            "r": np.clip(np.hypot(t[None, :] - 0.5, t[:, None] - 0.5) * 1.4, 0, 1),
        }[spec["direction"]][..., None]
        start, end = np.array(PALETTE[spec["bg"]]), np.array(PALETTE[spec["bg2"]])
        image = Image.fromarray((start * (1 - ramp) + end * ramp).astype(np.uint8))
    else:
        image = Image.new("RGB", (size, size), PALETTE[spec["bg"]])
    draw = ImageDraw.Draw(image)
    if spec["kind"] == "text":
        font = ImageFont.load_default(size=round(spec["text_size"] * size / 128))
        place = (spec.get("left", 0.1) * size, spec["row"] * size)
        draw.text(place, spec["word"], fill=PALETTE[spec["fg"]], font=font)
    else:
        draw_shapes(draw, spec["cells"], spec["radius"], spec["shape"], PALETTE[spec["fg"]], size)
    return image


def flat_specs(count: int, seed: int = 0) -> list[dict]:
    """``count`` distinct flat images in families sharing a geometry (see the module docstring).
    Within a family renderings differ in (background, colour, shape kind) for shapes, in
    (background, second background, colour, shape kind) for gradients, and text images never
    share their two colours (the word varies too, but is never the only difference: a text of
    another size at the same corner is a crop of it); no geometry, nor its mirror image, repeats."""
    rng = random.Random(seed)
    names = sorted(PALETTE)
    geometries, text_colours = set(), set()
    specs: list[dict] = []
    misses = 0
    while len(specs) < count:
        kind = rng.choices(["shapes", "text", "gradient"], weights=[40, 12, 48])[0]
        if kind == "text":
            geometry = (
                kind,
                rng.choice(TEXT_ROWS),
                rng.choice((18, 24, 30)),
                rng.choice((0.05, 0.3)),
            )
        else:
            cells = tuple(sorted(rng.sample(range(9), rng.randint(1, 3))))
            geometry = (kind, cells, rng.choice((0.09, 0.12, 0.15)), rng.choice("hvdr"))
            if kind == "shapes":
                geometry = geometry[:3]
        if geometry in geometries:
            misses += 1
            if misses > 100_000:
                raise ValueError(f"only {len(specs)} distinct flat images can be made")
            continue
        geometries.add(geometry)
        if kind != "text":  # nor its mirror image (every shape is left-right symmetric)
            mirrored = tuple(sorted(3 * (c // 3) + 2 - c % 3 for c in geometry[1]))
            geometries.add((kind, mirrored, *geometry[2:]))
        renderings = set()
        for _ in range({"shapes": 20, "text": 30, "gradient": 10}[kind]):
            bg, fg, bg2 = rng.sample(names, 3)
            shape = rng.choice(SHAPES)
            if kind == "gradient" and geometry[3] == "h":  # mirrored: the colours swap ends
                bg, bg2 = sorted((bg, bg2))
            key = {"shapes": (bg, fg, shape), "text": (bg, fg), "gradient": (bg, bg2, fg, shape)}
            if key[kind] in renderings or len(specs) >= count:
                continue
            if kind == "text" and (bg, fg) in text_colours:  # another size or place, not a zoom
                continue
            renderings.add(key[kind])
            text_colours.add((bg, fg))
            spec = {"kind": kind, "bg": bg, "fg": fg}
            if kind == "text":
                spec.update(row=geometry[1], text_size=geometry[2], left=geometry[3])
                spec["word"] = rng.choice(WORDS)
            else:
                spec.update(cells=geometry[1], radius=geometry[2], shape=shape)
                if kind == "gradient":
                    spec.update(bg2=bg2, direction=geometry[3])
            specs.append(spec)
    return specs


def photo_like(seed: int, size: int = 512):
    """Smooth random colour fields at three scales, a few shapes, a slight blur and noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    field = np.zeros((size, size, 3))
    for scale in (3, 6, 12):
        low = rng.uniform(-1, 1, (scale, scale, 3)).astype(np.float32)
        for channel in range(3):
            layer = Image.fromarray(low[..., channel], mode="F")
            layer = layer.resize((size, size), Image.Resampling.BICUBIC)
            field[..., channel] += np.asarray(layer) * 90 / scale**0.5
    field += rng.uniform(60, 190, 3)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, 0.2) * size
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            corners = rng.uniform(-r, r, (int(rng.integers(3, 6)), 2)) + [cx, cy]
            draw.polygon([tuple(p) for p in corners.tolist()], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    pixels = np.asarray(image).astype(np.float64) + rng.normal(0, 5, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def true_copies(image) -> dict[str, bytes]:
    from PIL import ImageEnhance, ImageFilter

    width, height = image.size
    return {
        "resize-50%": encode(image.resize((width // 2, height // 2), 1)),  # LANCZOS
        "jpeg-q40": encode(image, quality=40),
        "jpeg-q60": encode(image, quality=60),
        "jpeg-q95": encode(image, quality=95),
        "blur-1px": encode(image.filter(ImageFilter.GaussianBlur(1.0))),
        "brighter-5%": encode(ImageEnhance.Brightness(image).enhance(1.05)),
        "darker-5%": encode(ImageEnhance.Brightness(image).enhance(0.95)),
        "brighter-8%": encode(ImageEnhance.Brightness(image).enhance(1.08)),
        "darker-8%": encode(ImageEnhance.Brightness(image).enhance(0.92)),
    }


def reposts(image, rng: random.Random) -> dict[str, bytes]:
    """Mirrored and cropped copies, re-encoded (q85), some resized."""
    from PIL import Image

    width, height = image.size
    out = {"mirror": encode(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=85)}
    small = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((width * 3 // 4,) * 2)
    out["mirror+resize"] = encode(small, quality=85)
    for cut in (0.05, 0.10, 0.125, 0.15, 0.175, 0.20):
        keep_w, keep_h = round(width * (1 - cut)), round(height * (1 - cut))
        x, y = rng.choice((0, width - keep_w)), rng.choice((0, height - keep_h))
        part = image.crop((x, y, x + keep_w, y + keep_h))
        out[f"corner-{cut:.1%}"] = encode(part, quality=85)
        mx, my = round(width * cut / 2), round(height * cut / 2)
        border = image.crop((mx, my, width - mx, height - my))
        out[f"border-{cut:.1%}"] = encode(border, quality=85)
    side = rng.choice(("left", "right", "top", "bottom"))
    box = {
        "left": (round(width * 0.1), 0, width, height),
        "right": (0, 0, round(width * 0.9), height),
        "top": (0, round(height * 0.1), width, height),
        "bottom": (0, 0, width, round(height * 0.9)),
    }[side]
    out["one-side-10%"] = encode(image.crop(box).resize((384, 384)), quality=85)
    return out


def signatures(images: list[bytes], variants=None) -> list[pp.ImageSignature]:
    regions = variants or dd.VARIANTS
    return [pp.image_signature(data, variants=regions) for data in images]


def cluster(ids: list[str], sigs: list[pp.ImageSignature], **passes) -> dd.Clustering:
    import pyarrow as pa

    table = pa.table(
        {
            "sample_id": ids,
            "phash": [s.phash for s in sigs],
            "variant_hashes": pa.array([s.variant_hashes for s in sigs], pa.list_(pa.string())),
            "colour_hash": [s.colour_hash for s in sigs],
        }
    )
    return dd.cluster_samples(table, dd.DEFAULT_MAX_DISTANCE, **passes)


SWEEP = (3, 4, 4.5, 5, 6, 8, 12)
WIDTHS = (8, 9, 11, 7)
DEFAULT_PASS = "phash + variants + colour check (default)"
PASSES = {
    "phash alone": {"variants": False, "verify": False},
    "phash + colour check": {"variants": False, "verify": True},
    "phash + variants": {"variants": True, "verify": False},
    "phash + variants + colour check (default)": {"variants": True, "verify": True},
}


def bench_flat(args, results: dict) -> None:
    specs = flat_specs(args.flat, seed=args.seed)
    started = time.perf_counter()
    sigs = signatures([encode(render_flat(s), "PNG") for s in specs])
    print(f"flat: {len(specs):,} distinct images hashed in {time.perf_counter() - started:.1f} s")
    ids = [f"flat{i:05d}" for i in range(len(specs))]
    rows = {}
    for name, passes in PASSES.items():
        found = cluster(ids, sigs, **passes)
        merged = sum(len(c) - 1 for c in found.clusters)
        rows[name] = {
            "marked": merged,
            "clusters": len(found.clusters),
            "candidate_pairs": found.candidate_pairs,
            "rejected_pairs": found.rejected_pairs,
        }
        print(
            f"  {name:44s} false merges {merged:6,} ({len(found.clusters):,} clusters; "
            f"{found.candidate_pairs:,} candidate pairs, {found.rejected_pairs:,} rejected)"
        )
    sweep = {}
    for limit in SWEEP:
        found = cluster(ids, sigs, colour_distance=limit)
        sweep[f"{limit:g}"] = sum(len(c) - 1 for c in found.clusters)
    print(
        "  false merges (default passes) by --colour-distance: "
        + ", ".join(f"{k}: {v}" for k, v in sweep.items())
    )
    results["flat"] = {"images": len(specs), "passes": rows, "by_thresholds": sweep}


def recall(ids, groups, found: dd.Clustering) -> tuple[dict[str, float], int]:
    """Share of each copy kind found in its original's cluster; members of other groups merged."""
    cluster_of = {s: n for n, c in enumerate(found.clusters) for s in c}
    hits: dict[str, list[bool]] = {}
    for sample_id, (group, kind) in zip(ids, groups, strict=True):
        if kind == "original":
            continue
        original = f"{group}:original"
        same = sample_id in cluster_of and cluster_of[sample_id] == cluster_of.get(original)
        hits.setdefault(kind, []).append(same)
    foreign = 0
    group_of = {s: g for s, (g, _) in zip(ids, groups, strict=True)}
    for members in found.clusters:
        counts = {}
        for s in members:
            counts[group_of[s]] = counts.get(group_of[s], 0) + 1
        foreign += len(members) - max(counts.values())
    return {kind: float(np.mean(v)) for kind, v in hits.items()}, foreign


def bench_copies(args, results: dict) -> None:
    specs = flat_specs(args.flat, seed=args.seed)
    chosen = random.Random(1).sample(range(len(specs)), min(args.copies, len(specs)))
    sets = {
        "flat": [render_flat(specs[i]) for i in chosen],
        "flat-512px": [render_flat(specs[i], 512) for i in chosen],
        "photo": [photo_like(seed) for seed in range(args.photos)],
    }
    results["copies"] = {}
    for family, originals in sets.items():
        ids, groups, images = [], [], []
        for number, image in enumerate(originals):
            group = f"{family}{number:04d}"
            for kind, data in {"original": encode(image, "PNG"), **true_copies(image)}.items():
                ids.append(f"{group}:{kind}")
                groups.append((group, kind))
                images.append(data)
        sigs = signatures(images)
        phash_ok = {}
        for sample_id, sig in zip(ids, sigs, strict=True):
            original = sigs[ids.index(sample_id.split(":")[0] + ":original")]
            bits = (int(sig.phash, 16) ^ int(original.phash, 16)).bit_count()
            phash_ok.setdefault(sample_id.split(":")[1], []).append(bits <= dd.DEFAULT_MAX_DISTANCE)
        rows = {"within_phash_distance": {k: float(np.mean(v)) for k, v in phash_ok.items()}}
        for name in ("phash alone", "phash + colour check"):
            shares, foreign = recall(ids, groups, cluster(ids, sigs, **PASSES[name]))
            rows[name] = {"found": shares, "foreign_members": foreign}
        # the colour check on every copy whose pHash is within reach, whatever else joins it
        colour = []
        for sample_id, sig in zip(ids, sigs, strict=True):
            if sample_id.endswith(":original"):
                continue
            original = sigs[ids.index(sample_id.split(":")[0] + ":original")]
            colour.append(dd.colour_distance(original.colour_hash, sig.colour_hash))
        rows["colour_distance_max"] = float(max(colour))
        rows["colour_distance_p99"] = float(np.percentile(colour, 99))
        rows["passing_by_threshold"] = {
            f"{t:g}": float(np.mean(np.array(colour) <= t)) for t in SWEEP
        }
        results["copies"][family] = rows
        print(
            f"copies of {len(originals)} {family} images (colour distance to the original: "
            f"max {max(colour):.1f}, 99th pct {np.percentile(colour, 99):.1f}):"
        )
        for kind in rows["within_phash_distance"]:
            if kind == "original":
                continue
            line = "  ".join(
                f"{name}: {rows[name]['found'][kind]:.3f}"
                for name in ("phash alone", "phash + colour check")
            )
            print(f"  {kind:12s} within k {rows['within_phash_distance'][kind]:.3f}  found: {line}")
        print(
            "  copies passing the colour check by --colour-distance: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in rows["passing_by_threshold"].items())
        )
        print(
            f"  merges between different originals: phash alone "
            f"{rows['phash alone']['foreign_members']}, with the colour check "
            f"{rows['phash + colour check']['foreign_members']}"
        )


def bench_variants(args, results: dict) -> None:
    rng = random.Random(2)
    ids, groups, images = [], [], []
    for seed in range(args.photos):
        image = photo_like(10_000 + seed)
        group = f"photo{seed:04d}"
        for kind, data in {"original": encode(image), **reposts(image, rng)}.items():
            ids.append(f"{group}:{kind}")
            groups.append((group, kind))
            images.append(data)
    results["variants"] = {}
    default_regions = dd.VARIANTS
    columns = ("phash alone", "phash + colour check", "phash + variants", DEFAULT_PASS)
    for fraction in sorted({dd.VARIANT_CROP, *args.crop}):
        regions = pp.variant_regions(fraction)
        started = time.perf_counter()
        sigs = signatures(images, regions)
        per_image = (time.perf_counter() - started) / len(images)
        dd.VARIANTS = regions  # the search reads the regions of the variants from here
        try:
            rows = {"seconds_per_image": per_image}
            for name in columns:
                shares, foreign = recall(ids, groups, cluster(ids, sigs, **PASSES[name]))
                rows[name] = {"found": shares, "foreign_members": foreign}
            rows["crops_found_by_colour_distance"] = {}
            for limit in SWEEP:
                shares, _ = recall(ids, groups, cluster(ids, sigs, colour_distance=limit))
                crops = [v for k, v in shares.items() if "mirror" not in k]
                rows["crops_found_by_colour_distance"][f"{limit:g}"] = float(np.mean(crops))
        finally:
            dd.VARIANTS = default_regions
        results["variants"][f"crop {fraction:.2f}"] = rows
        label = " (default)" if fraction == dd.VARIANT_CROP else ""
        print(
            f"mirrored and cropped re-posts of {args.photos} photo-like images, variant crops "
            f"keep {fraction:.0%}{label} (signature {per_image * 1000:.1f} ms/image); found by:"
        )
        print(f"  {'':14s} {'phash':>7s} {'+colour':>8s} {'+variants':>10s} {'+both':>6s}")
        widths = list(zip(columns, WIDTHS, strict=True))
        for kind in rows[columns[0]]["found"]:
            found = "".join(f"{rows[n]['found'][kind]:>{w}.3f}" for n, w in widths)
            print(f"  {kind:14s}{found}")
        foreign = "".join(f"{rows[n]['foreign_members']:>{w}}" for n, w in widths)
        print(f"  {'other merges':14s}{foreign}")
        print(
            "  crop re-posts found (mean over kinds) by --colour-distance: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in rows["crops_found_by_colour_distance"].items())
        )


def bench_demo(args, results: dict) -> None:
    from pipelines.ingest import IngestStage
    from pipelines.runner import RunOptions, run_stage
    from surd_builder.demo import make_demo_folder
    from surd_builder.workspace import Workspace

    quiet = RunOptions(show_progress=False)
    rows = {}
    for seed in range(args.demo_seeds):
        with tempfile.TemporaryDirectory() as folder:
            make_demo_folder(Path(folder) / "demo", count=200, seed=seed)
            workspace = Workspace.create(Path(folder) / "ws")
            run_stage(IngestStage(Path(folder) / "demo", source="demo"), workspace, quiet)
            run_stage(dd.HashStage(), workspace, quiet)
            for name, passes in (
                ("before: phash alone", PASSES["phash alone"]),
                ("after: default", PASSES["phash + variants + colour check (default)"]),
            ):
                report = dd.dedupe(workspace, "phash-8", dry_run=True, **passes)
                rows.setdefault(name, []).append(report.duplicates)
    results["demo"] = {"images_per_seed": 200, "seeds": args.demo_seeds, "marked": rows}
    for name, marked in rows.items():
        print(f"demo, 200 distinct images x {args.demo_seeds} seeds, {name}: marked {marked}")


def bench_text(args, results: dict) -> None:
    rng = random.Random(3)
    merged, pairs = 0, 0
    names = sorted(PALETTE)
    for number in range(args.text_pairs):
        bg, fg = rng.sample(names, 2)
        first, second = rng.sample(WORDS, 2)
        spec = {
            "kind": "text",
            "bg": bg,
            "fg": fg,
            "row": rng.choice(TEXT_ROWS),
            "text_size": rng.choice((18, 24, 30)),
            "left": rng.choice((0.05, 0.3)),
        }
        sigs = signatures(
            [encode(render_flat({**spec, "word": w}), "PNG") for w in (first, second)]
        )
        bits = (int(sigs[0].phash, 16) ^ int(sigs[1].phash, 16)).bit_count()
        if bits > dd.DEFAULT_MAX_DISTANCE:
            continue
        pairs += 1
        found = cluster([f"t{number}a", f"t{number}b"], sigs)
        merged += bool(found.clusters)
    results["text"] = {"pairs_within_phash_distance": pairs, "merged": merged}
    print(
        f"text, same colours and place, another word: {merged} of {pairs} pairs within the "
        f"pHash distance merged (a limit of mean colours)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flat", type=int, default=10_000, help="distinct flat images")
    parser.add_argument("--copies", type=int, default=400, help="flat images to copy")
    parser.add_argument("--photos", type=int, default=200, help="photo-like images to copy")
    parser.add_argument(
        "--crop",
        type=float,
        nargs="*",
        default=[0.8, 0.9],
        help="variant crop fractions to compare with the default",
    )
    parser.add_argument("--demo-seeds", type=int, default=5)
    parser.add_argument("--text-pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["flat", "copies", "variants", "demo", "text"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {
        "max_distance": dd.DEFAULT_MAX_DISTANCE,
        "colour_distance": dd.DEFAULT_COLOUR_DISTANCE,
        "variant_crop": dd.VARIANT_CROP,
    }
    parts = {
        "flat": bench_flat,
        "copies": bench_copies,
        "variants": bench_variants,
        "demo": bench_demo,
        "text": bench_text,
    }
    for name in args.only:
        parts[name](args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
