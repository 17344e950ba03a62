"""The executor: apply compiled rules to real tensors across TP/PP/EP ranks.

``export``/``export_offline`` go Megatron → Hugging Face, ``import_``/``import_offline`` come
back. Runs on ``torch.distributed`` (gloo or NCCL) when a process group exists, or in one process
that plays every rank; :class:`RunOptions` holds a run's options (strictness, timeout, shard size, ...).
Importing this package imports torch.
"""

from quantmap.executor.export import Export, export, export_offline
from quantmap.executor.placement import Placement
from quantmap.executor.importer import import_, import_offline, import_state
from quantmap.parallel import Coords, LayoutError, ParallelLayout
from quantmap.executor.options import OptionsError, RunOptions
from quantmap.executor.report import ExecutorError, Report

__all__ = ["Coords", "ExecutorError", "Export", "LayoutError", "OptionsError", "ParallelLayout", "Placement", "Report",
           "RunOptions", "export", "export_offline", "import_", "import_offline", "import_state"]
