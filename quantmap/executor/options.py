"""The options of one export or import run, as one value.

The command line and the Python API each build a :class:`RunOptions` once, where the run starts; it is
checked there, and then travels as one argument through the launch, every rank and the writers (and,
pickled, to spawned workers). A new option is one field here, not a keyword threaded through a dozen
signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from quantmap.formats import DEFAULT, FORMATS, OutputFormat
from quantmap.io.hf import DEFAULT_SHARD_SIZE
from quantmap.limits import MAX_TIMEOUT_S

#: ``--dtype`` names and the torch dtype each casts to (by name: this module imports no torch for it).
CASTS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


ONLY = (None, "quantizers")  # what RunOptions.only may be
KV_SCALES = ("megatron", "hf")  # what RunOptions.kv_scales may be: ModelOpt's two exporters' conventions


class OptionsError(ValueError):
    """A run option out of its range: one line naming it, what it must be, and what it was."""


@dataclass(frozen=True)
class RunOptions:
    """How a run behaves, apart from what it reads and writes.

    ``strict`` refuses any finding; ``allow_partial`` (export) writes shards short of what the layout
    requires and reports the rest (under ``strict`` they are refused with the other findings);
    (import too: a torch_dist checkpoint's weights the HF checkpoint lacks are kept rather than refused);
    ``timeout`` bounds every wait of a collective (and of a stopped or hung worker); ``shard_size`` is the
    largest HF shard file in bytes; ``progress`` shows progress bars; ``nproc`` spawns that many gloo
    workers (``None``: torchrun's ranks, or one process playing every rank); ``format`` names the output
    format (:data:`quantmap.formats.FORMATS`): what an export writes and an import reads back; ``only``
    (import into a torch_dist checkpoint): ``"quantizers"`` reads the quantizer state back and keeps every
    weight, ``None`` also the model's weights, norms and biases the HF checkpoint holds; ``dtype``
    (``bf16``, ``fp16``, ``fp32``; ``None``: the checkpoint's) is what an export casts the tensors the format
    lets it cast to (the model's weights, never quantizer state); ``model_files``: for a format that writes
    a whole model, the files copied beside its weights, each ``(source path, name in the output)``
    (:func:`quantmap.io.hf.model_files`), ``config.json`` among them; ``recipe``: the quantization recipe the
    source records (ModelOpt's ``quant_cfg`` list, read from the checkpoint where the run starts,
    :meth:`~quantmap.executor.sources.TorchDistCheckpoint.recipe`), which a format that computes its tensors
    per module follows; ``None`` where the source records none; ``kv_scales`` (``--format modelopt``): the
    KV-cache scales as ModelOpt's Megatron exporter writes them (``megatron``: ``self_attn.k_scale``, FP8
    clamped at 1.0) or its Hugging Face exporter (``hf``: ``self_attn.k_proj.k_scale``, ``amax / 448``)."""

    strict: bool = False
    allow_partial: bool = False
    timeout: timedelta = timedelta(minutes=10)
    shard_size: int = DEFAULT_SHARD_SIZE
    progress: bool = False
    nproc: int | None = None
    format: str = DEFAULT
    only: str | None = None
    dtype: str | None = None
    model_files: tuple[tuple[str, str], ...] = ()
    recipe: list | None = None
    kv_scales: str = "megatron"

    def __post_init__(self) -> None:
        for name in ("strict", "allow_partial", "progress"):
            if not isinstance(getattr(self, name), bool):
                _refuse(name, "True or False", getattr(self, name))
        if not isinstance(self.timeout, timedelta) or not timedelta(0) < self.timeout <= \
                timedelta(seconds=MAX_TIMEOUT_S):
            _refuse("timeout", f"a timedelta above 0 and at most {MAX_TIMEOUT_S} s (a week, quantmap/limits.py), "
                               f"e.g. timedelta(minutes=10)", self.timeout)
        if not _whole(self.shard_size) or self.shard_size < 1:
            _refuse("shard_size", "a whole number of bytes >= 1", self.shard_size)
        if self.nproc is not None and (not _whole(self.nproc) or self.nproc < 1):
            _refuse("nproc", "a whole number >= 1, or None (torchrun's ranks, or one process)", self.nproc)
        if not isinstance(self.format, str) or self.format not in FORMATS:
            _refuse("format", " or ".join(map(repr, FORMATS)), self.format)
        if self.kv_scales not in KV_SCALES:
            _refuse("kv_scales", " or ".join(map(repr, KV_SCALES)), self.kv_scales)
        if self.only not in ONLY:
            _refuse("only", " or ".join(map(repr, ONLY)), self.only)
        if self.recipe is not None and not (isinstance(self.recipe, list) and all(isinstance(entry, dict)
                                                                                  for entry in self.recipe)):
            _refuse("recipe", "None or ModelOpt's quant_cfg, a list of dicts", self.recipe)
        self._check_model()

    def _check_model(self) -> None:
        """``dtype`` and ``model_files`` against the format: what it casts, whether it is a whole model."""
        fmt = self.output_format
        if self.dtype is not None:
            if self.dtype not in CASTS:
                _refuse("dtype", " or ".join(map(repr, CASTS)) + " or None (the checkpoint's dtype)", self.dtype)
            if not fmt.takes_dtype:
                _refuse("dtype", f"None with format {fmt.name!r}, which writes no tensor that --dtype casts (it "
                                 f"casts a model's weights: --format hf)", self.dtype)
        if not isinstance(self.model_files, tuple) or not all(
                isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
                and pair[1] and "/" not in pair[1] for pair in self.model_files):
            _refuse("model_files", "a tuple of (source path, file name) pairs", self.model_files)
        if self.model_files and not fmt.model:
            _refuse("model_files", f"() with format {fmt.name!r}, which writes no model beside which to copy them",
                    self.model_files)
    def check_export(self) -> None:
        """What only an export needs: a format that writes a whole model has the ``config.json`` to write beside
        it (an import reads such a model back without one)."""
        if self.output_format.model and "config.json" not in {name for _, name in self.model_files}:
            raise OptionsError(f"format {self.format!r} writes a whole Hugging Face model, which needs its config.json: "
                               f"pass --like HF_DIR (the Hugging Face model the Megatron run started from: its config, "
                               f"generation and tokenizer files are copied beside the weights) or --config "
                               f"config.json (model_files=quantmap.io.hf.model_files(like=..., config=...) from "
                               f"Python). Nothing was written")

    def check_import(self) -> None:
        """What only an import needs: a format it reads back (a deployable one may be written only)."""
        if not self.output_format.restores and self.output_format.restore_modules is None:
            readable = " or ".join(repr(name) for name, fmt in FORMATS.items() if fmt.restores or fmt.restore_modules)
            raise OptionsError(f"format {self.format!r} is written by export but not read back by import yet (import "
                               f"reads {readable}). Nothing was written")

    @property
    def output_format(self) -> OutputFormat:
        """The registered format :attr:`format` names."""
        return FORMATS[self.format]


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(name: str, expected: str, got) -> None:
    raise OptionsError(f"run option {name} must be {expected}, not {got!r}")
