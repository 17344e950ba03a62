"""What a run did not map cleanly: reported, grouped and counted, never silently dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

from quantmap.name_groups import group_names, natural



class ExecutorError(RuntimeError):
    """An export or import that cannot complete; every rank raises it with the same message."""


@dataclass
class Report:
    """Findings of one export or import. ``problems`` are what ``--strict`` refuses."""

    written: int = 0
    output: object = None  # an export's written files, read back (quantmap.io.hf.Contents); None in memory
    model: bool = False  # the export wrote a whole model (a format with ``model``: hf)
    quantizer_output: object = None  # a model export's quantizer state, read back from its own directory
    copied: list[str] = field(default_factory=list)  # a model export's files copied from --like / --config
    unclaimed: list[str] = field(default_factory=list)  # names no rule claims
    weights: int = 0  # tensors in the input that are not quantizer state (weights), which quantmap does not move
    entries: int = 0  # torch_dist entries that are no tensor (_extra_state, rng_state): not model state
    # names the layout requires (every layer and expert of every kind seen) that the input lacks:
    # HF names on import, Megatron names on export (with --allow-partial; refused otherwise)
    missing: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # import: HF names beyond the layout's layers or experts
    uncalibrated: list[str] = field(default_factory=list)  # amax with a zero: ModelOpt's "never calibrated"
    disagreements: list[str] = field(default_factory=list)  # copies that should be equal but were not
    duplicates: list[str] = field(default_factory=list)  # pipeline stages other than the owner holding a name
    kept: list[str] = field(default_factory=list)  # import --into: what of the checkpoint stayed as it was, and why
    restored: list[str] = field(default_factory=list)  # import: values computed back from a deployable checkpoint
    deployed: list[str] = field(default_factory=list)  # export: what a deployable format wrote (its summarize)

    @property
    def problems(self) -> int:
        return len(self.unclaimed) + len(self.missing) + len(self.outside) + len(self.uncalibrated)

    def refusal(self, source: str = "HF", examples: int = 3) -> str:
        """The problems ``--strict`` refuses, one clause per kind: how many, a few names, what to check.
        ``source`` names the input's side: ``"HF"`` on import, ``"Megatron"`` on export."""
        lacks = "the checkpoint lacks" if source == "HF" else "the shards lack"
        clauses = []
        for names, what, check in (
                (self.unclaimed, "no rule of the spec claims", ""),
                (self.missing, f"the layout's ranks need but {lacks}", ""),
                (self.outside, "no rank of the layout holds (a layer or expert beyond it)",
                 " (check num_layers/num_experts in layout.json)"),
                (self.uncalibrated, "with a zero amax (uncalibrated)", " (calibrate them, or drop --strict)")):
            if names:
                shown = sorted(names, key=natural)[:examples]
                more = f", and {len(names) - examples} more" if len(names) > examples else ""
                clauses.append(f"{len(names)} {source} name(s) {what}: {', '.join(shown)}{more}{check}")
        return "; ".join(clauses)

    def lines(self, limit: int = 5) -> list[str]:
        """Human-readable summary: each category grouped by name shape, with counts."""
        out = [self._written()] if self.written else []
        out += self.deployed
        if self.weights:
            out.append(f"{self.weights} tensor(s) that are not quantizer state skipped (weights, norms, "
                       f"embeddings; a shard directory's counted per tensor-parallel rank): quantmap moves "
                       f"quantizer state only; the weights come from the model's own Hugging Face conversion")
        if self.entries:
            out.append(f"{self.entries} checkpoint entries that hold no tensor skipped (_extra_state, rng_state): "
                       f"not model state")
        out += self.kept + self.restored
        unclaimed = ("left out of the model: no rule of the spec claims them (--allow-partial)" if self.model
                     else "unclaimed by any rule")
        for title, names in ((unclaimed, self.unclaimed), ("missing", self.missing),
                             ("no rank of the layout holds (layer or expert beyond the layout)", self.outside),
                             ("with a zero amax (uncalibrated)", self.uncalibrated)):
            if names:
                out.append(f"{len(names)} name(s) {title}:")
                out += [f"  {count} x {shape}" for shape, count in group_names(names)[:limit]]
        for title, notes in (("copies or parts that differ", self.disagreements),
                             ("copies on non-owning pipeline stages ignored", self.duplicates)):
            if notes:
                out.append(f"{len(notes)} {title}:")
                out += [f"  {note}" for note in notes[:limit]]
                out += [f"  ... and {len(notes) - limit} more"] if len(notes) > limit else []
        return out

    def _written(self) -> str:
        """How many tensors, and for files where, how many bytes in which dtypes (read back from the files);
        for a model, its quantizer state and the files copied beside it."""
        if self.output is None:
            return f"{self.written} tensor(s) written"
        found = self.output
        if not self.model:
            dtypes = ", ".join(f"{count} {dtype}" for dtype, count in found.dtypes.items())
            return (f"{found.tensors} tensor(s) written to {found.path}: {found.bytes} bytes of data ({dtypes}) in "
                    f"{found.files} safetensors file(s) and the index")
        lines = [_files(found, "model tensor(s) written to")]
        if self.quantizer_output is not None:
            lines.append(_files(self.quantizer_output, "quantizer tensor(s) written to"))
        if self.copied:
            lines.append(f"copied beside the weights: {', '.join(self.copied)}")
        return "\n".join(lines)


def _files(found, what: str) -> str:
    dtypes = ", ".join(f"{count} {dtype}" for dtype, count in found.dtypes.items())
    return (f"{found.tensors} {what} {found.path}: {found.bytes} bytes of data ({_human(found.bytes)}; {dtypes}) "
            f"in {found.files} safetensors file(s) and the index")


def _human(size: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size /= 1024
    return f"{size:.4g} {unit}"


def distinct(values: list[float]) -> list[str]:
    """``values`` as ``:g`` writes them (6 significant digits), or with as many more as it takes for the ones
    that differ to read differently: float32 copies 1 ulp apart (3.78847 and 3.78847) need 8 or 9."""
    for digits in range(6, 18):
        shown = [f"{value:.{digits}g}" for value in values]
        if len(set(shown)) == len(set(values)):
            return shown
    return [repr(value) for value in values]  # NaNs, which never compare equal


def describe(error: BaseException) -> str:
    """An error as the one line every rank raises: its own text where that says enough, else with its type."""
    text = str(error)
    return text if isinstance(error, (ExecutorError, ValueError, OSError)) and text else f"{type(error).__name__}: {text}"
