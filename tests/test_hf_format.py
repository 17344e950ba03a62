"""The ``hf`` format on a shard directory: a tiny Llama built by transformers, laid out by hand as Megatron
TP=2 x PP=2 shards with some quantizer state, exported as a Hugging Face model directory that
``from_pretrained`` loads with every weight bit-equal; and each whole-model refusal, with nothing written."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch

import quantmap
from megatron_layout import megatron_llama, write_shards
from quantmap.executor import ExecutorError, OptionsError, ParallelLayout, RunOptions
from quantmap.executor.export import export_offline
from quantmap.executor.launch import export_from
from quantmap.io.hf import Checkpoint, model_files
from quantmap.io.shards import LazyShard, rank_file

transformers = pytest.importorskip("transformers")

SPECS = Path(__file__).parent / "data" / "specs"
LAYERS, HEADS, GROUPS, HIDDEN, VOCAB = 2, 4, 2, 32, 64
LAYOUT = ParallelLayout(tp=2, pp=2, num_layers=LAYERS)
LIKE_FILES = {"tokenizer.json": '{"version": "1.0"}\n', "generation_config.json": '{"do_sample": false}\n'}


def rules(spec: str = "llama"):
    return quantmap.compile(spec if spec == "llama" else SPECS / spec, num_attention_heads=HEADS, num_query_groups=GROUPS,
                            head_dim=HIDDEN // HEADS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny untied Llama, saved with its (dummy) tokenizer and generation files: the ``--like`` directory."""
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=GROUPS, vocab_size=VOCAB,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    like = tmp_path_factory.mktemp("like")
    model.save_pretrained(like)
    for name, text in LIKE_FILES.items():
        (like / name).write_text(text)
    return model, like


def quantizer_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = {}
    for layer in range(LAYERS):
        for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            for quantizer in ("weight_quantizer", "input_quantizer"):
                state[f"decoder.layers.{layer}.{module}.{quantizer}._amax"] = torch.rand((), generator=g) + 0.1
    return state


def megatron(model, drop=(), **extra) -> dict[str, torch.Tensor]:
    state = megatron_llama(model.state_dict(), LAYERS, HEADS, GROUPS) | quantizer_state() | extra
    return {name: tensor for name, tensor in state.items() if name not in drop}


def options(like, **given) -> RunOptions:
    return RunOptions(format="hf", model_files=model_files(like=like), **given)


def test_an_hf_export_loads_in_transformers_with_every_weight_bit_equal(llama, tmp_path):
    model, like = llama
    write_shards(tmp_path / "meg", megatron(model), LAYOUT)
    report = export_from(rules(), tmp_path / "meg", tmp_path / "hf", options(like, shard_size=20_000))
    out = tmp_path / "hf"
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    batch = torch.tensor([[1, 5, 9, 33, 2, 60], [7, 7, 0, 12, 45, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    # the non-weight files of --like, byte for byte, and none of its weight files
    assert sorted(p.name for p in out.iterdir() if p.is_file() and "safetensors" not in p.name) == sorted(
        ["config.json", *LIKE_FILES])
    assert all((out / name).read_bytes() == (like / name).read_bytes() for name in ["config.json", *LIKE_FILES])
    assert len(list(out.glob("model-*.safetensors"))) > 1  # --shard-size split it
    assert report.model and report.copied == ["config.json", *sorted(LIKE_FILES)] and not report.unclaimed
    assert report.output.tensors == len(expected) and report.quantizer_output.tensors == 2 * 7 * LAYERS


def test_the_quantizer_state_beside_the_model_is_the_quantizers_format_byte_for_byte(llama, tmp_path):
    model, like = llama
    write_shards(tmp_path / "meg", megatron(model), LAYOUT)
    export_from(rules(), tmp_path / "meg", tmp_path / "hf", options(like, dtype="bf16"))
    export_from(rules(), tmp_path / "meg", tmp_path / "quantizers", RunOptions())
    state, alone = tmp_path / "hf" / "quantizer_state", tmp_path / "quantizers"
    assert sorted(p.name for p in state.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert all((state / p.name).read_bytes() == p.read_bytes() for p in alone.iterdir())
    # --dtype casts the weights only
    weights = Checkpoint(tmp_path / "hf", nested=False)  # the model files alone, not quantizer_state/
    assert {weights.get(name).dtype for name in weights.names()} == {torch.bfloat16}
    original = model.state_dict()
    assert all(torch.equal(weights.get(name), original[name].to(torch.bfloat16)) for name in weights.names())


def test_a_lazy_shard_export_reads_each_weight_when_its_file_is_written(llama, tmp_path):
    """Weights are planned from the shard headers and read one output file at a time: the number of weight
    tensors alive at once stays at what one file needs, whatever the model's size. (With a file per HF
    tensor, q/k/v and gate/up each read their Megatron tensor again: every part is cut from all of it.)"""
    model, like = llama
    write_shards(tmp_path / "meg", megatron(model), LAYOUT)
    alive, read, counts = set(), set(), {"peak": 0, "reads": 0}

    class Counted(LazyShard):
        def __getitem__(self, name):
            tensor = super().__getitem__(name)
            if "quantizer" not in name:  # quantizer state is read and checked when packed, as ever
                key = (id(self), name, counts["reads"])
                counts["reads"] += 1
                read.add((id(self), name))
                alive.add(key)
                weakref.finalize(tensor, alive.discard, key)
                counts["peak"] = max(counts["peak"], len(alive))
            return tensor

    states = [Counted(rank_file(tmp_path / "meg", rank)) for rank in range(LAYOUT.world_size)]
    export_offline(rules(), states, LAYOUT, out=tmp_path / "hf", options=options(like, shard_size=1))
    weights = sum(1 for state in states for name in state if "quantizer" not in name)
    assert len(read) == weights == 30 and counts["peak"] == 1, counts


def test_a_written_files_buffers_are_freed_before_the_next_files_are_built(tmp_path, monkeypatch):
    """The writer holds one file's inputs at a time: when a file is written, no tensor built for the one before
    it is kept (a record of a single-rank checkpoint is a view into its file's buffer, which it would keep
    alive), so a process peaks near one shard, not two."""
    from quantmap.executor import writers

    checkpoint = Path(__file__).parent / "data" / "dcp" / "fp8_kv_tp1" / "ckpt"
    config = Path(__file__).parent / "data" / "dcp" / "reference" / "hf_config_dense.json"
    written = []

    def watched(path, records, indices):
        assert records._built is None, f"{path.name}: a tensor built for the file before is still held"
        written.append(path.name)
        return write_shard(path, records, indices)

    write_shard = writers.write_shard
    monkeypatch.setattr(writers, "write_shard", watched)
    export_from(quantmap.compile("llama", num_attention_heads=4, num_query_groups=2, head_dim=16), checkpoint,
                tmp_path / "hf", RunOptions(format="hf", model_files=model_files(config=config), shard_size=4096))
    assert len(written) > 3


# -- refusals: each before anything is written ------------------------------------------------------

def refused(llama, tmp_path, match, state=None, spec="llama", **given):
    model, like = llama
    write_shards(tmp_path / "meg", state if state is not None else megatron(model), LAYOUT)
    with pytest.raises(ExecutorError, match=match):
        export_from(rules(spec), tmp_path / "meg", tmp_path / "hf", given.pop("run", None) or options(like, **given))
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["meg"]


def test_a_model_without_a_config_is_refused_before_any_work_saying_how_to_give_one(llama, tmp_path):
    with pytest.raises(OptionsError, match="needs its config.json: pass --like HF_DIR.*or --config config.json"):
        RunOptions(format="hf").check_export()  # an import reads such a model back without one
    write_shards(tmp_path / "meg", megatron(llama[0]), LAYOUT)
    with pytest.raises(ExecutorError, match="needs its config.json"):
        export_from(rules(), tmp_path / "meg", tmp_path / "hf", RunOptions(format="hf"))
    assert not (tmp_path / "hf").exists()
    with pytest.raises(OptionsError, match="dtype must be None with format 'quantizers'"):
        RunOptions(dtype="bf16")
    from typer.testing import CliRunner

    from quantmap.cli import app

    run = CliRunner().invoke(app, ["export", "llama", "--megatron",
                                   str(tmp_path / "meg"), "--out", str(tmp_path / "hf"), "--format", "hf"])
    assert run.exit_code == 1 and "needs its config.json: pass --like HF_DIR" in run.output, run.output
    assert not (tmp_path / "hf").exists()


def test_an_unclaimed_weight_is_refused_by_name_or_left_out_and_listed_with_allow_partial(llama, tmp_path):
    stray = {"decoder.layers.1.self_attention.linear_extra.weight": torch.ones(4, HIDDEN)}
    state = megatron(llama[0], **stray)
    refused(llama, tmp_path, r"1 tensor\(s\) of the checkpoint that no rule of the spec claims, which the model "
                             r"would lack: decoder\.layers\.1\.self_attention\.linear_extra\.weight; .*--allow-partial",
            state)
    report = export_from(rules(), tmp_path / "meg", tmp_path / "hf", options(llama[1], allow_partial=True))
    assert report.unclaimed == list(stray)
    assert any("left out of the model" in line for line in report.lines())
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None


def test_an_untied_checkpoint_through_a_tied_spec_is_refused_naming_both(llama, tmp_path):
    refused(llama, tmp_path, r"holds output_layer\.weight \(untied.*spec maps no output_layer\.weight \(tied",
            spec="llama_tied.yaml")


def test_a_tied_checkpoint_through_an_untied_spec_is_refused_naming_both(llama, tmp_path):
    refused(llama, tmp_path, r"spec maps output_layer\.weight to lm_head\.weight \(untied.*holds no "
                             r"output_layer\.weight \(tied", megatron(llama[0], drop=("output_layer.weight",)))


def test_a_tied_checkpoint_through_a_tied_spec_writes_no_lm_head(llama, tmp_path):
    model, like = llama
    config = json.loads((like / "config.json").read_text()) | {"tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_shards(tmp_path / "meg", megatron(model, drop=("output_layer.weight",)), LAYOUT)
    run = RunOptions(format="hf", model_files=model_files(config=tmp_path / "config.json"))
    export_from(rules("llama_tied.yaml"), tmp_path / "meg", tmp_path / "hf", run)
    assert "lm_head.weight" not in Checkpoint(tmp_path / "hf").names()
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_a_config_whose_tie_word_embeddings_contradicts_the_checkpoint_is_refused(llama, tmp_path):
    config = json.loads((llama[1] / "config.json").read_text()) | {"tie_word_embeddings": True}
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "config.json").write_text(json.dumps(config))
    run = RunOptions(format="hf", model_files=model_files(config=tmp_path / "keep" / "config.json"))
    model, _ = llama
    write_shards(tmp_path / "meg", megatron(model), LAYOUT)
    with pytest.raises(ExecutorError, match=r"says tie_word_embeddings: true but the checkpoint holds "
                                            r"output_layer\.weight \(untied\)"):
        export_from(rules(), tmp_path / "meg", tmp_path / "hf", run)
    assert not (tmp_path / "hf").exists()


def test_a_weight_whose_tensor_parallel_split_is_unknown_is_refused_saying_how_to_fix_it(llama, tmp_path):
    """A spec that declares no ``parallel`` for the embedding: at TP=2 its halves cannot be joined."""
    model, like = llama
    write_shards(tmp_path / "meg", megatron(model), LAYOUT)
    with pytest.raises(ExecutorError, match=r"embedding\.word_embeddings\.weight .*does not declare 'parallel'.*"
                                            r"declare it in the spec"):
        export_from(rules("llama_unsplit_embedding.yaml"), tmp_path / "meg", tmp_path / "hf", options(like))
    assert not (tmp_path / "hf").exists()


def test_the_command_line_exports_a_model_like_its_hf_directory_and_says_what_to_run_next(llama, tmp_path):
    import shlex

    from typer.testing import CliRunner

    from quantmap.cli import app

    model, like = llama
    write_shards(tmp_path / "meg", megatron(model), ParallelLayout(tp=2, num_layers=LAYERS))
    spec, out = "llama", tmp_path / "hf"
    run = CliRunner().invoke(app, ["export", spec, "--megatron", str(tmp_path / "meg"), "--out", str(out), "--format",
                                   "hf", "--like", str(like), "--dtype", "fp16"])  # sizes from --like's config.json
    assert run.exit_code == 0, run.output
    lines = run.output.splitlines()
    assert lines[0].startswith(f"21 model tensor(s) written to {out}: ") and "21 F16" in lines[0]
    assert lines[1].startswith(f"28 quantizer tensor(s) written to {out / 'quantizer_state'}: ")
    assert lines[2] == "copied beside the weights: config.json, generation_config.json, tokenizer.json"
    assert lines[3] == ("next: load the model: " + shlex.join(["python", "-c", "from transformers import "
                        f"AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(\"{out}\")"]))
    check = shlex.split(lines[4].split("(it must be clean): ", 1)[1])
    assert check[:3] == ["quantmap", "check", spec] and check[-1] == "--strict"
    checked = CliRunner().invoke(app, check[1:])
    assert checked.exit_code == 0 and "no finding(s)" in checked.output, checked.output
    both = CliRunner().invoke(app, ["export", spec, "--megatron", str(tmp_path / "meg"), "--out", str(tmp_path / "x"),
                                    "--like", str(like)])
    assert both.exit_code == 2 and "--like goes with --format hf" in both.output
