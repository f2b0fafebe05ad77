"""Every feature group that exists today, declared as data (docs/cache-schema.md is generated from here).

To add a group: declare a ``GroupSpec`` here (both stages import this package, never each other),
write its producer in ``mner.features`` and the model that reads it (docs/architecture.md).
"""

from __future__ import annotations

from mner.pipeline.cache.specs import DatasetSpec as D
from mner.pipeline.cache.specs import GroupSpec, register_group

# Prompt sets bundled with stage 1 (features/producers/prompt_sets/*.json); any other name is a FILE.json set.
PROMPT_SETS = ("vcrmner", "vcrmner_words", "promptmner_task", "promptmner_kb", "promptmner_expert")

IMAGES = register_group(GroupSpec(
    name="images", feature=False,
    doc="The image index: row i of every image dataset is image i. Ids are sorted and unique (the "
        "canonical order shared by shards and merge). attrs: id_list_hash, status_names (JSON).",
    datasets=(
        D("ids", "image", "S", collate=None, doc="image id (utf-8 fixed bytes), sorted, unique"),
        D("status", "image", "uint8", collate=None,
          doc="0 ok, 1 missing, 2 unreadable, 3 placeholder (see Status codes)"),
        D("detail", "text", "uint8", encoding="utf-8", collate=None,
          doc='why the image is not ok ("" when ok)'),
        D("width", "image", "int32", collate=None, doc="original width in pixels; 0 when not decodable"),
        D("height", "image", "int32", collate=None, doc="original height in pixels; 0 when not decodable"),
        D("content_sha256", "image", "S", collate=None, required=False,
          doc='sha256 of the image file\'s bytes ("" when there is no file): tells a changed image'),
    ),
))

POSTS = register_group(GroupSpec(
    name="posts", feature=False,
    doc="The posts the cache was built from, so training needs only the cache. attrs: data_hash, "
        "data_files_json, orphan_i_json, notes_json, split_names_json, tag_names_json.",
    datasets=(
        D("post_id", "post", "S", collate=None, doc='"{split}-{index}"'),
        D("split", "post", "uint8", collate=None, doc="index into split_names_json"),
        D("image_id", "post", "S", collate=None, doc='b"" when the post has no image'),
        D("labelled", "post", "uint8", collate=None, doc="0: tags unknown (tag_ids are -1)"),
        D("source", "post", "uint8", encoding="utf-8", collate=None, doc='"path:line" of the post'),
        D("token_offsets", "index", "int64", indexes="token", collate=None,
          doc="tokens of post p: token rows token_offsets[p]:token_offsets[p+1]"),
        D("token_text", "token", "uint8", encoding="utf-8", collate=None, doc="the tokens as read"),
        D("tag_ids", "token", "int16", collate=None, doc="index into tag_names_json (BIO as read), -1 unlabelled"),
    ),
))

DETECTOR_SLOT = {"detector": "the --detector that made the objects: maskrcnn, fasterrcnn, detectron2, "
                                 "maskrcnn-test (a tiny random variant; its provenance names the model it stands for)"}
CLIP_SLOT = {"clip_model": "the open_clip architecture (--clip-model): ViT-B-32, ViT-B-16, RN50, or a tiny random "
                           "variant <arch>-test standing for <arch>"}

OBJECTS = register_group(GroupSpec(
    name="objects/{detector}", option="--detector {detector}", slot_docs=DETECTOR_SLOT,
    doc="One instance per detector; objects of an image are in descending score. The crops are stored so "
        "encoders added later read the same pixels. attr class_names.",
    provenance=("detector", "crops"),
    datasets=(
        D("offsets", "index", "int64", indexes="object", cut_by="max_objects", collate=None,
          doc="objects of image i: object rows offsets[i]:offsets[i+1]"),
        D("boxes", "object", "float32", (4,), doc="xyxy in original pixels"),
        D("scores", "object", "float32", doc="detector score"),
        D("class_ids", "object", "int32", collate=None, doc="detector classes (COCO ids for torchvision)"),
        D("crop_jpeg", "object", "uint8", encoding="jpeg", collate="jpeg", pixels=224,
          doc="JPEG bytes of each object crop (longer side <= --crop-max-side)"),
    ),
))

CLIP = register_group(GroupSpec(
    name="encoders/clip/{clip_model}", option="--encoder clip --clip-model {clip_model}", slot_docs=CLIP_SLOT,
    provenance=("encoder",), attrs=("logit_scale",),
    dims={"D": "projected embedding width (512 for ViT-B-32)",
          "P": "patch tokens, class token excluded (49 for ViT-B-32 at 224)",
          "Dp": "transformer width (768 for ViT-B-32)"},
    doc="open_clip image tower, one instance per CLIP model. attr logit_scale (exp of the learned scale, 100 "
        "for OpenAI weights).",
    datasets=(
        D("image_embed", "image", "float16", ("D",), doc="pooled, projected image embedding"),
        D("patch_tokens", "image", "float16", ("P", "Dp"), required=False,
          doc="visual tokens after ln_post (only for open_clip models that expose tokens)"),
    ),
))

CLIP_CROPS = register_group(GroupSpec(
    name="crops/{detector}/clip/{clip_model}", option="--detector {detector} --encoder clip --clip-model {clip_model}",
    slot_docs={**DETECTOR_SLOT, **CLIP_SLOT}, provenance=("encoder",),
    dims={"D": "projected embedding width (512 for ViT-B-32)"},
    doc="A CLIP model's embedding of one detector's object crops: rows follow objects/{detector}/offsets.",
    datasets=(D("crop_embed", "object", "float16", ("D",), doc="embedding of each object crop (224x224)"),),
))

RESNET_SLOT = {"resnet_model": "resnet152, or resnet152-test (tiny random variant standing for resnet152)"}

RESNET = register_group(GroupSpec(
    name="encoders/resnet/{resnet_model}", option="--encoder {resnet_model}", slot_docs=RESNET_SLOT,
    provenance=("encoder",),
    dims={"G": "grid side (7 at 224)", "C": "channels (2048)"},
    doc="torchvision ResNet-152 (the -test variant has fewer layers and channels).",
    datasets=(D("grid", "image", "float16", ("G", "G", "C"), doc="last feature map of the whole image"),),
))

RESNET_CROPS = register_group(GroupSpec(
    name="crops/{detector}/resnet/{resnet_model}", option="--detector {detector} --encoder {resnet_model}",
    slot_docs={**DETECTOR_SLOT, **RESNET_SLOT}, provenance=("encoder",), dims={"C": "channels (2048)"},
    doc="ResNet features of one detector's object crops: rows follow objects/{detector}/offsets.",
    datasets=(D("crop_pooled", "object", "float16", ("C",), doc="average-pooled feature of each object crop"),),
))

SWIN = register_group(GroupSpec(
    name="encoders/swin/{swin_model}", option="--encoder swin --swin-model {swin_model}",
    slot_docs={"swin_model": "last segment of --swin-model (swin-large-patch4-window12-384), or swin-test "
                             "(tiny random variant)"},
    provenance=("encoder",),
    dims={"G": "grid side (12 at 384)", "C": "channels (1536 for Swin-L)"},
    doc="Hugging Face Swin (microsoft/swin-large-patch4-window12-384 by default).",
    datasets=(D("grid", "image", "float16", ("G", "G", "C"), doc="last hidden state as a grid"),),
))

PROMPT_SLOTS = {**CLIP_SLOT, "prompt_set": "a bundled set (" + ", ".join(PROMPT_SETS) + ") or the stem of a "
                "--prompts FILE.json"}

PROMPTS = register_group(GroupSpec(
    name="prompts/{clip_model}/{prompt_set}", option="--prompts {prompt_set} --clip-model {clip_model}",
    slot_docs=PROMPT_SLOTS, provenance=("prompt_set",), attrs=("category_names", "logit_scale"),
    dims={"Q": "prompts in the set", "D": "CLIP width", "C": "entity categories (4)"},
    doc="A prompt set embedded with one CLIP instance's text tower (needs encoders/clip/{clip_model}). attrs "
        "category_names, logit_scale.",
    datasets=(
        D("prompt_text", "global", "uint8", ("Q",), encoding="utf-8", collate=None, doc="the prompts"),
        D("prompt_category", "global", "int16", ("Q",), collate=None, doc="category of each prompt"),
        D("prompt_embed", "global", "float32", ("Q", "D"), collate=None, doc="CLIP text embeddings"),
        D("centroids", "global", "float32", ("C", "D"), collate=None,
          doc="mean prompt embedding per category (VCRMNER eq. 2)"),
        D("image_relevance", "image", "float16", ("Q",), doc="p(prompt given the image) (PromptMNER eq. 1)"),
    ),
))

PROMPT_CROPS = register_group(GroupSpec(
    name="crops/{detector}/prompts/{clip_model}/{prompt_set}",
    option="--detector {detector} --prompts {prompt_set} --clip-model {clip_model}",
    slot_docs={**DETECTOR_SLOT, **PROMPT_SLOTS}, provenance=("prompt_set",),
    dims={"C": "entity categories (4)"},
    doc="A prompt set's weights of one detector's crops (from crops/{detector}/clip/{clip_model} and the "
        "centroids of prompts/{clip_model}/{prompt_set}).",
    datasets=(D("crop_weights", "object", "float16", ("C",),
                doc="softmax(logit_scale * cos(crop, centroid)) (VCRMNER eq. 4-5)"),),
))

GROUNDING_MAX = 3  # grounding crops per image at most (the index below declares it; the writer checks it)

GROUNDING = register_group(GroupSpec(
    name="grounding", option="--grounding owlv2", provenance=("grounding",),
    doc="Up to three visual-grounding crops per image (MGIPS-CL, after HVPNeT), squashed to 128x128 and stored "
        "as uint8 pixels: --grounding owlv2 (OWLv2 queried with the posts' capitalised spans + entity types), "
        "detector (the objects group's top 3) or files (HVPNeT *_dict.pth / JSON mappings). An image that is not "
        "ok gets no crops from a model (reason 0). See docs/grounding-captions.md.",
    datasets=(
        D("offsets", "index", "int64", indexes="grounding", max_per_image=GROUNDING_MAX, collate=None,
          doc="crops of image i: grounding rows offsets[i]:offsets[i+1] (0..3)"),
        D("pixels", "grounding", "uint8", (3, 128, 128), collate="pixels", pixels=128,
          doc="RGB crop, channel first, squashed to 128x128, not normalised"),
        D("boxes", "grounding", "float32", (4,), collate=None, doc="xyxy in original pixels (zeros for user crops)"),
        D("scores", "grounding", "float32", collate=None,
          doc="query or objectness probability, detector score, 1 for user crops"),
        D("source", "grounding", "uint8", collate=None, doc="0 query, 1 objectness fill, 2 detector, 3 file"),
        D("query", "grounding", "uint8", encoding="utf-8", collate=None,
          doc='the text query that found the crop ("" otherwise)'),
        D("reason", "image", "uint8", collate=None, doc="0 no_image, 1 full, 2 few_found, 3 not_in_mapping"),
    ),
))

CLIP_GROUNDING = register_group(GroupSpec(
    name="encoders/clip_grounding", option="--grounding-clip", provenance=("encoder",),
    attrs=("layers", "image_size", "patch_size"),
    dims={"L": "hidden states kept (2: layers 6 and 12)", "T": "tokens (17: class + 4x4 patches of 32)",
          "D": "tower width (768 for ViT-B/32)"},
    doc="Frozen CLIP ViT hidden states of every grounding crop run alone at 128x128 (mgipscl's frozen mode); "
        "rows follow grounding/offsets. attrs layers (0 = embeddings after pre_layrnorm, i = layer i), "
        "image_size, patch_size.",
    datasets=(D("states", "grounding", "float16", ("L", "T", "D"), doc="hidden states of the crop"),),
))

CAPTIONS = register_group(GroupSpec(
    name="captions", option="--captions blip", provenance=("captions",),
    doc="One caption per image for ESPVR: --captions blip or a user JSONL/TSV file (its sha256 is the "
        "pretrained tag). \"\" = no caption (masked). See docs/grounding-captions.md.",
    datasets=(
        D("text", "text", "uint8", encoding="utf-8", collate="text", doc='the caption ("" = none)'),
        D("reason", "image", "uint8", collate=None, doc="0 no_image, 1 ok, 2 empty, 3 not_in_file"),
    ),
))
