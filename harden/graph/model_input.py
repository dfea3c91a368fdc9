"""What a model expects as input: its declared preprocessing, and images made ready for it.

Models exported by `harden export` declare their preprocessing in the
`harden.preprocess` metadata entry. Zoo models declare nothing, so the user
says it (`--preprocess`), or the usual convention applies: ImageNet
normalisation for a 3×224×224 input, identity otherwise. convert, rewrite,
inject and certify all resolve and apply it here, so a zoo model and the
hardened copy that convert writes (which records the resolved preprocessing)
see the same tensor from the same data.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx

from harden.data import Dataset, Preprocess, load_dataset
from harden.data.preprocess import IMAGENET
from harden.errors import HardenError
from harden.graph.locate import scores_name
from harden.graph.onnx_io import get_metadata

PREPROCESS_KEY = "harden.preprocess"
PREPROCESS_HELP = ("the model's input preprocessing when it declares none: 'imagenet', 'identity', a JSON "
                   "object, or channels=C,size=S,mean=m1/m2/m3,std=s1/s2/s3")


# The image input types harden feeds: float32, and float16 for graphs converted to half precision
# (onnxconverter-common's float16 converter without keep_io_types).
INPUT_TYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.FLOAT16: np.dtype(np.float16)}


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The model's single input, which must be a float32 or float16 image batch (initializers listed as
    inputs aside).

    An integer or quantised input would fail inside ONNX Runtime instead, so it
    is refused here with the way round.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise HardenError(f"expected a model with one image input, found {len(inputs)}: {[i.name for i in inputs]}")
    kind = inputs[0].type.tensor_type.elem_type
    if kind not in INPUT_TYPES:
        name = onnx.TensorProto.DataType.Name(kind).lower() if kind else "not a tensor"
        raise HardenError(f"the model input {inputs[0].name!r} is {name}; harden runs float32 and float16 models "
                          "(inject the float32 model with --format bf16, fp8-e4m3, fp8-e5m2 or int8 to emulate that "
                          "storage)")
    return inputs[0]


def input_dtype(model: onnx.ModelProto) -> np.dtype:
    """The element type of the model's image input: what every stage must feed it."""
    return INPUT_TYPES[image_input(model).type.tensor_type.elem_type]


def select_scores(model: onnx.ModelProto, output: str | None = None) -> onnx.ModelProto:
    """The model with its class scores as its one output (`scores_name`): itself when it has only that one,
    else a copy without the others."""
    names = [o.name for o in model.graph.output]
    output = scores_name(names, output)
    if names == [output]:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = next(o for o in copy.graph.output if o.name == output)
    del copy.graph.output[:]
    copy.graph.output.append(keep)
    return copy


def input_dims(model: onnx.ModelProto) -> tuple[int | None, ...]:
    """Per-image dimensions (all but the batch) of the model's single input; None where symbolic."""
    dims = list(image_input(model).type.tensor_type.shape.dim)[1:]
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def channels_last(model: onnx.ModelProto) -> bool:
    """Whether the image input is N×H×W×C, as models converted from TensorFlow take it (tf2onnx, the model
    zoo's EfficientNet-Lite4): the last dimension is 1 or 3 and the first is not. Anything else is N×C×H×W."""
    dims = input_dims(model)
    return len(dims) == 3 and dims[2] in (1, 3) and dims[0] not in (1, 3)


def input_chw(model: onnx.ModelProto) -> tuple[int | None, int | None, int | None]:
    """(C, H, W) of the model's single image input, whatever its layout; None where a dimension is symbolic."""
    dims = input_dims(model)
    if len(dims) != 3:
        raise HardenError(f"the model input has rank {len(dims) + 1}; expected an N×C×H×W or N×H×W×C image batch")
    if channels_last(model):
        return dims[2], dims[0], dims[1]
    return dims[0], dims[1], dims[2]


def parse_preprocess(text: str) -> Preprocess:
    """`--preprocess` text → Preprocess (see PREPROCESS_HELP)."""
    text = text.strip()
    if text == "imagenet":
        return IMAGENET
    if text == "identity":  # the images as they are, in as many channels as the model takes
        return Preprocess(channels=0)
    if text.startswith("{"):
        return Preprocess.from_json(text)
    fields: dict[str, object] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("channels", "size", "mean", "std"):
            raise HardenError(f"--preprocess: cannot read {part!r}; {PREPROCESS_HELP}")
        fields[key.strip()] = value.strip()
    try:
        channels = int(fields.get("channels", 1))  # type: ignore[arg-type]
        size = int(fields["size"]) if "size" in fields else None  # type: ignore[arg-type]
        mean = tuple(float(v) for v in str(fields.get("mean", "0")).split("/"))
        std = tuple(float(v) for v in str(fields.get("std", "1")).split("/"))
    except ValueError as err:
        raise HardenError(f"--preprocess: {err}; {PREPROCESS_HELP}") from err
    return Preprocess(channels=channels, size=size, mean=mean, std=std)


def model_preprocess(model: onnx.ModelProto, override: Preprocess | None = None) -> Preprocess:
    """The model's preprocessing: the override, its `harden.preprocess` metadata, or the zoo default."""
    if override is not None:
        if override.channels == 0:  # 'identity': the model's channel count, once the model is known
            channels = input_chw(model)[0]
            return replace(override, channels=channels if channels in (1, 3) else 1)
        return override
    declared = get_metadata(model).get(PREPROCESS_KEY)
    if declared:
        return Preprocess.from_json(declared)
    channels, height, width = input_chw(model)
    if (channels, height, width) == (3, 224, 224):
        return IMAGENET
    if channels not in (1, 3):
        raise HardenError(f"the model's input has {channels} channels; say its preprocessing with --preprocess")
    size = height if height is not None and height == width else None
    return Preprocess(channels=channels, size=size)


def model_inputs(model: onnx.ModelProto, data: Dataset, preprocess: Preprocess | None = None) -> np.ndarray:
    """The dataset's images as the model's input tensor, refusing a shape the model would reject.

    `preprocess` overrides what `model_preprocess(model)` finds. Every stage that feeds a
    model (convert, rewrite, inject, certify) goes through here, so one model gets
    the same tensor from the same data everywhere. An N×H×W×C model gets its images in
    that layout, a float16 model gets them rounded to float16.
    """
    x = model_preprocess(model, preprocess).apply(data.images)
    want = input_chw(model)
    got = tuple(int(g) for g in x.shape[1:])
    if any(w is not None and w != g for w, g in zip(want, got)):
        shape = ", ".join("?" if w is None else str(w) for w in want)
        raise HardenError(f"{data.spec}: images are {got} (C, H, W) after preprocessing but the model takes "
                          f"({shape}); set --preprocess")
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last(model) else x
    dtype = input_dtype(model)
    return x if x.dtype == dtype else x.astype(dtype)


def load_inputs(model: onnx.ModelProto, spec: str, limit: int | None = None, seed: int = 0,
                preprocess: Preprocess | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(model-ready inputs, labels) of a dataset spec: what a campaign on `spec` with this limit and seed sees."""
    data = load_dataset(spec, limit=limit, seed=seed)
    return model_inputs(model, data, preprocess), data.labels


def model_classes(model: onnx.ModelProto) -> list[str] | None:
    """Class names a model declares in `harden.classes` (JSON list), if any."""
    text = get_metadata(model).get("harden.classes")
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None
