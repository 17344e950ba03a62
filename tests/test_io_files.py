"""The file formats: the streaming safetensors writer, HF sharding and index, staged directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from quantmap.io.hf import INDEX, Checkpoint, write_checkpoint
from quantmap.io.staging import OutputError, Staged


class _Tensors:
    """Records over plain (names, tensor) pairs."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def spec(self, i):
        names, tensor = self.pairs[i]
        return len(names), tensor.dtype, tuple(tensor.shape)

    def names(self, i):
        return self.pairs[i][0]

    def tensor(self, i):
        return self.pairs[i][1]


PAIRS = [
    (["a.q_proj.weight_quantizer._amax", "a.k_proj.weight_quantizer._amax"], torch.tensor(1.5)),
    (['odd "quoted" \\ näme'], torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)),
    (["fp8"], torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)),
    (["big"], torch.arange(40, dtype=torch.int32)),
    (["mask"], torch.tensor([True, False, True])),
]


@pytest.mark.parametrize("shard_size", [1, 64, 10**9])
def test_streamed_shards_read_back_with_safetensors_and_the_index_covers_every_name(tmp_path, shard_size):
    files = write_checkpoint(tmp_path, _Tensors(PAIRS), shard_size)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) == {1: 5, 64: 3, 10**9: 1}[shard_size]
    assert [f.name for f in shards][0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / INDEX).read_text())
    expected = {name: tensor for names, tensor in PAIRS for name in names}
    assert sorted(index["weight_map"]) == sorted(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert all(index["weight_map"][name] == shard.name for name in handle.keys())
    checkpoint = Checkpoint(tmp_path)
    for name, tensor in expected.items():
        got = checkpoint.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_a_staged_directory_appears_only_when_published(tmp_path):
    staged = Staged(tmp_path / "out")
    (staged.path / "file").write_text("x")
    assert not (tmp_path / "out").exists()
    staged.publish()
    assert (tmp_path / "out" / "file").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    class Broken(_Tensors):
        def tensor(self, i):
            raise RuntimeError("boom")

    staged = Staged(tmp_path / "out")
    with pytest.raises(RuntimeError):
        write_checkpoint(staged.path, Broken(PAIRS))
    staged.discard()
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OutputError, match="already exists and is not an empty directory"):
        Staged(tmp_path / "out")
