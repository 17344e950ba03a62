"""ModelOpt's sequential weight quantizer: one weight quantized by a chain of quantizers, its stages.

A quantizer config whose ``cfg`` is a list replaces the matched ``TensorQuantizer`` by a
``SequentialQuantizer`` (an ``nn.Sequential``, ``set_quantizer_attributes_full`` in ModelOpt 0.47's
``conversion.py``), so each stage's buffers are named after its position: W4A8 AWQ
(``W4A8_AWQ_BETA_CFG``, the one stock recipe with a list) gives every weight
``weight_quantizer.0._amax`` (INT4 blocks, shaped like INT4 AWQ's block amax) and
``weight_quantizer.1._amax`` (FP8, per tensor). The stage index is the last index of the name,
after whatever else indexes the quantizer (facts from ModelOpt 0.47's source and
tests/data/dcp/w4a8_awq_bs32_tp2):

* a linear layer, Megatron or HF: ``linear_fc1.weight_quantizer.{S}._amax``;
* a TE grouped linear, whose ``weight_quantizer`` is a ``GroupedQuantizer`` of one quantizer per
  local expert (``plugins/transformer_engine.py``): ``linear_fc1.weight_quantizer.{E}.{S}._amax``
  (``plugins/megatron.py`` restores ``weight_quantizer.<i>.<lvl>``);
* transformers v5 fused experts (``plugins/huggingface.py`` ``_QuantFusedExperts``, a
  ``ModuleList`` per tensor): ``down_proj_weight_quantizers.{E}.{S}._amax``; gpt-oss's one shared
  quantizer: ``gate_up_proj_weight_quantizer.{S}._amax``.

A ModelOpt <= 0.46 grouped linear's one shared sequence would be ``linear_fc1.weight_quantizer.{S}._amax``,
character for character ModelOpt 0.47's per-expert ``weight_quantizer.{E}._amax``: quantmap reads
that name as 0.47 writes it (an expert) and derives no shared staged form.

A staged rule is the single-quantizer rule with a ``*`` capture for the stage before the buffer's
attribute, on both sides: every stage maps to the same stage, the last capture of each side. Its
layout is the weight quantizer's, so each stage's tensor goes by its shape: a scalar (FP8) is copied,
a block or per-channel amax follows the weight's rows.
"""

from __future__ import annotations

#: How many stages ``quantmap names`` lists: W4A8 AWQ's two (INT4 blocks, then FP8).
STAGES = 2


def staged(text: str) -> str:
    """A quantizer buffer's pattern (``...weight_quantizer._amax``) with the stage capture before its
    attribute (``...weight_quantizer.*._amax``)."""
    head, attribute = text.rsplit(".", 1)
    return f"{head}.*.{attribute}"
