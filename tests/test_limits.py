"""Every size read from a file or a flag is bounded before anything is allocated or enumerated
(quantmap/limits.py; issue 19, item 17): each entry point refuses an absurd size with one line naming
its source and the limit, at once, and writes nothing."""

import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import quantmap
from quantmap.cli import app
from quantmap.diagnostics import SpecError
from quantmap.parallel import LayoutError, ParallelLayout
from quantmap.io.torch_dist import TorchDistError, locate
from quantmap.io.torch_dist.metadata import METADATA_FILE, load_metadata
from quantmap.limits import MAX_EXPERTS, MAX_LAYERS, MAX_SPEC_BYTES, MAX_TRACKER_BYTES
from quantmap.spec import load_spec

DCP = Path(__file__).parent / "data" / "dcp" / "int8_tp2" / "ckpt"


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_2_gib_spec_is_refused_by_its_size_without_reading_it(tmp_path):
    spec = tmp_path / "huge.yaml"
    with spec.open("wb") as stream:
        stream.truncate(2 << 30)  # sparse: 2 GiB that were never written
    with pytest.raises(SpecError) as error:
        load_spec(spec)
    diagnostic, = error.value.diagnostics
    assert diagnostic.code == "QM004" and f"{2 << 30:,} bytes" in diagnostic.message
    assert f"{MAX_SPEC_BYTES:,}" in diagnostic.message


def test_a_100_mb_tracker_file_is_refused_in_one_line(tmp_path):
    save = tmp_path / "save"
    shutil.copytree(DCP, save)
    with (save / "latest_checkpointed_iteration.txt").open("wb") as stream:
        stream.write(b"1" * 1000)
        stream.truncate(100 << 20)
    with pytest.raises(TorchDistError) as error:
        locate(save)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400
    assert f"{100 << 20:,}" in message and f"limit of {MAX_TRACKER_BYTES}" in message


def test_layout_json_with_a_billion_layers_or_experts_is_refused(tmp_path):
    for key, limit in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS)):
        layout = tmp_path / "layout.json"
        layout.write_text(f'{{"tp": 1, "pp": 1, "dp": 1, "num_layers": 4, "{key}": 1000000000}}')
        with pytest.raises(LayoutError, match=f"{key} is 1,000,000,000, over quantmap's limit of {limit:,}"):
            ParallelLayout.read(layout)


def test_a_run_time_parameter_over_its_limit_is_a_spec_error_before_any_rule_is_built():
    with pytest.raises(SpecError) as error:
        quantmap.compile("mixtral", num_experts=1_000_000_000)
    diagnostic, = error.value.diagnostics
    assert diagnostic.code == "QM050" and f"limit of {MAX_EXPERTS:,}" in diagnostic.message
    result = _invoke("lookup", "mixtral", "-p", "num_experts=1000000000", "model.layers.0.mlp.experts.0.w1.weight")
    assert result.exit_code == 1 and "num_experts" in result.output and "Traceback" not in result.output


def test_names_refuses_huge_counts_and_dense_ranges_before_enumerating():
    started = time.process_time()
    result = _invoke("names", "llama", "--side", "hf", "--layers", "1000000000")
    assert result.exit_code == 2 and str(MAX_LAYERS) in result.output
    result = _invoke("names", "llama", "--side", "hf", "--layers", "4",
                     "--dense-layers", "0-1000000000")
    assert result.exit_code == 2 and "names a layer >= --layers 4" in result.output
    assert time.process_time() - started < 30  # enumerating 10⁹ layers took minutes and 10 GB


def test_names_streams_so_head_ends_it_at_once_and_quietly():
    """A listing of the most layers allowed: the first lines arrive before the rest is made, and a reader
    that closes the pipe ends the command quietly, as SIGPIPE would (exit 128 + 13), without a traceback."""
    command = [sys.executable, "-m", "quantmap", "names", "llama", "--side", "hf", "--layers", str(MAX_LAYERS)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = [process.stdout.readline() for _ in range(2)]
    process.stdout.close()  # what '| head -2' does
    assert process.wait(timeout=120) == 141
    assert first == [b"lm_head.input_quantizer._amax\n", b"lm_head.input_quantizer._pre_quant_scale\n"]
    assert process.stderr.read() == b""


def test_names_json_streams_the_same_text_as_json_dumps():
    import json

    result = _invoke("names", "llama", "--side", "megatron", "--layers", "2", "--json")
    assert result.exit_code == 0
    names = json.loads(result.output)
    assert result.output == json.dumps(names, indent=2) + "\n" and len(names) > 10


def _edit_metadata(tmp_path: Path, edit) -> Path:
    """A copy of a real torch_dist checkpoint whose .metadata ``edit`` changed (real torch classes)."""
    save = tmp_path / "ckpt"
    shutil.copytree(DCP, save)
    iteration = save / "release"
    metadata = load_metadata(iteration, real=True)
    edit(metadata)
    (iteration / METADATA_FILE).write_bytes(pickle.dumps(metadata))
    return save


def _export_refuses(tmp_path: Path, save: Path, phrase: str) -> None:
    out = tmp_path / "out"
    started = time.process_time()
    result = _invoke("export", "llama", "--megatron", save, "--out", out, "-q")
    assert result.exit_code == 1, result.output
    line, = result.output.strip().splitlines()
    assert line.startswith("error: ") and phrase in line, line
    assert not out.exists()
    assert time.process_time() - started < 30


def test_a_metadata_key_for_layer_one_billion_is_refused(tmp_path):
    def add_far_layer(metadata):
        key = next(k for k in metadata.state_dict_metadata if "decoder.layers.0." in k and k.endswith("_amax"))
        far = key.replace("decoder.layers.0.", "decoder.layers.1000000000.")
        metadata.state_dict_metadata[far] = metadata.state_dict_metadata[key]
        for index, info in list(metadata.storage_data.items()):
            if index.fqn == key:
                metadata.storage_data[type(index)(far, index.offset, index.index)] = info

    save = _edit_metadata(tmp_path, add_far_layer)
    _export_refuses(tmp_path, save, f"the layer count it implies is 1,000,000,001, over quantmap's limit of {MAX_LAYERS:,}")


def test_a_chunk_length_of_2_40_is_refused_before_it_is_allocated(tmp_path):
    def lengthen(metadata):
        index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn.endswith("_amax"))
        info.length = 1 << 40

    save = _edit_metadata(tmp_path, lengthen)
    _export_refuses(tmp_path, save, "the file is truncated")
