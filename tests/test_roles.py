"""Roles are decided from the rule that claimed a tensor, for every rule of every shipped spec."""

import pytest

from quantmap import compile
from quantmap.roles import (AMAX_ROLES, BIAS, INPUT_AMAX, K_AMAX, MODEL_ROLES, NORM, PARAMETER, PRE_QUANT_SCALE,
                            QUANTIZER_ROLES, V_AMAX, WEIGHT, WEIGHT_AMAX, module_of, role_of)
from quantmap.spec.library import shipped_specs


@pytest.mark.parametrize(("buffer", "hf", "role"), [
    ("weight_quantizer._amax", "model.layers.*.mlp.down_proj.weight_quantizer._amax", WEIGHT_AMAX),
    ("weight_quantizer.*._amax", "model.layers.*.mlp.down_proj.weight_quantizer.*._amax", WEIGHT_AMAX),
    ("input_quantizer._amax", "model.layers.*.mlp.experts.gate_up_proj_input_quantizer._amax", INPUT_AMAX),
    ("input_quantizer._pre_quant_scale", "model.layers.*.mlp.up_proj.input_quantizer._pre_quant_scale",
     PRE_QUANT_SCALE),
    ("k_bmm_quantizer._amax", "model.layers.*.self_attn.k_bmm_quantizer._amax", K_AMAX),
    ("v_bmm_quantizer._amax", "model.layers.*.self_attn.v_bmm_quantizer._amax", V_AMAX),
    (None, "model.layers.*.self_attn.q_proj.weight", WEIGHT),
    (None, "model.layers.*.mlp.experts.gate_up_proj", WEIGHT),
    (None, "model.layers.*.self_attn.q_proj.bias", BIAS),
    (None, "model.layers.*.mlp.experts.down_proj_bias", BIAS),
    (None, "model.layers.*.input_layernorm.weight", NORM),
    (None, "model.norm.bias", NORM),
    (None, "model.layers.*.linear_attn.dt_bias", PARAMETER),
    (None, "model.layers.*.mlp.gate.e_score_correction_bias", PARAMETER),
    (None, "model.layers.*.self_attn.sinks", PARAMETER),
])
def test_role_of_each_kind_of_tensor(buffer, hf, role):
    assert role_of(buffer, hf) == role


def test_a_buffer_that_is_no_quantizer_state_is_refused():
    with pytest.raises(ValueError, match="_scale_inv"):
        role_of("weight_quantizer._scale_inv", "x.weight_quantizer._scale_inv")


@pytest.mark.parametrize(("name", "role", "module"), [
    ("model.layers.3.self_attn.q_proj.input_quantizer._amax", INPUT_AMAX, "model.layers.3.self_attn.q_proj"),
    ("model.layers.3.mlp.experts.7.up_proj.weight_quantizer.1._amax", WEIGHT_AMAX, "model.layers.3.mlp.experts.7.up_proj"),
    ("model.layers.3.mlp.experts.gate_up_proj_input_quantizer._amax", INPUT_AMAX, "model.layers.3.mlp.experts"),
    ("model.layers.3.self_attn.k_bmm_quantizer._amax", K_AMAX, "model.layers.3.self_attn"),
    ("model.layers.3.self_attn.o_proj.weight", WEIGHT, "model.layers.3.self_attn.o_proj"),
])
def test_module_of(name, role, module):
    assert module_of(name, role) == module


@pytest.mark.slow
@pytest.mark.parametrize("spec", sorted(shipped_specs()))
def test_every_rule_of_every_spec_has_a_role_its_kind_allows(spec):
    params = {"num_layers": 3} if spec in ("deepseek_v3", "glm4_moe") else {}
    for naming in ("on-disk", "in-memory"):
        for rule in compile(spec, hf_naming=naming, **params):
            assert rule.role in (MODEL_ROLES if rule.kind == "weight" else QUANTIZER_ROLES), rule.to_json()
            if rule.role in AMAX_ROLES:
                assert rule.buffer.endswith("_amax")
