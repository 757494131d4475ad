"""Measurement files: merge rules, validation messages, atomic writes."""

import json
import os
from pathlib import Path

import pytest

from ds_quant import testing
from ds_quant.errors import MeasurementError
from ds_quant.files import measurements as ms
from ds_quant.files import shards as sf


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
    assert sf.shard_path(prefix, 1, 4) == prefix + "_1_4.json" and sf.merged_path(prefix) == prefix + ".json"
    merged = ms.merge(shards_for_uneven_row())
    ms.atomic_write_json(sf.merged_path(prefix), merged)  # creates directories when writing
    assert ms.load(sf.merged_path(prefix)) == merged
    # Readable by whoever could read a file written with open(): not mkstemp's 0600.
    mask = os.umask(0o022)
    try:
        ms.atomic_write_json(sf.merged_path(prefix), merged)
    finally:
        os.umask(mask)
    assert os.stat(sf.merged_path(prefix)).st_mode & 0o777 == 0o644


def test_read_plan_merged_file_is_read_once_by_the_first_rank_that_has_it(tmp_path):
    prefix = str(tmp_path / "stats")
    ms.atomic_write_json(sf.merged_path(prefix), ms.merge(shards_for_uneven_row()))
    here, elsewhere = sf.local_sources(prefix), {"merged": False, "shards": {}}
    assert sf.read_plan(prefix, [elsewhere, here, here], 3) == ("merged", {1: [prefix + ".json"]}, prefix + ".json")


def test_read_plan_without_merged_file_reads_each_shard_once(tmp_path):
    """Shards spread over two nodes (rank 0 has shard 0, rank 1 has shard 1): each is read by one rank."""
    prefix = str(tmp_path / "stats")
    s0, s1 = shards_for_uneven_row()
    ms.atomic_write_json(sf.shard_path(prefix, 0, 2), s0)
    node0 = sf.local_sources(prefix)
    ms.atomic_write_json(sf.shard_path(prefix, 1, 2), s1)
    both = sf.local_sources(prefix)
    node1 = {"merged": False, "shards": {k: p for k, p in both["shards"].items() if k == (1, 2)}}
    what, plan, where = sf.read_plan(prefix, [node0, node1], 2)
    assert what == "shards" and plan == {0: [prefix + "_0_2.json"], 1: [prefix + "_1_2.json"]}
    assert "2 shards" in where
    # The merge of what was read is the merge of the shards: TP-invariant statistics, whoever read them.
    assert ms.merge([ms.load(p) for ps in plan.values() for p in ps], where)["layers"] == ms.merge([s0, s1])["layers"]
    # A run at another world size uses the one complete set there is.
    assert sf.read_plan(prefix, [both], 1)[1] == {0: [prefix + "_0_2.json", prefix + "_1_2.json"]}


def test_read_plan_names_what_is_missing(tmp_path):
    prefix = str(tmp_path / "stats")
    with pytest.raises(MeasurementError, match=r"no measurements at .*stats.json \(nor shards .*stats_RANK_WORLD"):
        sf.read_plan(prefix, [sf.local_sources(prefix)] * 2, 2)
    s0, _ = shards_for_uneven_row()
    ms.atomic_write_json(sf.shard_path(prefix, 0, 2), s0)
    with pytest.raises(MeasurementError, match=r"no rank has shard 1 of 2 \(.*stats_1_2.json\)"):
        sf.read_plan(prefix, [sf.local_sources(prefix)] * 2, 2)
    ms.atomic_write_json(sf.shard_path(prefix, 0, 4), {**s0, "world_size": 4})
    with pytest.raises(MeasurementError, match="several runs .world sizes 2, 4, none is this run's 3"):
        sf.read_plan(prefix, [sf.local_sources(prefix)], 3)


def test_shards_of_two_measure_runs_are_never_merged(tmp_path):
    s0, s1 = shards_for_uneven_row()
    a, b = {**s0, "run": "aaaa"}, {**s1, "run": "bbbb"}
    with pytest.raises(MeasurementError, match="shard of rank 1 has run='bbbb', rank 0 has 'aaaa'"):
        ms.merge([a, b])
    assert ms.merge([a, {**s1, "run": "aaaa"}])["run"] == "aaaa"
    prefix = str(tmp_path / "stats")
    ms.atomic_write_json(sf.shard_path(prefix, 0, 2), a)
    ms.atomic_write_json(sf.shard_path(prefix, 1, 2), b)
    with pytest.raises(MeasurementError, match="foreign shards .* run='bbbb'"):
        sf.merge_files(prefix)
    assert not (tmp_path / "stats.json").exists()


def test_measure_start_checks_the_dump_path_and_removes_the_previous_run(tmp_path):
    prefix = str(tmp_path / "m" / "stats")
    sf.check_writable(prefix, 1000)  # creates the folder
    s0, s1 = shards_for_uneven_row()
    for r, s in enumerate((s0, s1)):
        ms.atomic_write_json(sf.shard_path(prefix, r, 2), s)
    ms.atomic_write_json(sf.merged_path(prefix), ms.merge([s0, s1]))
    assert sf.remove_previous(prefix, 1) == [prefix + "_1_2.json"]
    assert sorted(sf.remove_previous(prefix, 0)) == [prefix + ".json", prefix + "_0_2.json"]
    assert list((tmp_path / "m").iterdir()) == []
    with pytest.raises(MeasurementError, match=r"dump_stats_path .*: .* MiB free in .*, the measurements need about"):
        sf.check_writable(prefix, 1 << 60)
    # An unwritable place (root ignores permission bits, so: a folder whose parent is a file).
    (tmp_path / "file").write_text("")
    with pytest.raises(MeasurementError, match="cannot write in .*file/sub: Not a directory; choose a writable"):
        sf.check_writable(str(tmp_path / "file" / "sub" / "stats"))


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


# -- companion binary for long vectors --------------------------------------------------------------------
@pytest.fixture
def small_inline_limit(monkeypatch):
    monkeypatch.setattr(ms, "INLINE_MAX_VALUES", 4)  # the 5 + 2 channels above go to the companion


def companions(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".f32")


def test_long_vectors_go_to_a_companion_binary_and_round_trip(tmp_path, small_inline_limit):
    merged = ms.merge(shards_for_uneven_row())
    ms.atomic_write_json(tmp_path / "stats.json", merged)
    head = json.loads((tmp_path / "stats.json").read_text())
    assert head["vectors"]["count"] == 7 and head["layers"]["down"]["input_channel_amax"] == {"offset": 0, "count": 5}
    assert companions(tmp_path) == [head["vectors"]["file"]] and head["vectors"]["file"].startswith("stats.")
    back = ms.load(tmp_path / "stats.json")
    assert back["layers"]["down"]["input_channel_amax"].tolist() == [1.0, 2.0, 3.0, 9.0, 0.5]
    assert "vectors" not in back and back["layers"]["up"]["input_amax"] == merged["layers"]["up"]["input_amax"]
    # Rewriting with other data replaces the pair and leaves no stale companion behind.
    merged["layers"]["up"]["input_channel_amax"] = [5.0, 6.0]
    ms.atomic_write_json(tmp_path / "stats.json", merged)
    assert len(companions(tmp_path)) == 1 and companions(tmp_path) != [head["vectors"]["file"]]
    assert ms.load(tmp_path / "stats.json")["layers"]["up"]["input_channel_amax"].tolist() == [5.0, 6.0]


def test_a_failed_write_keeps_the_old_pair_readable(tmp_path, small_inline_limit, monkeypatch):
    ms.atomic_write_json(tmp_path / "stats.json", ms.merge(shards_for_uneven_row()))
    before = ms.load(tmp_path / "stats.json")
    changed = ms.merge(shards_for_uneven_row())
    changed["layers"]["up"]["input_channel_amax"] = [5.0, 6.0]

    def boom(doc):
        raise KeyboardInterrupt  # killed after the new companion, before the JSON (the commit point)

    monkeypatch.setattr(ms, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        ms.atomic_write_json(tmp_path / "stats.json", changed)
    monkeypatch.undo()
    after = ms.load(tmp_path / "stats.json")
    assert after["layers"]["up"]["input_channel_amax"].tolist() == before["layers"]["up"]["input_channel_amax"].tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: p.unlink(), "is missing; copy it along with the JSON"),
    (lambda p: p.write_bytes(p.read_bytes()[:-4]), "has 24 bytes, expected 28 (truncated?)"),
    (lambda p: p.write_bytes(b"\0" * 28), "does not match its sha256"),
])
def test_damaged_companion_is_named(tmp_path, small_inline_limit, damage, fragment):
    ms.atomic_write_json(tmp_path / "stats.json", ms.merge(shards_for_uneven_row()))
    damage(tmp_path / companions(tmp_path)[0])
    with pytest.raises(MeasurementError) as err:
        ms.load(tmp_path / "stats.json")
    assert str(err.value).startswith(str(tmp_path / "stats.json")) and fragment in str(err.value), str(err.value)


# -- more validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d["layers"]["down"].update(input_amax=float("nan")), "layer 'down': input_amax is nan"),
    (lambda d: d["layers"]["down"].update(weight_amax=-1.0), "layer 'down': weight_amax is -1.0"),
    (lambda d: d["layers"]["up"].update(kind="fused"), "layer 'up': kind 'fused' is not one of"),
    (lambda d: d["layers"]["up"].update(input_channel_amax=[1.0, "x"]), "holds a value that is not a number"),
    (lambda d: d["layers"]["up"].update(input_channel_amax=[1.0, -2.0]), "negative or non-finite"),
    (lambda d: d.update(kind="bundle"), "header 'kind' is 'bundle'"),
    (lambda d: d.update(world_size=0), "header 'world_size' is 0"),
])
def test_hand_edited_values_are_named(tmp_path, edit, fragment):
    doc = ms.merge(shards_for_uneven_row())
    edit(doc)
    (tmp_path / "stats.json").write_text(ms.dumps(doc))
    with pytest.raises(MeasurementError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        ms.load(tmp_path / "stats.json")


def test_shard_rank_outside_world_is_named(tmp_path):
    s0, _ = shards_for_uneven_row()
    ms.atomic_write_json(tmp_path / "s.json", dict(s0, rank=5))
    with pytest.raises(MeasurementError, match=r"s.json: shard 'rank' is 5, expected 0..1"):
        ms.load(tmp_path / "s.json")


# -- offline merge -----------------------------------------------------------------------------------------
def write_shards(prefix, shards):
    for s in shards:
        ms.atomic_write_json(sf.shard_path(prefix, s["rank"], s["world_size"]), s)


def test_offline_merge_equals_online_merge_and_is_repeatable(tmp_path):
    prefix = str(tmp_path / "run" / "stats")
    shards = shards_for_uneven_row()
    write_shards(prefix, shards)
    out = sf.merge_files(prefix)
    assert out == prefix + ".json"
    first = Path(out).read_bytes()
    online = tmp_path / "online.json"
    ms.atomic_write_json(online, ms.merge(shards))
    assert first == online.read_bytes()
    sf.merge_files(prefix)
    assert Path(out).read_bytes() == first


def test_offline_merge_names_missing_duplicate_and_foreign_shards(tmp_path):
    prefix = str(tmp_path / "stats")
    s0, s1 = shards_for_uneven_row()
    with pytest.raises(MeasurementError, match=r"no shard files .*stats_RANK_WORLD.json found"):
        sf.merge_files(prefix)
    write_shards(prefix, [s0])
    with pytest.raises(MeasurementError, match=r"world size 2: missing .*stats_1_2.json"):
        sf.merge_files(prefix)
    ms.atomic_write_json(sf.shard_path(prefix, 1, 2), s0)  # rank 0's data copied under rank 1's name
    with pytest.raises(MeasurementError, match=r"stats_1_2.json: holds rank 0 of world size 2, but its name says "
                                               r"rank 1 of 2; duplicate of .*stats_0_2.json"):
        sf.merge_files(prefix)
    ms.atomic_write_json(sf.shard_path(prefix, 1, 2), dict(s1, fingerprint="f" * 16))
    with pytest.raises(MeasurementError, match=r"foreign shards of .*: fingerprint='ffffffffffffffff': "
                                               r".*stats_1_2.json \(the other 1 have"):
        sf.merge_files(prefix)
    ms.atomic_write_json(sf.shard_path(prefix, 1, 2), dict(s1, observer="minmax"))
    with pytest.raises(MeasurementError, match=r"observer='minmax': .*stats_1_2.json"):
        sf.merge_files(prefix)
    ms.atomic_write_json(sf.shard_path(prefix, 1, 2), s1)
    ms.atomic_write_json(sf.shard_path(prefix, 0, 4), dict(s0, world_size=4))  # a stale run at TP=4
    with pytest.raises(MeasurementError, match=r"several runs \(world size 2: .*stats_0_2.json, .*stats_1_2.json; "
                                               r"world size 4: .*stats_0_4.json\); pass --world-size N"):
        sf.merge_files(prefix)
    assert not Path(prefix + ".json").exists()  # nothing written on any error
    assert sf.merge_files(prefix, world_size=2) == prefix + ".json"
    # Another prefix sharing the start of the name is not picked up.
    ms.atomic_write_json(str(tmp_path / "stats_x_0_2.json"), s0)
    assert sorted(sf.find_shards(prefix)) == [(0, 2), (0, 4), (1, 2)]


# -- any TP size from one file -------------------------------------------------------------------------------
def deepspeed_sizes(total, tp):
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

    return get_shard_size_list(total, tp, AutoTPMeta(tp_grain_size=64), "mlp.down_proj")


def observed_shard(x, kind, rank, sizes):
    """What a rank's MeasuredLinear records for input `x` (tokens, in_features)."""
    from ds_quant.parallel.tp import Kind, TPLayout

    layout = TPLayout(Kind(kind), rank, len(sizes), tuple(sizes))
    part = layout.input_slice()
    local = x if part is None else x[:, part]
    ch = local.abs().amax(0)
    return {"kind": kind, "in_features": x.shape[1], "out_features": 64, "local_in_features": local.shape[1],
            "partition_sizes": list(sizes), "input_amax": float(ch.max()), "input_channel_amax": ch.tolist(),
            "output_amax": None, "weight_amax": 1.0, "samples": x.shape[0]}


@pytest.mark.parametrize("n,m", [(1, 2), (2, 1), (2, 4), (4, 2), (4, 1), (1, 4), (4, 4)])
def test_measure_at_n_quantize_at_m(n, m):
    """Shards observed at TP=n merge to the same model-level file; at TP=m each rank's input amax is the
    true max over its slice (act_scope rank) or the layer's (global). 352 channels split unevenly."""
    import torch

    from ds_quant.config import ActScope
    from ds_quant.layers.linear import input_amax
    from ds_quant.parallel.tp import Kind, TPLayout

    torch.manual_seed(0)
    x = torch.randn(16, 352) * torch.linspace(0.1, 8, 352)  # channels of very different ranges
    per_kind = {}
    for kind in ("row", "lm-head", "column"):
        sizes = deepspeed_sizes(352, n) if kind != "column" else [32] * n
        shards = [ms.make_shard({"l": observed_shard(x, kind, r, sizes)}, r, n, "maxabs", "bfloat16")
                  for r in range(n)]
        per_kind[kind] = ms.merge(shards)["layers"]["l"]
    assert per_kind["row"]["input_channel_amax"] == pytest.approx(x.abs().amax(0).tolist())
    for kind, rec in per_kind.items():
        sizes = deepspeed_sizes(352, m)
        for rank in range(m):
            layout = TPLayout(Kind(kind), rank, m, tuple(sizes))
            part = layout.input_slice() or slice(None)
            assert input_amax(rec, layout, ActScope.RANK) == pytest.approx(float(x[:, part].abs().max()))
            assert input_amax(rec, layout, ActScope.GLOBAL) == pytest.approx(float(x.abs().max()))
    assert deepspeed_sizes(352, 2) == [192, 160]  # the split really is uneven


def test_check_layers_accepts_unknown_shapes_of_imported_files():
    doc = {"layers": {"a": {"out_features": None, "in_features": None, "input_amax": 1.0}}}
    ms.check_layers(doc, "imported.json", {"a": (8, 4)})
    doc["layers"]["a"]["in_features"] = 5
    with pytest.raises(MeasurementError, match=r"imported.json: shapes differ from the model: a: measured Nonex5, "
                                               r"model 8x4"):
        ms.check_layers(doc, "imported.json", {"a": (8, 4)})


def test_bench_merge_runs_small():
    result = testing.bench_merge(n_shards=4, n_layers=14, width=100)
    assert result["n_shards"] == 4 and result["merge_seconds"] > 0 and result["offline_merge_seconds"] > 0
    assert result["shard_bytes"] > result["merged_bytes"] > 0


def test_a_rank_killed_mid_write_leaves_no_partial_file(tmp_path):
    """SIGKILL after the data is written but before the rename: the target never exists half-written."""
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from ds_quant.files import measurements as ms\n"
        f"ms.atomic_write_json({str(tmp_path / 'stats.json')!r}, {{'old': 1}})\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"ms.atomic_write_json({str(tmp_path / 'stats.json')!r}, {{'new': 2}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert json.loads((tmp_path / "stats.json").read_text()) == {"old": 1}


# -- the schema: one Section per record kind, records built by its constructors ----------------------------------
def test_every_record_kind_is_built_validated_and_merged_by_its_section(tmp_path):
    """Linear, KV-cache and attention records made by the constructors the twins use round-trip through a shard
    file per rank and merge by their kind's rule; every file section is a Section of the table."""
    assert list(ms.SECTIONS) == ["layers", "kv", "attention"] and ms.SECTIONS["layers"] is ms.LINEAR
    stats = lambda ch: {"input_amax": max(ch), "input_channel_amax": ch, "output_amax": 1.0,  # noqa: E731
                        "weight_amax": 0.5, "samples": 3, "nonfinite_inputs": 1}
    docs = []
    for rank, (ch, heads) in enumerate((([1.0, 2.0, 3.0], [1.0, 4.0]), ([5.0, 0.5], [2.0]))):
        lin = {"down": ms.linear_record("row", 5, 8, stats(ch), local_in_features=len(ch), partition_sizes=(3, 2))}
        kv = {"l0.kv": ms.kv_record(0, 3, heads, [h / 2 for h in heads], 10 + rank)}
        att = {"l0.attn": ms.attention_record({"q": 1.0 + rank, "k": 2.0, "v": 3.0, "p": 1.0}, 4)}
        path = tmp_path / f"s{rank}.json"
        ms.atomic_write_json(path, ms.make_shard(lin, rank, 2, "maxabs", "bfloat16", kv=kv, attention=att, run="r"))
        docs.append(ms.load(path))
    merged = ms.merge(docs)
    assert merged["layers"]["down"]["input_channel_amax"] == [1.0, 2.0, 3.0, 5.0, 0.5]
    assert merged["layers"]["down"]["nonfinite_inputs"] == 2  # split input: the slices' counts add up
    assert merged["kv"]["l0.kv"]["key_head_amax"] == [1.0, 4.0, 2.0] and merged["kv"]["l0.kv"]["heads"] == 3
    assert merged["attention"]["l0.attn"]["q_amax"] == 2.0
    for key, section in ms.SECTIONS.items():  # each merged record has its section's keys, and only known ones
        for rec in merged[key].values():
            assert set(section.keys) <= set(rec) <= set(section.keys) | set(section.optional), (key, sorted(rec))
    path = tmp_path / "merged.json"
    ms.atomic_write_json(path, merged)
    assert ms.load(path)["kv"] == merged["kv"]


def test_record_constructors_refuse_what_the_schema_does_not_hold():
    ok = {"input_amax": 1.0, "input_channel_amax": None, "output_amax": None, "weight_amax": None, "samples": 0}
    with pytest.raises(MeasurementError, match="kind 'fused' is not one of column, row, lm-head, plain"):
        ms.linear_record("fused", 4, 4, ok)
    with pytest.raises(MeasurementError, match=r"statistics have keys .*'typo'"):
        ms.linear_record("plain", 4, 4, {**ok, "typo": 1})
    with pytest.raises(MeasurementError, match="2 key heads, 1 value heads"):
        ms.kv_record(0, 2, [1.0, 2.0], [1.0], 1)
    with pytest.raises(MeasurementError, match="operands"):
        ms.attention_record({"q": 1.0, "k": 1.0}, 1)


def test_a_file_from_before_the_sections_and_counts_existed_still_loads(tmp_path):
    """Version-1 files of earlier releases: no kv / attention sections, no nonfinite_inputs, no local slice."""
    old = {"format": ms.FORMAT, "version": 1, "kind": "merged", "observer": "maxabs", "dtype": "bfloat16",
           "world_size": 2, "fingerprint": "0" * 16,
           "layers": {"up": {"kind": "column", "in_features": 2, "out_features": 4, "input_amax": 2.0,
                             "input_channel_amax": [1.0, 2.0], "output_amax": None, "weight_amax": 0.5,
                             "samples": 7}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    doc = ms.load(path)
    assert doc["layers"]["up"]["input_channel_amax"] == [1.0, 2.0] and "kv" not in doc and "attention" not in doc
