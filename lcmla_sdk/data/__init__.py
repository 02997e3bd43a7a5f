"""``lcmla data``: the paper's synthetic set of consistent identities, made with SDXL-Turbo (docs/DATA.md).

:func:`generated_identities` / :func:`read_identities` give the people, :class:`PlanOptions` what is made of each,
:func:`load_turbo` the model, :class:`SetGenerator` makes the set in the authors' layout, :func:`merge_shards` joins
shards.
"""

from .descriptions import Identity, generate_descriptions, generated_identities, read_identities
from .generate import SetGenerator
from .layout import DataSetError, merge_shards, run_record
from .plan import STYLES, PlanOptions, Shard
from .turbo import load_turbo, turbo_fingerprint

__all__ = [
    "STYLES", "DataSetError", "Identity", "PlanOptions", "SetGenerator", "Shard", "generate_descriptions",
    "generated_identities", "load_turbo", "merge_shards", "read_identities", "run_record", "turbo_fingerprint",
]  # fmt: skip
