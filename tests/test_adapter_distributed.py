"""`surd train` under `accelerate launch`, on the CPU: 2 processes, and 2 "nodes" (two launches
on this machine, each with its own cache folder), train the adapter one process trains with the
same global batch and seed, and build every cache folder once, completely.

The launches use the documented configs (configs/accelerate/), with the process count, address
and precision overridden for a CPU run. `accelerate launch --cpu --num_processes 2` would start
one process: with ``--cpu`` accelerate only spreads processes through MPI (``--mpirun_hostfile``).
A MULTI_GPU config (or ``--multi_gpu``) starts them with torchrun, and ``surd train --device
cpu`` then makes accelerate use gloo on the CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adapter.model import SURAdapter
from adapter.train import train
from adapter.train_setup import cache_share
from tests.test_adapter_train import Stack, config, history, make_stack

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
STEPS, BATCH_PER_PROCESS, PROCESSES = 6, 4, 2
# gradients all-reduced over 2 processes differ from one batch's by float rounding (measured:
# weights within 3e-6); one step moves a weight by up to the learning rate, 1e-3
WEIGHT_TOLERANCE = 2e-5
LOSS_TERMS = ("total", "quality", "distillation", "prompt_alignment", "lr")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    return make_stack(tmp_path_factory.mktemp("distributed"))


def parity_config(stack: Stack, output: Path, cache: Path, **overrides):
    return config(
        stack,
        output,
        cache_dir=cache,
        max_steps=STEPS,
        adapter_dropout=0.0,
        logging_steps=1,
        **overrides,
    )


@pytest.fixture(scope="module")
def one_process(stack, tmp_path_factory) -> tuple[Path, Path]:
    """(output, cache) of one process with the global batch, dropout off, a fresh cache."""
    root = tmp_path_factory.mktemp("one-process")
    train(
        parity_config(stack, root / "run", root / "cache", batch_size=BATCH_PER_PROCESS * PROCESSES)
    )
    return root / "run", root / "cache"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config_file: str, stack: Stack, output: Path, cache: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / config_file), "--num_processes", str(PROCESSES), "--mixed_precision", "no",
        *options, "-m", "surd_builder", "train", "--data", str(stack.data), "--base-model",
        str(stack.base_model), "--llm", str(stack.llm), "--llm-layer", "2", "--output",
        str(output), "--cache-dir", str(cache), "--resolution", "32", "--batch-size",
        str(BATCH_PER_PROCESS), "--max-steps", str(STEPS), "--learning-rate", "1e-3",
        "--eta-prompt", "1", "--adapter-dropout", "0", "--device", "cpu",
        "--no-validation-images", "--no-progress", "--adapter-heads", "4", "--logging-steps", "1",
        "--adapter-feedforward", "64", "--adapter-mlp", "64",
    ]  # fmt: skip


def node(rank: int, port: str) -> list[str]:
    """The options that make a launch ``rank``'s machine of a 2-machine job on this one."""
    return ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port",
            port]  # fmt: skip


def run_together(
    commands: list[list[str]], logs: Path, timeout: float = 240
) -> list[tuple[int | str, str]]:
    """Run ``commands`` at once (the nodes of one job): (exit code, output) of each."""
    launcher_state = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")  # fmt: skip
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ACCELERATE_") and name not in launcher_state
    }
    env["OMP_NUM_THREADS"] = "1"
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    for number, command in enumerate(commands):
        log = (logs / f"launch-{number}.log").open("w")
        started.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True), log))  # fmt: skip
    deadline, results = time.monotonic() + timeout, []
    try:
        for process, log in started:
            try:
                code: int | str = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = "timed out"
            log.close()
            results.append((code, Path(log.name).read_text()))
    finally:
        for process, log in started:
            log.close()
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the session of a launch started here
                process.wait()
    return results


def succeed_together(commands: list[list[str]], logs: Path) -> None:
    failed = [f"({code}):\n{output[-3000:]}" for code, output in run_together(commands, logs)
              if code != 0]  # fmt: skip
    assert not failed, "\n".join(failed)


def compare_runs(output: Path, reference: Path) -> None:
    """The adapter of ``output`` is the one of ``reference`` up to float rounding (small next
    to how far the weights moved), and so are the train losses of every step."""
    expected = SURAdapter.from_pretrained(reference).state_dict()
    got = SURAdapter.from_pretrained(output).state_dict()
    difference = max(float((got[name] - tensor).abs().max()) for name, tensor in expected.items())
    moved = float(expected["out.weight"].abs().max())  # the output layer starts at zero
    print(f"{output.name}: max |weight difference| {difference:.2e}, out.weight moved {moved:.2e}")
    assert moved > 100 * WEIGHT_TOLERANCE
    assert difference < WEIGHT_TOLERANCE
    rows, expected_rows = history(output, "train"), history(reference, "train")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row, expected_row in zip(rows, expected_rows, strict=True):
        for term in LOSS_TERMS:
            assert row[term] == pytest.approx(expected_row[term], rel=1e-5, abs=1e-6), (row, term)
    # held-out losses too, though the main process evaluates in chunks of its own --batch-size
    held, expected_held = history(output, "held_out"), history(reference, "held_out")
    assert [row["step"] for row in held] == [row["step"] for row in expected_held] == [0, STEPS]
    for row, expected_row in zip(held, expected_held, strict=True):
        for term in LOSS_TERMS[:-1]:
            assert row[term] == pytest.approx(expected_row[term], rel=1e-5, abs=1e-6), (row, term)


def cache_keys(cache: Path) -> dict[str, list[str]]:
    """Each cache folder's keys, repeats kept (a repeat = a value computed twice)."""
    keys: dict[str, list[str]] = {}
    for part in sorted(cache.rglob("part-*.keys.npy")):
        folder = str(part.parent.relative_to(cache))
        keys.setdefault(folder, []).extend(key.decode() for key in np.load(part).tolist())
    return keys


def assert_complete_and_built_once(cache: Path, reference: Path) -> set[str]:
    """Every folder of ``cache`` holds the reference's keys, each once; returns the writers' pids
    (part names carry them)."""
    keys, expected = cache_keys(cache), cache_keys(reference)
    assert {folder: set(found) for folder, found in keys.items()} == {
        folder: set(found) for folder, found in expected.items()
    }
    for folder, found in keys.items():
        assert len(found) == len(set(found)), f"{folder}: keys computed more than once"
    assert not list(cache.glob(".surd-rank-*"))  # the share check cleaned up
    return {part.name.split("-")[2] for part in cache.rglob("part-*.keys.npy")}


def test_two_processes_train_the_adapter_of_one_with_the_same_global_batch(
    stack, one_process, tmp_path
) -> None:
    reference, reference_cache = one_process
    output, cache = tmp_path / "two-processes", tmp_path / "cache"
    port = str(free_port())
    succeed_together(
        [launch("one-node-8-gpus.yaml", stack, output, cache, "--main_process_port", port)],
        tmp_path / "logs",
    )
    compare_runs(output, reference)
    # both processes computed a share of the fresh cache, no key twice, none missing
    assert len(assert_complete_and_built_once(cache, reference_cache)) == PROCESSES
    again = train(config(stack, tmp_path / "again", cache_dir=cache, max_steps=1))
    assert again.computed == {"text": 0, "latents": 0, "llm": 0}


def test_two_nodes_with_node_local_caches_each_build_a_complete_cache(
    stack, one_process, tmp_path
) -> None:
    reference, reference_cache = one_process
    output = tmp_path / "two-nodes"  # shared by both "nodes", as --output must be
    port = str(free_port())
    caches = [tmp_path / f"node-{rank}-cache" for rank in range(2)]
    nodes = [
        launch("two-nodes-8-gpus.yaml", stack, output, caches[rank], *node(rank, port))
        for rank in range(2)
    ]
    succeed_together(nodes, tmp_path / "logs")  # the two "nodes" at once, like two machines
    compare_runs(output, reference)
    writers = [assert_complete_and_built_once(cache, reference_cache) for cache in caches]
    assert len(writers[0]) == len(writers[1]) == 1 and writers[0] != writers[1]


def test_an_output_folder_that_is_not_shared_by_all_nodes_is_refused(stack, tmp_path) -> None:
    """Checkpoints hold every process's RNG state and every process resumes from one: with
    node-local outputs they would resume from different steps, so the run refuses up front."""
    port = str(free_port())
    outputs = [tmp_path / f"node-{rank}-output" for rank in range(2)]
    nodes = [
        launch("two-nodes-8-gpus.yaml", stack, outputs[rank], stack.cache, *node(rank, port))
        for rank in range(2)
    ]
    for code, output in run_together(nodes, tmp_path / "logs"):
        assert code != 0 and "is not one folder for all 2 processes" in output, output[-3000:]
    assert not list(stack.cache.glob("**/part-*"))  # refused before any caching


def test_cache_shares_follow_who_sees_the_same_folder() -> None:
    shared = [(0, 1, 2, 3)] * 4
    assert [cache_share(shared, rank) for rank in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    per_node = [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [cache_share(per_node, rank) for rank in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [cache_share([(0,), (1,)], rank) for rank in range(2)] == [(0, 1), (0, 1)]
    # rank 1 sees rank 0's marker, rank 0 not rank 1's: no split is safe, each fills its own
    with pytest.warns(UserWarning, match="disagree"):
        assert cache_share([(0,), (0, 1)], 0) == (0, 1)


def test_the_documented_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    one = load_config_from_file(str(CONFIGS / "one-node-8-gpus.yaml"))
    assert one.distributed_type == DistributedType.MULTI_GPU
    assert (one.num_machines, one.num_processes, one.mixed_precision) == (1, 8, "bf16")
    two = load_config_from_file(str(CONFIGS / "two-nodes-8-gpus.yaml"))
    assert two.distributed_type == DistributedType.MULTI_GPU
    assert (two.num_machines, two.num_processes, two.mixed_precision) == (2, 16, "bf16")
    assert two.main_process_ip and two.main_process_port and two.rdzv_backend == "static"
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == [
        "one-node-8-gpus.yaml",
        "two-nodes-8-gpus.yaml",
    ]
