"""Every transformers surface the integration uses, checked against the installed version.

When upstream renames or removes one of them, the test of that name goes red with the installed
version in its message (CI runs this file against the newest and the oldest supported release).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers

from adaspark import AdaSparkConfig, patch
from adaspark.integrations.transformers import attention as attn_backend
from adaspark.integrations.transformers import compat
from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

VERSION = transformers.__version__


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl(num_layers=1)


def test_installed_transformers_is_in_the_tested_range():
    assert compat.check_version(), (
        f"transformers {VERSION} is outside the tested range {compat.TESTED_MIN} to {compat.TESTED_MAX}"
    )


def test_version_parsing():
    assert compat.version_tuple("5.24.0") == (5, 24, 0)
    assert compat.version_tuple("5.25.0.dev0") == (5, 25, 0)
    assert compat.version_tuple("6.0rc1") == (6, 0, 0)
    assert compat.version_tuple(compat.TESTED_MIN) <= compat.version_tuple(compat.TESTED_MAX)


def test_outside_the_range_warns_once(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "99.0.0")
    monkeypatch.setattr(compat, "_WARNED", set())
    with pytest.warns(UserWarning, match="tested with transformers .* but 99.0.0 is installed"):
        assert not compat.check_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not compat.check_version()  # once per process


def test_errors_name_the_version():
    err = compat.compat_error("something moved")
    assert isinstance(err, RuntimeError) and isinstance(err, ValueError)
    assert f"transformers {VERSION}" in str(err) and compat.TESTED_MAX in str(err)


@torch.inference_mode()
def test_cache_is_found_by_type_and_read_under_either_name(model):
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    assert issubclass(DynamicCache, Cache)
    inputs = build_inputs([[(2, 4, 4)]], seed=1)
    out = model(**inputs, use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, Cache), f"transformers {VERSION}: no cache among the outputs {list(out.keys())}"
    n = inputs["input_ids"].shape[1]
    assert compat.cache_length(cache) == n
    kw = compat.cache_keyword(model)
    assert kw in ("cache", "past_key_values")
    assert compat.find_cache((), {kw: cache, "use_cache": True}) is cache
    assert compat.find_cache((None, cache), {}) is cache
    assert compat.find_cache((), {"x": 1}) is None
    step = model(input_ids=inputs["input_ids"][:, -1:], use_cache=True, **{kw: cache})
    assert compat.cache_length(compat.output_cache(step)) == n + 1
    assert compat.output_cache({"cache": cache}) is cache
    assert compat.output_cache({"past_key_values": cache}) is cache


@torch.inference_mode()
def test_reading_the_outputs_logs_no_deprecation_warning(model, caplog):
    """A patched forward reads the output's cache; on transformers that renamed the field it must not
    read the old name (which logs transformers' deprecation warning in the user's run)."""
    import logging

    from adaspark import AdaSparkConfig, patch

    inputs = build_inputs([[(2, 4, 4)]], seed=1)
    with caplog.at_level(logging.WARNING), patch(model, AdaSparkConfig(p=0.5)):
        out = model(**inputs, use_cache=False)
        assert compat.output_cache(out) is None
        model(**inputs, use_cache=True)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text


def test_mask_and_attention_registries():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

    attn_backend.register()
    assert AttentionInterface._global_mapping[attn_backend.ATTN_NAME] is attn_backend.adaspark_attention
    assert AttentionMaskInterface._global_mapping[attn_backend.ATTN_NAME] is attn_backend.adaspark_mask
    assert compat.is_plain_causal(causal_mask_function)
    assert not compat.is_plain_causal(lambda b, h, q, kv: kv <= q)


def test_the_mask_function_gets_what_the_mask_interface_promises(model):
    """transformers calls the registered mask function with the keywords adaspark_mask reads."""
    seen = {}
    real = attn_backend.adaspark_mask

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    from transformers.masking_utils import AttentionMaskInterface

    inputs = build_inputs([[(2, 4, 4)]], seed=2)
    with patch(model, AdaSparkConfig(p=0.5, cube=(1, 2, 2))):
        AttentionMaskInterface.register(attn_backend.ATTN_NAME, spy)
        try:
            with torch.inference_mode():
                model(**inputs)
        finally:
            AttentionMaskInterface.register(attn_backend.ATTN_NAME, real)
    assert {"batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "mask_function"} <= set(seen), (
        f"transformers {VERSION} calls the mask interface with {sorted(seen)}"
    )


def test_attn_implementation_is_where_patch_switches_it(model):
    tc = model.config.text_config
    before = compat.attn_implementation(tc)
    with patch(model, AdaSparkConfig(p=0.5)):
        assert compat.attn_implementation(tc) == attn_backend.ATTN_NAME
    assert compat.attn_implementation(tc) == before


def test_patch_refuses_a_model_without_the_hooks_it_needs(model):
    import copy

    broken = copy.deepcopy(model)
    del broken.model.language_model.layers[0].post_attention_layernorm
    with pytest.raises(compat.TransformersCompatError, match="post_attention_layernorm"):
        patch(broken, AdaSparkConfig(p=0.5))
