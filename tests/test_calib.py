"""The data reader: file kinds, batch semantics, labels, images, and the error messages for bad data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import CLASSES, image_model, int_input_model, scaled_classifier, two_input_model
from conftest import MODELS_DIR
from PIL import Image

import onnxslim.calib as calib
from onnxslim.calib import DataOptions, ImageOptions, model_input_specs, open_dataset
from onnxslim.errors import DataError, UsageError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, CLASSES)).astype(np.float32)


def collect(dataset: calib.Dataset) -> tuple[list[calib.Batch], np.ndarray]:
    """All batches, and the real samples of input `x` concatenated."""
    batches = list(dataset.batches())
    return batches, np.concatenate([b.feeds["x"][: b.size] for b in batches])


# ------------------------------------------------------------------------------------------- file kinds


def test_npz_with_labels_round_trips(tmp_path: Path) -> None:
    x, labels = samples(7), np.arange(7, dtype=np.int64) % CLASSES
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    dataset = open_dataset(tmp_path / "d.npz", scaled_classifier())
    assert (dataset.num_samples, dataset.batch_size, dataset.has_labels, dataset.is_random) == (7, 1, True, False)
    batches, got = collect(dataset)
    assert len(batches) == 7 and all(b.feeds["x"].shape == (1, CLASSES) for b in batches)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
    assert all(b.labels.dtype == np.int64 for b in batches)
    # re-iterable: a second pass gives the same data
    np.testing.assert_array_equal(collect(dataset)[1], x)


def test_compressed_npz_and_npy(tmp_path: Path) -> None:
    x = samples(5)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.save(tmp_path / "a.npy", x)
    for name in ("c.npz", "a.npy"):
        dataset = open_dataset(tmp_path / name, scaled_classifier(), DataOptions(batch=2))
        assert not dataset.has_labels
        np.testing.assert_array_equal(collect(dataset)[1], x)


def test_multi_input_npz(tmp_path: Path) -> None:
    a, b = samples(4)[:, :3], samples(4, seed=1)[:, :3]
    np.savez(tmp_path / "d.npz", a=a, b=b)
    batches = list(open_dataset(tmp_path / "d.npz", two_input_model(), DataOptions(batch=3)).batches())
    assert [bt.size for bt in batches] == [3, 1]
    np.testing.assert_array_equal(np.concatenate([bt.feeds["a"] for bt in batches]), a)
    np.testing.assert_array_equal(np.concatenate([bt.feeds["b"] for bt in batches]), b)


def test_folder_of_files_batches_across_files_in_name_order(tmp_path: Path) -> None:
    x = samples(10)
    np.savez(tmp_path / "part1.npz", x=x[:3], labels=np.arange(3))
    np.savez(tmp_path / "part2.npz", x=x[3:], labels=np.arange(3, 10))
    (tmp_path / "README.txt").write_text("ignored")
    dataset = open_dataset(tmp_path, scaled_classifier(), DataOptions(batch=4))
    batches, got = collect(dataset)
    assert dataset.num_samples == 10 and dataset.has_labels
    assert [b.size for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), np.arange(10))


def test_folder_of_single_sample_npy_files(tmp_path: Path) -> None:
    x = samples(3)
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", x[i])  # one rank short: one sample each
    batches, got = collect(open_dataset(tmp_path, scaled_classifier(), DataOptions(batch=2)))
    assert [b.feeds["x"].shape for b in batches] == [(2, CLASSES), (1, CLASSES)]
    np.testing.assert_array_equal(got, x)


def test_the_official_mnist_data_matches_the_reference_model() -> None:
    model = onnx.load(str(MODELS_DIR / "mnist_resnet.onnx"))
    dataset = open_dataset(MODELS_DIR / "mnist_calib.npz", model, DataOptions(batch=100))
    assert dataset.num_samples == 256 and dataset.has_labels
    assert dataset.input_shapes == {"input": (100, 1, 28, 28)}
    assert [b.size for b in dataset.batches()] == [100, 100, 56]


def test_fortran_order_and_big_endian_arrays_are_read_correctly(tmp_path: Path) -> None:
    x = samples(6)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.save(tmp_path / "b.npy", x.astype(">f4"))
    for name in ("f.npy", "b.npy"):
        got = collect(open_dataset(tmp_path / name, scaled_classifier(), DataOptions(batch=4)))[1]
        assert got.dtype == np.float32 and got.dtype.isnative
        np.testing.assert_array_equal(got, x)


def test_reads_stream_a_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez_compressed(tmp_path / "d.npz", x=samples(1000))
    requested: list[int] = []
    original = calib._read_exact

    def spy(stream, nbytes, where):  # noqa: ANN001, ANN202
        requested.append(nbytes)
        return original(stream, nbytes, where)

    monkeypatch.setattr(calib, "_read_exact", spy)
    assert sum(b.size for b in open_dataset(tmp_path / "d.npz", scaled_classifier(), DataOptions(batch=8)).batches()) == 1000
    assert max(requested) == 8 * CLASSES * 4  # one batch of float32 rows, never the whole array


# ------------------------------------------------------------------------------------------ batch semantics


def test_fixed_batch_1(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", samples(5))
    dataset = open_dataset(tmp_path / "d.npy", scaled_classifier(batch=1))
    assert dataset.batch_size == 1 and dataset.fixed_batch
    assert [b.feeds["x"].shape for b in dataset.batches()] == [(1, CLASSES)] * 5


def test_fixed_batch_n_pads_the_last_batch_with_its_last_sample(tmp_path: Path) -> None:
    x = samples(10)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(10))
    dataset = open_dataset(tmp_path / "d.npz", scaled_classifier(batch=4))
    batches = list(dataset.batches())
    assert [b.feeds["x"].shape[0] for b in batches] == [4, 4, 4]  # every batch has the model's fixed size
    assert [b.size for b in batches] == [4, 4, 2]
    last = batches[-1]
    np.testing.assert_array_equal(last.feeds["x"][:2], x[8:])
    np.testing.assert_array_equal(last.feeds["x"][2:], np.repeat(x[9:], 2, axis=0))
    np.testing.assert_array_equal(last.labels, [8, 9])  # labels only for the real samples


def test_fixed_batch_refuses_a_different_batch_option(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", samples(4))
    with pytest.raises(UsageError, match="fixed batch size of 4"):
        open_dataset(tmp_path / "d.npy", scaled_classifier(batch=4), DataOptions(batch=2))
    assert open_dataset(tmp_path / "d.npy", scaled_classifier(batch=4), DataOptions(batch=4)).batch_size == 4


def test_symbolic_batch_uses_the_batch_option_and_a_smaller_last_batch(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", samples(10))
    default = open_dataset(tmp_path / "d.npy", scaled_classifier())
    assert default.batch_size == 1 and default.num_batches == 10 and not default.fixed_batch
    batched = open_dataset(tmp_path / "d.npy", scaled_classifier(), DataOptions(batch=3))
    assert [b.feeds["x"].shape[0] for b in batched.batches()] == [3, 3, 3, 1]
    assert batched.input_shapes == {"x": (3, CLASSES)}


def test_symbolic_batch_takes_the_batch_from_input_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", samples(10))
    dataset = open_dataset(tmp_path / "d.npy", scaled_classifier(), DataOptions(input_shapes={"x": (5, CLASSES)}))
    assert dataset.batch_size == 5


# -------------------------------------------------------------------------------------------- random


def test_random_data_warns_and_is_seeded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxslim.calib"):
        dataset = open_dataset("random", scaled_classifier(), DataOptions(batch=2, seed=3))
    assert "meaningless" in caplog.text
    assert dataset.is_random and not dataset.has_labels and dataset.num_samples == 16  # 8 batches
    first, again = collect(dataset)[1], collect(dataset)[1]
    np.testing.assert_array_equal(first, again)
    other = collect(open_dataset("random", scaled_classifier(), DataOptions(batch=2, seed=4)))[1]
    assert not np.array_equal(first, other)
    assert open_dataset("random:5", scaled_classifier()).num_samples == 5


def test_random_data_needs_static_non_batch_dims() -> None:
    with pytest.raises(UsageError, match="--input-shapes"):
        open_dataset("random", image_model(["N", 3, "H", "W"]))


# ---------------------------------------------------------------------------------------------- errors


def test_wrong_key_names_the_input_and_what_was_found(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=samples(2))
    with pytest.raises(DataError) as error:
        open_dataset(tmp_path / "d.npz", scaled_classifier())
    message = str(error.value)
    assert "'x'" in message and "float32 [N, 10]" in message and "['images']" in message


def test_unknown_extra_key_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=samples(2), mask=samples(2))
    with pytest.raises(DataError, match="'mask' is not an input"):
        open_dataset(tmp_path / "d.npz", scaled_classifier())


def test_wrong_rank(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((2, 2, CLASSES), np.float32))
    with pytest.raises(DataError, match=r"rank 3.*\[N, 10\].*rank 2 \(samples first\) or 1 \(one sample\)"):
        open_dataset(tmp_path / "d.npy", scaled_classifier())


def test_wrong_static_dim(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((2, 9), np.float32))
    with pytest.raises(DataError, match="axis 1 must be 10, not 9"):
        open_dataset(tmp_path / "d.npy", scaled_classifier())


def test_wrong_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", samples(2).astype(np.float64))
    with pytest.raises(DataError, match=r"float64, but input 'x' expects float32.*astype\(np.float32\)"):
        open_dataset(tmp_path / "d.npy", scaled_classifier())
    np.savez(tmp_path / "ids.npz", ids=np.zeros((2, 4), np.int32))
    with pytest.raises(DataError, match="int32, but input 'ids' expects int64"):
        open_dataset(tmp_path / "ids.npz", int_input_model())


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, {"b": 2}]
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "o.npz", x=objects)
    for name in ("o.npy", "o.npz"):
        with pytest.raises(DataError, match="pickle"):
            open_dataset(tmp_path / name, scaled_classifier())


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data found"):
        open_dataset(tmp_path, scaled_classifier())
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "missing.npz", scaled_classifier())
    (tmp_path / "notes.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported data file"):
        open_dataset(tmp_path / "notes.csv", scaled_classifier())


def test_npy_for_a_multi_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"one array, but the model has 2 inputs \['a', 'b'\]"):
        open_dataset(tmp_path / "d.npy", two_input_model())


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="not a valid .npz"):
        open_dataset(tmp_path / "bad.npz", scaled_classifier())
    (tmp_path / "bad.npy").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="not a valid .npy"):
        open_dataset(tmp_path / "bad.npy", scaled_classifier())
    np.save(tmp_path / "cut.npy", samples(4))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-20])
    dataset = open_dataset(tmp_path / "cut.npy", scaled_classifier(), DataOptions(batch=4))
    with pytest.raises(DataError, match="truncated"):
        list(dataset.batches())


def test_label_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=samples(3), labels=np.zeros(3, np.float32))
    with pytest.raises(DataError, match="integer class ids"):
        open_dataset(tmp_path / "f.npz", scaled_classifier())
    np.savez(tmp_path / "n.npz", x=samples(3), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"expected \[3\]"):
        open_dataset(tmp_path / "n.npz", scaled_classifier())
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.savez(folder / "a.npz", x=samples(3), labels=np.zeros(3, np.int64))
    np.savez(folder / "b.npz", x=samples(3))
    with pytest.raises(DataError, match="some files have 'labels' and some do not"):
        open_dataset(folder, scaled_classifier())


def test_arrays_with_different_sample_counts(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 3), np.float32), b=np.zeros((4, 3), np.float32))
    with pytest.raises(DataError, match="different numbers of samples"):
        open_dataset(tmp_path / "d.npz", two_input_model())


def test_samples_of_different_shapes_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    np.save(folder / "b.npy", np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(DataError, match="samples must have one shape"):
        open_dataset(folder, image_model(["N", 3, "H", "W"]))


# ---------------------------------------------------------------------------------------------- images


def make_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(2):
            make_image(tmp_path / cls / f"{i}.png", color)
    dataset = open_dataset(tmp_path, image_model([1, 3, 8, 8]))
    assert dataset.class_names == ("cat", "dog") and dataset.has_labels and dataset.num_samples == 4
    batches = list(dataset.batches())
    assert [int(b.labels[0]) for b in batches] == [0, 0, 1, 1]
    first = batches[0].feeds["images"]
    assert first.shape == (1, 3, 8, 8) and first.dtype == np.float32
    red = (np.array([1.0, 0.0, 0.0], np.float32) - IMAGENET_MEAN) / IMAGENET_STD  # the documented defaults
    np.testing.assert_allclose(first[0, :, 4, 4], red, rtol=1e-5)


def test_image_folder_without_subfolders_has_no_labels(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (255, 255, 255))
    make_image(tmp_path / "b.jpg", (0, 0, 0))
    dataset = open_dataset(tmp_path, image_model(["N", 3, 6, 6]), DataOptions(batch=2))
    batch = next(iter(dataset.batches()))
    assert not dataset.has_labels and batch.labels is None and batch.feeds["images"].shape == (2, 3, 6, 6)


def test_image_options_bgr_nhwc_scale_mean_std(tmp_path: Path) -> None:
    make_image(tmp_path / "x.png", (255, 128, 0))
    options = ImageOptions(color="bgr", scale=1.0, mean=(10.0,), std=(2.0,))
    dataset = open_dataset(tmp_path, image_model([1, 5, 5, 3]), DataOptions(image=options))  # NHWC by auto layout
    pixel = next(iter(dataset.batches())).feeds["images"][0, 2, 2]
    np.testing.assert_allclose(pixel, (np.array([0, 128, 255]) - 10.0) / 2.0)


def test_image_grayscale_and_integer_inputs(tmp_path: Path) -> None:
    make_image(tmp_path / "x.png", (255, 255, 255))
    gray = open_dataset(tmp_path, image_model([1, 1, 4, 4]))
    np.testing.assert_allclose(next(iter(gray.batches())).feeds["images"], np.ones((1, 1, 4, 4)), rtol=1e-6)
    raw = open_dataset(tmp_path, image_model([1, 3, 4, 4], elem_type=onnx.TensorProto.UINT8))
    pixels = next(iter(raw.batches())).feeds["images"]
    assert pixels.dtype == np.uint8 and (pixels == 255).all()  # integer inputs get raw pixel values


def test_image_resize_crop_keeps_the_center_and_stretch_keeps_everything(tmp_path: Path) -> None:
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 3:17] = 255  # white center, black 3-pixel borders left and right
    Image.fromarray(image).save(tmp_path / "wide.png")
    model = image_model([1, 3, 4, 4])
    plain = {"scale": 1 / 255, "mean": (0.0,), "std": (1.0,)}
    crop = open_dataset(tmp_path, model, DataOptions(image=ImageOptions(crop_fraction=1.0, **plain)))
    np.testing.assert_allclose(next(iter(crop.batches())).feeds["images"], 1.0, atol=1e-6)
    stretch = open_dataset(tmp_path, model, DataOptions(image=ImageOptions(resize="stretch", **plain)))
    values = next(iter(stretch.batches())).feeds["images"]
    assert values[0, 0, :, 0].max() < 0.9 and values[0, 0, :, 1:3].min() > 0.9


def test_image_resize_pad_keeps_the_aspect_ratio_of_text_lines_of_any_width(tmp_path: Path) -> None:
    """Text lines of different widths for a [N, 3, 48, W] recognizer: each at the input's height, its aspect
    ratio kept, at the left; the rest of the width 0 after normalization; a line wider than the input is
    squeezed to its width; every batch has the input's shape (NCHW and NHWC)."""
    Image.new("RGB", (20, 10), (255, 255, 255)).save(tmp_path / "a_short.png")  # 2:1 -> 8 of 16 columns at height 4
    Image.new("RGB", (100, 10), (255, 255, 255)).save(tmp_path / "b_long.png")  # 10:1 -> squeezed to 16
    plain = {"scale": 1 / 255, "mean": (0.5,), "std": (0.5,)}  # PaddleOCR's: white 1.0, padding 0
    for shape, width_axis in (([1, 3, 4, 16], 3), ([1, 4, 16, 3], 2)):
        folder = tmp_path / f"{width_axis}"
        folder.mkdir()
        for image in ("a_short.png", "b_long.png"):
            (folder / image).write_bytes((tmp_path / image).read_bytes())
        dataset = open_dataset(folder, image_model(shape), DataOptions(image=ImageOptions(resize="pad", **plain)))
        short, long = (np.moveaxis(b.feeds["images"][0], width_axis - 1, 0) for b in dataset.batches())
        assert short.shape == long.shape == (16, *(s for i, s in enumerate(shape[1:]) if i != width_axis - 1))
        np.testing.assert_allclose(short[:8], 1.0, atol=1e-5)
        np.testing.assert_allclose(short[8:], 0.0)
        np.testing.assert_allclose(long, 1.0, atol=1e-5)


def test_image_size_comes_from_input_shapes_or_fails_clearly(tmp_path: Path) -> None:
    make_image(tmp_path / "x.png", (0, 0, 0))
    model = image_model(["N", 3, "H", "W"])
    with pytest.raises(UsageError, match="images need a fixed image size.*--input-shapes"):
        open_dataset(tmp_path, model)
    dataset = open_dataset(tmp_path, model, DataOptions(input_shapes={None: (1, 3, 7, 9)}))
    assert next(iter(dataset.batches())).feeds["images"].shape == (1, 3, 7, 9)


def test_image_folder_errors(tmp_path: Path) -> None:
    make_image(tmp_path / "loose.png", (0, 0, 0))
    make_image(tmp_path / "cls" / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match="both directly .* and in class sub-folders"):
        open_dataset(tmp_path, image_model([1, 3, 4, 4]))
    other = tmp_path / "other"
    make_image(other / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match="single-input models"):
        open_dataset(other, two_input_model())
    with pytest.raises(DataError, match="axis 1 nor axis 3"):
        open_dataset(other, image_model([1, 5, 4, 4]))
    with pytest.raises(UsageError, match="mean has 2 values"):
        open_dataset(other, image_model([1, 3, 4, 4]), DataOptions(image=ImageOptions(mean=(0.1, 0.2))))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    dataset = open_dataset(broken, image_model([1, 3, 4, 4]))
    with pytest.raises(DataError, match="cannot read the image"):
        list(dataset.batches())


def test_image_option_validation() -> None:
    with pytest.raises(UsageError):
        ImageOptions(resize="zoom")
    with pytest.raises(UsageError):
        ImageOptions(crop_fraction=1.5)
    with pytest.raises(UsageError):
        ImageOptions(std=(0.0,))


def test_model_input_specs_describe_symbolic_dims() -> None:
    (spec,) = model_input_specs(scaled_classifier(batch="batch"))
    assert spec.describe() == "float32 [batch, 10]" and spec.fixed_batch is None
    (fixed,) = model_input_specs(scaled_classifier(batch=4))
    assert fixed.fixed_batch == 4
