"""Calibration and evaluation data: one reader for `--calib`, `--eval` and `--data`.

A data spec is one of

* a `.npz` file with one array per model input, keyed by input name, and optionally integer class ids
  under `labels`;
* a `.npy` file (single-input models only);
* a folder of such files (read in name order; a batch may span files);
* a folder of images (needs Pillow, the `images` extra), preprocessed per `ImageOptions`; images in
  sub-folders get the sub-folder's index in name order as their label (the ImageFolder convention);
* `random` or `random:N`: seeded random inputs for smoke tests (N samples, default 8 batches). Anything
  measured on them is meaningless, and a warning says so.

Batch semantics: each array has the input's rank and its first axis is the batch (sample) axis; an array
one rank short is a single sample and gets a batch axis added. Samples are fed in batches of the model's
fixed batch size or, where the batch dim is symbolic, of `batch` (default 1). With a fixed batch size the
last batch is padded with copies of its last sample; `Batch.size` says how many rows are real, and
consumers ignore the outputs past it. With a symbolic batch the last batch is simply smaller.

Arrays are never unpickled (`allow_pickle=False` semantics: object arrays are refused) and are streamed:
only the `.npy` headers are read up front, to check every name, dtype and shape against the model before
any work starts; then rows are read a batch at a time, so memory holds about two batches.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import onnx

from onnxslim.errors import DataError, UsageError
from onnxslim.io import graph_inputs, random_inputs, resolve_input_shapes

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "LABELS_KEY",
    "first_samples",
    "IMAGE_EXTENSIONS",
    "ImageOptions",
    "DataOptions",
    "InputSpec",
    "Batch",
    "Dataset",
    "model_input_specs",
    "open_dataset",
]

logger = logging.getLogger(__name__)

LABELS_KEY = "labels"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
RANDOM_BATCHES = 8  # `random` without a count: this many batches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RANDOM_WARNING = (
    "data is random: inputs are seeded noise, so any accuracy, fidelity or calibration measured on them is "
    "meaningless. Use it only for smoke tests."
)


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ImageOptions:
    """How images become input arrays. The image size is the model input's (static dims or --input-shapes).

    resize: "crop" resizes (bilinear) so the image covers size / crop_fraction (224 -> shorter side 256),
        then center-crops to the size; "stretch" resizes straight to the size, ignoring aspect ratio; "pad"
        (text lines of different widths for a recognizer such as PP-OCR's [N, 3, 48, W]) resizes to the
        input's height keeping the aspect ratio (no wider than the input: then squeezed to its width), puts
        the image at the left and fills the rest of the width with 0 after normalization, as PaddleOCR's own
        preprocessing does.
    color: "rgb" or "bgr" channel order for 3-channel inputs; 1-channel inputs get grayscale.
    scale, mean, std: value = (pixel * scale - mean) / std, per channel, mean/std in the channel order fed
        to the model. None means the default: for float inputs scale 1/255 and, with 3 channels, the
        ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) (reversed for bgr), with 1
        channel mean 0 and std 1; for integer inputs the raw pixel values (scale 1, mean 0, std 1).
    layout: "NCHW", "NHWC", or "auto": the layout whose channel axis (1 or 3 channels) fits the input.
    The element type is always the model input's (integer types are rounded and clipped).
    """

    resize: str = "crop"
    crop_fraction: float = 0.875
    color: str = "rgb"
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "auto"

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "stretch", "pad"):
            raise UsageError(f"image resize must be 'crop', 'stretch' or 'pad', not {self.resize!r}")
        if not 0 < self.crop_fraction <= 1:
            raise UsageError(f"crop fraction must be in (0, 1], not {self.crop_fraction}")
        if self.color not in ("rgb", "bgr"):
            raise UsageError(f"image color order must be 'rgb' or 'bgr', not {self.color!r}")
        if self.layout not in ("auto", "NCHW", "NHWC"):
            raise UsageError(f"image layout must be 'auto', 'NCHW' or 'NHWC', not {self.layout!r}")
        if self.std is not None and any(s == 0 for s in self.std):
            raise UsageError("image std must not contain 0")


@dataclass(frozen=True)
class DataOptions:
    """Everything besides the spec that decides how data is fed: shapes, batch size, image preprocessing.

    input_shapes: `--input-shapes` overrides (name or None -> dims); only the non-batch dims matter here
        (image size, random data shapes), except that a batch dim given for a symbolic-batch input is the
        default batch size.
    batch: batch size for inputs whose batch dim is symbolic (default 1); must equal a fixed batch dim.
    seed: seed for random data.
    """

    input_shapes: Mapping[str | None, Sequence[int]] = field(default_factory=dict)
    batch: int | None = None
    image: ImageOptions = field(default_factory=ImageOptions)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise UsageError(f"batch size must be at least 1, not {self.batch}")


# ------------------------------------------------------------------------------------------ model inputs


@dataclass(frozen=True)
class InputSpec:
    """A model input as the reader sees it: name, dtype and declared dims (str where symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str, ...] | None  # None: rank unknown

    @property
    def fixed_batch(self) -> int | None:
        """The batch dim if it is static, else None."""
        if self.dims and isinstance(self.dims[0], int):
            return self.dims[0]
        return None

    def describe(self) -> str:
        """'float32 [batch, 1, 28, 28]'."""
        dims = "[?]" if self.dims is None else "[" + ", ".join(str(d) for d in self.dims) + "]"
        return f"{self.dtype} {dims}"


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's inputs (initializers excluded) with their dtypes and declared dims."""
    specs = []
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims: tuple[int | str, ...] | None = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in tensor_type.shape.dim
            )
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


# -------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Batch:
    """One batch: feeds for every model input and, when the data has them, integer labels.

    `size` is the number of real samples; rows past it are padding (fixed-batch models only) whose
    outputs must be ignored. `labels` has `size` entries.
    """

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    size: int


_Chunk = tuple[dict[str, np.ndarray], "np.ndarray | None"]


class Dataset:
    """Data opened against a model and checked: re-iterable with `batches()`, which streams."""

    def __init__(
        self,
        *,
        description: str,
        source: _Source,
        num_samples: int,
        batch_size: int,
        fixed_batch: bool,
        input_shapes: dict[str, tuple[int, ...]],
        has_labels: bool,
        is_random: bool = False,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.description = description
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.fixed_batch = fixed_batch
        self.input_shapes = input_shapes  # the feed shapes of a full batch
        self.has_labels = has_labels
        self.is_random = is_random
        self.class_names = class_names
        self._source = source

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.description!r}, samples={self.num_samples}, batch={self.batch_size}, "
            f"labels={self.has_labels}, random={self.is_random})"
        )

    def batches(self) -> Iterator[Batch]:
        """Yield batches of `batch_size` samples (see the module docstring for the last one)."""
        names = list(self.input_shapes)
        pending: dict[str, list[np.ndarray]] = {name: [] for name in names}
        pending_labels: list[np.ndarray] = []
        buffered = 0
        for feeds, labels in self._source.chunks(self.batch_size):
            for name in names:
                pending[name].append(feeds[name])
            if labels is not None:
                pending_labels.append(labels)
            buffered += len(labels) if labels is not None else len(feeds[names[0]])
            while buffered >= self.batch_size:
                joined = {name: _join(parts) for name, parts in pending.items()}
                joined_labels = _join(pending_labels) if self.has_labels else None
                yield Batch(
                    {name: array[: self.batch_size] for name, array in joined.items()},
                    None if joined_labels is None else joined_labels[: self.batch_size],
                    self.batch_size,
                )
                pending = {name: [array[self.batch_size :]] for name, array in joined.items()}
                pending_labels = [joined_labels[self.batch_size :]] if joined_labels is not None else []
                buffered -= self.batch_size
        if buffered:
            feeds = {name: _join(parts) for name, parts in pending.items()}
            if self.fixed_batch:
                logger.info(
                    "the last batch has %d of %d samples; padded with copies of its last sample, whose "
                    "outputs are ignored", buffered, self.batch_size,
                )
                feeds = {name: _pad_rows(array, self.batch_size) for name, array in feeds.items()}
            yield Batch(feeds, _join(pending_labels) if self.has_labels else None, buffered)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)] or parts[:1]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    missing = rows - len(array)
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)], axis=0)


class _Source:
    """Where samples come from: yields chunks of at most `limit` samples (feeds, labels or None)."""

    def chunks(self, limit: int) -> Iterator[_Chunk]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------- entry point


def open_dataset(
    spec: str | os.PathLike[str], model: onnx.ModelProto, options: DataOptions | None = None
) -> Dataset:
    """Open `spec` (a file, a folder, `random` or `random:N`) as data for `model`, checking it up front.

    Raises DataError when the data cannot be read or does not match the model's inputs (naming the
    input, what was expected and what was found), UsageError when an option does not fit the model.
    """
    options = options or DataOptions()
    specs = model_input_specs(model)
    if not specs:
        raise DataError("the model has no inputs, so it takes no data")
    for input_spec in specs:
        if input_spec.dims is not None and len(input_spec.dims) == 0:
            raise DataError(
                f"input {input_spec.name!r} is a scalar; the data reader needs a batch axis first on every input. "
                "Inputs that are not batched samples (a sample rate, a recurrent state with the batch on axis 1, as "
                "in silero-vad) cannot be fed yet: export the model with them fixed as constants (README, 'Data')"
            )
    batch_size, fixed = _resolve_batch(specs, options)
    text = os.fspath(spec)
    match = re.fullmatch(r"random(?::(\d+))?", text)
    if match and not Path(text).exists():
        count = int(match.group(1)) if match.group(1) else RANDOM_BATCHES * batch_size
        return _open_random(model, specs, options, batch_size, fixed, count, text)
    path = Path(text)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (data is a .npz/.npy file, a folder, or 'random')")
    if path.is_dir():
        return _open_folder(path, specs, model, options, batch_size, fixed)
    if path.suffix.lower() in (".npz", ".npy"):
        return _open_array_files([path], specs, batch_size, fixed, str(path))
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        raise DataError(f"{path}: a single image; put images in a folder and pass the folder")
    raise DataError(f"{path}: unsupported data file; expected .npz, .npy, a folder of them or of images, or 'random'")


def _resolve_batch(specs: Sequence[InputSpec], options: DataOptions) -> tuple[int, bool]:
    fixed = {s.fixed_batch for s in specs if s.fixed_batch is not None}
    if len(fixed) > 1:
        raise DataError(
            "the model's inputs have different fixed batch sizes ("
            + ", ".join(f"{s.name}: {s.fixed_batch}" for s in specs if s.fixed_batch is not None)
            + "); onnxslim feeds all inputs the same samples"
        )
    if fixed:
        size = fixed.pop()
        if options.batch is not None and options.batch != size:
            raise UsageError(f"the model has a fixed batch size of {size}; --batch {options.batch} cannot change it")
        return size, True
    if options.batch is not None:
        return options.batch, False
    overrides = dict(options.input_shapes)
    given = set()
    for s in specs:
        dims = overrides.get(s.name, overrides.get(None) if len(specs) == 1 else None)
        if dims:
            given.add(int(dims[0]))
    if len(given) == 1:
        return given.pop(), False
    return 1, False


def _batch_shapes(
    model: onnx.ModelProto, options: DataOptions, batch_size: int
) -> dict[str, tuple[int, ...]]:
    shapes = resolve_input_shapes(model, options.input_shapes)
    return {name: (batch_size, *shape[1:]) for name, shape in shapes.items()}


# ---------------------------------------------------------------------------------------------- random


class _RandomSource(_Source):
    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> None:
        self._model, self._shapes, self._count, self._seed = model, shapes, count, seed

    def chunks(self, limit: int) -> Iterator[_Chunk]:
        produced, index = 0, 0
        while produced < self._count:
            rows = min(limit, self._count - produced)
            shapes = {name: (rows, *shape[1:]) for name, shape in self._shapes.items()}
            yield random_inputs(self._model, shapes, seed=self._seed + index), None
            produced, index = produced + rows, index + 1


def _open_random(
    model: onnx.ModelProto,
    specs: Sequence[InputSpec],
    options: DataOptions,
    batch_size: int,
    fixed: bool,
    count: int,
    text: str,
) -> Dataset:
    if count < 1:
        raise UsageError(f"{text}: the number of random samples must be at least 1")
    logger.warning(RANDOM_WARNING)
    shapes = _batch_shapes(model, options, batch_size)
    return Dataset(
        description=f"random ({count} samples, seed {options.seed})",
        source=_RandomSource(model, shapes, count, options.seed),
        num_samples=count,
        batch_size=batch_size,
        fixed_batch=fixed,
        input_shapes=shapes,
        has_labels=False,
        is_random=True,
    )


# ------------------------------------------------------------------------------------------ array files


@dataclass(frozen=True)
class _Member:
    """One array stored in a .npy file or as a member of a .npz file: its header, read without the data."""

    path: Path
    key: str | None  # the npz key; None for a .npy file
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def where(self) -> str:
        return f"{self.path}" if self.key is None else f"{self.path}: array {self.key!r}"

    def open(self, archive: zipfile.ZipFile | None) -> IO[bytes]:
        """A binary stream positioned at the first data byte."""
        stream: IO[bytes] = archive.open(f"{self.key}.npy") if archive is not None else open(self.path, "rb")
        _read_header(stream, self.where)
        return stream


def _read_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise DataError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported")
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not a valid .npy array ({e})") from e
    if dtype.hasobject:
        raise DataError(
            f"{where}: holds Python objects (a pickled object array); onnxslim reads data with "
            "allow_pickle=False and refuses it. Save plain numeric arrays."
        )
    return tuple(int(d) for d in shape), bool(fortran_order), dtype


def _read_members(path: Path) -> list[_Member]:
    if path.suffix.lower() == ".npy":
        try:
            with open(path, "rb") as stream:
                shape, fortran_order, dtype = _read_header(stream, str(path))
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from e
        return [_Member(path, None, shape, dtype, fortran_order)]
    try:
        with zipfile.ZipFile(path) as archive:
            members = []
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    logger.debug("%s: ignoring member %r (not a .npy array)", path, name)
                    continue
                key = name[: -len(".npy")]
                with archive.open(name) as stream:
                    shape, fortran_order, dtype = _read_header(stream, f"{path}: array {key!r}")
                members.append(_Member(path, key, shape, dtype, fortran_order))
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a valid .npz file ({e})") from e
    return members


def _read_exact(stream: IO[bytes], nbytes: int, where: str) -> bytearray:
    buffer = bytearray(nbytes)
    view, done = memoryview(buffer), 0
    while done < nbytes:
        got = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise DataError(f"{where}: the file is truncated ({done} of {nbytes} bytes of data left)")
        done += got
    return buffer


class _RowReader:
    """Reads consecutive rows (samples) of one stored array."""

    def __init__(self, member: _Member, stream: IO[bytes], samples: int, sample_shape: tuple[int, ...]) -> None:
        self._member, self._stream, self._sample_shape = member, stream, sample_shape
        self._dtype = member.dtype
        self._whole: np.ndarray | None = None
        self._next = 0
        if member.fortran_order and int(np.prod(sample_shape)) > 1:
            # Fortran order stores columns first: rows cannot be streamed, so read the array once.
            logger.debug("%s: stored in Fortran order; reading it whole", member.where)
            count = int(np.prod(member.shape))
            data = _read_exact(stream, count * self._dtype.itemsize, member.where)
            array = np.frombuffer(data, self._dtype).reshape(member.shape, order="F")
            self._whole = np.ascontiguousarray(array).reshape((samples, *sample_shape))

    def read(self, rows: int) -> np.ndarray:
        if self._whole is not None:
            out = self._whole[self._next : self._next + rows]
        else:
            itemsize = int(np.prod(self._sample_shape, dtype=np.int64)) * self._dtype.itemsize
            data = _read_exact(self._stream, rows * itemsize, self._member.where)
            out = np.frombuffer(data, self._dtype).reshape((rows, *self._sample_shape))
        self._next += rows
        return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))


@dataclass(frozen=True)
class _ArrayFile:
    """One checked data file: which member feeds which input, how many samples, and the labels member."""

    path: Path
    inputs: dict[str, _Member]
    labels: _Member | None
    samples: int
    single_sample: bool  # arrays one rank short: the file is one sample


class _ArrayFilesSource(_Source):
    def __init__(self, files: Sequence[_ArrayFile], specs: Sequence[InputSpec]) -> None:
        self._files = files
        self._specs = specs

    def chunks(self, limit: int) -> Iterator[_Chunk]:
        for data_file in self._files:
            yield from self._file_chunks(data_file, limit)

    def _file_chunks(self, data_file: _ArrayFile, limit: int) -> Iterator[_Chunk]:
        is_npz = data_file.path.suffix.lower() == ".npz"
        try:
            archive = zipfile.ZipFile(data_file.path) if is_npz else None
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{data_file.path}: not a valid .npz file ({e})") from e
        streams: list[IO[bytes]] = []
        try:
            readers = {}
            for name, member in data_file.inputs.items():
                stream = member.open(archive)
                streams.append(stream)
                sample_shape = member.shape if data_file.single_sample else member.shape[1:]
                readers[name] = _RowReader(member, stream, data_file.samples, sample_shape)
            labels = None
            if data_file.labels is not None:
                stream = data_file.labels.open(archive)
                streams.append(stream)
                labels = _RowReader(data_file.labels, stream, data_file.samples, ()).read(data_file.samples)
                labels = labels.astype(np.int64)
            done = 0
            while done < data_file.samples:
                rows = min(limit, data_file.samples - done)
                feeds = {name: reader.read(rows) for name, reader in readers.items()}
                yield feeds, None if labels is None else labels[done : done + rows]
                done += rows
        finally:
            for stream in streams:
                stream.close()
            if archive is not None:
                archive.close()


def _check_array_file(path: Path, specs: Sequence[InputSpec]) -> _ArrayFile:
    """Match a file's arrays to the model's inputs by name, rank, shape and dtype; count its samples."""
    members = _read_members(path)
    names = [s.name for s in specs]
    if path.suffix.lower() == ".npy":
        if len(specs) != 1:
            raise DataError(
                f"{path}: a .npy file holds one array, but the model has {len(specs)} inputs {names}; "
                f"use a .npz file with one array per input name"
            )
        by_input = {specs[0].name: members[0]}
        labels = None
    else:
        found = {m.key: m for m in members}
        missing = [s for s in specs if s.name not in found]
        if missing:
            spec = missing[0]
            raise DataError(
                f"{path}: no array for input {spec.name!r} ({spec.describe()}); the file has arrays "
                f"{sorted(str(key) for key in found)}. Key arrays by the model's input names {names}, labels by {LABELS_KEY!r}."
            )
        extra = [key for key in found if key not in names and key != LABELS_KEY]
        if extra:
            raise DataError(
                f"{path}: array {extra[0]!r} is not an input of the model (inputs: {names}) nor {LABELS_KEY!r}"
            )
        by_input = {s.name: found[s.name] for s in specs}
        labels = found.get(LABELS_KEY)
    counts = {}
    single = {}
    for spec in specs:
        member = by_input[spec.name]
        counts[spec.name], single[spec.name] = _check_member(member, spec)
    if len(set(single.values())) > 1:
        raise DataError(
            f"{path}: some arrays are single samples (one rank short) and some are batches: "
            + ", ".join(f"{n} {by_input[n].shape}" for n in names)
        )
    if len(set(counts.values())) > 1:
        raise DataError(
            f"{path}: arrays hold different numbers of samples (first axis): "
            + ", ".join(f"{n}: {c}" for n, c in counts.items())
        )
    samples = next(iter(counts.values()))
    if labels is not None:
        _check_labels(labels, samples, single_sample=next(iter(single.values())))
    return _ArrayFile(path, by_input, labels, samples, next(iter(single.values())))


def _check_member(member: _Member, spec: InputSpec) -> tuple[int, bool]:
    """(number of samples, whether the array is one sample) for an array feeding `spec`."""
    if member.dtype.newbyteorder("=") != spec.dtype.newbyteorder("="):
        raise DataError(
            f"{member.where} is {member.dtype}, but input {spec.name!r} expects {spec.dtype} "
            f"({spec.describe()}); convert it, e.g. array.astype(np.{spec.dtype})"
        )
    shape = member.shape
    if spec.dims is None:
        if not shape:
            raise DataError(f"{member.where} is a scalar; arrays need the batch axis first")
        return shape[0], False
    rank = len(spec.dims)
    if len(shape) == rank:
        sample_shape, samples, single = shape[1:], shape[0], False
    elif len(shape) == rank - 1:
        sample_shape, samples, single = shape, 1, True
    else:
        raise DataError(
            f"{member.where} has shape {list(shape)} (rank {len(shape)}), but input {spec.name!r} is "
            f"{spec.describe()}: give arrays of rank {rank} (samples first) or {rank - 1} (one sample)"
        )
    for axis, (want, got) in enumerate(zip(spec.dims[1:], sample_shape, strict=True), start=1):
        if isinstance(want, int) and want != got:
            raise DataError(
                f"{member.where} has shape {list(shape)}, but input {spec.name!r} is {spec.describe()}: "
                f"axis {axis} must be {want}, not {got}"
                + (" (the array is one rank short, so it is read as a single sample)" if single else "")
            )
    return samples, single


def _check_labels(labels: _Member, samples: int, *, single_sample: bool) -> None:
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels.where}: labels must be integer class ids, not {labels.dtype}")
    expected = () if single_sample else (samples,)
    if labels.shape != expected and not (single_sample and labels.shape == (1,)):
        raise DataError(
            f"{labels.where} has shape {list(labels.shape)}; expected {list(expected)}: one integer class id "
            "per sample"
        )


def _open_array_files(
    paths: Sequence[Path], specs: Sequence[InputSpec], batch_size: int, fixed: bool, description: str
) -> Dataset:
    files = [_check_array_file(path, specs) for path in paths]
    with_labels = [f.labels is not None for f in files]
    if any(with_labels) and not all(with_labels):
        unlabeled = next(f.path for f in files if f.labels is None)
        raise DataError(f"{description}: some files have {LABELS_KEY!r} and some do not (e.g. {unlabeled})")
    sample_shapes: dict[str, tuple[int, ...]] = {}
    for data_file in files:
        for name, member in data_file.inputs.items():
            shape = member.shape if data_file.single_sample else member.shape[1:]
            if sample_shapes.setdefault(name, shape) != shape:
                raise DataError(
                    f"{data_file.path}: array for input {name!r} has samples of shape {list(shape)}, but earlier "
                    f"files have {list(sample_shapes[name])}; samples must have one shape to be batched (text lines of "
                    "different widths: pad them to one width, or give the images with --resize pad)"
                )
    num_samples = sum(f.samples for f in files)
    if num_samples == 0:
        raise DataError(f"{description}: holds no samples (the arrays' first axis is 0)")
    return Dataset(
        description=description,
        source=_ArrayFilesSource(files, specs),
        num_samples=num_samples,
        batch_size=batch_size,
        fixed_batch=fixed,
        input_shapes={s.name: (batch_size, *sample_shapes[s.name]) for s in specs},
        has_labels=all(with_labels),
    )


# ----------------------------------------------------------------------------------------------- folders


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _open_folder(
    folder: Path,
    specs: Sequence[InputSpec],
    model: onnx.ModelProto,
    options: DataOptions,
    batch_size: int,
    fixed: bool,
) -> Dataset:
    entries = sorted(p for p in folder.iterdir() if _visible(p))
    arrays = [p for p in entries if p.is_file() and p.suffix.lower() in (".npz", ".npy")]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    class_dirs = [p for p in entries if p.is_dir()]
    class_images = {d: _images_under(d) for d in class_dirs}
    has_class_images = any(class_images.values())
    if arrays and (images or has_class_images):
        raise DataError(f"{folder}: holds both array files (.npz/.npy) and images; keep one kind per folder")
    if arrays:
        return _open_array_files(arrays, specs, batch_size, fixed, str(folder))
    if images and has_class_images:
        raise DataError(
            f"{folder}: holds images both directly (e.g. {images[0].name}) and in class sub-folders; with "
            "sub-folders (one per class, the ImageFolder convention) every image must be in one"
        )
    if not images and not has_class_images:
        raise DataError(
            f"{folder}: no data found: expected .npz/.npy files, or images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            "directly or in one sub-folder per class"
        )
    if has_class_images:
        class_names = tuple(d.name for d in class_dirs)
        samples = [(path, index) for index, d in enumerate(class_dirs) for path in class_images[d]]
        return _open_images(folder, samples, class_names, specs, model, options, batch_size, fixed)
    return _open_images(folder, [(p, None) for p in images], None, specs, model, options, batch_size, fixed)


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# -------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _ImagePlan:
    """Resolved image preprocessing for one model input."""

    height: int
    width: int
    channels: int
    nchw: bool
    bgr: bool
    scale: float
    mean: np.ndarray
    std: np.ndarray
    dtype: np.dtype
    resize: str
    crop_fraction: float


def _image_plan(spec: InputSpec, shape: tuple[int, ...], options: ImageOptions) -> _ImagePlan:
    if len(shape) != 4:
        raise DataError(
            f"image folders need a 4-d image input (NCHW or NHWC); input {spec.name!r} is {spec.describe()}"
        )
    layout = options.layout
    if layout == "auto":
        if shape[1] in (1, 3):
            layout = "NCHW"
        elif shape[3] in (1, 3):
            layout = "NHWC"
        else:
            raise DataError(
                f"input {spec.name!r} has shape {list(shape)}: neither axis 1 nor axis 3 is 1 or 3 channels, so "
                "it cannot take images; check --input-shapes or give --layout"
            )
    nchw = layout == "NCHW"
    channels, height, width = (shape[1], shape[2], shape[3]) if nchw else (shape[3], shape[1], shape[2])
    if channels not in (1, 3):
        raise DataError(
            f"input {spec.name!r} has {channels} channels in layout {layout} ({list(shape)}); images give 1 or 3"
        )
    integer = spec.dtype.kind in "iub"
    bgr = options.color == "bgr" and channels == 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if integer:
        scale, mean, std = 1.0, (0.0,), (1.0,)
    else:
        scale = 1 / 255
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,), (1.0,))
        if bgr:
            mean, std = mean[::-1], std[::-1]
    scale = options.scale if options.scale is not None else scale
    mean = options.mean if options.mean is not None else mean
    std = options.std if options.std is not None else std
    for label, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise UsageError(f"image {label} has {len(values)} values; the input has {channels} channels (give 1 or {channels})")
    return _ImagePlan(
        height, width, channels, nchw, bgr, float(scale),
        np.asarray(mean, np.float32), np.asarray(std, np.float32), spec.dtype, options.resize, options.crop_fraction,
    )


def _load_image(path: Path, plan: _ImagePlan) -> np.ndarray:
    """One preprocessed sample (no batch axis) in the input's layout and dtype."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = _resize(opened.convert("L" if plan.channels == 1 else "RGB"), plan)
            pixels = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if plan.bgr:
        pixels = pixels[..., ::-1]
    values = (pixels * plan.scale - plan.mean) / plan.std
    if values.shape[1] < plan.width:  # resize "pad": the rest of the width is 0 after normalization
        values = np.pad(values, ((0, 0), (0, plan.width - values.shape[1]), (0, 0)))
    if plan.nchw:
        values = values.transpose(2, 0, 1)
    if plan.dtype.kind in "iu":
        limits = np.iinfo(plan.dtype)
        values = np.clip(np.rint(values), limits.min, limits.max)
    return np.ascontiguousarray(values.astype(plan.dtype))


def _resize(image: PILImage, plan: _ImagePlan) -> PILImage:
    from PIL import Image

    if plan.resize == "stretch":
        return image.resize((plan.width, plan.height), Image.Resampling.BILINEAR)
    width, height = image.size
    if plan.resize == "pad":  # the input's height, the aspect ratio kept, never wider than the input
        new_width = max(1, min(plan.width, math.ceil(width * plan.height / height)))
        return image.resize((new_width, plan.height), Image.Resampling.BILINEAR)
    factor = max(plan.height / plan.crop_fraction / height, plan.width / plan.crop_fraction / width)
    new_width = max(plan.width, round(width * factor))
    new_height = max(plan.height, round(height * factor))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left = (new_width - plan.width) // 2
    top = (new_height - plan.height) // 2
    return image.crop((left, top, left + plan.width, top + plan.height))


class _ImageSource(_Source):
    def __init__(self, name: str, samples: Sequence[tuple[Path, int | None]], plan: _ImagePlan) -> None:
        self._name, self._samples, self._plan = name, samples, plan

    def chunks(self, limit: int) -> Iterator[_Chunk]:
        for start in range(0, len(self._samples), limit):
            part = self._samples[start : start + limit]
            feeds = {self._name: np.stack([_load_image(path, self._plan) for path, _ in part])}
            labels = None if part[0][1] is None else np.array([label for _, label in part], np.int64)
            yield feeds, labels


def _open_images(
    folder: Path,
    samples: Sequence[tuple[Path, int | None]],
    class_names: tuple[str, ...] | None,
    specs: Sequence[InputSpec],
    model: onnx.ModelProto,
    options: DataOptions,
    batch_size: int,
    fixed: bool,
) -> Dataset:
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise DataError(
            f"{folder}: reading image folders needs Pillow; install it with: pip install 'onnxslim[images]'"
        ) from e
    if len(specs) != 1:
        raise DataError(
            f"{folder}: image folders feed single-input models; this one has inputs {[s.name for s in specs]}. "
            "Use .npz files with one array per input name."
        )
    spec = specs[0]
    try:
        shape = resolve_input_shapes(model, options.input_shapes)[spec.name]
    except UsageError as e:
        raise UsageError(f"images need a fixed image size: {e}") from e
    plan = _image_plan(spec, shape, options.image)
    logger.info(
        "%s: %d images -> %s %s, %s, resize %s%s, scale %g, mean %s, std %s",
        folder, len(samples), "NCHW" if plan.nchw else "NHWC", plan.dtype, "BGR" if plan.bgr else
        ("RGB" if plan.channels == 3 else "grayscale"), plan.resize,
        f" (crop fraction {plan.crop_fraction})" if plan.resize == "crop" else "", plan.scale,
        plan.mean.tolist(), plan.std.tolist(),
    )
    return Dataset(
        description=str(folder),
        source=_ImageSource(spec.name, samples, plan),
        num_samples=len(samples),
        batch_size=batch_size,
        fixed_batch=fixed,
        input_shapes={spec.name: (batch_size, *shape[1:])},
        has_labels=class_names is not None,
        class_names=class_names,
    )



def first_samples(data: Dataset, samples: int | None) -> Iterator[Batch]:
    """The batches of `data` up to `samples` samples (all when None): the last one cut (a fixed batch keeps
    its rows and marks the rest as padding)."""
    seen = 0
    for batch in data.batches():
        if samples is not None and seen >= samples:
            return
        if samples is not None and seen + batch.size > samples:
            keep = samples - seen
            feeds = batch.feeds if data.fixed_batch else {name: array[:keep] for name, array in batch.feeds.items()}
            batch = Batch(feeds, None if batch.labels is None else batch.labels[:keep], keep)
        seen += batch.size
        yield batch
