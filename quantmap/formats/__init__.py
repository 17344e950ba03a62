"""The registry of output formats, by name (:mod:`quantmap.formats.declaration` says what a format is).

An export writes, and an import reads, the format its :class:`~quantmap.executor.options.RunOptions`
names; ``quantmap export/import --format`` offers the names registered here. Torch-free.
"""

from __future__ import annotations

from quantmap.formats.compressed_tensors import COMPRESSED_TENSORS
from quantmap.formats.declaration import AddedFile, OutputFormat, Restored, Written, unchanged
from quantmap.formats.hf import HF
from quantmap.formats.modelopt import MODELOPT
from quantmap.formats.quantizers import QUANTIZERS

__all__ = ["AddedFile", "DEFAULT", "FORMATS", "OutputFormat", "Restored", "Written", "unchanged"]

#: Every output format by name, in the order ``--help`` lists them.
FORMATS: dict[str, OutputFormat] = {fmt.name: fmt for fmt in (QUANTIZERS, HF, MODELOPT, COMPRESSED_TENSORS)}
DEFAULT = QUANTIZERS.name
