"""Measurement files: merge rules, validation messages, atomic writes."""

import json

import pytest

from ds_quant import measurements as ms
from ds_quant.measurements import MeasurementError


def layer(kind, channels, partition_sizes=(), in_full=None, out_full=8, output=None, weight=1.0):
    return {"kind": kind, "in_features": in_full or len(channels), "out_features": out_full,
            "local_in_features": len(channels), "partition_sizes": list(partition_sizes),
            "input_amax": max(channels, default=0.0), "input_channel_amax": list(channels),
            "output_amax": output, "weight_amax": weight, "samples": 12}


def shards_for_uneven_row():
    # A row-parallel layer with 5 input channels split (3, 2) by DeepSpeed, and a column-parallel one.
    r0 = {"down": layer("row", [1.0, 2.0, 3.0], (3, 2), in_full=5, weight=0.5),
          "up": layer("column", [4.0, 1.0], (4, 4), out_full=8, output=7.0)}
    r1 = {"down": layer("row", [9.0, 0.5], (3, 2), in_full=5, weight=0.75),
          "up": layer("column", [3.0, 2.0], (4, 4), out_full=8, output=6.0)}
    return [ms.make_shard(r, rank, 2, "maxabs", "bfloat16") for rank, r in enumerate((r0, r1))]


def test_merge_places_row_slices_by_partition_and_maxes_replicated_inputs():
    shards = shards_for_uneven_row()
    merged = ms.merge(reversed(shards))  # order of arrival does not matter
    down, up = merged["layers"]["down"], merged["layers"]["up"]
    assert down["input_channel_amax"] == [1.0, 2.0, 3.0, 9.0, 0.5] and down["input_amax"] == 9.0
    assert down["weight_amax"] == 0.75 and down["in_features"] == 5
    assert up["input_channel_amax"] == [4.0, 2.0] and up["output_amax"] == 7.0
    assert merged["kind"] == "merged" and merged["world_size"] == 2


def test_merge_is_deterministic(tmp_path):
    shards = shards_for_uneven_row()
    ms.atomic_write_json(tmp_path / "a.json", ms.merge(shards))
    ms.atomic_write_json(tmp_path / "b.json", ms.merge(list(reversed(shards))))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_merge_errors_name_the_problem():
    s0, s1 = shards_for_uneven_row()
    with pytest.raises(MeasurementError, match=r"one shard per rank 0\.\.1, got ranks \[0\]"):
        ms.merge([s0])
    with pytest.raises(MeasurementError, match=r"got ranks \[0, 0\]"):
        ms.merge([s0, s0])
    foreign = dict(s1, fingerprint="0" * 16)
    with pytest.raises(MeasurementError, match="rank 1 has fingerprint='0000000000000000'.*different runs"):
        ms.merge([s0, foreign])
    bad = json.loads(json.dumps(s1))
    bad["layers"]["down"]["input_channel_amax"] = [1.0, 2.0, 3.0]
    with pytest.raises(MeasurementError, match=r"layer 'down': slice lengths \[3, 3\] do not match partition"):
        ms.merge([s0, bad])


def test_fingerprint_ignores_tp_size():
    full = {"down": layer("plain", [0.0] * 5, out_full=8), "up": layer("plain", [0.0] * 2, out_full=8)}
    assert ms.fingerprint(full) == ms.merge(shards_for_uneven_row())["fingerprint"]


def test_round_trip_and_naming(tmp_path):
    prefix = str(tmp_path / "deep" / "dir" / "stats")
    assert ms.shard_path(prefix, 1, 4) == prefix + "_1_4.json" and ms.merged_path(prefix) == prefix + ".json"
    merged = ms.merge(shards_for_uneven_row())
    ms.atomic_write_json(ms.merged_path(prefix), merged)  # creates directories when writing
    assert ms.load(ms.merged_path(prefix)) == merged
    doc, where = ms.load_for_quantize(prefix, rank=0, world_size=2)
    assert where.endswith("stats.json") and doc == merged


def test_shard_is_used_when_no_merged_file(tmp_path):
    prefix = str(tmp_path / "stats")
    s0, _ = shards_for_uneven_row()
    ms.atomic_write_json(ms.shard_path(prefix, 0, 2), s0)
    doc, where = ms.load_for_quantize(prefix, rank=0, world_size=2)
    assert where.endswith("stats_0_2.json") and doc["kind"] == "shard"
    with pytest.raises(MeasurementError, match="no measurements at .*stats.json .*stats_0_4.json"):
        ms.load_for_quantize(prefix, rank=0, world_size=4)


@pytest.mark.parametrize("edit,fragment", [
    (lambda t: t[: len(t) // 2], "not valid JSON (truncated or corrupt?)"),
    (lambda t: t.replace('"ds_quant.measurements"', '"hqt"'), "not a ds_quant measurement file"),
    (lambda t: t.replace('"version": 1', '"version": 9'), "format version 9, this ds_quant reads 1"),
    (lambda t: t.replace('"world_size": 2,', ""), "header key 'world_size' is missing"),
    (lambda t: t.replace('"input_amax": 9.0, ', ""), "layer 'down' has no 'input_amax'"),
    (lambda t: t.replace("[1.0, 2.0, 3.0, 9.0, 0.5]", "[1.0]"), "layer 'down': input_channel_amax has 1 values"),
])
def test_bad_files_are_named_with_what_is_wrong(tmp_path, edit, fragment):
    path = tmp_path / "stats.json"
    ms.atomic_write_json(path, ms.merge(shards_for_uneven_row()))
    path.write_text(edit(path.read_text()))
    with pytest.raises(MeasurementError) as err:
        ms.load(path)
    assert str(err.value).startswith(str(path)) and fragment in str(err.value), str(err.value)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "stats.json"
    ms.atomic_write_json(path, {"old": 1})

    def boom(doc):
        raise KeyboardInterrupt  # e.g. a rank killed mid-write

    monkeypatch.setattr(ms, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        ms.atomic_write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
