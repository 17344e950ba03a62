"""A torch_dist checkpoint's model weights, read lazily for a format that takes them: bit-identical to plain
``torch.distributed.checkpoint.load`` converted by hand (SwiGLU halves, stacked layers), the same model at TP=1
and TP=2, only the asked-for tensor's bytes read, and one error naming the key for each kind of bad input."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import quantmap
from executor_support import run_ranks
from megatron_layout import llama_hf_by_hand
from quantmap.executor import RunOptions
from quantmap.executor.launch import export_from
from quantmap.executor.sources import TorchDistCheckpoint
from quantmap.executor.torch_dist_checkpoint import CheckpointState, read_checkpoint
from quantmap.formats import FORMATS, unchanged
from quantmap.io.hf import Checkpoint, model_files
from quantmap.io.torch_dist import TorchDistError, locate, read_entries
from quantmap.io.torch_dist import read as read_module
from quantmap.roles import NORM, QUANTIZER_ROLES, WEIGHT

DATA = Path(__file__).parent / "data" / "dcp"
FIXTURES = ["fp8_kv_tp1", "fp8_kv_tp2", "int8_tp2"]
LAYERS, HEADS, GROUPS, HEAD_DIM, HIDDEN = 2, 4, 2, 16, 64
SIZES = dict(num_attention_heads=HEADS, num_query_groups=GROUPS, head_dim=HEAD_DIM)
PER_LAYER = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
             "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc2.weight")


def plain_load(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor that is not quantizer state, as torch itself loads it (global, whatever the saving layout)."""
    entries = read_entries(directory)
    target = {key: torch.empty(entry.shape, dtype=getattr(torch, entry.dtype)) for key, entry in entries.items()
              if entry.dtype is not None and "quantizer" not in key}
    dcp.load(target, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    return target


def by_hand(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict form of a per-layer (singleton) save, written out: ``linear_fc1.weight`` is
    ``cat([weight_w, weight_v])``, every other key is its own name."""
    out = {}
    for key, tensor in raw.items():
        if key.endswith("linear_fc1.weight_w"):
            out[key[:-2]] = torch.cat([tensor, raw[key[:-1] + "v"]])
        elif not key.endswith("linear_fc1.weight_v"):
            out[key] = tensor
    return out


def weights_of(directory: Path, world: int = 1, rank: int = 0) -> dict[str, torch.Tensor]:
    _, state, _ = read_checkpoint(locate(directory), world, rank, weights=True)
    assert isinstance(state, CheckpointState)
    return {name: state[name] for name in state if "quantizer" not in name}


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_weight_is_bit_identical_to_torch_load_converted_by_hand(fixture):
    directory = locate(DATA / fixture / "ckpt").path
    want, got = by_hand(plain_load(directory)), weights_of(directory)
    assert sorted(got) == sorted(want) and len(got) == 3 + 6 * LAYERS
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert _bits(got[name]) == _bits(tensor), name
    assert got["decoder.layers.1.mlp.linear_fc1.weight"].shape == (256, HIDDEN)


def test_tp1_and_tp2_saves_of_one_model_read_to_the_same_weights():
    tp1, tp2 = weights_of(DATA / "fp8_kv_tp1/ckpt"), weights_of(DATA / "fp8_kv_tp2/ckpt")
    assert sorted(tp1) == sorted(tp2) and all(_bits(tp1[name]) == _bits(tp2[name]) for name in tp1)


def test_a_weight_read_into_a_slice_of_a_buffer_equals_the_plain_read_and_touches_nothing_else():
    """``read_into`` (what the export's writer uses: the weight's bytes straight into the output file's buffer)
    gives the plain read's bits for TP=2 chunks split on either axis and SwiGLU's halves, and leaves the
    bytes around the slice as they were."""
    _, state, _ = read_checkpoint(locate(DATA / "fp8_kv_tp2/ckpt"), weights=True)
    split = [name for name, weight in state.weights.items() if len(state.stored[weight.parts[0].key].chunks) > 1]
    halves = [name for name, weight in state.weights.items() if len(weight.parts) == 2]
    assert {"decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc2.weight",
            "decoder.layers.1.mlp.linear_fc1.weight"} <= set(split) and "decoder.layers.1.mlp.linear_fc1.weight" in halves
    for name in split + halves:
        plain = state[name]
        width = plain.numel() * plain.element_size()
        buffer = torch.full((width + 64,), 0xA5, dtype=torch.uint8)
        state.read_into(name, buffer[32:32 + width].view(plain.dtype).view(plain.shape))
        assert _bits(buffer[32:32 + width]) == _bits(plain), name
        assert bool((buffer[:32] == 0xA5).all()) and bool((buffer[32 + width:] == 0xA5).all()), name


def test_each_pipeline_stage_holds_only_its_layers_under_local_names():
    whole = weights_of(DATA / "fp8_kv_tp2/ckpt")
    first, last = weights_of(DATA / "fp8_kv_tp2/ckpt", 2, 0), weights_of(DATA / "fp8_kv_tp2/ckpt", 2, 1)
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" in last
    assert "output_layer.weight" not in first and "embedding.word_embeddings.weight" not in last
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc1.weight"], whole["decoder.layers.1.mlp.linear_fc1.weight"])
    assert len(first) + len(last) == len(whole)


# -- stacked layers (an unquantized Megatron-Core save: singleton_local_shards off) ----------------------

def stacked_keys(per_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron-Core's stacked form by hand: ``decoder.layers.<param>`` ``[L, ...]``, ``linear_fc1.weight``
    whole (``[gate; up]``), everything outside the layers as it is."""
    out = {key: tensor for key, tensor in per_layer.items() if not key.startswith("decoder.layers.")}
    for param in (*PER_LAYER, "mlp.linear_fc1.weight"):
        out[f"decoder.layers.{param}"] = torch.stack([per_layer[f"decoder.layers.{layer}.{param}"]
                                                      for layer in range(LAYERS)])
    return out


def save_stacked(directory: Path, state: dict[str, torch.Tensor], per_layer_chunks: bool) -> None:
    """Save ``state`` with dcp; with ``per_layer_chunks`` each stacked key is one chunk per layer at offset
    ``(layer, 0, ...)``, as Megatron's sharded state dict saves it (``.metadata`` rewritten with torch's own
    classes: each layer saved as ``[1, ...]`` under a scratch key, then recorded as that chunk)."""
    if not per_layer_chunks:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
        return
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    flat = {}
    for key, tensor in state.items():
        if key.startswith("decoder.layers."):
            flat |= {f"scratch.{layer}.{key}": tensor[layer:layer + 1].clone() for layer in range(LAYERS)}
        else:
            flat[key] = tensor
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    for key, tensor in state.items():
        if not key.startswith("decoder.layers."):
            continue
        rest = (0,) * (tensor.dim() - 1)
        chunks = []
        for layer in range(LAYERS):
            scratch = f"scratch.{layer}.{key}"
            record = metadata.state_dict_metadata.pop(scratch)
            metadata.storage_data[MetadataIndex(key, torch.Size((layer, *rest)))] = \
                metadata.storage_data.pop(MetadataIndex(scratch, torch.Size((0, *rest))))
            chunks.append(ChunkStorageMetadata(torch.Size((layer, *rest)), torch.Size((1, *tensor.shape[1:]))))
        metadata.state_dict_metadata[key] = type(record)(record.properties, torch.Size(tensor.shape), chunks)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("per_layer_chunks", [True, False], ids=["chunk-per-layer", "one-chunk"])
def test_a_stacked_checkpoint_reads_to_the_per_layer_weights(tmp_path, per_layer_chunks):
    per_layer = by_hand(plain_load(locate(DATA / "fp8_kv_tp1/ckpt").path))
    stacked = stacked_keys(per_layer)
    save_stacked(tmp_path / "ckpt", stacked, per_layer_chunks)
    assert torch.equal(plain_load(tmp_path / "ckpt")["decoder.layers.mlp.linear_fc2.weight"],
                       stacked["decoder.layers.mlp.linear_fc2.weight"])  # the layout torch itself reads back
    got = weights_of(tmp_path / "ckpt")
    assert sorted(got) == sorted(per_layer)
    assert all(_bits(got[name]) == _bits(tensor) for name, tensor in per_layer.items())


def _count_reads(monkeypatch) -> list[int]:
    sizes = []
    real = read_module._read_range

    def counting(directory, file, start, end, *args, **kwargs):
        sizes.append(end - start)
        return real(directory, file, start, end, *args, **kwargs)

    monkeypatch.setattr(read_module, "_read_range", counting)
    return sizes


@pytest.mark.parametrize("per_layer_chunks", [True, False], ids=["chunk-per-layer", "one-chunk"])
def test_reading_one_weight_reads_only_its_bytes(tmp_path, monkeypatch, per_layer_chunks):
    """Naming the weights reads nothing; one layer of a stacked key reads that layer's bytes (plus, for a chunk
    of several layers, its archive's directory and header), even with every other tensor's bytes overwritten."""
    per_layer = by_hand(plain_load(locate(DATA / "fp8_kv_tp1/ckpt").path))
    save_stacked(tmp_path / "ckpt", stacked_keys(per_layer), per_layer_chunks)
    wanted = "decoder.layers.1.mlp.linear_fc1.weight"
    directory, key = tmp_path / "ckpt", "decoder.layers.mlp.linear_fc1.weight"
    for other, entry in read_entries(directory).items():
        for chunk in entry.chunks if other != key else ():
            with open(directory / chunk.file, "r+b") as stream:
                stream.seek(chunk.offset)
                stream.write(b"\xff" * chunk.length)
    sizes = _count_reads(monkeypatch)
    _, state, _ = read_checkpoint(locate(directory), weights=True)
    assert wanted in state and not sizes  # no quantizer state here, and names come from .metadata
    assert _bits(state[wanted]) == _bits(per_layer[wanted])
    layer_bytes = per_layer[wanted].numel() * 4
    assert layer_bytes <= sum(sizes) <= layer_bytes + (5 << 10), sizes


# -- bad input --------------------------------------------------------------------------------------

def _copy(tmp_path: Path, fixture: str = "fp8_kv_tp2") -> Path:
    shutil.copytree(DATA / fixture / "ckpt", tmp_path / "ckpt")
    return locate(tmp_path / "ckpt").path


def _edit_metadata(directory: Path, edit) -> None:
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    edit(metadata)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_missing_chunk_of_a_weight_is_refused_naming_it(tmp_path):
    directory = _copy(tmp_path)
    _edit_metadata(directory, lambda m: m.state_dict_metadata["decoder.layers.1.mlp.linear_fc2.weight"].chunks.pop(1))
    with pytest.raises(TorchDistError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight.*leaving a gap"):
        read_checkpoint(locate(directory), weights=True)


def test_a_truncated_distcp_is_refused_naming_the_weight_before_any_read_and_when_read(tmp_path):
    directory = _copy(tmp_path)
    last = {}  # each file's last chunk: truncating it cuts only that key
    for key, entry in read_entries(directory).items():
        for chunk in entry.chunks:
            if chunk.file not in last or chunk.offset > last[chunk.file][1].offset:
                last[chunk.file] = (key, chunk)
    key, chunk = next((key, chunk) for key, chunk in last.values() if "quantizer" not in key)
    _, state, _ = read_checkpoint(locate(directory), weights=True)
    with open(directory / chunk.file, "r+b") as stream:
        stream.truncate(chunk.offset + 10)
    shown = key.replace(".", r"\.")
    with pytest.raises(TorchDistError, match=rf"^{shown} \(checkpoint key {shown}\): .*records bytes up to offset "
                                             rf"{chunk.offset + chunk.length}, but the file has {chunk.offset + 10}"):
        state[key]  # truncated after the state was made: refused when read
    with pytest.raises(TorchDistError, match=rf"^{shown}: .*records bytes up to .* truncated"):
        read_checkpoint(locate(directory), weights=True)  # refused up front, before anything is read
    read_checkpoint(locate(directory))  # the quantizer state alone never reads that key


def _save(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt"


@pytest.mark.parametrize(("state", "phrase"), [
    ({"decoder.layers.0.mlp.linear_fc2.weight": torch.ones(2, 2, dtype=torch.int32)},
     r"decoder\.layers\.0\.mlp\.linear_fc2\.weight: a model tensor of dtype int32"),
    ({"decoder.layers.0.mlp.linear_fc1.weight_w": torch.ones(4, 2), "decoder.layers.0.mlp.linear_fc1.weight_v":
      torch.ones(3, 2)}, r"linear_fc1\.weight_w and .*linear_fc1\.weight_v: SwiGLU halves of shapes \[4, 2\] and \[3, 2\]"),
    ({"decoder.layers.0.mlp.linear_fc1.weight_w": torch.ones(4, 2)}, r"linear_fc1\.weight_w: a SwiGLU half without "
                                                                      r"its v half"),
    ({"decoder.layers.3.mlp.linear_fc2.weight": torch.ones(2, 2), "decoder.layers.mlp.linear_fc1.weight":
      torch.ones(2, 4, 2)}, r"decoder\.layers\.mlp\.linear_fc1\.weight: a stacked-layers key of 2 layers .* has 4"),
], ids=["non-float", "halves-differ", "one-half", "stacked-axis"])
def test_a_malformed_weight_is_refused_naming_its_key(tmp_path, state, phrase):
    with pytest.raises(TorchDistError, match=phrase):
        read_checkpoint(locate(_save(tmp_path, state)), weights=True)


def test_optimizer_state_and_bytes_entries_are_left_out_and_counted(tmp_path):
    directory = _save(tmp_path, {"decoder.layers.0.mlp.linear_fc2.weight": torch.ones(2, 2),
                                 "optimizer.state.exp_avg.decoder.layers.0.mlp.linear_fc2.weight": torch.ones(2, 2),
                                 "optimizer.state.step": torch.tensor(3), "rng_state": b"opaque"})
    _, state, left_out = read_checkpoint(locate(directory), weights=True)
    assert list(state) == ["decoder.layers.0.mlp.linear_fc2.weight"] and left_out == (2, 1)


# -- export ---------------------------------------------------------------------------------------

WEIGHTS = unchanged("test-weights", "weights, norms and the quantizer state, as is", {WEIGHT, NORM} | QUANTIZER_ROLES)


def hf_by_hand(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return llama_hf_by_hand(state, LAYERS, HEADS, GROUPS, HEAD_DIM)


def test_export_of_fp8_kv_tp1_with_a_format_taking_weights_gives_the_hand_converted_hf_weights(tmp_path, monkeypatch):
    """``export_from``, what ``quantmap export --megatron`` runs once its options are parsed (the CLI's
    --format choices are fixed when it is imported, so a test-only format is passed as the options)."""
    monkeypatch.setitem(FORMATS, WEIGHTS.name, WEIGHTS)
    checkpoint = DATA / "fp8_kv_tp1" / "ckpt"
    export_from(quantmap.compile("llama", **SIZES), checkpoint, tmp_path / "hf", RunOptions(format=WEIGHTS.name))
    exported = Checkpoint(tmp_path / "hf")
    want = hf_by_hand(by_hand(plain_load(locate(checkpoint).path)))
    names = set(exported.names())
    assert set(want) <= names and all(name.endswith("_amax") for name in names - set(want))
    for name, tensor in want.items():
        assert _bits(exported.get(name)) == _bits(tensor.contiguous()), name


def test_experts_per_key_and_on_stacked_axes_read_as_sequential_mlp_names(tmp_path):
    """SequentialMLP or grouped experts: one key per expert (``experts.experts.{E}``, SwiGLU halves), or on a
    leading axis of their own, after the layers' (``mlp.experts.linear_fc1.weight`` ``[L, E, ...]``, Megatron's
    stacked form for both) or alone (``decoder.layers.{L}.mlp.experts...`` ``[E, ...]``, non-homogeneous layers)."""
    g = torch.Generator().manual_seed(0)
    fc1, fc2, single = torch.randn(2, 3, 4, 2, generator=g), torch.randn(3, 2, 2, generator=g), torch.randn(2, 2, generator=g)
    _, state, _ = read_checkpoint(locate(_save(tmp_path, {
        "decoder.layers.mlp.experts.linear_fc1.weight": fc1, "decoder.layers.0.mlp.experts.linear_fc2.weight": fc2,
        "decoder.layers.1.mlp.experts.experts.4.linear_fc1.weight_w": single,
        "decoder.layers.1.mlp.experts.experts.4.linear_fc1.weight_v": single + 1})), weights=True)
    want = {f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight": fc1[layer, expert]
            for layer in range(2) for expert in range(3)}
    want |= {f"decoder.layers.0.mlp.experts.local_experts.{expert}.linear_fc2.weight": fc2[expert] for expert in range(3)}
    want["decoder.layers.1.mlp.experts.local_experts.4.linear_fc1.weight"] = torch.cat([single, single + 1])
    assert sorted(state) == sorted(want) and all(torch.equal(state[name], tensor) for name, tensor in want.items())


def test_a_chunk_of_several_layers_whose_archive_is_damaged_is_refused_naming_the_key(tmp_path):
    """The byte-range slice reads a chunk's zip directory first; a damaged one falls back to reading the chunk
    whole, whose bytes then fail as any chunk's do, with the key named."""
    directory = _save(tmp_path, {"decoder.layers.mlp.linear_fc2.weight": torch.ones(2, 4, 4)})
    chunk = read_entries(directory)["decoder.layers.mlp.linear_fc2.weight"].chunks[0]
    with open(directory / chunk.file, "r+b") as stream:
        stream.seek(chunk.offset + chunk.length - 22)
        stream.write(b"\x00" * 22)  # the end-of-directory record
    _, state, _ = read_checkpoint(locate(directory), weights=True)
    with pytest.raises(TorchDistError, match=r"^decoder\.layers\.1\.mlp\.linear_fc2\.weight \(checkpoint key "
                                             r"decoder\.layers\.mlp\.linear_fc2\.weight\): .*not a saved tensor"):
        state["decoder.layers.1.mlp.linear_fc2.weight"]


def _export_counting_bytes(checkpoint: Path, out: Path, options: RunOptions, failing: int | None = None) -> int:
    """One gloo rank's export of a torch_dist checkpoint (as ``quantmap export --nproc`` runs it): the bytes
    it moved (sent and received, metadata included). On rank ``failing``, every read of another rank's weight fails."""
    import torch.distributed as dist

    from quantmap.executor.export import export
    from quantmap.executor.placement import Placement

    rules = quantmap.compile("llama", **SIZES)
    layout, state = TorchDistCheckpoint(checkpoint).read(dist.get_world_size(), dist.get_rank(), rules,
                                                         options.output_format)
    if dist.get_rank() == failing:
        def read_shared(name, out):
            raise OSError("disk read failed")
        state.read_shared = read_shared
    return export(rules, state, Placement.from_world(layout), out=out, options=options).bytes


def _files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def test_at_two_ranks_each_writer_reads_the_weights_itself_and_only_quantizer_state_moves(tmp_path):
    """The checkpoint's files are every process's to read: a writer reads the weights its file needs from
    them, whichever stage holds them, and no weight byte crosses gloo; the files are the one-process export's."""
    checkpoint = DATA / "fp8_kv_tp2" / "ckpt"
    config = model_files(config=DATA / "reference" / "hf_config_dense.json")
    options = RunOptions(format="hf", shard_size=64 << 10, model_files=config)  # several files, both ranks write
    export_from(quantmap.compile("llama", **SIZES), checkpoint, tmp_path / "one", options)
    outcomes = run_ranks(2, _export_counting_bytes, checkpoint, tmp_path / "two", options)
    assert all(outcome[0] == "ok" for outcome in outcomes), outcomes
    one = _files(tmp_path / "one")
    assert _files(tmp_path / "two") == one
    model = Checkpoint(tmp_path / "one", nested=False)
    weights = sum(model.get(name).nbytes for name in model.names())
    quantizer_state = sum(len(data) for name, data in one.items() if name.startswith("quantizer_state/"))
    assert len([name for name in one if name.startswith("model-")]) >= 4 and weights > 200_000
    for moved in (outcome[1] for outcome in outcomes):
        # metadata and quantizer state (2.7 kB of 362 kB): before, every weight of the other stage came too
        assert moved < quantizer_state + 10_000 < weights / 20, (moved, quantizer_state, weights)


def _export_recording_writes(checkpoint: Path, out: Path, options: RunOptions, cores: int | None) -> list[str]:
    """A spawned worker's export (as ``--nproc`` runs it, ``cores`` as the launcher measures them), and the
    files this rank wrote."""
    from quantmap.executor import launch, writers

    wrote, write_shard = [], writers.write_shard

    def recording(path, records, indices):
        wrote.append(Path(path).name)
        return write_shard(path, records, indices)

    writers.write_shard = recording
    launch._export_rank(quantmap.compile("llama", **SIZES), TorchDistCheckpoint(checkpoint), str(out), options, cores)
    return wrote


def test_spawned_workers_write_with_no_more_writers_than_cores_and_the_same_files(tmp_path):
    """Four workers on a machine that lends them two cores: two writers (the first rank of each half, as
    ``writer_ranks`` spreads them) write every file, and the files are those of one writer per stage."""
    checkpoint = DATA / "fp8_kv_tp2" / "ckpt"
    config = model_files(config=DATA / "reference" / "hf_config_dense.json")
    options = RunOptions(format="hf", shard_size=64 << 10, model_files=config)
    per_stage = run_ranks(4, _export_recording_writes, checkpoint, tmp_path / "per-stage", options, None)
    capped = run_ranks(4, _export_recording_writes, checkpoint, tmp_path / "capped", options, 2)
    assert all(outcome[0] == "ok" for outcome in per_stage + capped), per_stage + capped
    assert all(outcome[1] for outcome in per_stage), "precondition: every stage writes files"
    files = sorted(name for outcome in per_stage for name in outcome[1])
    assert [bool(outcome[1]) for outcome in capped] == [True, False, True, False]
    assert sorted(name for outcome in capped for name in outcome[1]) == files and len(files) >= 4
    assert _files(tmp_path / "capped") == _files(tmp_path / "per-stage")


@pytest.mark.parametrize("failing", [0, 1])
def test_a_writer_whose_read_of_another_stages_weight_fails_fails_every_rank_and_writes_nothing(tmp_path, failing):
    """Every rank raises the failing writer's error, naming the weight; no rank waits on a transfer; no output."""
    config = model_files(config=DATA / "reference" / "hf_config_dense.json")
    options = RunOptions(format="hf", shard_size=64 << 10, model_files=config)
    outcomes = run_ranks(2, _export_counting_bytes, DATA / "fp8_kv_tp2" / "ckpt", tmp_path / "hf", options, failing)
    assert [outcome[0] for outcome in outcomes] == ["error", "error"], outcomes
    assert outcomes[0][1] == outcomes[1][1], "ranks disagree on the error"
    message = outcomes[0][1]
    assert f"rank {failing} writing" in message and "OSError: disk read failed" in message, message
    assert "reading 'decoder." in message and "nothing was written" in message, message
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []
