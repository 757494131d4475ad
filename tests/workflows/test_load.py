"""Loading FP8 checkpoints (issue 14): on meta with each rank reading its slices (TP=1 here, TP=2 and 4 through the
real launcher), quantize-on-load from a bf16 folder, errors on bad folders.

Numerics: a checkpoint load must give logits *bitwise* equal to in-memory QUANTIZE at the same TP size (the
folder's FP8 weight is the same elementwise cast with the same model-level scale), so equality is exact, no
tolerance.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_quant.errors import CheckpointError
from ds_quant.files import safetensors as st_io
from ds_quant.files.checkpoint import Fp8Folder
from ds_quant.layers.experts import Fp8Experts
from ds_quant.layers.linear import Fp8Linear
from ds_quant.workflows import hf_model
from ds_quant.workflows.convert import convert
from tests.launcher import ROOT, deepspeed
from tests.workflows.fp8_folders import from_folder, in_memory, logits, same


# -- loading at TP=1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama_hw", "llama_pcs", "neox_block_head"])
def test_fp8_folder_loads_bitwise_equal_to_in_memory_quantize(work, case):
    w, cases = work
    src, config = cases[case]
    ref = logits(in_memory(src, config))
    m = from_folder(w / f"fp8_{case}", config)
    fp8 = {n: x for n, x in m.named_modules() if isinstance(x, Fp8Linear)}
    assert len(fp8) == len(Fp8Folder(w / f"fp8_{case}").layers) > 0
    assert all(x.weight.dtype == torch.float8_e4m3fn for x in fp8.values())
    assert not any(p.device.type == "meta" for p in m.parameters())
    assert torch.equal(logits(m), ref)


@pytest.mark.parametrize("case", ["llama_pcs", "neox_block_head"])
def test_quantize_on_load_is_bitwise_equal_to_in_memory_quantize(work, case):
    """A bf16 folder + measurements on the same meta path ("quantize_on_load": true): each linear read, quantized,
    sliced, freed."""
    w, cases = work
    src, config = cases[case]
    ref = logits(in_memory(src, config))
    m = from_folder(src, {**config, "quantize_on_load": True})
    assert sum(isinstance(x, Fp8Linear) for x in m.modules()) == (29 if case.startswith("llama") else 8)
    assert torch.equal(logits(m), ref)


@pytest.mark.parametrize("case", ["mixtral_hw", "qwen3_moe_pcs"])
def test_moe_folder_and_quantize_on_load_are_bitwise_in_memory_quantize(work, case, monkeypatch):
    """Fused experts from an FP8 folder (Fp8Experts filled from the per-expert FP8 linears, no bf16 expert weight
    made) and by quantize-on-load (one expert's bf16 slice read, quantized, freed): the same modules, the same
    FP8 weights and scales bit for bit, the same logits as in-memory QUANTIZE. Routers stay bf16; Qwen3-MoE's
    layer-1 experts are blocked: bf16, assembled from their per-expert linears."""
    w, cases = work
    src, config = cases[case]
    ref_model = in_memory(src, config)
    ref = logits(ref_model)
    ref_experts = {n: x for n, x in ref_model.named_modules() if isinstance(x, Fp8Experts)}
    assert len(ref_experts) == (2 if case.startswith("mixtral") else 1)

    reads, read = [], st_io.SafetensorsFile.read

    def logged(self, key, *args, **kwargs):
        t = read(self, key, *args, **kwargs)
        reads.append((key, t.dtype, tuple(t.shape)))
        return t

    monkeypatch.setattr(st_io.SafetensorsFile, "read", logged)
    for how, path in (("folder", w / f"fp8_{case}"), ("quantize_on_load", src)):
        reads.clear()
        m = from_folder(path, {**config, "quantize_on_load": True} if how == "quantize_on_load" else config)
        # the quantized experts' weights: FP8 from a folder, one expert's bf16 linear at a time on quantize-on-load
        blocked = ".layers.1." if case.startswith("qwen3") else "-"  # Qwen3-MoE's blocked block: bf16, as stored
        expert_reads = [(k, d, s) for k, d, s in reads if ".experts." in k and k.endswith(".weight")
                        and blocked not in k]
        assert expert_reads and all(len(s) == 2 for _, _, s in expert_reads)
        assert all(d == (torch.float8_e4m3fn if how == "folder" else torch.bfloat16) for _, d, _ in expert_reads)
        assert not any(p.device.type == "meta" for p in m.parameters())
        got = {n: x for n, x in m.named_modules() if isinstance(x, Fp8Experts)}
        assert sorted(got) == sorted(ref_experts), how
        for n, x in got.items():
            assert x.gate_up_proj.dtype == x.down_proj.dtype == torch.float8_e4m3fn
            state, want = x.state_dict(), ref_experts[n].state_dict()
            assert sorted(state) == sorted(want) and all(same(state[k], want[k]) for k in want), (how, n)
        per_channel = case.endswith("pcs")
        x = got["model.layers.0.mlp.experts"]
        assert x.gate_up_proj_scale.shape == ((4, x.gate_up_proj.shape[1]) if per_channel else (4,))
        assert x.gate_up_proj_input_scale.shape == (4,)
        router = m.model.layers[0].mlp.gate
        assert router.weight.dtype == torch.bfloat16 and "Router" in type(router).__name__
        if case.startswith("qwen3"):
            blocked = m.model.layers[1].mlp.experts
            assert type(blocked).__name__ == "Qwen3MoeExperts" and blocked.gate_up_proj.dtype == torch.bfloat16
            assert torch.equal(blocked.gate_up_proj, ref_model.model.layers[1].mlp.experts.gate_up_proj)
        assert sum(isinstance(y, Fp8Linear) for y in m.modules()) == \
            sum(isinstance(y, Fp8Linear) for y in ref_model.modules())
        assert torch.equal(logits(m), ref), how


# -- errors ----------------------------------------------------------------------------------------------------
def _copy(w: Path, name: str, src: str = "fp8_llama_hw") -> Path:
    dst = w / f"bad_{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w / src, dst)
    return dst


def test_truncated_or_corrupt_folder_gives_one_error_naming_file_and_tensor(work):
    from safetensors.torch import load_file, save_file

    w, _ = work
    bad = _copy(w, "truncated")
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file .*truncated or corrupt"):
        Fp8Folder(bad)
    st.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        Fp8Folder(bad)
    bad = _copy(w, "zero_scale")
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight_scale"].zero_()
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight_scale' holds zero"):
        Fp8Folder(bad)
    t["model.layers.1.mlp.up_proj.weight_scale"].fill_(0.01)
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    save_file(t, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is BF16 .*expected a 2-D F8_E4M3"):
        Fp8Folder(bad)


def test_wrapped_script_on_a_truncated_folder_ends_in_one_line(work, tmp_path):
    """`python -m ds_quant.run` with a script that loads a truncated FP8 folder: the CheckpointError (raised inside
    the user's from_pretrained) ends the run in one line naming the file, no traceback, a non-zero exit."""
    w, cases = work
    bad = _copy(w, "truncated_run")
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (tmp_path / "q.json").write_text(json.dumps(cases["llama_hw"][1]))
    script = tmp_path / "load.py"
    script.write_text("import sys\nfrom transformers import AutoModelForCausalLM\n"
                      "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-m", "ds_quant.run", "--quant-config", str(tmp_path / "q.json"), str(script),
                        str(bad)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    lines = [x for x in out.splitlines() if "model.safetensors" in x]
    assert len(lines) == 1 and "ERROR" in lines[0] and "not a readable safetensors file" in lines[0], out[-3000:]


def test_bad_expert_tensors_give_one_error_naming_file_and_tensor(work, monkeypatch):
    """An FP8 folder whose expert linear has the wrong shape, is not FP8, lacks its weight_scale or (alone among
    its block) its input_scale; a bf16 source for quantize-on-load with a wrong expert shape: one line naming the
    file and the tensor as the file spells it (`block_sparse_moe.`; the model says `mlp.`)."""
    from safetensors.torch import load_file, save_file

    w, cases = work
    config = cases["mixtral_hw"][1]
    e1 = "model.layers.0.block_sparse_moe.experts.1"
    file = r"bad_\w+/model\.safetensors: "
    # the file's name; where the folder is read for the model, also the model's
    named = re.escape(f"'{e1}.w3.weight'") + "(" + re.escape(" (the model's 'model.layers.0.mlp.experts.1.w3.weight')") + ")?"
    edits = [
        ("shape", lambda t: t.update({f"{e1}.w3.weight": t[f"{e1}.w3.weight"][:255].contiguous()}),
         file + "tensor " + named + r" is F8_E4M3 \[255, 128\], expected a 2-D F8_E4M3 weight \[256, 128\] \(expert 1 "
         r"of 'model\.layers\.0\.mlp\.experts\.gate_up_proj'\)"),
        ("bf16", lambda t: t.update({f"{e1}.w3.weight": t[f"{e1}.w3.weight"].to(torch.bfloat16)}),
         file + "tensor " + named + r" is BF16 \[256, 128\], expected a 2-D F8_E4M3"),
        ("no_scale", lambda t: t.pop(f"{e1}.w3.weight_scale"),
         file + "tensor " + named + " is F8_E4M3 but the file has no weight_scale beside it"),
        ("no_input_scale", lambda t: t.pop(f"{e1}.w3.input_scale"),
         file + "no input_scale beside tensor " + named + ", which the other experts of "
         r"'model\.layers\.0\.mlp\.experts' have"),
    ]
    for name, edit, message in edits:
        bad = _copy(w, f"moe_{name}", "fp8_mixtral_hw")
        t = load_file(bad / "model.safetensors")
        edit(t)
        save_file(t, bad / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            from_folder(bad, config)
    bad = w / "bad_moe_source"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(cases["mixtral_hw"][0], bad)
    t = load_file(bad / "model.safetensors")
    t[f"{e1}.w2.weight"] = t[f"{e1}.w2.weight"][:, :200].contiguous()
    save_file(t, bad / "model.safetensors")
    monkeypatch.setenv(hf_model.QUANTIZE_ON_LOAD_ENV, "1")  # the env override: quantize-on-load without the key
    with pytest.raises(CheckpointError, match=file + re.escape(f"tensor '{e1}.w2.weight' (the model's "
                                                               "'model.layers.0.mlp.experts.1.w2.weight') is BF16 "
                                                               "[128, 200], expected a 2-D float weight [128, 256]")):
        from_folder(bad, config)
    monkeypatch.delenv(hf_model.QUANTIZE_ON_LOAD_ENV)
    with pytest.raises(CheckpointError, match=file + re.escape(f"tensor '{e1}.w2.weight' (the model's")):
        convert(bad, w / "never_written", config, progress=False)
    assert not (w / "never_written").exists()


def test_folder_with_different_gate_and_up_scales_loads_with_per_row_scales(work, caplog_ds):
    """A folder written elsewhere (llm-compressor scales w1 and w3 apart): gate and up rows keep their own weight
    scales (per-row scales, the same dequantized weights), and differing gate / up input scales take the larger
    (they share one input), logged."""
    from safetensors.torch import load_file, save_file

    w, cases = work
    bad = _copy(w, "moe_split_scales", "fp8_mixtral_hw")
    t = load_file(bad / "model.safetensors")
    e1 = "model.layers.0.block_sparse_moe.experts.1"
    up_scale, up_input = t[f"{e1}.w3.weight_scale"] * 2, t[f"{e1}.w3.input_scale"] * 3
    t[f"{e1}.w3.weight_scale"], t[f"{e1}.w3.input_scale"] = up_scale, up_input
    save_file(t, bad / "model.safetensors")
    m = from_folder(bad, cases["mixtral_hw"][1])
    x = m.model.layers[0].mlp.experts
    assert x.gate_up_proj_scale.shape == (4, 512)  # per row: gate rows [0, 256), up rows [256, 512)
    assert torch.equal(x.gate_up_proj_scale[1, 256:], up_scale.expand(256))
    assert torch.equal(x.gate_up_proj_scale[1, :256], t[f"{e1}.w1.weight_scale"].expand(256))
    assert torch.equal(x.gate_up_proj_scale[2], t[f"{e1[:-1]}2.w1.weight_scale"].expand(512))
    assert x.gate_up_proj_input_scale[1] == up_input.max() > t[f"{e1}.w1.input_scale"].max()
    assert "model.layers.0.mlp.experts.gate_up_proj: expert 1's gate and up input scales differ" in caplog_ds.text
    assert m.model.layers[1].mlp.experts.gate_up_proj_scale.shape == (4,)  # the other layer: as written
    assert torch.isfinite(logits(m)).all()


def test_folder_of_another_model_is_refused_naming_the_layer(work):
    w, cases = work
    bad = _copy(w, "other_model")
    c = json.loads((bad / "config.json").read_text())
    c["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.0\.mlp\.gate_proj' is \[352, 128\] in the "
                                              r"checkpoint, \[256, 128\] in the model"):
        from_folder(bad, cases["llama_hw"][1])


# -- TP=2 through the real launcher ---------------------------------------------------------------------------
@pytest.mark.distributed
def test_fp8_folder_at_tp2_equals_in_memory_quantize(work):
    """One launch, five cases from FP8 folders and three quantize-on-load: column / row / lm-head slices (uneven
    MLP split in the tiny Llama: 352 rows), per-channel scales and a dynamic lm_head, GPT-NeoX's fused qkv (rows of
    three sub-parameters) with biases, a blocked lm_head read as bf16 slices; fused MoE experts (Mixtral per
    tensor, Qwen3-MoE per channel with a blocked block), which AutoTP leaves whole: every rank holds all experts."""
    w, cases = work
    plan = []
    for name, (src, config) in cases.items():
        (w / f"{name}.json").write_text(json.dumps(config))
        plan.append({"name": name, "bf16": str(src), "fp8": str(w / f"fp8_{name}"), "config": str(w / f"{name}.json")})
    for name in ("llama_pcs", "neox_block_head", "mixtral_hw"):  # quantize-on-load: the bf16 folder, same meta path
        (w / f"{name}_qol.json").write_text(json.dumps({**cases[name][1], "quantize_on_load": True}))
        plan.append({**plan[[p["name"] for p in plan].index(name)], "name": f"{name}_qol",
                     "fp8": str(cases[name][0]), "load_config": str(w / f"{name}_qol.json")})
    # rank 1 alone gets a folder of another model (its MLP shapes differ): every rank stops with the same one line
    other = _copy(w, "other_model_rank1")
    c = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**c, "intermediate_size": 256}))
    plan.append({**plan[0], "name": "other_model_on_rank1", "fp8_rank1": str(other)})
    (w / "plan.json").write_text(json.dumps(plan))
    deepspeed(2, ROOT / "tests" / "scripts" / "fp8_checkpoint_tp.py", str(w / "plan.json"), str(w / "tp2"),
              cwd=w, timeout=600)
    for rank in (0, 1):
        res = json.loads((w / f"tp2_{rank}.json").read_text())
        fault = res.pop("other_model_on_rank1")
        print(f"rank {rank} seconds per case:", {n: round(r["seconds"], 1) for n, r in res.items()})
        assert fault["error"] == "RankError" and fault["message"] == (
            "loading the FP8 checkpoint: rank 1: " + str(other) + ": layer 'model.layers.0.mlp.gate_proj' is "
            "[352, 128] in the checkpoint, [256, 128] in the model; the checkpoint is for another model"), fault
        for name, r in res.items():
            assert r["equal"], (rank, name, r["max_abs_diff"])
            assert r["params_on_meta_before_init_inference"] > 0 and r["params_on_meta_after"] == 0
            assert all(x["dtype"] == "torch.float8_e4m3fn" for x in r["fp8_layers"].values())
        llama = res["llama_hw"]["fp8_layers"]
        assert llama["model.layers.0.self_attn.o_proj"]["ds_class"] == "LinearAllreduce"
        assert llama["model.layers.0.self_attn.o_proj"]["shape"] == [128, 64]
        assert llama["lm_head"]["ds_class"] == "LmHeadLinearAllreduce"
        up = llama["model.layers.0.mlp.up_proj"]["shape"][0]
        assert 0 < up < 352 and len(llama) == 29
        neox = res["neox_block_head"]
        assert neox["fp8_layers"]["gpt_neox.layers.0.attention.query_key_value"]["ds_class"] == "fused_LinearLayer"
        assert neox["fp8_layers"]["gpt_neox.layers.0.attention.query_key_value"]["shape"] == [192, 128]
        assert neox["other_linears"]["lm_head"][1] == "torch.bfloat16"
        for name in ("mixtral_hw", "mixtral_hw_qol", "qwen3_moe_pcs"):
            experts = res[name]["experts"]
            fp8 = {n: x for n, x in experts.items() if x["type"] == "Fp8Experts"}
            assert len(fp8) == (1 if name.startswith("qwen3") else 2) and len(experts) == 2, (name, experts)
            assert all(x["dtype"] == "torch.float8_e4m3fn" for x in fp8.values())
            assert all(x["same_as_in_memory"] for x in experts.values()), (rank, name)
        whole = res["mixtral_hw"]["experts"]["model.layers.1.mlp.experts"]
        assert whole["shapes"] == [[4, 512, 128], [4, 128, 256]] and whole["scale_shape"] == [4]
        qwen = res["qwen3_moe_pcs"]["experts"]
        assert qwen["model.layers.0.mlp.experts"]["scale_shape"] == [4, 256]
        assert qwen["model.layers.1.mlp.experts"]["type"] == "Qwen3MoeExperts"
        assert qwen["model.layers.1.mlp.experts"]["dtype"] == "torch.bfloat16"


@pytest.mark.distributed
def test_fp8_folder_at_tp4_equals_in_memory_quantize(work):
    """The round trip at TP=4 (4 ranks on this machine's cores, ~25 s): GPT-NeoX (4 heads: one per rank; fused qkv
    rows of three sub-parameters, biases, a bf16 lm_head read as slices) and the tiny Llama per channel with a
    dynamic lm_head (2 KV heads over 4 ranks: DeepSpeed's own split), from their FP8 folders: logits bitwise equal
    to in-memory QUANTIZE at TP=4."""
    w, cases = work
    plan = [{"name": n, "bf16": str(cases[n][0]), "fp8": str(w / f"fp8_{n}"), "config": str(w / f"{n}.json")}
            for n in ("neox_block_head", "llama_pcs")]
    for n in ("neox_block_head", "llama_pcs"):
        (w / f"{n}.json").write_text(json.dumps(cases[n][1]))
    (w / "plan4.json").write_text(json.dumps(plan))
    deepspeed(4, ROOT / "tests" / "scripts" / "fp8_checkpoint_tp.py", str(w / "plan4.json"), str(w / "tp4"),
              cwd=w, timeout=600, OMP_NUM_THREADS="1")
    for rank in range(4):
        res = json.loads((w / f"tp4_{rank}.json").read_text())
        for name, r in res.items():
            assert r["equal"], (rank, name, r["max_abs_diff"])
            assert r["params_on_meta_before_init_inference"] > 0 and r["params_on_meta_after"] == 0
            assert all(x["dtype"] == "torch.float8_e4m3fn" for x in r["fp8_layers"].values())
        qkv = res["neox_block_head"]["fp8_layers"]["gpt_neox.layers.0.attention.query_key_value"]
        assert qkv["shape"] == [96, 128]  # 3 x 128 rows over 4 ranks
        o_proj = res["llama_pcs"]["fp8_layers"]["model.layers.0.self_attn.o_proj"]
        assert o_proj["ds_class"] == "LinearAllreduce" and o_proj["shape"][0] == 128 and o_proj["shape"][1] < 128

