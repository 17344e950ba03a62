"""``import --into`` writes a Hugging Face model's weights (and its ``quantizer_state/``) into a copy of a
torch_dist checkpoint: importing the model the checkpoint holds gives back every key's tensor bit for bit;
changed weights land where Megatron stores them (q/k/v interleaved per query group, gate rows in
``weight_w``, up rows in ``weight_v``, a stacked key's layer at its index); ``--only quantizers`` is
today's import; a missing weight, a contradicting shape and a lossy dtype are refused by name with nothing
written.

The HF directory is built here by hand from the checkpoint's tensors as plain
``torch.distributed.checkpoint.load`` returns them (the layout the fixture README documents: 4 heads, 2
query groups, head_dim 16), never with quantmap's own ops; its ``quantizer_state/`` is a ``--format
quantizers`` export."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from typer.testing import CliRunner

from quantmap.cli import app
from quantmap.io.torch_dist import locate, read_entries
from quantmap.io.torch_dist.write import OWN_FILES

DATA = Path(__file__).parent / "data" / "dcp"
SIZES = ("-p", "num_attention_heads=4", "-p", "num_query_groups=2", "-p", "head_dim=16")
GROUPS, Q_ROWS, HEAD_DIM = 2, 32, 16  # per query group: 2 query heads of 16 rows, then k, then v
LAYERS = 2


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _load(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP directory, whole, as plain torch loads it in one process."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return state


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.reshape(-1).view(torch.uint8).equal(
        b.reshape(-1).view(torch.uint8))


def hf_weights(megatron: dict[str, torch.Tensor], stacked: bool = False) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's tensors from Megatron's, by hand (``stacked``: layers on a leading axis)."""
    def layer(name: str, index: int) -> torch.Tensor:
        return megatron[f"decoder.layers.{name}"][index] if stacked else megatron[f"decoder.layers.{index}.{name}"]

    out = {"model.embed_tokens.weight": megatron["embedding.word_embeddings.weight"],
           "model.norm.weight": megatron["decoder.final_layernorm.weight"],
           "lm_head.weight": megatron["output_layer.weight"]}
    for index in range(LAYERS):
        h = f"model.layers.{index}."
        qkv = layer("self_attention.linear_qkv.weight", index)
        grouped = qkv.reshape(GROUPS, Q_ROWS + 2 * HEAD_DIM, qkv.shape[1])
        out |= {h + "self_attn.q_proj.weight": grouped[:, :Q_ROWS].reshape(-1, qkv.shape[1]),
                h + "self_attn.k_proj.weight": grouped[:, Q_ROWS:Q_ROWS + HEAD_DIM].reshape(-1, qkv.shape[1]),
                h + "self_attn.v_proj.weight": grouped[:, Q_ROWS + HEAD_DIM:].reshape(-1, qkv.shape[1]),
                h + "self_attn.o_proj.weight": layer("self_attention.linear_proj.weight", index),
                h + "mlp.gate_proj.weight": layer("mlp.linear_fc1.weight_w", index),
                h + "mlp.up_proj.weight": layer("mlp.linear_fc1.weight_v", index),
                h + "mlp.down_proj.weight": layer("mlp.linear_fc2.weight", index),
                h + "input_layernorm.weight": layer("self_attention.linear_qkv.layer_norm_weight", index),
                h + "post_attention_layernorm.weight": layer("mlp.linear_fc1.layer_norm_weight", index)}
    return {name: tensor.contiguous() for name, tensor in out.items()}


def write_hf(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A sharded HF directory (one shard and its index), as save_pretrained lays it out."""
    directory.mkdir(parents=True, exist_ok=True)
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, directory / shard)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict.fromkeys(sorted(tensors), shard)}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def hf_model(tmp_path: Path, fixture: str, change=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """The fixture's model as a HF directory with its quantizer_state/; ``change(tensors)`` edits the weights
    first. Returns the directory and the checkpoint's tensors as plain torch read them."""
    source = locate(DATA / fixture / "ckpt").path
    megatron = _load(source)
    tensors = hf_weights(megatron)
    if change is not None:
        change(tensors)
    hf = tmp_path / f"hf-{fixture}"
    write_hf(hf, tensors)
    exported = _invoke("export", "llama", "--megatron", DATA / fixture / "ckpt", "--out", tmp_path / "q", "--quiet",
                       *SIZES)
    assert exported.exit_code == 0, exported.output
    shutil.move(tmp_path / "q", hf / "quantizer_state")
    return hf, megatron


@pytest.mark.parametrize("fixture", ["fp8_kv_tp1", "fp8_kv_tp2", "int8_tp2"])
def test_importing_the_model_a_checkpoint_holds_gives_back_every_tensor_bit_for_bit(fixture, tmp_path):
    hf, megatron = hf_model(tmp_path, fixture)
    before = _tree_digest(DATA / fixture / "ckpt")
    result = _invoke("import", "llama", "--hf", hf, "--into", DATA / fixture / "ckpt", "--out", tmp_path / "new",
                     *SIZES)
    assert result.exit_code == 0, result.output
    assert _tree_digest(DATA / fixture / "ckpt") == before, "the original is untouched"
    written = locate(tmp_path / "new").path
    back = _load(written)
    assert sorted(back) == sorted(megatron)
    assert all(_identical(back[key], megatron[key]) for key in megatron), \
        [key for key in megatron if not _identical(back[key], megatron[key])]
    entries = read_entries(written)
    assert all(entries[key].chunks[0].file.startswith(OWN_FILES) for key in megatron), "every tensor was written"
    assert [(e.dtype, e.shape, [(c.offsets, c.sizes) for c in e.chunks]) for e in entries.values() if e.dtype] == \
        [(e.dtype, e.shape, [(c.offsets, c.sizes) for c in e.chunks]) for e in read_entries(
            locate(DATA / fixture / "ckpt").path).values() if e.dtype], "dtypes, shapes and chunks as saved"


def _changed(tensors: dict[str, torch.Tensor]) -> None:
    """Each HF weight of a kind given its own offset, so that where it lands says where it went."""
    for name, offset in (("model.layers.1.self_attn.q_proj.weight", 1), ("model.layers.1.self_attn.k_proj.weight", 2),
                         ("model.layers.1.self_attn.v_proj.weight", 3), ("model.layers.0.mlp.gate_proj.weight", 4),
                         ("model.layers.0.mlp.up_proj.weight", 5), ("lm_head.weight", 6),
                         ("model.layers.1.post_attention_layernorm.weight", 7)):
        tensors[name] = tensors[name] + offset


def _expected_after_change(megatron: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    want = dict(megatron)
    qkv = megatron["decoder.layers.1.self_attention.linear_qkv.weight"].clone()
    grouped = qkv.view(GROUPS, Q_ROWS + 2 * HEAD_DIM, -1)
    grouped[:, :Q_ROWS] += 1
    grouped[:, Q_ROWS:Q_ROWS + HEAD_DIM] += 2
    grouped[:, Q_ROWS + HEAD_DIM:] += 3
    want["decoder.layers.1.self_attention.linear_qkv.weight"] = qkv
    want["decoder.layers.0.mlp.linear_fc1.weight_w"] = megatron["decoder.layers.0.mlp.linear_fc1.weight_w"] + 4
    want["decoder.layers.0.mlp.linear_fc1.weight_v"] = megatron["decoder.layers.0.mlp.linear_fc1.weight_v"] + 5
    want["output_layer.weight"] = megatron["output_layer.weight"] + 6
    want["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"] = \
        megatron["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"] + 7
    return want


@pytest.mark.parametrize("destination", ["out", "in-place"])
def test_changed_weights_land_where_megatron_stores_them_and_the_rest_keep_theirs(destination, tmp_path):
    hf, megatron = hf_model(tmp_path, "fp8_kv_tp2", _changed)
    if destination == "out":
        args, written = ["--out", tmp_path / "new"], tmp_path / "new"
    else:
        shutil.copytree(DATA / "fp8_kv_tp2" / "ckpt", tmp_path / "ckpt")
        args, written = ["--in-place"], tmp_path / "ckpt"
    result = _invoke("import", "llama", "--hf", hf, "--into", written if destination == "in-place" else
                     DATA / "fp8_kv_tp2" / "ckpt", *args, *SIZES)
    assert result.exit_code == 0, result.output
    back, want = _load(locate(written).path), _expected_after_change(megatron)
    assert sorted(back) == sorted(want)
    wrong = [key for key in want if not _identical(back[key], want[key])]
    assert not wrong, wrong
    changed = [key for key in want if not torch.equal(want[key], megatron[key])]
    assert len(changed) == 5, changed  # qkv, weight_w, weight_v, the output layer, a norm


def test_only_quantizers_writes_todays_bytes_and_keeps_every_weight(tmp_path):
    hf, megatron = hf_model(tmp_path, "fp8_kv_tp1", _changed)
    source = DATA / "fp8_kv_tp1" / "ckpt"
    only = _invoke("import", "llama", "--hf", hf, "--into", source, "--out", tmp_path / "only", "--only",
                   "quantizers", *SIZES)
    today = _invoke("import", "llama", "--hf", hf / "quantizer_state", "--into", source, "--out", tmp_path / "today",
                    *SIZES)
    assert only.exit_code == 0 == today.exit_code, (only.output, today.output)
    back = _load(locate(tmp_path / "only").path)
    assert all(_identical(back[key], megatron[key]) for key in megatron), "the changed weights were not written"

    def stored_bytes(directory: Path) -> dict[str, bytes]:
        out = {}
        for key, entry in read_entries(directory).items():
            for chunk in entry.chunks:
                with open(directory / chunk.file, "rb") as stream:
                    stream.seek(chunk.offset)
                    out[f"{key}@{chunk.offsets}"] = chunk.file.startswith(OWN_FILES), stream.read(chunk.length)
        return out

    assert stored_bytes(locate(tmp_path / "only").path) == stored_bytes(locate(tmp_path / "today").path)
    weights = [key for key, entry in read_entries(locate(tmp_path / "only").path).items()
               if entry.dtype and "quantizer" not in key]
    assert weights and not any(read_entries(locate(tmp_path / "only").path)[key].chunks[0].file.startswith(OWN_FILES)
                               for key in weights), "weights kept by reference"


def test_a_plain_hf_model_imports_its_weights_and_keeps_the_checkpoints_quantizer_state(tmp_path):
    megatron = _load(locate(DATA / "fp8_kv_tp1" / "ckpt").path)
    tensors = hf_weights(megatron)
    _changed(tensors)
    write_hf(tmp_path / "plain", tensors)
    result = _invoke("import", "llama", "--hf", tmp_path / "plain", "--into", DATA / "fp8_kv_tp1" / "ckpt", "--out",
                     tmp_path / "new", *SIZES)
    assert result.exit_code == 0, result.output
    assert "quantizer tensor(s) of the checkpoint kept as they were: the HF checkpoint holds no quantizer state" in \
        result.output
    back, want = _load(locate(tmp_path / "new").path), _expected_after_change(megatron)
    assert all(_identical(back[key], want[key]) for key in want)
    entries = read_entries(locate(tmp_path / "new").path)
    assert not any(entries[key].chunks[0].file.startswith(OWN_FILES) for key in want if "quantizer" in key)


def test_a_stacked_checkpoint_gets_each_layer_written_at_its_index(tmp_path):
    """An unquantized Megatron-Core save: ``decoder.layers.<param>`` with the layers on a leading axis, under a
    NeMo wrapper prefix; every layer of a key is written, and the layers keep their order."""
    megatron = _load(locate(DATA / "fp8_kv_tp1" / "ckpt").path)
    stacked = {}
    for key, tensor in megatron.items():
        if "quantizer" in key:
            continue
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            stacked.setdefault(f"model.decoder.layers.{rest}", [None] * LAYERS)[int(index)] = tensor
        else:
            stacked[f"model.{key}"] = tensor
    stacked = {key: torch.stack(value) if isinstance(value, list) else value for key, value in stacked.items()}
    directory = tmp_path / "stacked" / "iter_0000001"
    dcp.save(stacked, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    unwrapped = {key.removeprefix("model."): tensor for key, tensor in stacked.items()}
    tensors = hf_weights(unwrapped, stacked=True)
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"],
                       megatron["decoder.layers.1.mlp.linear_fc1.weight_v"])
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"] + 1
    tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"] - 1
    write_hf(tmp_path / "hf", tensors)
    result = _invoke("import", "llama", "--hf", tmp_path / "hf", "--into", directory, "--out", tmp_path / "new",
                     *SIZES)
    assert result.exit_code == 0, result.output
    back = _load(tmp_path / "new")
    want = dict(stacked)
    up = "model.decoder.layers.mlp.linear_fc1.weight_v"
    want[up] = stacked[up].clone()
    want[up][1] += 1
    want["model.decoder.layers.self_attention.linear_proj.weight"] = \
        stacked["model.decoder.layers.self_attention.linear_proj.weight"].clone()
    want["model.decoder.layers.self_attention.linear_proj.weight"][0] -= 1
    assert sorted(back) == sorted(want) and all(_identical(back[key], want[key]) for key in want), \
        [key for key in want if not _identical(back[key], want[key])]
    assert read_entries(tmp_path / "new")["model.decoder.layers.mlp.linear_fc1.weight_v"].shape == (2, 128, 64)


def _refused(tmp_path: Path, hf: Path, *extra) -> str:
    """The one error line of importing ``hf`` into fp8_kv_tp1, as a copy and in place; nothing written."""
    save = tmp_path / "ckpt"
    if not save.exists():
        shutil.copytree(DATA / "fp8_kv_tp1" / "ckpt", save)
    before = _tree_digest(save)
    lines = []
    for destination in (["--out", tmp_path / "new"], ["--in-place"]):
        result = _invoke("import", "llama", "--hf", hf, "--into", save, *destination, "--quiet", *SIZES, *extra)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        lines += result.output.strip().splitlines()
        assert _tree_digest(save) == before and not (tmp_path / "new").exists()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_weight_missing_from_the_hf_model_is_refused_by_name_unless_allow_partial(tmp_path):
    def drop(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.1.mlp.gate_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"] + 1

    hf, megatron = hf_model(tmp_path, "fp8_kv_tp1", drop)
    line = _refused(tmp_path, hf)
    assert "1 weight(s) the checkpoint holds are missing from the HF checkpoint: model.layers.1.mlp.up_proj.weight" \
        in line and "--allow-partial" in line
    result = _invoke("import", "llama", "--hf", hf, "--into", DATA / "fp8_kv_tp1" / "ckpt", "--out", tmp_path / "new",
                     "--allow-partial", *SIZES)
    assert result.exit_code == 0, result.output
    assert "1 weight(s) missing from the HF checkpoint kept as they were (--allow-partial)" in result.output
    back = _load(locate(tmp_path / "new").path)
    fc1 = "decoder.layers.1.mlp.linear_fc1."
    assert torch.equal(back[fc1 + "weight_w"], megatron[fc1 + "weight_w"]) and \
        torch.equal(back[fc1 + "weight_v"], megatron[fc1 + "weight_v"]), \
        "gate and up are one Megatron tensor: with up missing, neither half is written"
    assert all(_identical(back[key], megatron[key]) for key in megatron)


def test_a_weight_whose_shape_contradicts_the_checkpoint_is_refused_by_name(tmp_path):
    def widen(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 130)

    hf, _ = hf_model(tmp_path, "fp8_kv_tp1", widen)
    line = _refused(tmp_path, hf)
    assert "decoder.layers.0.mlp.linear_fc2.weight: the imported tensor has shape [64, 130]" in line
    assert "holds it as [64, 128]" in line


def test_a_weight_the_checkpoint_dtype_cannot_hold_exactly_is_refused_by_name(tmp_path):
    """The fp32 checkpoint keeps its dtype: an fp64 weight that float32 would round is refused, naming it; one
    float32 holds exactly is written."""
    def finer(tensors):
        exact = tensors["model.layers.0.mlp.down_proj.weight"].double()
        tensors["model.layers.0.mlp.down_proj.weight"] = exact
        tensors["model.norm.weight"] = tensors["model.norm.weight"].double() + 1e-12

    hf, _ = hf_model(tmp_path, "fp8_kv_tp1", finer)
    line = _refused(tmp_path, hf)
    assert "decoder.final_layernorm.weight: 64 of 64 float64 value(s) change when stored as float32" in line
    assert "cast the HF model to float32" in line


def test_sequential_mlp_expert_weights_go_back_to_their_experts_experts_keys(tmp_path):
    """SequentialMLP: ``local_experts.{E}`` in state_dict form is ``experts.experts.{E}`` in the checkpoint (under
    a NeMo prefix here), SwiGLU halves included; an expert not given keeps its bytes."""
    from quantmap.executor.values import converted
    from quantmap.io.torch_dist.write import write_into

    saved = {f"module.decoder.layers.0.mlp.experts.experts.{e}.linear_fc1.weight_{half}": torch.randn(6, 4)
             for e in range(2) for half in "wv"}
    saved |= {f"module.decoder.layers.0.mlp.experts.experts.{e}.linear_fc2.weight": torch.randn(4, 6) for e in range(2)}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path / "moe"), no_dist=True)
    fc1, fc2 = torch.randn(12, 4), torch.randn(4, 6)
    state = {"decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight": fc1,
             "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight": fc2}
    written = write_into(locate(tmp_path / "moe"), state, out=tmp_path / "new", convert=converted)
    assert sorted(written.replaced) == sorted(state)
    back, prefix = _load(tmp_path / "new"), "module.decoder.layers.0.mlp.experts.experts."
    assert torch.equal(back[prefix + "1.linear_fc1.weight_w"], fc1[:6])
    assert torch.equal(back[prefix + "1.linear_fc1.weight_v"], fc1[6:])
    assert torch.equal(back[prefix + "1.linear_fc2.weight"], fc2)
    assert all(torch.equal(back[key], saved[key]) for key in saved if ".experts.0." in key)
