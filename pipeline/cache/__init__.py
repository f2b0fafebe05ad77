"""The HDF5 feature cache: the one thing stage 1 (``mner.features``) and stage 2 (``mner.trainer``) share.

Modules: ``specs`` (GroupSpec / DatasetSpec and the registry), ``groups`` (every group that exists,
declared as data), ``provenance``, ``lock`` (one writer per cache), ``writer``, ``reader``, ``merge``,
``describe`` (``mner-features info``, the missing-features hint, the doc tables). Imports no torch.
Layout and rules: docs/cache-schema.md; how to add a group: docs/architecture.md.
"""

from mner.pipeline.cache.base import (
    SCHEMA_VERSION,
    STATUS_NAMES,
    CacheError,
    MissingFeaturesError,
    NotACacheError,
    SchemaVersionError,
    cache_fingerprint,
    group_fingerprint,
    id_list_hash,
    open_cache_file,
    pack_ragged,
)
from mner.pipeline.cache.describe import describe, extract_command_hint, schema_tables
from mner.pipeline.cache.groups import GROUNDING_MAX
from mner.pipeline.cache.lock import CacheLock, CacheLockedError, held_lock
from mner.pipeline.cache.merge import merge_caches
from mner.pipeline.cache.provenance import make_provenance, shard_record, weights_tag
from mner.pipeline.cache.reader import COVERAGE_KEYS, FeatureCache, FeatureSpec
from mner.pipeline.cache.specs import (
    COLLATIONS,
    STRUCTURAL_KINDS,
    DatasetSpec,
    GroupSpec,
    all_groups,
    dataset_spec,
    get_group,
    is_ragged,
    ragged_kinds,
    register_group,
    unregister_group,
)
from mner.pipeline.cache.writer import CacheWriter, GroupWriter

__all__ = [
    "COLLATIONS",
    "COVERAGE_KEYS",
    "GROUNDING_MAX",
    "SCHEMA_VERSION",
    "STATUS_NAMES",
    "STRUCTURAL_KINDS",
    "CacheError",
    "CacheLock",
    "CacheLockedError",
    "CacheWriter",
    "DatasetSpec",
    "FeatureCache",
    "FeatureSpec",
    "GroupSpec",
    "GroupWriter",
    "MissingFeaturesError",
    "NotACacheError",
    "SchemaVersionError",
    "all_groups",
    "cache_fingerprint",
    "dataset_spec",
    "describe",
    "extract_command_hint",
    "get_group",
    "group_fingerprint",
    "held_lock",
    "id_list_hash",
    "is_ragged",
    "make_provenance",
    "merge_caches",
    "open_cache_file",
    "pack_ragged",
    "ragged_kinds",
    "register_group",
    "schema_tables",
    "shard_record",
    "unregister_group",
    "weights_tag",
]
