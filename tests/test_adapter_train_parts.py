"""The small pieces ``train()`` is made of, one by one (the whole run: test_adapter_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.checkpoints import check_steps_left
from adapter.train import logs_at
from adapter.train_config import TrainConfig, total_steps
from surd_builder.errors import InputError


def config(tmp_path: Path, **settings) -> TrainConfig:
    return TrainConfig(
        data=str(tmp_path), base_model="sd", llm="llm", llm_layer=1, output=tmp_path, **settings
    )


def test_rows_fall_every_logging_step_and_at_every_checkpoint_and_evaluation(tmp_path):
    settings = config(tmp_path, logging_steps=4, checkpointing_steps=6, validation_steps=9)
    logged = [done for done in range(1, 21) if logs_at(settings, done, steps=20)]
    # 4, 8, 12, 16, 20 (logging), 6, 12, 18 (checkpoints), 9, 18 (evaluation), 20 (the end)
    assert logged == [4, 6, 8, 9, 12, 16, 18, 20]


def test_the_last_step_is_logged_whatever_the_period(tmp_path):
    settings = config(tmp_path, logging_steps=100, checkpointing_steps=100, validation_steps=100)
    assert [done for done in range(1, 8) if logs_at(settings, done, steps=7)] == [7]


def test_total_steps_cover_the_epochs_of_the_global_batch(tmp_path):
    settings = config(tmp_path, batch_size=4, gradient_accumulation_steps=2, epochs=3)
    # 3 epochs of 100 samples, 4 x 2 x 2 processes = 16 samples a step: ceil(300 / 16)
    assert total_steps(settings, num_samples=100, world_size=2) == 19
    assert total_steps(config(tmp_path, max_steps=5), num_samples=100, world_size=2) == 5


def test_a_resumed_run_without_steps_left_is_a_one_line_error(tmp_path):
    check_steps_left(tmp_path / "checkpoint-4", 4, steps=5)
    with pytest.raises(InputError, match="at step 5, the run has 5 steps"):
        check_steps_left(tmp_path / "checkpoint-5", 5, steps=5)
