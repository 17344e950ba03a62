"""Bounds on every size quantmap reads from a file or a flag, in one place.

A count read from a checkpoint, a config, a spec or the command line decides how much is
allocated or enumerated (names per layer and expert, bytes of a chunk), so an absurd one (a
``.metadata`` key for layer 10⁹, ``num_layers: 1e9``) would run for hours or exhaust memory
before anything could be reported. Each limit is checked where the value enters, before it is
used, and is orders of magnitude above any real model: DeepSeek-V3 has 61 layers and 256
experts, the largest configs today a few hundred and a few thousand.
"""

from __future__ import annotations

# The largest world quantmap takes: above the largest published training runs (~100k accelerators).
# A layout beyond it is a typo (dp: 1000000000), and an import would write a file per rank.
MAX_WORLD_SIZE = 2**17
MAX_LAYERS = 100_000  # decoder or MTP layers of a model, and so any layer index + 1
MAX_EXPERTS = 65_536  # routed experts per MoE layer, and so any expert index + 1
MAX_PARAM = 1 << 24  # any other run-time parameter of a spec (hidden size, head counts: thousands)
MAX_SPEC_BYTES = 1 << 20  # one spec file; the largest shipped spec is a few KB
MAX_TRACKER_BYTES = 64  # latest_checkpointed_iteration.txt: an iteration number or 'release'
# --timeout: a week. torch.distributed keeps timeouts in milliseconds, and nothing waits longer.
MAX_TIMEOUT_S = 7 * 24 * 3600

PARAM_LIMITS = {"num_layers": MAX_LAYERS, "num_experts": MAX_EXPERTS}


def param_limit(name: str) -> int:
    """The largest value the run-time parameter ``name`` may take."""
    return PARAM_LIMITS.get(name, MAX_PARAM)


def over(what: str, value: int, limit: int) -> str | None:
    """The sentence saying ``what`` is over ``limit``, or ``None`` when it is within it."""
    if value <= limit:
        return None
    return f"{what} is {value:,}, over quantmap's limit of {limit:,} (quantmap/limits.py)"
