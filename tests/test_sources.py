"""API sources against API-shaped JSON pages served on 127.0.0.1."""

from __future__ import annotations

import os
from urllib.parse import parse_qs

import pytest

from pipelines.download import FetchOptions
from pipelines.runner import RunOptions, run_stage
from pipelines.scrape import ScrapeStage
from pipelines.sources.civitai import CivitaiImages, CivitaiModels
from pipelines.sources.lexica import LexicaSearch
from surd_builder.errors import InputError
from tests.conftest import run_surd
from tests.http_fixture import FaultyServer

QUIET = RunOptions(batch_size=8, show_progress=False)
LOOPBACK = FetchOptions(allowed_hosts=("127.0.0.1",), retries=1, backoff_seconds=0.0)
TOKEN = "sekrit-civitai-token-1234"


@pytest.fixture
def server():
    with FaultyServer() as running:
        yield running


def civitai_image(n: int, base: str, **overrides):
    image = {
        "id": n,
        "url": f"{base}/img/{n}.jpg",
        "width": 48,
        "height": 48,
        "nsfwLevel": "None",
        "nsfw": False,
        "username": f"artist{n}",
        "baseModel": "SD 1.5",
        "meta": {
            "prompt": f"castle {n}, fantasy, 8k, artstation",
            "negativePrompt": "blurry",
            "sampler": "Euler a",
            "seed": 1000 + n,
            "cfgScale": 7,
            "steps": 25,
            "Model": "dreamshaper_8",
        },
    }
    image.update(overrides)
    return image


def test_civitai_images_through_the_cli(tmp_path, server):
    base = server.base
    server.documents["/api/v1/images"] = {
        "items": [
            civitai_image(1, base),
            civitai_image(2, base, meta=None),  # no prompt: skipped, counted
            # an image on another host: it must not receive the API token
            civitai_image(5, base, url=f"{base.replace('127.0.0.1', 'localhost')}/img/5.jpg"),
            civitai_image(3, base, meta={"id": 3, "meta": {"prompt": "wrapped meta"}}),
        ],
        "metadata": {"nextCursor": "abc", "nextPage": f"{base}/civitai/page-2"},
    }
    server.documents["/civitai/page-2"] = {
        "items": [civitai_image(3, base, meta={"prompt": "wrapped meta"}), civitai_image(4, base)],
        "metadata": {},
    }
    ws = tmp_path / "ws"
    assert run_surd("init", str(ws)).returncode == 0
    command = (
        "build", "scrape", "civitai", "-w", str(ws), "--base-url", base,
        "--allow-host", "127.0.0.1", "--allow-host", "localhost",
        "--model-id", "77", "--nsfw", "X", "--sort", "Newest", "--page-size", "3", "--no-progress",
    )  # fmt: skip
    env = {**os.environ, "CIVITAI_API_TOKEN": TOKEN}
    result = run_surd(*command, env=env)
    assert result.returncode == 0, result.stderr

    from surd_builder.workspace import Workspace

    workspace = Workspace.open(ws)
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert set(samples) == {"1", "3", "4", "5"}  # 3 was on both pages: one sample
    first = samples["1"]
    assert first["complex_prompt"] == "castle 1, fantasy, 8k, artstation"
    assert (first["negative_prompt"], first["sampler"], first["seed"]) == (
        "blurry",
        "Euler a",
        1001,
    )
    assert (first["steps"], first["cfg_scale"], first["model_name"]) == (25, 7.0, "dreamshaper_8")
    assert (first["nsfw"], first["creator"], first["source"]) == (False, "artist1", "civitai")
    assert first["page_url"] == f"{base}/images/1"
    assert first["source_url"] == f"{base}/img/1.jpg"
    assert samples["3"]["complex_prompt"] == "wrapped meta"
    failures = workspace.read_failures().to_pylist()
    assert [(f["source_item_id"], f["reason"]) for f in failures] == [("2", "no-prompt")]

    query = parse_qs(next(q for p, q in server.queries if p == "/api/v1/images"))
    assert query == {
        "modelId": ["77"], "nsfw": ["X"], "sort": ["Newest"], "withMeta": ["true"], "limit": ["3"]
    }  # fmt: skip
    assert ("127.0.0.1", f"Bearer {TOKEN}") in server.auth_by_host  # the API host gets it
    assert {auth for host, auth in server.auth_by_host if host == "localhost"} == {""}
    # the token is sent, but never written anywhere in the workspace nor printed
    assert TOKEN not in result.stdout + result.stderr
    for path in ws.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    pages_before = server.hits["/api/v1/images"] + server.hits["/civitai/page-2"]
    again = run_surd(*command, env=env)
    assert again.returncode == 0, again.stderr
    assert server.hits["/api/v1/images"] + server.hits["/civitai/page-2"] == pages_before
    assert server.hits["/img/1.jpg"] == 1  # listing exhausted and samples done: nothing fetched


def test_listing_stops_at_a_broken_page_and_resumes_there(tmp_path, workspace, server):
    base = server.base
    server.documents["/api/v1/images"] = {
        "items": [civitai_image(1, base), civitai_image(2, base)],
        "metadata": {"nextPage": f"{base}/civitai/page-2"},
    }
    server.documents["/civitai/page-2"] = b"<html>Cloudflare says no</html>"  # HTML, not JSON

    def stage():
        source = CivitaiImages(base_url=base, max_items=100)
        return ScrapeStage(source, LOOPBACK)

    first = stage()
    report = run_stage(first, workspace, QUIET)
    assert report.written == 2  # what was listed is downloaded
    assert "bad-json" in first.source.listing_error
    assert "listing_error" in workspace.runs()[-1]["params"]

    server.documents["/civitai/page-2"] = {"items": [civitai_image(5, base)], "metadata": {}}
    second = stage()
    report = run_stage(second, workspace, QUIET)
    assert (report.already_done, report.written) == (2, 1)
    assert second.source.listing_error is None
    assert server.hits["/api/v1/images"] == 1  # resumed at page 2, page 1 not asked again
    assert workspace.read_state("listing-civitai")["exhausted"] is True


def test_max_items_bounds_the_listing(workspace, server):
    base = server.base
    server.documents["/api/v1/images"] = {
        "items": [civitai_image(n, base) for n in range(1, 4)],
        "metadata": {"nextPage": f"{base}/civitai/page-2"},
    }
    server.documents["/civitai/page-2"] = {"items": [civitai_image(9, base)], "metadata": {}}
    report = run_stage(
        ScrapeStage(CivitaiImages(base_url=base, max_items=2), LOOPBACK), workspace, QUIET
    )
    assert report.written == 3 and server.hits["/civitai/page-2"] == 0  # whole pages only
    report = run_stage(ScrapeStage(CivitaiImages(base_url=base), LOOPBACK), workspace, QUIET)
    assert report.written == 1 and server.hits["/civitai/page-2"] == 1


def test_civitai_models_endpoint(workspace, server):
    base = server.base
    server.documents["/api/v1/models"] = {
        "items": [
            {
                "id": 10,
                "name": "DreamShaper",
                "modelVersions": [
                    {
                        "name": "v8",
                        "images": [
                            civitai_image(1, base, nsfwLevel=1, nsfw=None, username=None),
                            {"id": 2, "url": f"{base}/img/2.jpg", "nsfwLevel": 8},  # no meta
                        ],
                    }
                ],
            }
        ],
        "metadata": {},
    }
    source = CivitaiModels(base_url=base, query={"types": ["Checkpoint"], "query": None})
    report = run_stage(ScrapeStage(source, LOOPBACK), workspace, QUIET)
    assert (report.written, report.failures_by_reason) == (1, {"no-prompt": 1})
    sample = workspace.read_table("samples").to_pylist()[0]
    assert (sample["model_name"], sample["nsfw"]) == ("dreamshaper_8", False)
    assert parse_qs(server.queries[0][1]) == {"types": ["Checkpoint"], "limit": ["100"]}


def test_lexica_one_page_per_query(workspace, server):
    base = server.base

    def lexica_image(n):
        return {
            "id": f"uuid-{n}",
            "src": f"{base}/img/{n}.jpg",
            "prompt": f"portrait {n}, octane render",
            "width": 48,
            "height": 48,
            "seed": str(4000 + n),
            "guidance": 7.5,
            "model": "stable-diffusion",
            "nsfw": False,
            "gallery": f"{base}/?q=uuid-{n}",
        }

    server.documents["/api/v1/search"] = {"images": [lexica_image(1), lexica_image(2)]}
    source = LexicaSearch(["portrait", "cat"], base_url=base)
    report = run_stage(ScrapeStage(source, LOOPBACK), workspace, QUIET)
    assert report.written == 2 and server.hits["/api/v1/search"] == 2  # one page per query
    assert sorted(q for _, q in server.queries if q.startswith("q=")) == ["q=cat", "q=portrait"]
    sample = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}["uuid-1"]
    assert (sample["seed"], sample["cfg_scale"], sample["model_name"]) == (
        4001,
        7.5,
        "stable-diffusion",
    )


def diffusiondb_part(part: int, count: int) -> tuple[bytes, dict]:
    import io
    import json
    import zipfile

    from tests.http_fixture import jpeg

    prompts, buffer = {}, io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(count):
            name = f"{part:02d}{n:02d}aaaa-uuid.png"
            archive.writestr(name, jpeg(part * 10 + n, fmt="PNG"))
            prompts[name] = {
                "p": f"dragon {part}-{n}, 4k",
                "se": 99 + n,
                "c": 7.0,
                "st": 50,
                "sa": "k_lms",
            }
        archive.writestr(f"part-{part:06d}.json", json.dumps(prompts))
    return buffer.getvalue(), prompts


def test_diffusiondb_local_zip_and_extracted_folder(tmp_path, workspace):
    import io
    import zipfile

    root = tmp_path / "diffusiondb"
    (root / "images").mkdir(parents=True)
    zipped, prompts_1 = diffusiondb_part(1, 3)
    (root / "images" / "part-000001.zip").write_bytes(zipped)
    second, prompts_2 = diffusiondb_part(2, 2)
    zipfile.ZipFile(io.BytesIO(second)).extractall(root / "images" / "part-000002")
    import pyarrow as pa
    import pyarrow.parquet as pq

    first_name = sorted(prompts_1)[0]
    metadata = pa.table(
        {
            "image_name": [first_name, "elsewhere.png"],
            "part_id": pa.array([1, 9], pa.uint16()),
            "user_name": ["hash-of-a-user", "someone else"],
            "image_nsfw": pa.array([2.0, 0.1], pa.float32()),
        }
    )
    pq.write_table(metadata, root / "metadata.parquet")

    from pipelines.sources.diffusiondb import DiffusionDB

    report = run_stage(
        ScrapeStage(DiffusionDB(str(root), parts=[1, 2]), LOOPBACK), workspace, QUIET
    )
    assert (report.written, report.failed) == (5, 0)
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    assert set(samples) == set(prompts_1) | set(prompts_2)
    name = sorted(prompts_1)[1]
    sample = samples[name]
    assert (sample["complex_prompt"], sample["seed"], sample["steps"]) == (
        "dragon 1-1, 4k",
        100,
        50,
    )
    assert (sample["sampler"], sample["cfg_scale"], sample["license"]) == ("k_lms", 7.0, "CC0-1.0")
    assert sample["source_url"] is None and sample["width"] == 48  # no local paths in the data
    assert (samples[first_name]["creator"], samples[first_name]["nsfw"]) == ("hash-of-a-user", True)
    assert sample["creator"] is None


def test_diffusiondb_over_http_downloads_each_part_once(tmp_path, workspace, server):
    from pipelines.sources.diffusiondb import DiffusionDB, parse_parts

    zipped, prompts = diffusiondb_part(3, 4)
    server.files["/dataset/images/part-000003.zip"] = (zipped, "application/zip")
    location = f"{server.base}/dataset"
    source = DiffusionDB(location, parts=parse_parts("3-4"))
    report = run_stage(ScrapeStage(source, LOOPBACK), workspace, QUIET)
    assert report.written == 4
    assert "part 4: http-404" in source.listing_error  # a missing part is reported, not fatal
    sample = workspace.read_table("samples").to_pylist()[0]
    assert sample["source_url"].startswith(f"{location}/images/part-000003.zip#")
    again = run_stage(ScrapeStage(DiffusionDB(location, parts=[3]), LOOPBACK), workspace, QUIET)
    assert again.already_done == 4
    assert server.hits["/dataset/images/part-000003.zip"] == 1  # cached in the workspace
    with pytest.raises(InputError, match="parts are numbered 1 to 2000"):
        parse_parts("0-2")


def test_a_listing_is_not_resumed_with_other_options(workspace, server):
    base = server.base
    server.documents["/api/v1/images"] = {"items": [civitai_image(1, base)], "metadata": {}}
    run_stage(
        ScrapeStage(CivitaiImages(base_url=base, query={"modelId": 1}), LOOPBACK), workspace, QUIET
    )
    other = CivitaiImages(base_url=base, query={"modelId": 2})
    with pytest.raises(InputError, match="made with other options.*--relist"):
        run_stage(ScrapeStage(other, LOOPBACK), workspace, QUIET)
    relisted = CivitaiImages(base_url=base, query={"modelId": 2}, relist=True)
    report = run_stage(ScrapeStage(relisted, LOOPBACK), workspace, QUIET)
    assert report.planned == 1 and server.hits["/api/v1/images"] == 2


# Whitespace as real gallery prompts carry it: tabs, runs of spaces, newlines (CRLF too),
# no-break, zero-width and ideographic spaces. One prompt in four on real Civitai pages had one.
ODD_PROMPTS = [
    "masterpiece,\tbest quality,  1girl",
    "castle on a hill\n\n(dusk:1.2),\u00a0volumetric light",
    "cyberpunk\u200bcity,\u3000neon,   rain\r\n8k",
    "  \ufeffsurrounded by spaces, kept inside  ",
]


def stored_text(text: str) -> str:
    """What surd stores of a prompt: the text less a leading BOM and the surrounding
    whitespace, line ends as \\n (README: prompts are stored exactly)."""
    return text.strip().removeprefix("\ufeff").replace("\r\n", "\n").strip()


def test_api_prompts_are_stored_exactly(workspace, server):
    base = server.base
    server.documents["/api/v1/images"] = {
        "items": [
            civitai_image(
                n,
                base,
                meta={"prompt": prompt, "negativePrompt": f"blurry,\t\tlowres  {n}\n"},
            )
            for n, prompt in enumerate(ODD_PROMPTS)
        ],
        "metadata": {},
    }
    server.documents["/api/v1/search"] = {
        "images": [
            {"id": f"lx-{n}", "src": f"{base}/img/{n + 10}.jpg", "prompt": prompt}
            for n, prompt in enumerate(ODD_PROMPTS)
        ]
    }
    run_stage(ScrapeStage(CivitaiImages(base_url=base), LOOPBACK), workspace, QUIET)
    run_stage(ScrapeStage(LexicaSearch(["q"], base_url=base), LOOPBACK), workspace, QUIET)
    samples = {r["source_item_id"]: r for r in workspace.read_table("samples").to_pylist()}
    for n, prompt in enumerate(ODD_PROMPTS):
        for item in (str(n), f"lx-{n}"):
            assert samples[item]["complex_prompt"] == stored_text(prompt), item
        assert samples[str(n)]["negative_prompt"] == f"blurry,\t\tlowres  {n}"
    assert "\u200b" in samples["2"]["complex_prompt"] and "\t" in samples["0"]["complex_prompt"]
