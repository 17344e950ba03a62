"""The ``hf`` format: a Hugging Face model directory that ``from_pretrained`` loads as it is.

The model's own tensors (weights, biases, norms, parameters) under the HF names the rules give, in the
checkpoint's dtype or the run's ``--dtype``, as ``model-*.safetensors`` and its index in the output itself;
the quantizer state, when the checkpoint has any, exactly as the ``quantizers`` format writes it, in
``quantizer_state/`` (its own shards and index, which ``from_pretrained`` never opens); and the model's
``config.json`` and other non-weight files, copied from ``--like`` (or ``--config``) beside the weights."""

from __future__ import annotations

from quantmap.formats.declaration import OutputFormat, Restored, Written
from quantmap.io.names import QUANTIZER_STATE
from quantmap.roles import MODEL_ROLES, QUANTIZER_ROLES

HF = OutputFormat(
    "hf", "a Hugging Face model directory (weights, config and tokenizer files from --like or --config), the "
          f"quantizer state in {QUANTIZER_STATE}/",
    writes={**{role: (Written((role,), cast=True),) for role in sorted(MODEL_ROLES)},
            **{role: (Written((role,), directory=QUANTIZER_STATE),) for role in sorted(QUANTIZER_ROLES)}},
    restores={**{role: Restored() for role in sorted(MODEL_ROLES)},
              **{role: Restored(directory=QUANTIZER_STATE) for role in sorted(QUANTIZER_ROLES)}},
    model=True)
