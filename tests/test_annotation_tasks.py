"""The pure parts of the annotation round trip (no server): labeling config, task building,
reading annotations, policies, agreement, and the read-only image server."""

from __future__ import annotations

import base64
import threading
from datetime import UTC, datetime, timedelta

import pytest
import requests

from annotation.config import check_label_config, label_config
from annotation.image_files import image_file, write_image_files
from annotation.images import ImageServer, cors_origins
from annotation.tasks import (
    PREDICTION_MODEL_VERSION,
    Decision,
    agreement,
    choose,
    data_uri,
    decision_of,
    image_url,
    media_type,
    sample_to_task,
)
from surd_builder.errors import InputError
from surd_builder.ids import sha256_hex
from surd_builder.schema import IMAGES_SCHEMA, records_to_table
from tests.conftest import image_bytes

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def annotation(*, decision=None, text=None, problems=(), cancelled=False, by=1, at=T0, id=1):
    result = []
    if decision:
        result.append(
            {"from_name": "decision", "type": "choices", "value": {"choices": [decision]}}
        )
    if text is not None:
        result.append(
            {"from_name": "narrative_prompt", "type": "textarea", "value": {"text": [text]}}
        )
    if problems:
        result.append(
            {"from_name": "problems", "type": "choices", "value": {"choices": list(problems)}}
        )
    return {
        "id": id,
        "completed_by": by,
        "result": result,
        "was_cancelled": cancelled,
        "updated_at": at.isoformat().replace("+00:00", "Z"),
    }


def test_shipped_label_config_is_ours_and_foreign_ones_are_told_apart() -> None:
    assert check_label_config(label_config()) is None
    assert "TextArea" in check_label_config(label_config().replace("TextArea", "Text"))
    assert "decision choices" in check_label_config(
        label_config().replace('value="corrected"', 'value="fixed"')
    )
    assert "not valid XML" in check_label_config("<View>")


def test_task_carries_the_data_and_prefills_the_narrative() -> None:
    sample = {
        "sample_id": "s1",
        "source": "demo",
        "complex_prompt": "3 red circles, 8k",
        "narrative_prompt": "three red circles",
        "narrative_origin": "rules:v2",
        "clip_score": 0.31234567,
        "text_similarity": None,
    }
    task = sample_to_task(
        sample, image_url("http://cdn/{image_sha256}.png?s={sample_id}", "ab", "s1")
    )
    assert task["data"]["image"] == "http://cdn/ab.png?s=s1"
    assert task["data"]["sample_id"] == "s1" and task["data"]["clip_score"] == 0.3123
    assert "text_similarity" not in task["data"]
    [prediction] = task["predictions"]
    # every rewriter's prediction has the model_version surd's projects select (the label
    # stream pre-fills only from that one); the rewriter is in the data
    assert prediction["model_version"] == PREDICTION_MODEL_VERSION
    assert task["data"]["narrative_origin"] == "rules:v2"
    assert prediction["result"][0]["value"]["text"] == ["three red circles"]
    assert "predictions" not in sample_to_task({**sample, "narrative_prompt": None}, "u")


def test_reading_annotations() -> None:
    pushed = "three red circles"
    accepted = decision_of(annotation(decision="accept"), "s", pushed)
    assert (accepted.status, accepted.narrative) == ("accepted", pushed)
    untouched = decision_of(annotation(decision="accept", text=pushed), "s", pushed)
    assert untouched.status == "accepted"
    # the text is the evidence: an edit is a correction whatever was clicked, and no edit is not
    edited = decision_of(annotation(decision="accept", text="three red squares"), "s", pushed)
    assert (edited.status, edited.narrative) == ("corrected", "three red squares")
    assert (
        decision_of(annotation(decision="corrected", text=pushed), "s", pushed).status == "accepted"
    )
    assert decision_of(annotation(text="two red circles"), "s", pushed).status == "corrected"
    rejected = decision_of(annotation(decision="reject", problems=["count", "bogus"]), "s", pushed)
    assert (rejected.status, rejected.narrative, rejected.tags) == ("rejected", None, ("count",))
    assert rejected.decided_at == T0 and rejected.annotator == 1
    assert decision_of(annotation(decision="accept", cancelled=True), "s", pushed) is None
    assert decision_of(annotation(), "s", pushed) is None  # neither a choice nor an edit
    assert decision_of(annotation(decision="accept"), "s", None) is None  # nothing to accept


def test_policies_and_agreement() -> None:
    early = Decision("s", 1, "accepted", "a cat", decided_at=T0)
    late = Decision("s", 2, "rejected", None, decided_at=T0 + timedelta(minutes=5))
    same = Decision("s", 2, "accepted", "a cat", decided_at=T0 + timedelta(minutes=1))
    assert choose([late, early]) == late
    assert choose([early, late], "unanimous") is None
    assert choose([early, same], "unanimous") == same
    assert choose([]) is None
    with pytest.raises(ValueError):
        choose([early], "majority")
    # one task with two annotators who disagree, one where they agree, one with one annotator
    assert agreement([[early, late], [early, same], [early]]) == (2, 1)
    # an annotator's own later decision replaces their earlier one
    again = Decision("s", 1, "rejected", None, decided_at=T0 + timedelta(minutes=9))
    assert agreement([[early, late, again]]) == (1, 1)


def test_data_uri_and_media_types() -> None:
    png, jpeg = image_bytes(fmt="PNG"), image_bytes(fmt="JPEG")
    assert media_type(png) == "image/png" and media_type(jpeg) == "image/jpeg"
    assert media_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert media_type(b"RIFF\0\0\0\0WAVE") == "application/octet-stream"
    uri = data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png


def test_image_server_serves_stored_images_read_only(workspace) -> None:
    png = image_bytes(fmt="PNG")
    sha = sha256_hex(png)
    workspace.write_images(
        records_to_table([{"image_sha256": sha, "image_bytes": png}], IMAGES_SCHEMA)
    )
    server = ImageServer(workspace, "127.0.0.1", 0, reload_seconds=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        response = requests.get(f"{server.url}/images/{sha}", timeout=5)
        assert response.status_code == 200 and response.content == png
        assert response.headers["Content-Type"] == "image/png"
        assert "immutable" in response.headers["Cache-Control"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        # Label Studio draws images with crossorigin="anonymous": the response must allow it
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in response.headers  # one answer for every origin: caches may share it
        head = requests.head(f"{server.url}/images/{sha}", timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(png))
        assert head.headers["Access-Control-Allow-Origin"] == "*"
        # the default URL template's query names no other file
        assert requests.get(f"{server.url}/images/{sha}?cors=1", timeout=5).content == png
        preflight = requests.options(
            f"{server.url}/images/{sha}",
            headers={
                "Origin": "http://127.0.0.1:8080",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "range, x-evil",
                "Access-Control-Request-Private-Network": "true",
            },
            timeout=5,
        )
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert preflight.headers["Access-Control-Allow-Methods"] == "GET, HEAD, OPTIONS"
        assert preflight.headers["Access-Control-Allow-Headers"] == "range"
        assert "Access-Control-Allow-Private-Network" not in preflight.headers  # not for '*'
        for path in ("/images/" + "0" * 64, "/images/../surd.toml", "/surd.toml", "/"):
            assert requests.get(server.url + path, timeout=5).status_code == 404
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            refused = requests.request(method, f"{server.url}/images/{sha}", timeout=5)
            assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD, OPTIONS"
        # an image stored after the server started (e.g. by a scrape) is found too
        later = image_bytes((1, 2, 3), fmt="JPEG")
        other = type(workspace)(workspace.root)  # another process's view of the workspace
        other.write_images(
            records_to_table(
                [{"image_sha256": sha256_hex(later), "image_bytes": later}], IMAGES_SCHEMA
            )
        )
        response = requests.get(f"{server.url}/images/{sha256_hex(later)}", timeout=5)
        assert response.content == later and response.headers["Content-Type"] == "image/jpeg"
    finally:
        server.shutdown()
        server.server_close()


def test_image_server_allows_only_named_origins(workspace) -> None:
    png = image_bytes(fmt="PNG")
    sha = sha256_hex(png)
    workspace.write_images(
        records_to_table([{"image_sha256": sha, "image_bytes": png}], IMAGES_SCHEMA)
    )
    label_studio = "http://127.0.0.1:8080"
    server = ImageServer(
        workspace, "127.0.0.1", 0, allowed_origins=[f"{label_studio}/projects/1/", label_studio]
    )
    assert server.allowed_origins == (label_studio,)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"{server.url}/images/{sha}"
        allowed = requests.get(url, headers={"Origin": label_studio}, timeout=5)
        assert allowed.headers["Access-Control-Allow-Origin"] == label_studio
        assert allowed.headers["Vary"] == "Origin"
        other = requests.get(url, headers={"Origin": "http://evil.example"}, timeout=5)
        assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
        assert other.headers["Vary"] == "Origin"
        preflight = requests.options(
            url,
            headers={"Origin": label_studio, "Access-Control-Request-Private-Network": "true"},
            timeout=5,
        )
        assert preflight.headers["Access-Control-Allow-Private-Network"] == "true"
    finally:
        server.shutdown()
        server.server_close()
    for bad in ("127.0.0.1:8080", "http://[::1", "http://h:abc", "http://u:p@h", "ftp://h"):
        with pytest.raises(InputError, match="not an origin"):
            ImageServer(workspace, "127.0.0.1", 0, allowed_origins=[bad])
    assert cors_origins(["http://a.example", "*"]) == ("*",)
    # as browsers send them: default ports left out, host in lower case, IPv6 in brackets
    assert cors_origins(["https://LS.example.org:443/x", "http://[::1]:8080", "http://h:80"]) == (
        "https://ls.example.org",
        "http://[::1]:8080",
        "http://h",
    )


def test_a_refused_write_closes_the_connection(workspace) -> None:
    """A 405 leaves the body unread; on a kept-alive connection it would be read as the next
    request. The answer closes the connection instead."""
    import socket

    server = ImageServer(workspace, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        smuggled = b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
        request = (
            b"POST /images/x HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(smuggled)}\r\n\r\n".encode()
            + smuggled
        )
        with socket.create_connection(server.server_address[:2], timeout=5) as conn:
            conn.sendall(request)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 405")
        assert answer.count(b"HTTP/1.1 ") == 1  # no second answer, to the body
    finally:
        server.shutdown()
        server.server_close()


def test_image_files_are_named_by_content_and_written_once(workspace, tmp_path) -> None:
    png, jpeg = image_bytes(fmt="PNG"), image_bytes((9, 9, 9), fmt="JPEG")
    images = {sha256_hex(png): png, sha256_hex(jpeg): jpeg}
    workspace.write_images(
        records_to_table(
            [{"image_sha256": s, "image_bytes": b} for s, b in images.items()], IMAGES_SCHEMA
        )
    )
    formats = [(sha256_hex(png), "PNG"), (sha256_hex(jpeg), "JPEG")]
    folder = tmp_path / "files"
    report = write_image_files(workspace, folder, formats, show_progress=False)
    assert (report.images, report.written, report.present) == (2, 2, 0)
    assert (folder / f"{sha256_hex(png)}.png").read_bytes() == png
    assert (folder / f"{sha256_hex(jpeg)}.jpg").read_bytes() == jpeg
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{sha256_hex(png)}.png", f"{sha256_hex(jpeg)}.jpg"]
    )  # no temporary files left
    (folder / f"{sha256_hex(jpeg)}.jpg").unlink()  # as if interrupted before it
    again = write_image_files(workspace, folder, formats, show_progress=False)
    assert (again.written, again.present) == (1, 1)
    assert image_file("ab", "MPO") == "ab.jpg" and image_file("ab", None) == "ab.img"
    assert image_url("/d/{image_file}?s={sample_id}", "ab", "s1", "ab.png") == "/d/ab.png?s=s1"


def test_a_text_shown_before_a_refresh_is_accepted_not_corrected() -> None:
    old, new = "three red circles", "three small red circles"
    accepted_old = annotation(decision="accept", text=old)  # opened before the refresh
    decided = decision_of(accepted_old, "s", new, shown_before=[old])
    assert (decided.status, decided.narrative) == ("accepted", old)
    edited = decision_of(annotation(decision="corrected", text="two circles"), "s", new, [old])
    assert (edited.status, edited.narrative) == ("corrected", "two circles")
    assert decision_of(accepted_old, "s", new).status == "corrected"  # without the history


def test_server_dates_and_where_the_next_read_starts() -> None:
    from annotation.client import _server_time
    from annotation.mirror import OVERLAP, next_since

    date = _server_time("Wed, 02 Dec 2026 06:03:14 GMT")
    assert date == datetime(2026, 12, 2, 6, 3, 14, tzinfo=UTC)
    assert _server_time(None) is None and _server_time("yesterday") is None
    assert next_since(date) == date - timedelta(seconds=1) - OVERLAP
    older = date - timedelta(minutes=3)  # the database's clock, behind a proxy's Date
    assert next_since(date, older) == older - OVERLAP
    assert next_since(None) < datetime.now(UTC) - timedelta(minutes=59)


def test_a_damaged_or_foreign_mirror_is_read_as_none(tmp_path) -> None:
    from annotation.mirror import Mirror, MirrorState, TaskState

    mirror = Mirror(tmp_path)
    decision = Decision("s", 1, "accepted", "a cat", decided_at=T0, annotation_id=5)
    state = MirrorState({7: TaskState("s", T0, (decision,))}, T0, 3, 9)
    mirror.write(state)
    assert mirror.read() == state
    mirror.path.write_bytes(mirror.path.read_bytes()[:40])  # cut short
    assert mirror.read() == MirrorState()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"task_id": [1]}), mirror.path)  # another layout, no format
    assert mirror.read() == MirrorState()


def test_naive_times_are_utc_and_a_cleared_text_is_no_edit() -> None:
    naive = annotation(decision="accept")
    naive["updated_at"] = "2026-01-01T00:00:00.000001"
    decided = decision_of(naive, "s", "a cat")
    assert decided.decided_at == T0 + timedelta(microseconds=1)
    assert choose([decided, decision_of(annotation(decision="reject"), "s", "a cat")]) == decided
    cleared = decision_of(annotation(decision="corrected", text=""), "s", "a cat")
    assert (cleared.status, cleared.narrative) == ("accepted", "a cat")
