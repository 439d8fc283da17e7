from __future__ import annotations

from ugro.trainer.demo import describe


def test_describe_reports_progress_and_window_figures_from_two_scrapes():
    before = {
        "ugro_train_steps_total": 10,
        "ugro_train_target_steps": 100,
        "ugro_train_loss_sum": 40.0,
        "ugro_train_loss_count": 10,
        "ugro_train_tokens_total": 10_000,
        "ugro_train_last_step_timestamp_seconds": 1000.0,
        "ugro_train_start_time_seconds": 990.0,
    }
    now = {
        **before,
        "ugro_train_steps_total": 30,
        "ugro_train_loss_last": 2.5,
        "ugro_train_loss_sum": 100.0,
        "ugro_train_loss_count": 30,
        "ugro_train_tokens_total": 30_000,
        "ugro_train_last_step_timestamp_seconds": 1004.0,
    }
    line = describe(1, now, before)
    assert line == (
        "  rank 1: step 30/100  loss 2.500  mean loss since last look 3.000  5,000 tokens/s"
    )


def test_describe_before_the_first_step():
    assert describe(0, {"ugro_train_target_steps": 5}, None) == "  rank 0: step 0/5  loss pending"
