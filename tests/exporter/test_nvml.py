from __future__ import annotations

import logging

import pytest

from ugro.exporter.nvml import GpuLost, Nvml, NvmlCallError, NvmlUnavailable, load_module

from .fake_nvml import NVML_ERROR_DRIVER_NOT_LOADED, FakeNvml, NVMLError, h100s


def test_init_happens_once_and_strings_come_back_decoded():
    fake = FakeNvml(h100s(1))
    nvml = Nvml(fake)
    nvml.init()
    nvml.init()
    assert fake.calls["nvmlInit"] == 1
    handle = nvml.call("nvmlDeviceGetHandleByIndex", 0)
    assert nvml.call("nvmlDeviceGetPciInfo", handle).busId == b"00000000:18:00.0"
    assert nvml.call("nvmlDeviceGetName", handle) == "NVIDIA H100 80GB HBM3"


def test_missing_library_is_unavailable_with_a_reason_code():
    with pytest.raises(NvmlUnavailable) as raised:
        Nvml(FakeNvml(library_missing=True)).init()
    assert raised.value.reason == "library_not_found"
    assert "NVML Shared Library Not Found" in str(raised.value)


def test_driver_not_loaded_reason():
    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)

    with pytest.raises(NvmlUnavailable) as raised:
        Nvml(NoDriver()).init()
    assert raised.value.reason == "driver_not_loaded"


def test_unsupported_query_is_none_and_logged_once(caplog):
    fake = FakeNvml(h100s(2), unsupported=frozenset({"nvmlDeviceGetPcieReplayCounter"}))
    nvml = Nvml(fake)
    nvml.init()
    with caplog.at_level(logging.INFO, logger="ugro.exporter.nvml"):
        for index in range(2):
            handle = nvml.call("nvmlDeviceGetHandleByIndex", index)
            assert nvml.call("nvmlDeviceGetPcieReplayCounter", handle) is None
    assert fake.calls["nvmlDeviceGetPcieReplayCounter"] == 2
    assert len([r for r in caplog.records if "PcieReplayCounter" in r.getMessage()]) == 1
    assert nvml.unsupported == {"nvmlDeviceGetPcieReplayCounter"}


def test_a_query_missing_from_an_older_binding_is_none():
    nvml = Nvml(FakeNvml(h100s(1)))
    nvml.init()
    assert nvml.call("nvmlDeviceGetSomethingFromTheFuture", 0) is None


def test_lost_gpu_raises_gpu_lost_and_other_errors_are_call_errors():
    fake = FakeNvml(h100s(2))
    nvml = Nvml(fake)
    nvml.init()
    lost, fine = (nvml.call("nvmlDeviceGetHandleByIndex", i) for i in range(2))
    fake.lose(0)
    with pytest.raises(GpuLost, match="GPU is lost"):
        nvml.call("nvmlDeviceGetTemperature", lost, 0)
    assert nvml.call("nvmlDeviceGetTemperature", fine, 0) == 61
    with pytest.raises(NvmlCallError, match="Invalid Argument"):
        nvml.call("nvmlDeviceGetTemperature", fine, 7)


def test_calls_after_shutdown_fail_like_the_real_library():
    fake = FakeNvml(h100s(1))
    nvml = Nvml(fake)
    nvml.init()
    nvml.shutdown()
    with pytest.raises(NvmlCallError, match="Uninitialized"):
        nvml.call("nvmlDeviceGetCount")


def test_load_module_reports_a_missing_binding():
    with pytest.raises(NvmlUnavailable) as raised:
        load_module("no_such_nvml_binding")
    assert raised.value.reason == "module_missing"
    assert load_module("tests.exporter.fake_nvml:from_environment").gpus


def test_the_real_binding_without_a_gpu_says_why():
    """On machines without an NVIDIA driver the real pynvml fails to initialise; say so."""
    real = load_module("pynvml")
    try:
        real.nvmlInit()
    except real.NVMLError:
        pass
    else:
        real.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present: the real path is checked on the GPU machine")
    with pytest.raises(NvmlUnavailable) as raised:
        Nvml(real).init()
    assert raised.value.reason in {"library_not_found", "driver_not_loaded"}
