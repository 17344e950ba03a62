"""Stage 1: spec files (schema, loading, the shipped library)."""

from quantmap.spec.library import find_spec, shipped_specs
from quantmap.spec.loader import ResolvedSpec, SourcedMapping, load_spec
from quantmap.spec.schema import MappingSpec, SpecFile

__all__ = ["MappingSpec", "ResolvedSpec", "SourcedMapping", "SpecFile", "find_spec", "load_spec", "shipped_specs"]
