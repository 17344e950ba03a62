"""Shared by the compressed-tensors tests: a checkpoint loaded by its real consumer on a CPU, transformers 5.25
with compressed-tensors 0.20.1, and what a test may ignore of what it reports."""

from __future__ import annotations

from pathlib import Path

#: What transformers 5.25 does not keep of a compressed-tensors checkpoint: input scales (it dequantizes the
#: weights only) and the KV-cache scales (compressed-tensors 0.20.1 does not recognize transformers 5.25's
#: attention, whose forward takes ``cache``, not ``past_key_values``, so no KV scheme is applied).
NOT_KEPT = ("input_scale", "input_global_scale", "k_scale", "v_scale", "k_global_scale", "v_global_scale")


def load(out: Path, dequantize: bool = True):
    """The model and transformers' loading info (``output_loading_info``)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, info = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=dequantize), output_loading_info=True)
    return model.eval(), info


def assert_all_keys_taken(info) -> None:
    """Zero missing and zero unexpected keys, apart from those transformers does not keep (:data:`NOT_KEPT`)."""
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert sorted(key for key in info["unexpected_keys"] if not key.endswith(NOT_KEPT)) == []
