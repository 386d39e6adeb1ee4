"""Black-box fuzzing of every file reader (issue 15): generated bad files must end in the
reading module's own error, never in another exception.

* ``io.read_points`` (``.bin .ply .pcd .npy``): valid files truncated or with bytes
  overwritten, random bytes, and ``.npy`` headers naming other dtypes and shapes ->
  a float32 [N, 3] array with a finite point, or :class:`PointFileError`;
* ``bags.read_clouds`` (rosbag2, mcap and sqlite3): the storage file truncated or with bytes
  overwritten, ``metadata.yaml`` damaged, topics of the wrong type, clouds with broken
  layouts -> clouds, or :class:`BagError`;
* ``checkpoints.load_model``: a published-layout ``.ckpt`` and our directory format
  (``model.safetensors`` + ``config.json``) truncated, with bytes overwritten, or with
  config values replaced by arbitrary JSON -> a model, or :class:`CheckpointError`.

Every generated case is counted by Hypothesis (``--hypothesis-show-statistics``).
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lidar_completion.bags import BagError, read_clouds, write_clouds
from lidar_completion.checkpoints import CheckpointError, load_model, save_model
from lidar_completion.model import CompletionModel, ModelConfig
from lidar_completion.io import PointFileError, read_points, write_points

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@st.composite
def damage(draw, size: int) -> list[tuple[str, int, bytes]]:
    """A few edits of a file of ``size`` bytes: overwrite bytes, cut the file, or both.
    Edits favour the first 512 bytes (headers) half of the time."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        head = draw(st.booleans())
        position = draw(st.integers(0, max(0, min(size, 512) - 1) if head else max(0, size - 1)))
        kind = draw(st.sampled_from(["overwrite", "overwrite", "truncate", "insert"]))
        edits.append((kind, position, draw(st.binary(min_size=1, max_size=16))))
    return edits


def apply(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, position, payload in edits:
        position = min(position, len(out))
        if kind == "overwrite":
            out[position:position + len(payload)] = payload
        elif kind == "truncate":
            del out[position:]
        else:
            out[position:position] = payload
    return bytes(out)


# ----------------------------------------------------------------------------- point files
def _scan(n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-30, 30, (n, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def point_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("points")
    files = {}
    for suffix in ("bin", "ply", "pcd", "npy"):
        files[suffix] = write_points(folder / f"scan.{suffix}", _scan()).read_bytes()
    return files


def _check_points(path: Path) -> None:
    try:
        points = read_points(path)
    except PointFileError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        event("PointFileError: " + str(err).split(": ", 1)[-1][:40])
        return
    event("read")
    assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 3 and len(points) > 0
    assert np.isfinite(points).all(axis=1).any()


@pytest.mark.parametrize("suffix", ["bin", "ply", "pcd", "npy"])
@FUZZ
@given(data=st.data())
def test_damaged_point_files_end_in_point_file_error(tmp_path, point_files, suffix, data):
    original = point_files[suffix]
    path = tmp_path / f"damaged.{suffix}"
    path.write_bytes(apply(original, data.draw(damage(len(original)), label="edits")))
    _check_points(path)


@pytest.mark.parametrize("suffix", ["bin", "ply", "pcd", "npy"])
@FUZZ
@given(content=st.one_of(st.binary(max_size=2048),
                         st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_random_point_files_end_in_point_file_error(tmp_path, suffix, content):
    path = tmp_path / f"random.{suffix}"
    path.write_bytes(content)
    _check_points(path)


@FUZZ
@given(dtype=st.sampled_from(["<f4", ">f8", "<i2", "u1", "?", "<c8", "U3", "S2", "O", "<f2", "<i8"]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), structured=st.booleans())
def test_npy_of_any_dtype_and_shape(tmp_path, dtype, shape, structured):
    path = tmp_path / "odd.npy"
    if structured:
        array = np.zeros(shape, dtype=[("x", "<f4"), ("y", dtype if dtype != "O" else "<f4")])
    elif dtype == "O":
        array = np.empty(shape, dtype=object)
    else:
        array = np.ones(shape, dtype=dtype)
    np.save(path, array, allow_pickle=True)
    _check_points(path)


# ----------------------------------------------------------------------------- rosbag2
@pytest.fixture(scope="module", params=["mcap", "sqlite3"])
def good_bag(request, tmp_path_factory) -> Path:
    bag = tmp_path_factory.mktemp(f"bag_{request.param}") / "bag"
    rng = np.random.default_rng(1)
    clouds = [(1_000_000_000 + i * 100_000_000, "velodyne", rng.uniform(-20, 20, (200, 3)).astype(np.float32),
               {"intensity": rng.random(200, dtype=np.float32)}) for i in range(3)]
    assert write_clouds(bag, clouds, storage=request.param) == 3
    return bag


def _check_bag(path: Path) -> None:
    try:
        clouds = list(read_clouds(path))
    except BagError as err:
        assert "\n" not in str(err)
        event("BagError: " + str(err).split(": ", 1)[-1][:40])
        return
    event(f"read {len(clouds)} clouds")
    for cloud in clouds:
        assert cloud.xyz.dtype == np.float32 and cloud.xyz.ndim == 2 and cloud.xyz.shape[1] == 3


@FUZZ
@given(data=st.data())
def test_damaged_bags_end_in_bag_error(tmp_path, good_bag, data):
    bag = tmp_path / "bag"
    if bag.exists():
        shutil.rmtree(bag)
    shutil.copytree(good_bag, bag)
    files = sorted(p for p in bag.iterdir() if p.is_file())
    target = data.draw(st.sampled_from(files), label="file")
    original = target.read_bytes()
    target.write_bytes(apply(original, data.draw(damage(len(original)), label="edits")))
    _check_bag(bag)


def test_wrong_types_and_layouts_end_in_bag_error(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    String = store.types["std_msgs/msg/String"]
    PointCloud2 = store.types["sensor_msgs/msg/PointCloud2"]
    PointField = store.types["sensor_msgs/msg/PointField"]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    bag = tmp_path / "mixed"
    with Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        text = writer.add_connection("/points_raw", "std_msgs/msg/String", typestore=store)
        writer.write(text, 1, store.serialize_cdr(String(data="not a cloud"), "std_msgs/msg/String"))
        broken = writer.add_connection("/broken", "sensor_msgs/msg/PointCloud2", typestore=store)
        msg = PointCloud2(header=Header(stamp=Time(sec=1, nanosec=0), frame_id="v"), height=1, width=10,
                          fields=[PointField(name="x", offset=0, datatype=7, count=1)], is_bigendian=False,
                          point_step=4, row_step=40, data=np.zeros(40, np.uint8), is_dense=True)
        writer.write(broken, 2, store.serialize_cdr(msg, "sensor_msgs/msg/PointCloud2"))
    with pytest.raises(BagError, match="has type std_msgs/msg/String, not sensor_msgs/msg/PointCloud2"):
        list(read_clouds(bag, "/points_raw"))
    with pytest.raises(BagError, match=r"cloud at 2 ns cannot be read: .*\by\b"):
        list(read_clouds(bag, "/broken"))
    with pytest.raises(BagError, match="cannot read bag"):
        list(read_clouds(tmp_path / "no_such_bag"))
    # A message whose bytes are not the type the bag says it is.
    wrong = tmp_path / "wrong_bytes"
    with Writer(wrong, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/points_raw", "sensor_msgs/msg/PointCloud2", typestore=store)
        writer.write(conn, 3, store.serialize_cdr(String(data="x" * 7), "std_msgs/msg/String"))
    with pytest.raises(BagError, match="cannot be decoded as sensor_msgs/msg/PointCloud2"):
        list(read_clouds(wrong))


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny() -> CompletionModel:
    torch.manual_seed(0)
    return CompletionModel(ModelConfig(channel_ratio=0.25, kind="student", default_steps=1, default_guidance=1.0))


@pytest.fixture(scope="module")
def published_bytes(tiny, tmp_path_factory) -> bytes:
    state = {f"partial_enc.{k[8:]}": v for k, v in tiny.state_dict().items() if k.startswith("encoder.")}
    state |= {f"generator.{k[9:]}": v for k, v in tiny.state_dict().items() if k.startswith("denoiser.")}
    path = tmp_path_factory.mktemp("published") / "student.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def ours(tiny, tmp_path_factory) -> Path:
    return save_model(tiny, tmp_path_factory.mktemp("ours") / "model")


def _check_checkpoint(path: Path) -> None:
    try:
        model = load_model(path)
    except CheckpointError as err:
        assert "\n" not in str(err) and "weights_only" not in str(err), str(err)
        event("CheckpointError: " + str(err).replace(str(path), "")[:50])
        return
    event("loaded")
    assert isinstance(model, CompletionModel)


def _fresh_copy(model_dir: Path, target: Path) -> Path:
    """An undamaged copy of ``model_dir`` at ``target`` (Hypothesis reuses tmp_path across examples)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(model_dir, target)
    return target


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_published_checkpoints_end_in_checkpoint_error(tmp_path, published_bytes, data):
    path = tmp_path / "student.ckpt"
    path.write_bytes(apply(published_bytes, data.draw(damage(len(published_bytes)), label="edits")))
    _check_checkpoint(path)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_safetensors_end_in_checkpoint_error(tmp_path, ours, data):
    target = _fresh_copy(ours, tmp_path / "model")
    weights = target / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(apply(original, data.draw(damage(len(original)), label="edits")))
    _check_checkpoint(target)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_odd_model_configs_end_in_checkpoint_error(tmp_path, ours, data):
    target = _fresh_copy(ours, tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    if data.draw(st.booleans(), label="replace whole config"):
        text = json.dumps(data.draw(JSON, label="config"))
    else:
        keys = data.draw(st.lists(st.sampled_from(sorted(config) + ["bogus"]), min_size=1, max_size=3, unique=True),
                         label="keys")
        for key in keys:
            config[key] = data.draw(JSON, label=key)
        text = json.dumps(config)
    (target / "config.json").write_text(text)
    _check_checkpoint(target)


@pytest.mark.parametrize("ratio", [60, 3.5, 1e6])
def test_config_naming_huge_widths_fails_before_allocating(tmp_path, ours, ratio):
    """Found by the fuzz test above (CI killed for memory): a config.json with channel_ratio 60
    built a model of tens of GB before its shapes were compared with the weights."""
    target = _fresh_copy(ours, tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"channel_ratio": ratio}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(CheckpointError, match="channel_ratio must be at most|has shape"):
        load_model(target)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000
