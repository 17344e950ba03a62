"""What an output format is: per role, the tensors it writes and how import reads them back; the files it adds.

A format knows nothing about names and the rules know nothing about formats (the split of transformers'
quantizer tables, sqlglot's dialects): the rules say where each Megatron tensor goes and what it is (its
role, :mod:`quantmap.roles`); a format says what becomes of a role there. A declaration is plain data plus
the functions it names, and never imports torch, so the command line lists the formats without it.

Two kinds. A format of rows moves each tensor of the roles it reads as it is, under the HF name the rule
gives: a row says where under the output it goes (``directory``: ``hf`` puts the quantizer state in
``quantizer_state/`` beside the model) and whether ``--dtype`` casts it (the model's own tensors, never
quantizer state). A format computed per module (a deployable checkpoint) writes other tensors, each
computed from several of one HF module's (a quantized weight from the weight and its amax): it declares
:attr:`OutputFormat.modules` (and :attr:`OutputFormat.restore_modules` for the way back), and its rows say
only which roles it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from quantmap.roles import MODEL_ROLES, QUANTIZER_ROLES

ROLES = MODEL_ROLES | QUANTIZER_ROLES


@dataclass(frozen=True, slots=True)
class Written:
    """A role's tensors as a format writes them, each under the HF name the rule gives, as it is: ``inputs``,
    the roles it reads (the role itself); ``directory``, where under the output they go, with their own shard
    files and index (``""``: the output itself); ``cast``, whether the run's ``--dtype`` casts them."""

    inputs: tuple[str, ...]
    directory: str = ""
    cast: bool = False


@dataclass(frozen=True, slots=True)
class Restored:
    """How import reads a role back: its tensors under the HF names the rules give, in ``directory`` under the
    HF checkpoint (as :attr:`Written.directory` says)."""

    directory: str = ""


@dataclass(frozen=True, slots=True)
class AddedFile:
    """A file a format writes beside the tensors (``hf_quant_config.json``), or rewrites (``config.json``,
    copied from ``--like``, gains its ``quantization_config``): its name, and ``build``, from what the
    module-wise format said of each HF module it wrote (:attr:`ModuleOutput.facts`, by module name) and the
    file's bytes as copied (``None`` where nothing was) to the file's bytes."""

    name: str
    build: Callable[[Mapping[str, Mapping[str, object]], bytes | None], bytes]


class FormatError(ValueError):
    """What a format cannot write from what the source holds (a recipe it does not know, a missing amax): one
    message naming the tensor or module, what was expected, and the fix. The run reports it as its error."""


@dataclass(frozen=True, slots=True)
class ModuleView:
    """What a module-wise format (:attr:`OutputFormat.modules`) sees of one Hugging Face module, from metadata
    alone, before any tensor is read: ``name`` (``model.layers.0.self_attn.q_proj``); ``buffers``, each
    tensor the source has for it by its name under the module (``weight``, ``weight_quantizer._amax``,
    ``k_bmm_quantizer._amax``), with its torch dtype's name and shape; ``roles`` (:mod:`quantmap.roles`) and
    ``megatron`` (the global Megatron name it comes from) of each; ``dtype``: the run's ``--dtype`` as a torch
    dtype name (``None``: each tensor's own); ``recipe``: the quantization recipe the checkpoint records
    (ModelOpt's ``quant_cfg``; ``None`` where it records none); ``kv_scales``: the run's KV-scale convention
    (``megatron`` or ``hf``, as ModelOpt's two exporters write them); ``lookup``: the full HF name that holds a
    global Megatron name (``None`` where none does), for a tensor computed from another module's (a norm with
    the ``pre_quant_scale`` of the linear it feeds folded in) — a :class:`Derived` input may be such a name;
    ``holders``: every full HF name that holds a global Megatron name (the q, k and v parts of one fused weight),
    for a format that must know which module another's tensor goes into; ``config``: the model's ``config.json``
    as the run copies it (``None`` where it copies none), for what the tensors do not say (the attention's head
    size, which decides which query heads share one value head).

    An input of a :class:`Derived` that starts with ``=`` is a constant (``=448.0``: a float32 scalar), for a
    value the checkpoint lacks and the format knows (ModelOpt's maximum bound for an uncalibrated amax); one
    that starts with ``@`` is another tensor the format writes for the module (``@weight_scale``, listed
    before it), computed once for both (NVFP4's block scales, which its payload is divided by)."""

    name: str
    buffers: Mapping[str, tuple[str, tuple[int, ...]]]
    roles: Mapping[str, str]
    megatron: Mapping[str, str]
    dtype: str | None
    recipe: object = None
    kv_scales: str = "megatron"
    lookup: Callable[[str], str | None] = lambda megatron: None
    holders: Callable[[str], tuple[str, ...]] = lambda megatron: ()
    config: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True)
class Derived:
    """One tensor a module-wise format writes: its full HF ``name``; ``inputs``, the module's buffers it is
    computed from (names under the module, as :attr:`ModuleView.buffers`); ``compute``, those tensors in
    ``inputs`` order to it; its torch ``dtype``'s name and ``shape``, known before any tensor is read; ``note``:
    where a tensor computed back from a deployable checkpoint is not the source's bit for bit, what it is."""

    name: str
    inputs: tuple[str, ...]
    compute: Callable
    dtype: str
    shape: tuple[int, ...]
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ModuleOutput:
    """What a module-wise format writes for one HF module: its ``tensors``, and ``facts`` about it for the
    format's added files (its quantization algorithm, the KV cache's; empty for a module written as is).
    ``facts["uncalibrated"]``, where present, lists its quantizers the checkpoint holds no amax for, written
    with a bound instead: the run reports them, and ``--strict`` refuses them."""

    tensors: tuple[Derived, ...]
    facts: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputFormat:
    """A registered output format (:data:`quantmap.formats.FORMATS`): ``writes`` maps each role it takes
    from the source to the tensors it writes for it, ``restores`` each role import reads back to how; a
    role in neither is skipped both ways and counted in the report. ``model``: the output is a whole
    Hugging Face model directory, which needs the model's ``config.json`` (``--like`` or ``--config``, copied
    beside the weights), and takes every tensor of the source: one that no rule claims is refused.
    ``modules``: the format computes what it writes per HF module (a deployable checkpoint: a quantized
    weight from the weight and its amax, scales from amax), from what the source has for the module
    (:class:`ModuleView`) to the tensors it writes (:class:`ModuleOutput`); its ``writes`` then say only which
    roles it reads. ``restore_modules``: the way back, per module of a checkpoint in the format (its tensors
    by name under the module, in :attr:`ModuleView.buffers`) to the tensors the ``hf`` format would hold for
    it (the weight, ``weight_quantizer._amax``, ...), which import then reads as it reads ``hf``.
    ``files``: what it adds beside the tensors, built after they are written. ``summarize``: for a module-wise
    format, the lines the closing report gives of what a user gets, from what each module said
    (:attr:`ModuleOutput.facts`, by module name); ``next_step``: the line that says what to do with the output,
    ``{out}`` standing for its path quoted for a shell and ``{out_py}`` as a Python string."""

    name: str
    summary: str  # one line, for --help and the docs
    writes: Mapping[str, tuple[Written, ...]]
    restores: Mapping[str, Restored]
    files: tuple[AddedFile, ...] = ()
    model: bool = False
    modules: Callable[[ModuleView], ModuleOutput] | None = None
    restore_modules: Callable[[ModuleView], tuple[Derived, ...]] | None = None
    summarize: Callable[[Mapping[str, Mapping[str, object]]], list[str]] | None = None
    next_step: str = ""
    _read: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted((set(self.writes) | set(self.restores)) - ROLES)
        if unknown:
            raise ValueError(f"format {self.name!r} declares unknown role(s) {unknown}; roles are {sorted(ROLES)}")
        read = {role for rows in self.writes.values() for row in rows for role in row.inputs}
        strays = sorted(read - ROLES)
        if strays:
            raise ValueError(f"format {self.name!r} reads unknown role(s) {strays}")
        for role, rows in self.writes.items():
            if len({row.directory for row in rows}) > 1 or any(not _plain(row.directory) for row in rows):
                raise ValueError(f"format {self.name!r} writes role {role!r} to {[row.directory for row in rows]}; a "
                                 f"role's tensors go to one directory, a plain name under the output (or \"\")")
        object.__setattr__(self, "_read", frozenset(read))

    def reads(self, role: str) -> bool:
        """Whether an export reads tensors of ``role`` from the source: every other role stays unread."""
        return role in self._read

    def directory(self, role: str) -> str:
        """Where under the output the tensors of ``role`` are written (``""``: the output itself)."""
        return self.writes[role][0].directory

    def casts(self, role: str) -> bool:
        """Whether the run's ``--dtype`` casts the tensors written for ``role``."""
        return any(row.cast for row in self.writes.get(role, ()))

    @property
    def directories(self) -> tuple[str, ...]:
        """Every directory the format writes tensors to, in the order its rows first name them."""
        return tuple(dict.fromkeys(row.directory for rows in self.writes.values() for row in rows))

    def reads_back(self, role: str) -> bool:
        """Whether an import reads ``role`` back from the HF checkpoint."""
        return role in self.restores

    @property
    def takes_dtype(self) -> bool:
        """Whether ``--dtype`` means anything to the format: it casts some role, or computes its tensors per
        module in the model's dtype."""
        return self.modules is not None or any(self.casts(role) for role in self.writes)


def _plain(directory: str) -> bool:
    return directory == "" or (directory.isidentifier() and directory.isascii())


def unchanged(name: str, summary: str, roles) -> OutputFormat:
    """A format that moves the tensors of ``roles`` unchanged under the HF names the rules give, both ways."""
    roles = sorted(roles)
    return OutputFormat(name, summary, writes={role: (Written((role,)),) for role in roles},
                        restores={role: Restored() for role in roles})
