"""InstrumentationConfig: the seed's names and values, one-line errors, Literal choices."""

from __future__ import annotations

import pytest

from lightning_llm_inst.config import HookGranularity, InstrumentationConfig


@pytest.mark.parametrize("field, value, allowed", [
    ("compression_algorithm", "gzip", "choose one of: 'lz4', 'zstd', None"),
    ("storage_dtype", "int8", "choose one of: None, 'float32', 'float16', 'bfloat16'"),
    ("on_full", "wait", "choose one of: 'block', 'drop'"),
    ("buffer_impl", "triton", "choose one of: 'auto', 'cuda', 'torch'"),
    ("granularity", "bogus", "choose one of: ALL, ATTENTION_ONLY, FFN_ONLY, RESIDUAL"),
    ("include_padding", "yes", "use True or False"),
    ("pad_token_id", -1, "use a non-negative token id or None"),
    ("capture_gradients", "yes", "use True or False"),
])
def test_a_bad_value_is_one_line_naming_the_field_the_value_and_the_choices(field, value, allowed):
    with pytest.raises(ValueError) as err:
        InstrumentationConfig(**{field: value})
    assert str(err.value) == f"InstrumentationConfig.{field}={value!r} is not valid; {allowed}"


def test_the_seed_api_values():
    for algo in ("lz4", "zstd", None):
        assert InstrumentationConfig(compression_algorithm=algo).compression_algorithm == algo
    assert InstrumentationConfig(compression_algorithm=None).codec_spec == "none"
    assert InstrumentationConfig(compression_algorithm="zstd", compression_level=3).codec_spec == "zstd:3"
    assert InstrumentationConfig(HookGranularity.ATTENTION_ONLY, "lz4", 1.0, 2.0).granularity is \
        HookGranularity.ATTENTION_ONLY


@pytest.mark.parametrize("field, value", [("on_full", "wait"), ("buffer_impl", "triton")])
def test_jsonargparse_rejects_a_bad_choice_naming_the_choices(field, value):
    """The enum-like fields are Literal types, so a parser built from the dataclass (as
    LightningCLI builds one) rejects a bad value itself, naming the choices."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InstrumentationConfig, "capture")
    with pytest.raises(Exception) as err:  # noqa: B017 - jsonargparse's ArgumentError
        parser.parse_args([f"--capture.{field}={value}"])
    choices = {"on_full": "'block', 'drop'", "buffer_impl": "'auto', 'cuda', 'torch'"}[field]
    assert f"Literal[{choices}]. Got value: {value}" in str(err.value)
