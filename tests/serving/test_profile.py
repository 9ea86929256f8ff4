"""Serving profiles: YAML → typed model → vLLM command line; invalid profiles refused before vLLM starts."""

from pathlib import Path

import pytest

from serving.profile import ServingProfile
from sovereign.errors import ConfigError


def test_cpu_profile_turns_into_eager_float32_vllm_args_with_lora_limits():
    p = ServingProfile.named("cpu")
    args = p.vllm_args(Path("/models/m"), "m")
    assert args[args.index("--dtype") + 1] == "float32"
    assert "--enforce-eager" in args
    assert args[args.index("--max-lora-rank") + 1] == "16"
    assert args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--served-model-name") + 1] == "m"
    env = p.vllm_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"


def test_gpu_profile_uses_bf16_prefix_caching_and_memory_utilisation():
    args = ServingProfile.named("gpu").vllm_args(Path("/m"), "m")
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert "--enable-prefix-caching" in args
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.9"
    assert "--enforce-eager" not in args


def test_env_variable_overrides_the_yaml(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_SERVING_MAX_NUM_SEQS", "7")
    assert ServingProfile.named("cpu").max_num_seqs == 7


@pytest.mark.parametrize("field,value,needle", [
    ("max_lora_rank", 12, "max_lora_rank"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
    ("dtype", "int3", "dtype"),
    ("max_num_seqs", 0, "max_num_seqs"),
    ("no_such_option", 1, "no_such_option"),
])
def test_invalid_profile_is_refused_naming_file_and_field(tmp_path, field, value, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"device: cuda\n{field}: {value!r}\n" if field == "gpu_memory_utilization"
                   else f"{field}: {value!r}\n")
    with pytest.raises(ConfigError) as err:
        ServingProfile.named(bad)
    assert str(bad) in str(err.value) and needle in str(err.value)


def test_cpu_profile_rejects_gpu_only_settings(tmp_path):
    bad = tmp_path / "cpu-gpu.yaml"
    bad.write_text("device: cpu\ngpu_memory_utilization: 0.5\n")
    with pytest.raises(ConfigError, match="gpu_memory_utilization applies to device: cuda only"):
        ServingProfile.named(bad)


def test_missing_profile_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        ServingProfile.named(tmp_path / "nope.yaml")


def test_cpu_tuning_fields_become_vllm_args_and_env(tmp_path):
    prof = tmp_path / "tuned.yaml"
    prof.write_text("device: cpu\ncpu_threads_bind: '0-1'\ncpu_reserved_cpus: 0\nenable_chunked_prefill: false\n"
                    "stream_interval: 4\nextra_env:\n  VLLM_CPU_ATTN_SPLIT_KV: '0'\n")
    p = ServingProfile.named(prof)
    args = p.vllm_args(Path("/m"), "m")
    assert "--no-enable-chunked-prefill" in args
    assert args[args.index("--stream-interval") + 1] == "4"
    env = p.vllm_env()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_ATTN_SPLIT_KV"] == "0"


def test_untuned_fields_leave_vllm_defaults_alone(tmp_path):
    prof = tmp_path / "plain.yaml"
    prof.write_text("device: cpu\n")
    p = ServingProfile.named(prof)
    args = p.vllm_args(Path("/m"), "m")
    assert not any("chunked-prefill" in a or a == "--stream-interval" for a in args)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in p.vllm_env()


@pytest.mark.parametrize("field,value", [("stream_interval", 0), ("cpu_reserved_cpus", -1)])
def test_cpu_tuning_fields_are_validated(tmp_path, field, value):
    bad = tmp_path / "bad-tuning.yaml"
    bad.write_text(f"{field}: {value}\n")
    with pytest.raises(ConfigError) as err:
        ServingProfile.named(bad)
    assert field in str(err.value)


def test_extra_env_can_be_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_SERVING_EXTRA_ENV", '{"OMP_WAIT_POLICY": "PASSIVE"}')
    assert ServingProfile.named("cpu").vllm_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_cpu_nolora_profile_is_the_cpu_profile_without_lora():
    cpu, fast = ServingProfile.named("cpu"), ServingProfile.named("cpu-nolora")
    args = fast.vllm_args(Path("/m"), "m")
    assert "--enable-lora" not in args and "--max-lora-rank" not in args
    assert fast.vllm_env()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "false"
    lora = {"name", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"}
    assert fast.model_dump(exclude=lora) == cpu.model_dump(exclude=lora)


def test_cpu_dedicated_profile_is_the_cpu_profile_with_every_core_for_the_model():
    cpu, dedicated = ServingProfile.named("cpu"), ServingProfile.named("cpu-dedicated")
    assert dedicated.vllm_env()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in cpu.vllm_env()
    assert dedicated.model_dump(exclude={"name", "cpu_reserved_cpus"}) == cpu.model_dump(exclude={"name",
                                                                                                "cpu_reserved_cpus"})


def test_port_and_health_port_must_differ(tmp_path):
    bad = tmp_path / "clash.yaml"
    bad.write_text("port: 9100\nhealth_port: 9100\n")
    with pytest.raises(ConfigError) as err:
        ServingProfile.named(bad)
    assert "port" in str(err.value) and "health_port" in str(err.value) and "9100" in str(err.value)


@pytest.mark.parametrize("extra,field", [
    (["--max-lora-rank", "64"], "max_lora_rank"),
    (["--max_lora_rank=64"], "max_lora_rank"),
    (["--max-lora-r", "64"], "max_lora_rank"),  # argparse takes unambiguous abbreviations
    (["--max-loras", "1"], "max_loras"),
    (["--port", "9"], "port"),
    (["--model", "/elsewhere"], "the model store"),
    (["--enable-lora"], "enable_lora"),
    (["--no-enforce-eager"], "enforce_eager"),
    (["-tp", "2"], "tensor_parallel_size"),
    (["--device-memory-utilization", "0.5"], "gpu_memory_utilization"),
    (["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], "tool_call_parser"),
    (["--reasoning-parser", "qwen3"], "reasoning_parser"),
])
def test_extra_args_may_not_set_a_flag_the_profile_owns(tmp_path, extra, field):
    bad = tmp_path / "owned.yaml"
    bad.write_text(f"extra_args: {extra!r}\n")
    with pytest.raises(ConfigError) as err:
        ServingProfile.named(bad)
    assert "extra_args" in str(err.value) and extra[0] in str(err.value) and field in str(err.value)


def test_extra_args_the_profile_does_not_own_pass_through():
    p = ServingProfile(extra_args=["--max-logprobs", "5", "--quantization=fp8", "--seed", "1"])
    assert p.vllm_args(Path("/m"), "m")[-5:] == ["--max-logprobs", "5", "--quantization=fp8", "--seed", "1"]


def test_tool_call_and_reasoning_parsers_are_typed_fields():
    args = ServingProfile(tool_call_parser="hermes", reasoning_parser="qwen3").vllm_args(Path("/m"), "m")
    assert args[args.index("--tool-call-parser") - 1] == "--enable-auto-tool-choice"
    assert args[args.index("--tool-call-parser") + 1] == "hermes"
    assert args[args.index("--reasoning-parser") + 1] == "qwen3"
    assert "--enable-auto-tool-choice" not in ServingProfile().vllm_args(Path("/m"), "m")
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServingProfile(tool_call_parser="hermes --trust-remote-code")


def test_kernel_config_is_owned_on_cpu_only():
    with pytest.raises(ValueError, match="cpu_rms_norm"):
        ServingProfile(device="cpu", extra_args=["--kernel-config.ir_op_priority.rms_norm", "[]"])
    assert ServingProfile(device="cuda", extra_args=["--kernel-config", "{}"]).extra_args == ["--kernel-config", "{}"]
