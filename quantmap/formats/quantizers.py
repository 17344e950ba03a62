"""The ``quantizers`` format, the default: the quantizer state (every amax and pre-quant scale) under the
HF names the rules give, as it is, and read back the same way. The model's own tensors (weights, biases,
norms) are neither read nor written: they come from the model's own Hugging Face conversion."""

from __future__ import annotations

from quantmap.formats.declaration import unchanged
from quantmap.roles import QUANTIZER_ROLES

QUANTIZERS = unchanged("quantizers", "the quantizer state (amax, pre-quant scales) under HF names, as is",
                       QUANTIZER_ROLES)
