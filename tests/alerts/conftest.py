"""Keeps each test's outcome on its item, so fixtures can print diagnostics for failures only;
and ``jobs``, which starts reference-trainer jobs against the module's ``stack`` fixture."""

import pytest

from tests.support.models import SMALL_MODEL
from tests.support.training import TrainingJob


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item.call_report = outcome.get_result()


@pytest.fixture
def jobs(stack):
    started: list[TrainingJob] = []

    def start(job_id: str, *trainer_args: str) -> TrainingJob:
        job = TrainingJob(stack, job_id, [*SMALL_MODEL, *trainer_args])
        started.append(job)
        return job

    yield start
    for job in started:
        job.stop()
