"""Running unmodified scripts: the wrapper (launch/run.py), mpirun, the pipeline, two emulated nodes.

Unit tests check the pure command construction. The launches run tests/scripts/hf_text_generation.py, a
script written like the HF/DeepSpeed text-generation examples that never imports ds_quant:
  - deepspeed --num_gpus 2 (transformers 5.x): MEASURE then QUANTIZE through launch/measure_then_quantize.sh;
  - mpirun -np 2 (transformers 4.x, from the overlay `make setup` installs): MEASURE then QUANTIZE;
  - two network-namespace nodes, pdsh: MEASURE at 2 nodes x 1 rank, QUANTIZE at TP=1 on node 1.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ds_quant
from ds_quant import run
from ds_quant.config import QuantConfig
from ds_quant.errors import ConfigError
from ds_quant.parallel import dist
from tests.launcher import BIN, ROOT, free_port, run_ok

RUN_PY = str(ROOT / "launch" / "run.py")
SCRIPT = str(ROOT / "tests" / "scripts" / "hf_text_generation.py")
TF4 = ROOT / ".venv" / "transformers4"
N_LINEARS = 29  # tiny Llama: 4 layers x 7 + lm_head


def load_pipeline():
    spec = importlib.util.spec_from_file_location("measure_then_quantize", ROOT / "launch" / "measure_then_quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- unit: the wrapper's plan -------------------------------------------------------------------------------
def test_plan_splits_our_options_from_the_scripts():
    p = run.plan(["--quant-config", "q.json", "gen.py", "--model", "m", "--quant-config", "theirs.json"], {}, "/w")
    assert p.script == "/w/gen.py" and p.config_path == "/w/q.json"
    assert p.argv == ("gen.py", "--model", "m", "--quant-config", "theirs.json")  # theirs stays theirs
    assert p.env == {"QUANT_CONFIG": "/w/q.json"}


@pytest.mark.parametrize("given, forwarded", [
    (["--local_rank=1"], "--local_rank=1"), (["--local_rank", "1"], "--local_rank=1"),
    (["--local-rank=3"], "--local-rank=3")])
def test_plan_forwards_deepspeeds_local_rank_right_after_the_script(given, forwarded):
    p = run.plan([*given, "--quant-config=/c.json", "/s/gen.py", "--x", "1"], {}, "/w")
    assert p.argv == ("/s/gen.py", forwarded, "--x", "1") and p.config_path == "/c.json"


def test_plan_config_from_env_and_errors():
    assert run.plan(["gen.py"], {"QUANT_CONFIG": "rel/q.json"}, "/w").config_path == "/w/rel/q.json"
    assert run.plan(["--quant-config", "/a.json", "gen.py"], {"QUANT_CONFIG": "/b.json"}, "/").config_path == "/a.json"
    assert run.plan(["--quant-config", "a.json", "--", "-odd.py"], {}, "/w").script == "/w/-odd.py"
    with pytest.raises(run.UsageError, match="no config"):
        run.plan(["gen.py"], {}, "/w")
    with pytest.raises(run.UsageError, match="no script"):
        run.plan(["--quant-config", "a.json"], {}, "/w")
    with pytest.raises(run.UsageError, match="options for your script go after it"):
        run.plan(["--quant-config", "a.json", "--model", "m", "gen.py"], {}, "/w")
    with pytest.raises(run.UsageError, match="needs a value"):
        run.plan(["--quant-config"], {}, "/w")
    assert run.plan(["--quant-config", "a.json", "gen.py", "-h"], {}, "/w").argv == ("gen.py", "-h")  # the script's


def test_mpi_env_keeps_master_port_and_local_size():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "31234"}
    assert run.needs_mpi_discovery(env)
    assert run.mpi_env(3, 4, 1, "10.0.0.1", env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                     "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                                                     "MASTER_PORT": "31234"}
    assert run.mpi_env(0, 2, 0, "h", {})["MASTER_PORT"] == "29500"
    assert not run.needs_mpi_discovery({})  # not under mpirun
    assert not run.needs_mpi_discovery({**env, "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h"})  # launcher did it


def test_shm_allreduce_only_when_every_rank_is_local():
    assert dist.shm_allreduce_usable("2", 2)
    assert not dist.shm_allreduce_usable("1", 2)  # two nodes, one rank each: DeepSpeed's shm op would segfault
    assert not dist.shm_allreduce_usable(None, 2)


def test_pinned_config_ignores_a_quant_config_in_the_scripts_argv(monkeypatch):
    """Without pinning, the hook reads `--quant-config` from the script's argv: the clash the wrapper avoids."""
    import torch

    from ds_quant.hook import _wrap
    from ds_quant.layers.linear import Fp8Linear

    class Engine:
        def __init__(self, module):
            self.module = module

    monkeypatch.setattr(sys, "argv", ["gen.py", "--quant-config", "not-ours.json"])
    pinned = QuantConfig.from_dict({"method": "HOOKS", "mode": "QUANTIZE", "scale_method": "unit_scale"})
    engine = _wrap(Engine, pinned)(torch.nn.Sequential(torch.nn.Linear(16, 16)))
    assert isinstance(engine.module[0], Fp8Linear)
    with pytest.raises(ConfigError, match="not-ours.json"):
        _wrap(Engine)(torch.nn.Sequential(torch.nn.Linear(16, 16)))


def test_main_runs_the_script_as_main_and_treats_sys_exit_0_as_success(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "q.json"
    cfg.write_text(json.dumps({"method": "HOOKS", "mode": "QUANTIZE", "scale_method": "unit_scale"}))
    script = tmp_path / "scripts" / "user.py"
    script.parent.mkdir()
    script.write_text("import json, os, sys\n"
                      "json.dump({'argv': sys.argv, 'name': __name__, 'path0': sys.path[0],\n"
                      "           'env': os.environ['QUANT_CONFIG']}, open(sys.argv[-1], 'w'))\n"
                      "sys.exit(int(sys.argv[1]))\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("QUANT_CONFIG", "replaced-by-the-wrapper")
    out = tmp_path / "seen.json"
    try:
        assert run.main(["--quant-config", str(cfg), str(script), "0", str(out)]) == 0
        seen = json.loads(out.read_text())
        assert seen == {"argv": [str(script), "0", str(out)], "name": "__main__", "path0": str(script.parent),
                        "env": str(cfg)}
        with pytest.raises(SystemExit) as exc:
            run.main(["--quant-config", str(cfg), str(script), "3", str(out)])
        assert exc.value.code == 3
    finally:
        ds_quant.uninstall()
    assert run.main(["--quant-config", str(tmp_path / "missing.json"), str(script)]) == 2
    assert "missing.json: config file not found" in capsys.readouterr().err


# -- unit: the pipeline's commands ---------------------------------------------------------------------------
def test_pipeline_commands_for_deepspeed_and_mpirun():
    mtq = load_pipeline()
    args = mtq.parse_args(["--measure-config", "m.json", "--quantize-config", "q.json", "--measure-ranks", "2",
                           "--quantize-ranks", "1", "--master-port", "30001", "gen.py", "--model", "x"])
    (measure, env_m), (quantize, env_q) = mtq.commands(args, "/v/bin/python", "/v/bin")
    assert measure == ["/v/bin/deepspeed", "--num_gpus", "2", "--master_port", "30001", mtq.RUN_PY,
                       "--quant-config", "m.json", "gen.py", "--model", "x"] and env_m == {}
    assert quantize[:3] == ["/v/bin/deepspeed", "--num_gpus", "1"] and "q.json" in quantize
    args.launcher, args.hostfile = "mpirun", "hosts"
    (measure, env_m), (quantize, _) = mtq.commands(args, "/v/bin/python", "/v/bin")
    assert measure == ["/v/bin/mpirun", "-np", "2", "-x", "MASTER_PORT", "--hostfile", "hosts", "/v/bin/python",
                       mtq.RUN_PY, "--quant-config", "m.json", "gen.py", "--model", "x"]
    assert env_m == {"MASTER_PORT": "30001"} and "--hostfile" not in quantize  # quantize wherever it is run


def test_pipeline_rejects_configs_that_do_not_chain():
    mtq = load_pipeline()

    def cfg(mode, path="stats/a"):
        return QuantConfig.from_dict({"method": "HOOKS", "mode": mode, "dump_stats_path": path}, source=mode)

    assert mtq.check_configs(cfg("MEASURE"), cfg("QUANTIZE")) is None
    assert "needs QUANTIZE" in mtq.check_configs(cfg("MEASURE"), cfg("MEASURE"))
    assert "dump_stats_path differs" in mtq.check_configs(cfg("MEASURE"), cfg("QUANTIZE", "stats/b"))


# -- real launches ---------------------------------------------------------------------------------------------
def launch(cmd: list[str], cwd: Path, **env: str) -> str:
    return run_ok(cmd, cwd=cwd, **env)


def write_configs(work: Path, dump_stats_path: str = "stats/tiny") -> tuple[str, str]:
    paths = []
    for mode in ("MEASURE", "QUANTIZE"):
        path = work / f"{mode.lower()}.json"
        path.write_text(json.dumps({"method": "HOOKS", "mode": mode, "scale_method": "maxabs_hw",
                                    "dump_stats_path": dump_stats_path}))
        paths.append(str(path))
    return paths[0], paths[1]


def runs_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_module_types(run_: dict, cls: str, world_size: int) -> None:
    assert run_["world_size"] == world_size and run_["name"] == "__main__"
    assert list(run_["module_types"].values()) == [cls] * N_LINEARS, run_["module_types"]
    if cls == "Fp8Linear":
        assert run_["weight_dtypes"] == ["torch.float8_e4m3fn"]
    assert run_["new_tokens"] == 8


def assert_merged(stats: Path, world_size: int) -> None:
    merged = json.loads((stats / "tiny.json").read_text())
    assert merged["kind"] == "merged" and merged["world_size"] == world_size and len(merged["layers"]) == N_LINEARS
    assert len(merged["layers"]["model.layers.0.mlp.down_proj"]["input_channel_amax"]) == 352  # full width


@pytest.mark.distributed
def test_deepspeed_tp2_measure_then_quantize_unmodified_script(tiny_model, tmp_path):
    """Through launch/measure_then_quantize.sh: two `deepspeed --num_gpus 2 launch/run.py` runs. The script
    ends with sys.exit(0) and never finishes measurements; it has its own --local_rank and --quant-config."""
    measure_cfg, quantize_cfg = write_configs(tmp_path)
    out = launch([str(ROOT / "launch" / "measure_then_quantize.sh"), "--measure-config", measure_cfg,
                  "--quantize-config", quantize_cfg, "--measure-ranks", "2", "--quantize-ranks", "2",
                  "--master-port", str(free_port()), SCRIPT, "--model", tiny_model, "--quant-config", "theirs.json",
                  "--tp_style", "mp_size", "--exit_with_sys_exit", "--report", "runs_{rank}.jsonl"],
                 cwd=tmp_path, PYTHON=sys.executable)
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["tiny.json", "tiny_0_2.json", "tiny_1_2.json"]
    assert_merged(tmp_path / "stats", 2)
    for rank in (0, 1):
        measured, quantized = runs_of(tmp_path / f"runs_{rank}.jsonl")
        assert_module_types(measured, "MeasuredLinear", 2)
        assert_module_types(quantized, "Fp8Linear", 2)
        assert measured["argv"] == [SCRIPT, f"--local_rank={rank}", "--model", tiny_model, "--quant-config",
                                    "theirs.json", "--tp_style", "mp_size", "--exit_with_sys_exit", "--report",
                                    "runs_{rank}.jsonl"]
        assert measured["local_rank"] == rank and measured["unrelated_quant_config"] == "theirs.json"
        assert measured["sys_path0"] == str(Path(SCRIPT).parent) and measured["quant_config_env"] == measure_cfg
        assert measured["transformers"].startswith("5.")
    assert "[ds_quant rank 1] INFO wrote stats/tiny_1_2.json" in out
    assert out.count("INFO summary: hf_text_generation.py finished") == 2  # once per run, rank 0 only
    assert "[ds_quant rank 0] INFO summary: hf_text_generation.py finished; QUANTIZE" in out


@pytest.mark.distributed
@pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="no mpirun in the venv: run `make setup`")
@pytest.mark.skipif(not (TF4 / "transformers").is_dir(), reason="no transformers 4.x overlay: run `make setup`")
def test_mpirun_np2_measure_then_quantize_under_transformers4(tiny_model, tmp_path):
    """mpirun starts plain processes: the wrapper discovers ranks with mpi4py; the script also initialises
    distributed itself, and uses the newer `tensor_parallel=` style. transformers 4.x comes first on the path."""
    measure_cfg, quantize_cfg = write_configs(tmp_path)
    pythonpath = os.pathsep.join(p for p in (str(TF4), os.environ.get("PYTHONPATH")) if p)
    outs = [
        launch([str(BIN / "mpirun"), "-np", "2", "--oversubscribe", "-x", "MASTER_PORT", "-x", "PYTHONPATH",
                sys.executable, RUN_PY, "--quant-config", cfg, SCRIPT, "--model", tiny_model,
                "--tp_style", "tensor_parallel", "--init_distributed", "--report", "runs_{rank}.jsonl"],
               cwd=tmp_path, MASTER_PORT=str(free_port()), PYTHONPATH=pythonpath)
        for cfg in (measure_cfg, quantize_cfg)]
    assert "[ds_quant rank 1] INFO wrote stats/tiny_1_2.json" in outs[0]
    assert "[ds_quant rank 0] INFO QUANTIZE with measurements from stats/tiny.json" in outs[1]
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["tiny.json", "tiny_0_2.json", "tiny_1_2.json"]
    assert_merged(tmp_path / "stats", 2)
    for rank in (0, 1):
        measured, quantized = runs_of(tmp_path / f"runs_{rank}.jsonl")
        assert_module_types(measured, "MeasuredLinear", 2)
        assert_module_types(quantized, "Fp8Linear", 2)
        assert quantized["transformers"].startswith("4.") and quantized["dist_initialized"]
        assert quantized["argv"][1:3] == ["--model", tiny_model]  # no --local_rank: mpirun passes none


# -- two emulated nodes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two network-namespace nodes with sshd; skipped, with the reason, where the machine cannot make them."""
    script = str(ROOT / "launch" / "emulate_nodes.sh")
    state = tmp_path_factory.mktemp("nodes")
    env = {**os.environ, "DSQ_NODES_ID": f"t{os.getpid() % 100000}", "DSQ_NODES_STATE": str(state)}
    check = subprocess.run([script, "check"], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"two emulated nodes unavailable: {check.stderr.strip()}")
    shutil.rmtree(state)
    up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield script, state, env
    finally:
        subprocess.run([script, "down"], env=env, capture_output=True, text=True)


@pytest.mark.distributed
def test_two_nodes_pdsh_measure_then_quantize_at_another_size(nodes, tiny_model, tmp_path):
    script, state, env = nodes
    # `local` is a different directory on each node: shards stay where their rank ran.
    measure_cfg, quantize_cfg = write_configs(tmp_path, f"{state}/local/stats/tiny")
    exec_on_1 = [script, "exec", "1"]
    ids = {"DSQ_NODES_ID": env["DSQ_NODES_ID"], "DSQ_NODES_STATE": env["DSQ_NODES_STATE"]}
    out = launch([*exec_on_1, str(BIN / "deepspeed"), "--hostfile", str(ROOT / "hostfiles" / "emulated_nodes"),
                  "--launcher", "pdsh", "--num_gpus", "1", "--master_port", str(free_port()), RUN_PY,
                  "--quant-config", measure_cfg, SCRIPT, "--model", tiny_model, "--report", "m_{rank}.jsonl"],
                 cwd=tmp_path, **ids)
    assert sorted(p.name for p in (state / "dsq-node1.local" / "stats").iterdir()) == ["tiny.json", "tiny_0_2.json"]
    assert sorted(p.name for p in (state / "dsq-node2.local" / "stats").iterdir()) == ["tiny_1_2.json"]
    assert not any((state / "local").iterdir())  # nothing leaked to the host's view
    assert_merged(state / "dsq-node1.local" / "stats", 2)
    for rank in (0, 1):
        (measured,) = runs_of(tmp_path / f"m_{rank}.jsonl")
        assert_module_types(measured, "MeasuredLinear", 2)
    assert "dsq-node2: [ds_quant rank 1] INFO wrote" in out and "nnodes=2" in out

    out = launch([*exec_on_1, str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()), RUN_PY,
                  "--quant-config", quantize_cfg, SCRIPT, "--model", tiny_model, "--report", "q_{rank}.jsonl"],
                 cwd=tmp_path, **ids)
    (quantized,) = runs_of(tmp_path / "q_0.jsonl")
    assert_module_types(quantized, "Fp8Linear", 1)
    assert "(measured at world size 2)" in out

    # QUANTIZE on both nodes with the measurements on node 1 only (node 2's own shard moved away: it holds no
    # measurement file at all): rank 0 reads the merged file and broadcasts it, nothing is copied by hand.
    node1, node2 = state / "dsq-node1.local" / "stats", state / "dsq-node2.local" / "stats"
    (node2 / "tiny_1_2.json").rename(tmp_path / "tiny_1_2.json")
    hostfile = ["--hostfile", str(ROOT / "hostfiles" / "emulated_nodes"), "--launcher", "pdsh", "--num_gpus", "1"]

    def quantize_on_both(tag: str) -> str:
        out = launch([*exec_on_1, str(BIN / "deepspeed"), *hostfile, "--master_port", str(free_port()), RUN_PY,
                      "--quant-config", quantize_cfg, SCRIPT, "--model", tiny_model, "--report", f"{tag}_{{rank}}.jsonl"],
                     cwd=tmp_path, **ids)
        for rank in (0, 1):
            (quantized,) = runs_of(tmp_path / f"{tag}_{rank}.jsonl")
            assert_module_types(quantized, "Fp8Linear", 2)
        return out

    out = quantize_on_both("q2")
    local = f"{state}/local/stats/tiny"  # the path every node's config names: node-local on each
    assert f"[ds_quant rank 0] INFO QUANTIZE with measurements from {local}.json" in out
    assert f"dsq-node2: [ds_quant rank 1] INFO QUANTIZE with measurements from {local}.json" in out
    assert sorted(p.name for p in node2.iterdir()) == []  # nothing was copied to node 2

    # No merged file anywhere, each node holding its own rank's shard: the shards are read where they are,
    # gathered and merged the same way on every rank.
    (node1 / "tiny.json").unlink()
    (tmp_path / "tiny_1_2.json").rename(node2 / "tiny_1_2.json")
    out = quantize_on_both("q3")
    assert f"the 2 shards of {local} (no merged file)" in out
