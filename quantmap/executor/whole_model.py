"""The checks of an export that writes a whole model (a format with ``model``, :mod:`quantmap.formats.hf`),
from metadata on the planner, before any tensor moves: a model missing a tensor, or with an output head
that its spec, its checkpoint and its config.json disagree about, would load in transformers with random
or wrongly tied weights and no error.

* Every tensor of the checkpoint is claimed by a rule (less what the spec's ``exclude`` names, such as
  ``_extra_state``): one that is not is refused by name, or with ``--allow-partial`` left out and listed.
* The output head: a spec with no ``output_layer.weight`` rule (tied embeddings: gemma2's) writes no
  ``lm_head.weight``; a checkpoint that has its own ``output_layer.weight`` exported through it, or one
  without it through a spec that maps it, is refused naming both; so is a ``config.json`` whose
  ``tie_word_embeddings`` contradicts the checkpoint.
"""

from __future__ import annotations

from quantmap.check import Excluded
from quantmap.roles import MODEL_ROLES

HEAD, EMBEDDING = "output_layer.weight", "embedding.word_embeddings.weight"
_LISTED = 8


def whole_model(rules, roles: dict[str, str | None], report, options) -> list[str]:
    """The problems of exporting the checkpoint whose claimed names have ``roles`` (name → role) as a whole
    model; ``report.unclaimed`` (names no rule claims) loses what the spec excludes."""
    excluded = Excluded(rules.spec.exclude_megatron, rules.params)
    report.unclaimed = [name for name in report.unclaimed if not excluded(name)]
    if not any(role in MODEL_ROLES for role in roles.values()):
        return ["the checkpoint holds no weight that the spec claims, so there is no model to write (a shard "
                "directory written by save_shard(..., quantizers_only=True) holds quantizer state only): save the "
                "shards with quantizers_only=False, or export the quantizer state alone with --format quantizers"]
    problems = _head(rules, HEAD in roles or HEAD in report.unclaimed, options)
    unclaimed = [name for name in report.unclaimed if not (problems and name == HEAD)]
    if unclaimed and not options.allow_partial:
        shown = ", ".join(unclaimed[:_LISTED]) + (f" and {len(unclaimed) - _LISTED} more" if len(unclaimed) > _LISTED
                                                  else "")
        problems.append(f"{len(unclaimed)} tensor(s) of the checkpoint that no rule of the spec claims, which the "
                        f"model would lack: {shown}; map them in the spec (or name them under its exclude), or pass "
                        f"--allow-partial to export the rest and list them")
    return problems


def _head(rules, has_head: bool, options) -> list[str]:
    """The output head as the spec, the checkpoint and the config.json see it: tied (none of its own) or not.
    A spec that maps the head serves a tied model too when its config.json says so (exaone4's spec serves
    both); without that word, a checkpoint without a head through it is refused."""
    mapped = rules.to_hf(HEAD)
    config = next((source for source, name in options.model_files if name == "config.json"), None)
    tied, problems = _config_tie(config) if config is not None else (None, [])
    if has_head and mapped is None:
        problems.append(f"the checkpoint holds {HEAD} (untied embeddings: an output layer of its own) but the spec "
                        f"maps no {HEAD} (tied embeddings: it writes no lm_head.weight, and transformers would tie "
                        f"lm_head to the embedding); export it with a spec that maps {HEAD} to lm_head.weight")
    if not has_head and mapped is not None and tied is not True:
        problems.append(f"the spec maps {HEAD} to {', '.join(mapped.hf)} (untied embeddings) but the checkpoint holds "
                        f"no {HEAD} (tied embeddings: Megatron's share_embeddings_and_output_weights) and the "
                        f"config.json does not say tie_word_embeddings: true; export it with a spec for tied "
                        f"embeddings (one that drops {HEAD} and excludes lm_head.** as gemma2's does), or with the "
                        f"model's own config.json")
    if tied is not None and tied != (not has_head):
        held = f"holds {HEAD} (untied)" if has_head else f"holds no {HEAD} (tied)"
        problems.append(f"{config} says tie_word_embeddings: {str(tied).lower()} but the checkpoint {held}; "
                        f"transformers would {'replace lm_head.weight by the embedding' if tied else 'leave lm_head.weight missing (random)'}: "
                        f"fix tie_word_embeddings in the config.json, or check that --like names this model")
    return problems


def _config_tie(config: str) -> tuple[bool | None, list[str]]:
    """What ``config`` says of tie_word_embeddings (``None``: nothing), and the problem reading it, if any."""
    from quantmap.spec.hf_config import ConfigError, tied_embeddings

    try:
        return tied_embeddings(config), []
    except ConfigError as error:
        return None, [str(error)]
