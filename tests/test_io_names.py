"""Reading tensor names from text files, safetensors headers, indexes and checkpoint directories."""

from __future__ import annotations

import json
import re
import struct

import pytest

from quantmap.io.names import NamesFileError, read_names


def write_safetensors(path, names: list[str]) -> None:
    """A valid safetensors file (one float32 scalar per name), written without torch."""
    header = {"__metadata__": {"format": "pt"}}
    header.update({name: {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]}
                   for i, name in enumerate(names)})
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(names))


def test_a_text_file_gives_one_name_per_line_skipping_blanks_comments_and_repeats(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# dumped keys\nb.weight\n\n  a.weight  \nb.weight\n")
    assert read_names(path) == ["b.weight", "a.weight"]


def test_a_safetensors_file_gives_its_header_names_without_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, ["x.weight", "y.weight_quantizer._amax"])
    assert read_names(path) == ["x.weight", "y.weight_quantizer._amax"]


def test_names_agree_with_the_safetensors_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    path = tmp_path / "real.safetensors"
    save_file({"b.weight": torch.zeros(2, 3), "a.bias": torch.ones(1)}, str(path))
    assert sorted(read_names(path)) == ["a.bias", "b.weight"]


def test_an_index_gives_its_weight_map_names(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": {"a.weight": "1.safetensors", "b.weight": "2.safetensors"}}))
    assert read_names(path) == ["a.weight", "b.weight"]


def test_a_directory_prefers_its_index_over_the_shards(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00001.safetensors", ["shard.weight"])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"index.weight": "x"}}))
    assert read_names(tmp_path) == ["index.weight"]


def test_a_directory_without_an_index_reads_every_shard_in_order(tmp_path):
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", ["b.weight"])
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", ["a.weight"])
    assert read_names(tmp_path) == ["a.weight", "b.weight"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.txt", "no such file or directory"),
    (lambda d: d, "holds no *.safetensors file"),
    (lambda d: _write(d / "x.safetensors", b"\xff" * 20), "header length"),
    (lambda d: _write(d / "y.safetensors", b"abc"), "too short"),
    (lambda d: _write(d / "z.safetensors", struct.pack("<Q", 3) + b"{x}"), "header is not JSON"),
    (lambda d: _write(d / "m.safetensors.index.json", b'{"metadata": {}}'), "no 'weight_map'"),
    (lambda d: _write(d / "n.txt", b"\xff\xfe"), "not UTF-8"),
    (lambda d: _write(d / "t.safetensors.index.json", b'{"weight_map": {"a.weight": "1.st", "a.weight": "2.st"}}'),
     "'a.weight' is listed twice"),
])
def test_unreadable_sources_raise_names_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(NamesFileError, match=re.escape(message)) as raised:
        read_names(path)
    assert str(path) in str(raised.value)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
