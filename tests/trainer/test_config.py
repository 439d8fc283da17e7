from __future__ import annotations

import pytest

from ugro.trainer.config import DEFAULT_METRICS_BASE_PORT, TelemetryConfig, TelemetryConfigError

TORCHRUN_ENV = {
    "TORCHELASTIC_RUN_ID": "abc",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "UGRO_JOB_ID": "llm-7",
    "UGRO_METRICS_PORT": "9600",
    "UGRO_NODE": "gpu-a",
}


def test_identity_and_port_come_from_the_environment():
    config = TelemetryConfig.resolve(TORCHRUN_ENV)
    assert (config.job_id, config.rank, config.local_rank, config.world_size, config.node) == (
        "llm-7",
        3,
        1,
        4,
        "gpu-a",
    )
    assert config.metrics_base_port == 9600
    assert config.metrics_port == 9601  # base + LOCAL_RANK
    assert config.bind_address == "0.0.0.0"
    assert config.on_port_taken == "continue"


def test_explicit_arguments_override_the_environment():
    config = TelemetryConfig.resolve(
        TORCHRUN_ENV, job_id="other", rank=0, local_rank=0, node="n2", metrics_port=7000
    )
    assert (config.job_id, config.rank, config.node, config.metrics_port) == (
        "other",
        0,
        "n2",
        7000,
    )
    assert config.world_size == 4


def test_outside_torchrun_a_single_rank_is_assumed():
    config = TelemetryConfig.resolve({})
    assert (config.rank, config.local_rank, config.world_size) == (0, 0, 1)
    assert config.metrics_port == DEFAULT_METRICS_BASE_PORT
    assert config.job_id == "local"
    assert config.node  # the host name


def test_port_zero_means_any_free_port_for_every_rank():
    config = TelemetryConfig.resolve({**TORCHRUN_ENV, "UGRO_METRICS_PORT": "0"})
    assert config.metrics_port == 0


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("UGRO_METRICS_PORT", "abc", "UGRO_METRICS_PORT='abc': expected an integer"),
        ("UGRO_METRICS_PORT", "70000", "UGRO_METRICS_PORT=70000"),
        ("UGRO_METRICS_PORT", "65535", "would listen on 65536"),
        ("UGRO_METRICS_PORT", "-1", "UGRO_METRICS_PORT='-1': expected an integer >= 0"),
        ("RANK", "x", "RANK='x'"),
        ("RANK", "4", "RANK=4 with WORLD_SIZE=4"),
        ("WORLD_SIZE", "0", "WORLD_SIZE='0': expected an integer >= 1"),
        ("LOCAL_RANK", "1.5", "LOCAL_RANK='1.5'"),
        ("UGRO_JOB_ID", "bad job;rm -rf", "UGRO_JOB_ID='bad job;rm -rf'"),
        ("UGRO_JOB_ID", "abc\n", "UGRO_JOB_ID='abc\\n'"),  # a pattern's $ allows a final \n
        ("UGRO_NODE", "a\n", "UGRO_NODE='a\\n'"),
        ("UGRO_NODE", "a b", "UGRO_NODE='a b'"),
        ("UGRO_METRICS_ADDR", "", "UGRO_METRICS_ADDR=''"),
        ("UGRO_METRICS_ON_PORT_TAKEN", "retry", "expected one of continue, fail"),
        ("UGRO_GPU_UUIDS", "GPU-a", "1 entries, but LOCAL_RANK=1"),
        ("UGRO_GPU_UUIDS", "GPU-a,0", "UGRO_GPU_UUIDS entry 1='0': expected an NVML UUID"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_was_expected(variable, value, expected):
    with pytest.raises(TelemetryConfigError) as raised:
        TelemetryConfig.resolve({**TORCHRUN_ENV, variable: value})
    assert expected in str(raised.value)


@pytest.mark.parametrize("missing", ["RANK", "LOCAL_RANK", "WORLD_SIZE"])
def test_a_missing_rank_variable_under_torchrun_is_an_error(missing):
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != missing}
    with pytest.raises(TelemetryConfigError, match=f"{missing} is not set.*torchrun"):
        TelemetryConfig.resolve(env)


def test_a_bad_explicit_argument_is_named_as_an_argument():
    with pytest.raises(TelemetryConfigError, match="argument for UGRO_METRICS_PORT"):
        TelemetryConfig.resolve({}, metrics_port=-5)
    with pytest.raises(TelemetryConfigError, match="total_steps=0"):
        TelemetryConfig.resolve({}, total_steps=0)
    with pytest.raises(TelemetryConfigError, match=r"gpu_uuid='GPU-a\\n'"):
        TelemetryConfig.resolve({}, gpu_uuid="GPU-a\n")
    with pytest.raises(TelemetryConfigError, match=r"UGRO_JOB_ID='abc\\n'"):
        TelemetryConfig.resolve({}, job_id="abc\n")


def test_gpu_uuids_name_each_local_ranks_gpu_and_an_argument_wins():
    env = {**TORCHRUN_ENV, "UGRO_GPU_UUIDS": "GPU-aaaa-0, GPU-bbbb-1"}
    assert TelemetryConfig.resolve(env).gpu_uuid == "GPU-bbbb-1"  # LOCAL_RANK=1
    assert TelemetryConfig.resolve(env, local_rank=0).gpu_uuid == "GPU-aaaa-0"
    assert TelemetryConfig.resolve(env, gpu_uuid="MIG-cccc").gpu_uuid == "MIG-cccc"
    assert TelemetryConfig.resolve(TORCHRUN_ENV).gpu_uuid is None
