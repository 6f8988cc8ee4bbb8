from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from surd_builder.atomic import (
    TEMP_PREFIX,
    atomic_path,
    remove_stale_temp_files,
    write_parquet_atomic,
)
from surd_builder.workspace import Workspace

# A writer that starts replacing part.parquet, writes one row group, then stops (blocked on stdin)
# until the test kills it with SIGKILL: a crash at the worst moment, made deterministic.
WRITER = textwrap.dedent(
    """
    import sys
    import pyarrow as pa, pyarrow.parquet as pq
    from surd_builder.atomic import atomic_path
    table = pa.table({"x": list(range(100_000))})
    with atomic_path(sys.argv[1]) as temp:
        writer = pq.ParquetWriter(temp, table.schema)
        writer.write_table(table)
        print("half-written", flush=True)
        sys.stdin.readline()
        writer.close()
    """
)


def test_writer_killed_mid_write_leaves_only_whole_files(tmp_path):
    workspace = Workspace.create(tmp_path / "ws")
    final = workspace.root / "tables" / "samples" / "part-1.parquet"
    write_parquet_atomic(pa.table({"x": [1, 2, 3]}), final)  # the previous, complete version

    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(final)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "half-written"
        temps = list(final.parent.glob(f"{TEMP_PREFIX}*"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()

    # the visible file is the old, whole one; the half-written temp is invisible to readers
    assert pq.read_table(final)["x"].to_pylist() == [1, 2, 3]
    assert [p.name for p in final.parent.glob("part-*.parquet")] == ["part-1.parquet"]
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(temps[0])
    # opening the workspace sweeps the dead writer's leftovers, once they are old enough that no
    # writer on another host (whose pid we cannot see) could still be using them
    Workspace.open(workspace.root)
    assert temps[0].exists()
    an_hour_ago = time.time() - 3600
    os.utime(temps[0], (an_hour_ago, an_hour_ago))
    Workspace.open(workspace.root)
    assert not temps[0].exists()


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    final = tmp_path / "state.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as temp:
        temp.write_text("new but broken")
        raise RuntimeError("writer crashed")
    assert final.read_text() == "old"
    assert list(tmp_path.iterdir()) == [final]


def test_only_old_temp_files_of_dead_writers_are_removed(tmp_path):
    an_hour_ago = time.time() - 3600
    mine = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-part.parquet"  # live writer, old file
    dead_recent = tmp_path / f"{TEMP_PREFIX}999999999-recent.parquet"  # maybe another host's
    dead_old = tmp_path / "sub" / f"{TEMP_PREFIX}999999999-part.parquet"
    dead_old.parent.mkdir()
    for path in (mine, dead_recent, dead_old):
        path.write_bytes(b"data")
    for path in (mine, dead_old):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert remove_stale_temp_files(tmp_path) == 1
    assert mine.exists() and dead_recent.exists() and not dead_old.exists()
