"""Reading real Megatron torch_dist checkpoints (tests/data/dcp): names and shapes from .metadata alone,
quantizer tensors in state_dict form equal to the single-rank reference (ModelOpt's TP-interleaved
linear_fc1 amax put back in order), export equal to exporting the reference, and one clear error for
each kind of bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.executor import ParallelLayout, export_offline
from quantmap.executor.torch_dist_checkpoint import read_state
from quantmap.io.hf import Checkpoint
from quantmap.io.torch_dist import TorchDistError, checkpoint_names, locate, read_entries
from quantmap.io.torch_dist.keys import quantizers
from quantmap.io.torch_dist.read import deinterleave, interleave, read_tensors

DATA = Path(__file__).parent / "data" / "dcp"
REPO = Path(__file__).resolve().parents[1]
FIXTURES = ["fp8_kv_tp1", "fp8_kv_tp2", "int8_tp2"]
FC1 = "decoder.layers.0.mlp.linear_fc1.weight_quantizer._amax"


def _reference(fixture: str) -> dict[str, torch.Tensor]:
    return load_file(DATA / fixture / "reference_tp1.safetensors")


def _within_float_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The TP=2 runs calibrated on sharded activations: their scalar amax differ from the TP=1 run's by at
    most 2 float32 steps (measured on these fixtures), nothing a reader could have changed."""
    steps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    return got.dtype == want.dtype == torch.float32 and bool((steps <= 2).all())


@pytest.mark.parametrize("fixture", FIXTURES)
def test_each_fixture_reads_to_its_single_rank_reference(fixture):
    _, state = read_state(locate(DATA / fixture / "ckpt"))
    reference = _reference(fixture)
    assert sorted(state) == sorted(reference)
    for name, want in reference.items():
        got = state[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if fixture == "fp8_kv_tp1" or want.numel() > 1:  # same run, or per-channel weight amax: exact
            assert torch.equal(got, want), name
        else:
            assert _within_float_rounding(got, want), name


def test_int8_tp2_linear_fc1_rows_are_put_back_in_gate_up_order():
    entries = read_entries(DATA / "int8_tp2/ckpt/release")
    stored = read_tensors(DATA / "int8_tp2/ckpt/release", entries, [FC1])[FC1]
    want = _reference("int8_tp2")[FC1]
    assert entries[FC1].dim0_splits == 2 and not torch.equal(stored, want), "the fixture shows ModelOpt's bug"
    gate_0, up_0, gate_1, up_1 = stored.chunk(4)
    assert torch.equal(torch.cat([gate_0, gate_1, up_0, up_1]), want)
    fc1 = [q for q in quantizers(entries) if q.name.endswith("linear_fc1.weight_quantizer._amax")]
    assert {q.interleaved for q in fc1} == {2}
    qkv = [q for q in quantizers(entries) if q.name.endswith("linear_qkv.weight_quantizer._amax")]
    assert {q.interleaved for q in qkv} == {1}, "only SwiGLU linear_fc1 is interleaved"


@settings(max_examples=60, deadline=None)
@given(tp=st.integers(1, 8), per_half=st.integers(1, 5), columns=st.integers(1, 3))
def test_interleave_and_deinterleave_are_inverse(tp, per_half, columns):
    rows = 2 * tp * per_half
    ordered = torch.arange(rows * columns, dtype=torch.float32).reshape(rows, columns)
    saved = interleave(ordered, tp)
    assert torch.equal(deinterleave(saved, tp), ordered)
    gate, up = ordered.chunk(2)
    assert torch.equal(saved.chunk(tp)[tp - 1], torch.cat([gate.chunk(tp)[tp - 1], up.chunk(tp)[tp - 1]]))


@pytest.mark.parametrize("fixture", FIXTURES)
def test_raw_tensors_equal_what_torch_itself_reads(fixture):
    location = locate(DATA / fixture / "ckpt")
    entries = read_entries(location.path)
    torch_read = load_file(DATA / fixture / "globals_read_with_torch.safetensors")
    ours = read_tensors(location.path, entries, list(torch_read))
    assert all(torch.equal(ours[key], torch_read[key]) for key in torch_read)
    weights = {key: torch.empty(e.shape) for key, e in entries.items() if e.dtype and "quantizer" not in key}
    dcp.load(weights, storage_reader=dcp.FileSystemReader(location.path), no_dist=True)
    ours = read_tensors(location.path, entries, list(weights))
    assert all(torch.equal(ours[key], weights[key]) for key in weights)


def test_every_dtype_and_shape_reads_as_torch_reads_it_small_ones_gathered_big_ones_viewed(tmp_path):
    """Tensors up to 64 bytes are copied out in one gather per (dtype, shape), bigger ones are viewed in
    place: both give exactly what dcp.load gives, and a tensor asked for in another shape comes so."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(), (1,), (3,), (2, 1), (4, 4), (5, 4), (0,), (64, 2)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    state = {f"{str(dtype)[6:]}.{shape}.{copy}": (torch.rand(shape, generator=generator) * 9).to(dtype)
             for dtype in dtypes for shape in shapes for copy in range(3)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path), no_dist=True)
    loaded = {key: torch.empty_like(tensor) for key, tensor in state.items()}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(tmp_path), no_dist=True)
    asked = {key: (1, tensor.numel()) for key, tensor in state.items() if tensor.numel() in (1, 2, 3, 16)}
    ours = read_tensors(tmp_path, read_entries(tmp_path), list(state), asked)
    for key, tensor in loaded.items():
        want = tensor.reshape(asked[key]) if key in asked else tensor
        assert ours[key].dtype == want.dtype and ours[key].shape == want.shape and torch.equal(ours[key], want), key


def test_the_tracker_an_iteration_directory_and_iteration_all_locate_the_checkpoint(tmp_path):
    assert locate(DATA / "fp8_kv_tp1/ckpt").path == DATA / "fp8_kv_tp1/ckpt/iter_0000001"
    assert locate(DATA / "fp8_kv_tp2/ckpt").path == DATA / "fp8_kv_tp2/ckpt/release"
    assert locate(DATA / "fp8_kv_tp1/ckpt/iter_0000001").path == DATA / "fp8_kv_tp1/ckpt/iter_0000001"
    save = tmp_path / "save"
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", save)
    shutil.copytree(DATA / "int8_tp2/ckpt/release", save / "iter_0000007")
    assert locate(save, 7).path == save / "iter_0000007"
    assert locate(save).path == save / "iter_0000001"


def _export(fixture_or_state, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    if isinstance(fixture_or_state, dict):
        export_offline(quantmap.compile("llama", **SIZES), [fixture_or_state], ParallelLayout(num_layers=2), out=out)
    else:
        result = CliRunner().invoke(app, ["export", "llama", "--megatron", str(DATA / fixture_or_state / "ckpt"),
                                          "--out", str(out), "--quiet", *SIZE_PARAMS])
        assert result.exit_code == 0, result.output
    checkpoint = Checkpoint(out)
    return {n: checkpoint.get(n) for n in checkpoint.names()}


# The fixture model's head counts: the QKV interleave of int8_tp2's per-channel amax needs them.
SIZES = dict(num_attention_heads=4, num_query_groups=2, head_dim=16)
SIZE_PARAMS = [arg for name, value in SIZES.items() for arg in ("--param", f"{name}={value}")]
EXPORTABLE = ["fp8_kv_tp1", "fp8_kv_tp2", "int8_tp2"]


@pytest.mark.parametrize("fixture", EXPORTABLE)
def test_cli_export_of_a_torch_dist_checkpoint_equals_exporting_the_reference(fixture, tmp_path):
    got = _export(fixture, tmp_path, "from-torch-dist")
    want = _export(_reference(fixture), tmp_path, "from-reference")
    assert sorted(got) == sorted(want) and len(got) >= 28  # 2 layers x 14 buffers, + KV cache for fp8
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor) if fixture == "fp8_kv_tp1" else _within_float_rounding(got[name], tensor), name



def test_check_reads_names_from_metadata_alone_without_torch(tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "int8_tp2/ckpt", save)
    for data in (save / "release").glob("*.distcp"):
        data.write_bytes(b"")  # no tensor data at all: check must not need it
    code = ("import sys\nfrom quantmap.cli import main\n"
            f"sys.argv = ['quantmap', 'check', 'llama', '--megatron', {str(save)!r}, '--strict']\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('clean')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "check llama: 31 Megatron names; no finding(s)" in result.stdout and result.stdout.strip().endswith("clean")
    names = checkpoint_names(save)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names and not any("weight_w" in n for n in names)
    assert not any("_extra_state" in n or "rng_state" in n for n in names)


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad input, and a phrase its one error line must hold."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    missing = tmp_path / "missing"
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", missing)
    (missing / "latest_checkpointed_iteration.txt").write_text("5")
    truncated = tmp_path / "truncated"
    shutil.copytree(DATA / "fp8_kv_tp1/ckpt", truncated)
    for data in (truncated / "iter_0000001").glob("*.distcp"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    foreign = tmp_path / "foreign"
    shutil.copytree(DATA / "int8_tp2/ckpt", foreign)
    shutil.copy(DATA / "fp8_kv_tp2/ckpt/release/.metadata", foreign / "release" / ".metadata")
    return {"not a checkpoint": (plain, "not a Megatron checkpoint"),
            "tracker naming a missing iteration": (missing, "names iteration 5, but"),
            "truncated .distcp": (truncated, "the file is truncated"),
            ".metadata from another checkpoint": (foreign, "belongs to another checkpoint")}


def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path):
    for what, (source, phrase) in _bad_checkpoints(tmp_path).items():
        out = tmp_path / f"out-{source.name}"
        result = _invoke("export", "llama", "--megatron", source, "--out", out, "--quiet")
        assert result.exit_code == 1, (what, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (what, result.output)
        assert "Traceback" not in result.output and not out.exists(), what
        assert not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir()), what


def test_a_metadata_naming_an_arbitrary_class_is_refused_without_running_it(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    directory = tmp_path / "iter_0000001"
    directory.mkdir()
    (directory / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(TorchDistError, match="refuses to unpickle"):
        read_entries(directory)
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_each_rank_reads_only_its_pipeline_stage_and_nproc_export_equals_offline(tmp_path):
    from quantmap.executor.torch_dist_checkpoint import checkpoint_layout

    location = locate(DATA / "fp8_kv_tp2/ckpt")
    layout = checkpoint_layout(read_entries(location.path), world=2)
    assert layout.pp == 2 and layout.stage_layers == (1, 1)
    _, whole = read_state(location)
    for rank in range(2):
        local = read_state(location, 2, rank)[1]
        assert local and all(name.startswith("decoder.layers.0.") for name in local)
        assert all(torch.equal(t, whole[n.replace("layers.0.", f"layers.{rank}.", 1)]) for n, t in local.items())
    offline = _export("fp8_kv_tp2", tmp_path, "offline")
    result = _invoke("export", "llama", "--megatron", DATA / "fp8_kv_tp2/ckpt", "--out", tmp_path / "spawned",
                     "--nproc", 2, "--quiet")
    assert result.exit_code == 0, result.output
    spawned = Checkpoint(tmp_path / "spawned")
    assert sorted(spawned.names()) == sorted(offline)
    assert all(torch.equal(spawned.get(n), offline[n]) for n in offline)


def test_modelopt_config_is_read_as_plain_data_and_a_per_channel_amax_it_calls_per_tensor_is_refused(tmp_path):
    from quantmap.io.torch_dist.modelopt import quant_cfg
    from quantmap.recipe import per_tensor

    fp8 = quant_cfg(DATA / "fp8_kv_tp2/ckpt/release")
    int8 = quant_cfg(DATA / "int8_tp2/ckpt/release")
    assert per_tensor("decoder.layers.0.mlp.linear_fc1.weight_quantizer", fp8) is True
    assert per_tensor("decoder.layers.0.mlp.linear_fc1.weight_quantizer", int8) is False
    assert per_tensor("decoder.layers.0.mlp.linear_fc1.input_quantizer", int8) is True
    assert per_tensor("output_layer.weight_quantizer", int8) is None, "disabled"
    mixed = tmp_path / "ckpt"
    shutil.copytree(DATA / "int8_tp2/ckpt", mixed)
    shutil.copytree(DATA / "fp8_kv_tp2/ckpt/release/modelopt_state", mixed / "release/modelopt_state",
                    dirs_exist_ok=True)
    result = _invoke("export", "llama", "--megatron", mixed, "--out", tmp_path / "hf", "--quiet")
    assert result.exit_code == 1 and not (tmp_path / "hf").exists()
    line = result.output.strip()
    assert line.startswith("error: decoder.layers.0.self_attention.linear_proj.weight_quantizer._amax has shape "
                           "[64, 1]") and "configures" in line and "per-tensor" in line, line


def test_export_strict_refuses_an_uncalibrated_amax_in_a_torch_dist_checkpoint(tmp_path):
    """--strict (and --allow-partial) reach the export of a torch_dist checkpoint as they reach a shard directory's."""
    reference = _reference("fp8_kv_tp1")
    stored = {name: t.reshape(1) if t.dim() == 0 and "_bmm_" not in name else t for name, t in reference.items()}
    stored["decoder.layers.0.mlp.linear_fc1.input_quantizer._amax"] = torch.zeros(1)
    dcp.save(stored, storage_writer=dcp.FileSystemWriter(tmp_path / "ckpt" / "iter_0000001"), no_dist=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1\n")
    result = _invoke("export", "llama", "--megatron", tmp_path / "ckpt", "--out", tmp_path / "strict", "--strict",
                     "--quiet")
    assert result.exit_code == 1 and "zero amax" in result.output and not (tmp_path / "strict").exists(), result.output
    result = _invoke("export", "llama", "--megatron", tmp_path / "ckpt", "--out", tmp_path / "lax", "--quiet")
    assert result.exit_code == 0, result.output


def test_export_reads_no_weight_bytes_and_never_unpickles_common_pt(tmp_path):
    """Only quantizer buffers are read: with every weight's bytes overwritten and a common.pt whose pickle would
    run a command, the export is the same and nothing runs."""
    import pickle

    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "fp8_kv_tp2/ckpt", save)
    directory = save / "release"
    for key, entry in read_entries(directory).items():
        if entry.dtype and "quantizer" not in key:
            for chunk in entry.chunks:
                with open(directory / chunk.file, "r+b") as stream:
                    stream.seek(chunk.offset)
                    stream.write(b"\xff" * chunk.length)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    (directory / "common.pt").write_bytes(pickle.dumps(Boom()))
    result = _invoke("export", "llama", "--megatron", save, "--out", tmp_path / "hf", "--quiet")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ran").exists()
    want = _export("fp8_kv_tp2", tmp_path, "untouched")
    got = Checkpoint(tmp_path / "hf")
    assert sorted(got.names()) == sorted(want) and all(torch.equal(got.get(n), want[n]) for n in want)


QKV_AMAX = "decoder.layers.0.self_attention.linear_qkv.weight_quantizer._amax"  # [128, 1] in 2 chunks of 64 rows


def _drop_second_chunk(metadata) -> None:
    metadata.state_dict_metadata[QKV_AMAX].chunks.pop(1)


def _add_overlapping_chunk(metadata) -> None:
    """A third chunk, rows 32-95, stored where chunk 0 (rows 0-63) is: the union still covers every row."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    metadata.state_dict_metadata[QKV_AMAX].chunks.append(ChunkStorageMetadata(torch.Size([32, 0]),
                                                                              torch.Size([64, 1])))
    first = metadata.storage_data[MetadataIndex(QKV_AMAX, torch.Size([0, 0]))]
    metadata.storage_data[MetadataIndex(QKV_AMAX, torch.Size([32, 0]))] = first


@pytest.mark.parametrize(("edit", "phrase"), [(_drop_second_chunk, "they cover 64 of its 128 elements, leaving a gap"),
                                              (_add_overlapping_chunk, "chunks 0 and 2 overlap")])
def test_metadata_chunks_that_do_not_tile_a_tensor_are_refused_before_reading(tmp_path, edit, phrase):
    """The real int8_tp2 .metadata, rewritten with torch's own classes: a chunk missing (rows no chunk wrote,
    which would be exported from uninitialised memory) or two chunks over the same rows is one clear error."""
    import pickle

    from quantmap.io.torch_dist.metadata import load_metadata

    save = tmp_path / "ckpt"
    shutil.copytree(DATA / "int8_tp2/ckpt", save)
    metadata = load_metadata(save / "release", real=True)
    edit(metadata)
    (save / "release/.metadata").write_bytes(pickle.dumps(metadata))
    out = tmp_path / "hf"
    result = _invoke("export", "llama", "--megatron", save, "--out", out, "--quiet", *SIZE_PARAMS)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert f"the chunks of {QKV_AMAX} (global shape [128, 1]) do not tile it: {phrase}" in lines[0], lines[0]
    assert not out.exists()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=3).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)), st.lists(st.tuples(
        st.tuples(*[st.integers(0, extent) for extent in shape]),
        st.tuples(*[st.integers(0, extent) for extent in shape])), max_size=5))))
def test_chunks_tile_a_shape_exactly_when_every_element_is_covered_once(case):
    """``tiling_problem`` agrees with counting, element by element, how many chunks cover it."""
    from quantmap.io.torch_dist.metadata import tiling_problem

    shape, boxes = case
    count = torch.zeros(shape, dtype=torch.int64)
    inside = all(o + z <= extent for offsets, sizes in boxes for o, z, extent in zip(offsets, sizes, shape))
    if inside:
        for offsets, sizes in boxes:
            region = count
            for dim, (o, z) in enumerate(zip(offsets, sizes)):
                region = region.narrow(dim, o, z)
            region += 1
    exact = inside and bool((count == 1).all())
    assert (tiling_problem(shape, boxes) is None) == exact, (shape, boxes)


def test_a_grid_of_chunks_tiles_and_any_one_removed_or_repeated_does_not():
    from quantmap.io.torch_dist.metadata import tiling_problem

    grid = [((r, c), (2, 3)) for r in (0, 2, 4) for c in (0, 3)]
    assert tiling_problem((6, 6), grid) is None
    assert all("gap" in tiling_problem((6, 6), grid[:i] + grid[i + 1:]) for i in range(len(grid)))
    assert all("overlap" in tiling_problem((6, 6), grid + [box]) for box in grid)


QKV, PROJ = (f"decoder.layers.0.self_attention.{m}.weight" for m in ("linear_qkv", "linear_proj"))


@pytest.mark.parametrize(("params", "phrase"), [
    ({"num_attention_heads": 6, "num_query_groups": 1},  # cuts 128 rows 96 + 16 + 16 without complaint
     f"give {QKV}'s 128 rows a head dim of 16, so {PROJ} should have 6 x 16 = 96 input columns, but it has 64"),
    ({**SIZES, "head_dim": 32}, f"with head_dim=32 give {QKV} 8 x 32 = 256 rows, but it has 128"),
    ({"num_attention_heads": 5, "num_query_groups": 1}, f"but {QKV} has 128 rows, not a multiple of 7"),
    ({**SIZES, "hidden_size": 32}, f"hidden_size=32 gives the row-parallel {PROJ} 32 output rows, but it has 64"),
], ids=["heads 6 groups 1", "head_dim 32", "heads 5 groups 1", "hidden_size 32"])
def test_sizes_the_checkpoint_shapes_contradict_are_refused_on_export_and_import(tmp_path, params, phrase):
    """int8_tp2's weights are [(heads + 2 x groups) x head_dim, hidden] (linear_qkv) and [hidden, heads x head_dim]
    (linear_proj) in .metadata: a size that contradicts them is one error naming both numbers and the tensor."""
    source = DATA / "int8_tp2/ckpt"
    flags = [arg for name, value in params.items() for arg in ("-p", f"{name}={value}")]
    exported = _invoke("export", "llama", "--megatron", source, "--out", tmp_path / "hf", "--quiet", *flags)
    good = _invoke("export", "llama", "--megatron", source, "--out", tmp_path / "good", "--quiet", *SIZE_PARAMS)
    assert good.exit_code == 0, good.output
    imported = _invoke("import", "llama", "--hf", tmp_path / "good", "--into", source, "--out", tmp_path / "new",
                       "--quiet", *flags)
    for result in (exported, imported):
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {source / 'release/.metadata'}: "), result.output
        assert phrase in lines[0] and "Traceback" not in result.output, lines[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "new").exists()


def test_the_ungated_nemotron_spec_on_a_gated_checkpoint_is_refused_and_check_reports_qm107(tmp_path):
    """int8_tp2 is SwiGLU (linear_fc1 saved as weight_w and weight_v): nemotron maps linear_fc1 as up_proj
    alone, so an export would write gate and up together as up_proj. Export and import refuse; check says QM107."""
    source, fc1 = DATA / "int8_tp2/ckpt", "decoder.layers.0.mlp.linear_fc1.weight"
    phrase = f"the checkpoint saves {fc1} gated, as SwiGLU halves ({fc1}_w and {fc1}_v), but the spec maps it as one " \
             f"ungated tensor (model.layers.0.mlp.up_proj.weight)"
    good = _invoke("export", "llama", "--megatron", source, "--out", tmp_path / "good", "--quiet", *SIZE_PARAMS)
    assert good.exit_code == 0, good.output
    for result in (_invoke("export", "nemotron", "--megatron", source, "--out", tmp_path / "hf", "--quiet", *SIZE_PARAMS),
                   _invoke("import", "nemotron", "--hf", tmp_path / "good", "--into", source, "--out", tmp_path / "new",
                           "--quiet", *SIZE_PARAMS)):
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.output
    assert not (tmp_path / "hf").exists() and not (tmp_path / "new").exists()
    checked = _invoke("check", "nemotron", "--megatron", source, "--strict")
    assert checked.exit_code == 1 and "QM107" in checked.output and phrase in checked.output, checked.output
    assert _invoke("check", "llama", "--megatron", source, "--strict").exit_code == 0


def test_a_gated_spec_on_an_ungated_checkpoint_is_reported_qm107_and_refused(tmp_path):
    """A torch_dist checkpoint saved as Megatron-Core saves an ungated MLP (one linear_fc1.weight, no halves):
    llama would cut it into gate and up; nemotron maps it as it is."""
    directory = tmp_path / "ckpt" / "iter_0000001"
    state = {"decoder.layers.0.mlp.linear_fc1.weight": torch.ones(128, 64),
             "decoder.layers.0.mlp.linear_fc2.weight": torch.ones(64, 128),
             "decoder.layers.0.mlp.linear_fc1.input_quantizer._amax": torch.ones(1),
             "decoder.layers.0.mlp.linear_fc2.input_quantizer._amax": torch.ones(1)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    (tmp_path / "ckpt/latest_checkpointed_iteration.txt").write_text("1")
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    phrase = f"the checkpoint saves {fc1} as one ungated tensor (no {fc1}_w and {fc1}_v halves), but the spec cuts it"
    checked = _invoke("check", "llama", "--megatron", tmp_path / "ckpt")
    assert "QM107" in checked.output and phrase in checked.output, checked.output
    assert "QM107" not in _invoke("check", "nemotron", "--megatron", tmp_path / "ckpt").output
    exported = _invoke("export", "llama", "--megatron", tmp_path / "ckpt", "--out", tmp_path / "hf", "--quiet")
    assert exported.exit_code == 1 and phrase in exported.output and not (tmp_path / "hf").exists(), exported.output
    assert _invoke("export", "nemotron", "--megatron", tmp_path / "ckpt", "--out", tmp_path / "ok", "--quiet").exit_code == 0
