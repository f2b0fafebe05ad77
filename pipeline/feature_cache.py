"""The HDF5 feature cache: schema, provenance, writer and reader (CONTRACT STUB).

This module is the only thing stage 1 (``mner.features``) and stage 2 (``mner.trainer``) share.
Schema version 1 (documented in docs/cache-schema.md):

/                      attrs: mner_schema_version=1, mner_version
/images                row i = image i; ids sorted (canonical order, identical for shards/merge)
  ids            (N,)     S<k>    image ids (utf-8)
  status         (N,)     uint8   0 ok, 1 missing, 2 unreadable, 3 placeholder (attr status_names)
  detail_bytes   (B,)     uint8   + detail_offsets (N+1,) int64: why an image is not ok ("" when ok)
  width, height  (N,)     int32   original size (0 when not decodable)
                 attrs: id_list_hash (sha256 of "\n".join(ids))
/posts                 the posts the cache was built from (tokens, tags, splits, data hash)
  post_ids (P,) S<k>; split (P,) uint8 (attr split_names); image_row (P,) int32 (-1: none)
  token_offsets (P+1,) int64 (tokens of post p: token rows token_offsets[p]:token_offsets[p+1])
  token_bytes (B,) uint8 + token_byte_offsets (T+1,) int64; tag_ids (T,) int16 (attr tag_names,
  -1 when unlabelled); attrs: data_hash, data_files (json)
/objects               one detector per cache
  offsets (N+1,) int64   objects of image i are rows offsets[i]:offsets[i+1] of every "object" dataset
  boxes (M,4) float32 xyxy original pixels; scores (M,) float32; class_ids (M,) int32
  crop_offsets (M+1,) int64 + crop_jpeg (B,) uint8: each object's crop as JPEG bytes
/encoders/<name>       clip | resnet152 | swin
  clip: image_embed (N,D) f16, patch_tokens (N,P,Dp) f16, crop_embed (M,D) f16; attr logit_scale
  resnet152: grid (N,7,7,2048) f16, crop_pooled (M,2048) f16
  swin: grid (N,12,12,1536) f16
/prompts/<set>         vcrmner | vcrmner_words | promptmner_task | promptmner_kb | promptmner_expert
  prompt_bytes + prompt_offsets (prompt texts); prompt_category (Q,) int16 (attr category_names)
  prompt_embed (Q,D) f16; centroids (C,D) float32; crop_weights (M,C) f16; image_relevance (N,Q) f16

Every dataset has attr ``rows`` in {"image", "object", "global"}; "object" datasets are sliced with
/objects/offsets. Every group under /objects, /encoders, /prompts has attr ``provenance`` (JSON):
component, model, pretrained (tag | "sha256:<file hash>" | "random"), preprocessing, thresholds,
library versions, image_list_hash, command (argv), created (UTC).

Public API:

- ``SCHEMA_VERSION = 1``; ``STATUS_NAMES = ("ok", "missing", "unreadable", "placeholder")``
- ``class CacheError(Exception)``; ``SchemaVersionError(CacheError)``; ``MissingFeaturesError(CacheError)``
- ``extract_command_hint(paths: list[str]) -> str``: the ``mner-features extract ...`` command that adds them
- ``make_provenance(component, *, model, pretrained, preprocessing, thresholds, image_ids, extra=None) -> dict``
- ``class CacheWriter(path, *, overwrite=False)``: context manager; copies an existing cache to a temp
  file in the same folder, writes there, ``os.replace``s on clean exit, deletes the temp on error.
  ``.existing_groups() -> set[str]``; ``.write_images(ids, status, detail, width, height)``;
  ``.write_posts(dataset)``; ``.write_group(name, datasets: dict[str, tuple[np.ndarray, str rows]],
  provenance: dict, attrs: dict | None = None)`` (``name`` like ``"objects"``, ``"encoders/clip"``).
- ``class FeatureCache(path, *, in_memory=False)``: opens h5py lazily per process (safe across fork:
  handle dropped when pickled / pid changes). ``.image_ids``, ``.row_of(image_id)``, ``.status``,
  ``.has(path)``, ``.require(paths, model)``, ``.read(path, row)``, ``.read_global(path)``,
  ``.row_shape(path)``, ``.provenance(group)``, ``.groups()``, ``.load_posts() -> Dataset``,
  ``.random_init_groups()``, ``.feature_spec(paths) -> FeatureSpec``.
- ``@dataclass FeatureSpec``: ``shapes: dict[str, tuple]`` (per-row shape of each path),
  ``globals: dict[str, np.ndarray]`` (the "global" datasets), ``attrs: dict[str, dict]``.
- ``merge_caches(paths, out)``; ``describe(path) -> str`` (for ``mner-features info``).
"""
