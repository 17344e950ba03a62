"""Writing quantizer state into torch_dist checkpoints: ``import --into`` its own checkpoint gives the
same quantizer bytes and leaves every other entry's bytes as they were; the result loads with plain
torch.distributed.checkpoint at world size 1 and 2 (gloo); round trips through synthetic checkpoints
at other layouts (TP=1, stacked layers under a NeMo prefix, keys the checkpoint lacked) hold; ModelOpt's
linear_fc1 row order is written back for the checkpoint's TP; failures leave the original untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from executor_support import run_ranks
from quantmap.cli import app
from quantmap.executor.torch_dist_checkpoint import read_state
from quantmap.executor.values import converted
from quantmap.io.torch_dist import TorchDistError, locate, read_entries
from quantmap.io.torch_dist.write import OWN_FILES, write_into
from quantmap.io.torch_dist.read import read_tensors

DATA = Path(__file__).parent / "data" / "dcp"
FC1 = "decoder.layers.0.mlp.linear_fc1.weight_quantizer._amax"


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _chunk_bytes(directory: Path) -> dict[tuple, bytes]:
    """Every entry's saved bytes, per chunk, as .metadata records them."""
    out = {}
    for key, entry in read_entries(directory).items():
        for chunk in entry.chunks:
            with open(directory / chunk.file, "rb") as stream:
                stream.seek(chunk.offset)
                out[(key, chunk.offsets)] = stream.read(chunk.length)
    return out


def _stored(directory: Path, quantizers_only: bool = True) -> dict[str, torch.Tensor]:
    entries = read_entries(directory)
    keys = [k for k, e in entries.items() if e.dtype and ("quantizer" in k) == quantizers_only]
    return read_tensors(directory, entries, keys)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("fixture", ["fp8_kv_tp1", "fp8_kv_tp2", "int8_tp2"])
def test_import_into_its_own_checkpoint_gives_identical_quantizers_and_other_bytes(fixture, tmp_path):
    source = DATA / fixture / "ckpt"
    before = _tree_digest(source)
    sizes = ("-p", "num_attention_heads=4", "-p", "num_query_groups=2", "-p", "head_dim=16")  # the fixture model
    assert _invoke("export", "llama", "--megatron", source, "--out", tmp_path / "hf", "--quiet", *sizes).exit_code == 0
    result = _invoke("import", "llama", "--hf", tmp_path / "hf", "--into", source, "--out", tmp_path / "new", *sizes)
    assert result.exit_code == 0, result.output
    assert _tree_digest(source) == before, "the original checkpoint is untouched"
    original, written = locate(source).path, locate(tmp_path / "new").path
    assert written.name == original.name and (tmp_path / "new/latest_checkpointed_iteration.txt").is_file()
    old, new = _stored(original), _stored(written)
    assert sorted(new) == sorted(old) and all(torch.equal(_bits(new[k]), _bits(old[k])) for k in old)
    entries = read_entries(written)
    assert all(entries[k].chunks[0].file.startswith(OWN_FILES) for k in old), "quantizers are in the new file"
    old_bytes, new_bytes = _chunk_bytes(original), _chunk_bytes(written)
    others = [k for k in old_bytes if "quantizer" not in k[0]]
    assert others and all(new_bytes[k] == old_bytes[k] for k in others), "every other entry keeps its bytes"
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == \
        {k: (e.dtype, e.shape) for k, e in read_entries(original).items()}



def test_int8_tp2_state_written_back_is_re_interleaved_as_modelopt_saved_it(tmp_path):
    location = locate(DATA / "int8_tp2/ckpt")
    state = read_state(location)[1]  # fc1 rows in [gate; up] order
    written = write_into(location, state, out=tmp_path / "new", convert=converted)
    assert sorted(written.replaced) == sorted(state) and written.added == [] == written.kept
    old, new = _stored(location.path), _stored(written.path)
    assert torch.equal(_bits(new[FC1]), _bits(old[FC1])) and not torch.equal(new[FC1], state[FC1])
    assert all(torch.equal(_bits(new[k]), _bits(old[k])) for k in old)
    assert read_entries(written.path)[FC1].dim0_splits == 2, "the chunks keep the saving TP layout"


def _save(directory: Path, state: dict[str, torch.Tensor]) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)


def _tp1_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """The int8 model saved at TP=1 (one chunk per key), as Megatron names and shapes it; returns its state form."""
    reference = load_file(DATA / "int8_tp2/reference_tp1.safetensors")
    stored = {name: t.reshape(1) if t.dim() == 0 else t for name, t in reference.items()}
    for layer in range(2):
        for half in "wv":
            stored[f"decoder.layers.{layer}.mlp.linear_fc1.weight_{half}"] = torch.randn(128, 64)
    _save(directory, stored)
    return reference


def test_round_trip_through_a_tp1_checkpoint_and_back_into_the_tp2_one(tmp_path):
    tp1 = tmp_path / "tp1" / "iter_0000003"
    reference = _tp1_checkpoint(tp1)
    read = read_state(locate(tp1))[1]
    assert sorted(read) == sorted(reference) and all(torch.equal(read[k], reference[k]) for k in reference)
    assert torch.equal(_stored(tp1)[FC1], reference[FC1]), "at TP=1 ModelOpt's rows are in order"
    tp2_state = read_state(locate(DATA / "int8_tp2/ckpt"))[1]
    into_tp1 = write_into(locate(tp1), tp2_state, out=tmp_path / "tp1-new", convert=converted)
    assert torch.equal(_stored(into_tp1.path)[FC1], tp2_state[FC1])
    back = read_state(locate(into_tp1.path))[1]
    assert all(torch.equal(back[k], tp2_state[k]) for k in tp2_state)
    into_tp2 = write_into(locate(DATA / "int8_tp2/ckpt"), back, out=tmp_path / "tp2-new", convert=converted)
    original = _stored(locate(DATA / "int8_tp2/ckpt").path)
    assert all(torch.equal(_bits(_stored(into_tp2.path)[k]), _bits(original[k])) for k in original)


def test_stacked_layers_under_a_nemo_prefix_read_and_write_back(tmp_path):
    reference = load_file(DATA / "int8_tp2/reference_tp1.safetensors")
    stacked: dict[str, list] = {}
    for name, tensor in sorted(reference.items()):
        layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
        stacked.setdefault(f"model.module.decoder.layers.{rest}", []).append(tensor.reshape(1) if tensor.dim() == 0
                                                                               else tensor)
    stacked_state = {key: torch.stack(parts) for key, parts in stacked.items()}
    stacked_state["model.module.decoder.layers.mlp.linear_fc1.weight"] = torch.randn(2, 256, 64)
    directory = tmp_path / "nemo"
    _save(directory, stacked_state)
    read = read_state(locate(directory))[1]
    assert sorted(read) == sorted(reference) and all(torch.equal(read[k], reference[k]) for k in reference)
    changed = {name: tensor * 2 for name, tensor in read.items() if name.startswith("decoder.layers.1.")}
    written = write_into(locate(directory), changed, out=tmp_path / "nemo-new", convert=converted)
    again = read_state(locate(written.path))[1]
    assert all(torch.equal(again[k], changed.get(k, reference[k])) for k in reference)
    assert read_entries(written.path)["model.module.decoder.layers.mlp.linear_fc2.weight_quantizer._amax"].shape == \
        (2, 64, 1)


def test_quantizers_the_checkpoint_lacks_are_added_with_megatrons_shapes(tmp_path):
    reference = load_file(DATA / "fp8_kv_tp1/reference_tp1.safetensors")
    lacking = {name: t.reshape(1) for name, t in reference.items() if "_bmm_" not in name and "linear_fc2" not in name}
    directory = tmp_path / "lacking"
    _save(directory, lacking)
    written = write_into(locate(directory), reference, out=tmp_path / "full", convert=converted)
    assert len(written.added) == 8 and len(written.replaced) == 12
    entries = read_entries(written.path)
    assert entries["decoder.layers.0.self_attention.core_attention.k_bmm_quantizer._amax"].shape == ()
    assert entries["decoder.layers.0.mlp.linear_fc2.input_quantizer._amax"].shape == (1,)
    back = read_state(locate(written.path))[1]
    assert sorted(back) == sorted(reference) and all(torch.equal(back[k], reference[k]) for k in reference)


def _load_everything(directory: str) -> dict[str, torch.Tensor]:
    """A plain torch.distributed.checkpoint load of every tensor entry (in a process group when one exists)."""
    import torch.distributed as dist

    entries = read_entries(directory)
    state = {k: torch.zeros(e.shape, dtype=getattr(torch, e.dtype)) for k, e in entries.items() if e.dtype}
    dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=not dist.is_initialized())
    return state


@pytest.mark.slow
def test_the_written_checkpoint_loads_with_plain_torch_at_world_size_1_and_2(tmp_path):
    source = locate(DATA / "fp8_kv_tp2/ckpt")
    state = {name: tensor + 1 for name, tensor in read_state(source)[1].items()}  # something to see
    written = write_into(source, state, out=tmp_path / "new", convert=converted)
    want = {**_stored(source.path, quantizers_only=False), **_stored(written.path)}
    assert torch.equal(want["decoder.layers.0.mlp.linear_fc1.input_quantizer._amax"],
                       state["decoder.layers.0.mlp.linear_fc1.input_quantizer._amax"].reshape(1))
    single = _load_everything(str(written.path))
    assert sorted(single) == sorted(want) and all(torch.equal(single[k], want[k]) for k in want)
    outcomes = run_ranks(2, _load_everything, str(written.path))
    assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
    for _, loaded in outcomes:
        assert sorted(loaded) == sorted(want) and all(torch.equal(loaded[k], want[k]) for k in want)


def test_in_place_import_replaces_only_the_metadata_and_cleans_up_its_earlier_file(tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "fp8_kv_tp2/ckpt", save)
    location = locate(save)
    originals = {p.name: p.read_bytes() for p in location.path.glob("__*.distcp")}
    state = read_state(location)[1]
    write_into(location, {k: v * 3 for k, v in state.items()}, in_place=True, convert=converted)
    first = [p.name for p in location.path.glob(f"{OWN_FILES}*.distcp")]
    write_into(location, state, in_place=True, convert=converted)
    second = [p.name for p in location.path.glob(f"{OWN_FILES}*.distcp")]
    assert len(first) == len(second) == 1 and first != second, "the replaced import's file is removed"
    assert all((location.path / n).read_bytes() == b for n, b in originals.items()), "Megatron's files untouched"
    back = read_state(location)[1]
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert not [p for p in location.path.iterdir() if "partial" in p.name or p.name.startswith(".quantmap")]


def test_a_failed_import_leaves_the_checkpoint_untouched_and_writes_nothing(tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "fp8_kv_tp2/ckpt", save)
    assert _invoke("export", "llama", "--megatron", save, "--out", tmp_path / "hf", "--quiet").exit_code == 0
    hf = tmp_path / "hf" / "model-00001-of-00001.safetensors"
    line = _refused_import_of(tmp_path, save, hf, torch.ones(3))  # not the checkpoint's shape
    assert "decoder.layers.0.mlp.linear_fc2.input_quantizer._amax" in line and "shaped [[3]]" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_import_into_needs_exactly_one_destination(tmp_path):
    result = _invoke("import", "llama", "--hf", tmp_path, "--into", DATA / "fp8_kv_tp1/ckpt")
    assert result.exit_code == 2 and "--out NEW or --in-place" in result.output
    result = _invoke("import", "llama", "--hf", tmp_path, "--into", DATA / "fp8_kv_tp1/ckpt", "--layout", tmp_path,
                     "--out", tmp_path / "x")
    assert result.exit_code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(TorchDistError, match="either an output directory"):
        write_into(locate(DATA / "fp8_kv_tp1/ckpt"), {}, out=tmp_path / "x", in_place=True, convert=converted)


@pytest.mark.parametrize("option", [["--nproc", "2"], ["--timeout", "30"], ["--timeout", "600"]])
def test_import_into_refuses_nproc_and_timeout_which_one_process_cannot_honour(option, tmp_path):
    """--into runs in one process, so --nproc and --timeout (even at its default value, when given) would be
    ignored: a usage error naming the option, and nothing written."""
    source = DATA / "fp8_kv_tp1/ckpt"
    before = _tree_digest(source)
    result = _invoke("import", "llama", "--hf", tmp_path, "--into", source, "--out", tmp_path / "new", *option)
    assert result.exit_code == 2 and f"drop {option[0]}" in result.output
    assert "one process" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "new").exists() and _tree_digest(source) == before


def test_a_failure_while_writing_removes_what_was_written_in_place_and_in_a_new_directory(tmp_path, monkeypatch):
    from quantmap.io.torch_dist import write

    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", save)
    location = locate(save)
    before = _tree_digest(save)

    def fail(*args):
        raise TorchDistError("injected failure after the new files were written")

    monkeypatch.setattr(write, "_verify", fail)
    for kwargs in ({"in_place": True}, {"out": tmp_path / "new"}):
        with pytest.raises(TorchDistError, match="injected"):
            write_into(location, read_state(location)[1], **kwargs, convert=converted)
        assert _tree_digest(save) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_import_into_a_truncated_or_foreign_checkpoint_is_refused_and_writes_nothing(tmp_path):
    """import --into keeps every weight by reference, so a .distcp shorter than .metadata says (truncated, or
    a .metadata from another checkpoint) must be refused before writing, not published as a broken copy."""
    from test_torch_dist import _bad_checkpoints

    hf = tmp_path / "hf"
    assert _invoke("export", "llama", "--megatron", DATA / "fp8_kv_tp1/ckpt", "--out", hf, "--quiet").exit_code == 0
    for what, (source, phrase) in _bad_checkpoints(tmp_path).items():
        before = _tree_digest(source)
        for extra in (["--out", tmp_path / f"new-{source.name}"], ["--in-place"]):
            result = _invoke("import", "llama", "--hf", hf, "--into", source, *extra, "--quiet")
            assert result.exit_code == 1, (what, extra, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (what, result.output)
            assert _tree_digest(source) == before and not (tmp_path / f"new-{source.name}").exists(), (what, extra)


def test_import_into_a_shard_directory_says_it_is_one(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "layout.json").write_text("{}")
    result = _invoke("import", "llama", "--hf", tmp_path, "--into", shards, "--out", tmp_path / "new", "--quiet")
    assert result.exit_code == 1 and "is a quantmap shard directory (layout.json)" in result.output, result.output
    assert "--layout" in result.output and not (tmp_path / "new").exists()


MEGATRON = Path(__file__).parent / "data" / "megatron"


def _megatron_checkpoint(directory: Path, fixture: str, prefix: str, leave_out: str) -> tuple[dict, dict]:
    """A TP=1 checkpoint of a real Megatron quantizer state (tests/data/megatron), each buffer under the key and
    global shape Megatron-Core + ModelOpt declare for it (the fixture's sharded_state_dict_quantizer_entries),
    with weights of the model's shapes, minus the keys containing ``leave_out``. Returns (state, declared)."""
    import json

    state = load_file(MEGATRON / f"{fixture}.safetensors")
    declared = {name: (entry["key"], tuple(entry["global_shape"])) for name, entry in
                json.loads((MEGATRON / f"{fixture}.json").read_text())["sharded_state_dict_quantizer_entries"].items()}
    stored = {prefix + key: state[name].reshape(shape) for name, (key, shape) in declared.items()
              if leave_out not in key}
    for name in state:  # the weight each quantizer belongs to; SwiGLU linear_fc1 as Megatron keys it
        module = prefix + declared[name][0].rsplit("_quantizer.", 1)[0].rsplit(".", 1)[0]
        rows, columns = {"linear_qkv": (128, 64), "linear_proj": (64, 64), "linear_fc1": (128, 64),
                         "linear_fc2": (64, 128)}[module.rsplit(".", 1)[1]]
        for key in ([f"{module}.weight_w", f"{module}.weight_v"] if module.endswith("linear_fc1") else
                    [f"{module}.weight"]):
            stored.setdefault(key, torch.randn(rows, columns))
    _save(directory, stored)
    return state, declared


@pytest.mark.parametrize("prefix", ["", "model."])
def test_sequential_mlp_experts_read_as_local_experts_and_are_written_as_experts_experts(tmp_path, prefix):
    """SequentialMLP: experts.experts.{E} / [1] in the checkpoint ↔ local_experts.{E} / [] in state_dict, both
    ways; expert 3's quantizers, absent from the checkpoint, are added under the keys and shapes Megatron declares."""
    directory = tmp_path / "moe" / "iter_0000001"
    state, declared = _megatron_checkpoint(directory, "state_int8_default_moeseq_tp1", prefix, ".experts.experts.3.")
    read = read_state(locate(directory))[1]
    assert read and all(".experts.local_experts." in n for n in read if ".experts." in n)
    assert all(torch.equal(read[n], state[n]) and read[n].shape == state[n].shape for n in read)
    assert sorted(state) == sorted([*read, *(n for n in state if ".local_experts.3." in n)])
    written = write_into(locate(directory), state, out=tmp_path / "new", convert=converted)
    assert sorted(written.added) == sorted(n for n in state if ".local_experts.3." in n) and len(written.added) == 8
    entries = read_entries(written.path)
    assert all(entries[prefix + key].shape == shape for key, shape in declared.values()), "Megatron's keys and shapes"
    back = read_state(locate(written.path))[1]
    assert sorted(back) == sorted(state) and all(torch.equal(back[n], state[n]) for n in state)


def test_block_amax_reads_flattened_and_is_written_as_rows_by_blocks(tmp_path):
    """INT4 AWQ block amax: [rows, nblocks] in the checkpoint ↔ [rows * nblocks, 1] in state_dict, both ways; a
    block amax the checkpoint lacks is added as [rows, nblocks], its rows from the weight (SwiGLU: weight_w + v)."""
    directory = tmp_path / "awq" / "iter_0000001"
    state, declared = _megatron_checkpoint(directory, "state_int4_awq_bs32_tp1", "", "layers.1.mlp.linear_fc1.weight_q")
    read = read_state(locate(directory))[1]
    assert len(read) == len(state) - 1 and all(torch.equal(read[n], state[n]) for n in read)
    name = "decoder.layers.0.mlp.linear_fc1.weight_quantizer._amax"
    assert read[name].shape == (512, 1) and read_entries(directory)[name].shape == (256, 2)
    changed = {n: t * 2 for n, t in state.items()}
    written = write_into(locate(directory), changed, out=tmp_path / "new", convert=converted)
    assert written.added == ["decoder.layers.1.mlp.linear_fc1.weight_quantizer._amax"]
    entries = read_entries(written.path)
    assert all(entries[key].shape == shape for key, shape in declared.values()), "Megatron's keys and shapes"
    assert torch.equal(_stored(written.path)[name], changed[name].reshape(256, 2))
    back = read_state(locate(written.path))[1]
    assert sorted(back) == sorted(state) and all(torch.equal(back[n], changed[n]) for n in state)


def test_import_into_reports_the_checkpoint_quantizers_the_hf_side_lacks_and_strict_refuses(tmp_path):
    """The KV-cache amax dropped from every layer of the HF checkpoint: nothing in the HF names says they
    are missing, but the checkpoint written into holds them, and they would keep their old values."""
    import json

    source = DATA / "fp8_kv_tp1" / "ckpt"
    sizes = ("-p", "num_attention_heads=4", "-p", "num_query_groups=2", "-p", "head_dim=16")
    assert _invoke("export", "llama", "--megatron", source, "--out", tmp_path / "hf", "--quiet", *sizes).exit_code == 0
    index_file = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    dropped = sorted(name for name in index["weight_map"] if "_bmm_quantizer." in name)
    assert dropped
    index["weight_map"] = {name: file for name, file in index["weight_map"].items() if name not in dropped}
    index_file.write_text(json.dumps(index))
    refused = _invoke("import", "llama", "--hf", tmp_path / "hf", "--into", source, "--out", tmp_path / "strict",
                      "--strict", *sizes)
    assert refused.exit_code == 1, refused.output
    assert refused.output.startswith(f"error: import refused (--strict): {len(dropped)} HF name(s) the layout's "
                                     f"ranks need but the checkpoint lacks: {dropped[0]}"), refused.output
    assert not (tmp_path / "strict").exists()
    loose = _invoke("import", "llama", "--hf", tmp_path / "hf", "--into", source, "--out", tmp_path / "loose", *sizes)
    assert loose.exit_code == 0, loose.output
    assert f"{len(dropped)} name(s) missing:" in loose.output


@pytest.mark.parametrize(("value", "phrase"), [(1e-50, "the float64 value 1e-50 underflows float32"),
                                               (1e300, "the float64 value 1e+300 overflows float32")])
def test_an_amax_the_checkpoint_dtype_cannot_hold_is_refused_by_name_and_nothing_changes(tmp_path, value, phrase):
    """The fp32 checkpoint stores what an fp64 HF amax becomes: 1e-50 would be stored as 0.0 ("uncalibrated") and
    1e300 as inf, so both are refused, naming the tensor, the value and the dtype, and nothing is written."""
    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", save)
    assert _invoke("export", "llama", "--megatron", save, "--out", tmp_path / "hf", "--quiet").exit_code == 0
    hf = tmp_path / "hf" / "model-00001-of-00001.safetensors"
    line = _refused_import_of(tmp_path, save, hf, torch.tensor(value, dtype=torch.float64))
    assert line.startswith("error: ") and "infinite" not in line
    assert "decoder.layers.0.mlp.linear_fc2.input_quantizer._amax: " + phrase in line


def _refused_import_of(tmp_path, save, hf, amax) -> str:
    """The one error line of importing ``hf`` with down_proj's input amax replaced by ``amax`` into
    ``save``, as a copy and in place; each refused with nothing written or changed."""
    tensors = load_file(hf)
    tensors["model.layers.0.mlp.down_proj.input_quantizer._amax"] = amax
    save_file(tensors, hf)
    before = _tree_digest(save)
    lines = []
    for extra in (["--out", tmp_path / "new"], ["--in-place"]):
        result = _invoke("import", "llama", "--hf", hf.parent, "--into", save, *extra, "--quiet")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        lines += result.output.strip().splitlines()
        assert _tree_digest(save) == before and not (tmp_path / "new").exists()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    return lines[0]
