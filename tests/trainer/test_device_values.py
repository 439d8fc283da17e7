"""The no-sync path for CUDA tensors, on machines without a GPU.

``FakeCudaCopies`` stands in for CUDA streams and events (which cannot exist here): like
``torch.cuda.Event.query()``, readiness is only ever polled, and a value may be read only after
its copy has completed. The tests check that telemetry never reads a value early, never waits
for one, and folds values back in step order once the device has caught up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from ugro.trainer import Telemetry
from ugro.trainer.device_values import DeviceValueQueue


@dataclass
class FakeCudaScalar:
    """The attributes telemetry looks at on a CUDA tensor."""

    value: float
    is_cuda: bool = True
    device: str = "cuda:0"

    def __float__(self) -> float:
        raise AssertionError("telemetry converted a CUDA tensor on the host: that is a device sync")

    def item(self) -> float:
        raise AssertionError("telemetry called .item() on a CUDA tensor: that is a device sync")


@dataclass
class FakePendingCopy:
    values: list[float]
    done: bool = False

    def is_ready(self) -> bool:
        return self.done

    def read(self) -> list[float]:
        assert self.done, "read before the copy completed"
        return list(self.values)


@dataclass
class FakeCudaCopies:
    started: list[FakePendingCopy] = field(default_factory=list)
    released: int = 0

    def start(self, tensors: list[FakeCudaScalar]) -> FakePendingCopy:
        pending = FakePendingCopy([t.value for t in tensors])
        self.started.append(pending)
        return pending

    def release(self, pending: FakePendingCopy) -> None:
        self.released += 1

    def complete(self, count: int | None = None) -> None:
        """The device catches up with the first ``count`` copies (all by default)."""
        for pending in self.started[:count]:
            pending.done = True


def test_queue_hands_back_only_completed_copies_in_order():
    copies = FakeCudaCopies()
    queue = DeviceValueQueue(copies)
    for step in range(3):
        assert queue.submit({"loss": FakeCudaScalar(float(step)), "grad_norm": FakeCudaScalar(1.0)})
    assert queue.ready() == []
    assert len(queue) == 3

    copies.complete(2)
    assert queue.ready() == [{"loss": 0.0, "grad_norm": 1.0}, {"loss": 1.0, "grad_norm": 1.0}]
    assert len(queue) == 1 and copies.released == 2


def test_queue_refuses_new_steps_when_the_device_falls_too_far_behind():
    copies = FakeCudaCopies()
    queue = DeviceValueQueue(copies, max_pending=2)
    assert queue.submit({"loss": FakeCudaScalar(1.0)})
    assert queue.submit({"loss": FakeCudaScalar(2.0)})
    assert not queue.submit({"loss": FakeCudaScalar(3.0)})
    assert len(copies.started) == 2


def test_wait_at_shutdown_gives_up_after_its_timeout():
    copies = FakeCudaCopies()
    queue = DeviceValueQueue(copies)
    queue.submit({"loss": FakeCudaScalar(1.0)})
    assert queue.wait(timeout_seconds=0.05) == []
    copies.complete()
    assert queue.wait(timeout_seconds=0.05) == [{"loss": 1.0}]


@pytest.fixture
def device_telemetry():
    copies = FakeCudaCopies()
    registry = CollectorRegistry()
    telemetry = Telemetry(
        job_id="j",
        rank=0,
        world_size=1,
        registry=registry,
        serve=False,
        env={},
        device_copier=copies,
    )
    return telemetry, registry, copies


def test_device_values_lag_until_the_copy_lands_then_fold_at_scrape_time(device_telemetry):
    telemetry, registry, copies = device_telemetry
    for step in range(3):
        telemetry.step(
            loss=FakeCudaScalar(5.0 - step),
            grad_norm=FakeCudaScalar(float("nan") if step == 1 else 1.0),
            tokens=FakeCudaScalar(128.0),
            samples=4,  # a host value alongside device ones is recorded at once
            learning_rate=0.01,
        )

    get = registry.get_sample_value
    # Steps, host values and timing are there at once; device values are still in flight.
    assert get("ugro_train_steps_total") == 3
    assert get("ugro_train_samples_total") == 12
    assert get("ugro_train_learning_rate") == 0.01
    assert get("ugro_train_loss_last") is None
    assert get("ugro_train_tokens_total") == 0
    assert get("ugro_train_telemetry_pending_steps") == 3

    copies.complete(2)  # the device has finished two steps' worth of copies
    assert get("ugro_train_loss_last") == 4.0
    assert get("ugro_train_loss_count") == 2
    assert get("ugro_train_nonfinite_total", {"quantity": "grad_norm"}) == 1
    assert get("ugro_train_tokens_total") == 256
    assert get("ugro_train_telemetry_pending_steps") == 1

    copies.complete()
    telemetry.close()
    assert get("ugro_train_loss_last") == 3.0
    assert get("ugro_train_loss_sum") == 12.0
    assert get("ugro_train_telemetry_pending_steps") == 0
    assert get("ugro_train_telemetry_errors_total") == 0


def test_later_steps_fold_in_completed_device_values(device_telemetry):
    telemetry, registry, copies = device_telemetry
    telemetry.step(loss=FakeCudaScalar(2.0))
    copies.complete()
    telemetry.step(loss=FakeCudaScalar(1.0))  # folds step 1's values; step 2's still in flight
    assert telemetry.latest()["loss"] == 2.0
    assert registry.get_sample_value("ugro_train_telemetry_pending_steps") == 1
