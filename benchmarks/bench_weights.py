"""Whole-model export benchmark: ``quantmap export SPEC --megatron CKPT --format hf`` of a synthetic
Megatron ``torch_dist`` checkpoint of 4+ GB of bf16 weights, against the physical floor of the same bytes.

The checkpoint is saved the way a TP=2 x PP=2 Megatron-Core + ModelOpt run saves it: four gloo ranks
(rank = pp * 2 + tp, Megatron's order) each call ``torch.distributed.checkpoint.save`` on their own
state dict, tensor-parallel weights as torch ``ShardedTensor`` chunks declared with their global
metadata (as Megatron's ``_mcore_to_torch_sharded_tensor`` does), so ``.metadata`` lists two chunks per
split weight and ``__<rank>_<thread>.distcp`` files come from every rank. Keys are one per layer with
GLOBAL layer numbers (PP stages hold disjoint layers), SwiGLU ``linear_fc1.weight_w``/``weight_v``
halves, Transformer-Engine norm names (``linear_qkv.layer_norm_weight``), and per-tensor fp32
quantizer amax (``[1]`` weight and input amax per linear, ``[]`` KV-cache amax) beside the weights.
Two variants, each with a matching HF ``config.json`` for ``--config``:

* ``dense``: Llama-like (``llama`` spec): hidden 2048, 32 heads / 8 KV heads of 64, FFN 8192, 32 layers,
  vocabulary 32000, untied: 4.15 GB of weights;
* ``moe``: Mixtral-like (``mixtral`` spec): the same attention, SequentialMLP experts
  (``mlp.experts.experts.{E}.linear_fc1.weight_w``, ...; 16 experts of FFN 1536), a router and
  ``pre_mlp_layernorm``, 12 layers: 4.14 GB.

Each export runs as its own ``python -m quantmap export`` subprocess, with ``--nproc 1`` and
``--nproc 4``. Measured per run:

* wall time of the export command (start-up included);
* peak resident memory (``VmHWM``) of every process of the command, the CLI, the fork server and each
  worker, polled from ``/proc`` every 50 ms (a process's high-water mark, so a poll misses only what a
  process adds in its last 50 ms), and the largest of those and of ``getrusage(RUSAGE_CHILDREN)`` of a
  wrapper process that only waits for the command (exact for the CLI; workers forked by the fork server
  are not the command's children, so only the polls see them);
* the floor, measured just before the export: ``cat`` of the checkpoint's ``.distcp`` files to
  ``/dev/null`` twice (the first shows the page-cache state the run found; the second, warm, is the
  floor's read: the export that follows reads the same warm cache), plus writing as many bytes
  (``dd`` from ``/dev/zero``, 16 MiB blocks) into the output's filesystem without ``fsync``, as
  quantmap writes its safetensors files (no fsync: io/safetensors_stream.py, io/staging.py). ``sync``
  (not timed) before the floor's write and before the export, so that each starts with no dirty pages.

Targets (issue 16): export <= 2x the floor (read + write); each process's peak <= 2x the largest
output shard + 256 MiB. With the CLI's default ``--shard-size`` (5 GiB) either model is one file, so one
process writes it all and the peak bound is loose; ``--shard-size 1073741824`` (four files, four writers
at ``--nproc 4``) tests the streaming. The export's time includes starting Python, torch and (``--nproc``)
the gloo workers: ``--tiny`` shows that fixed part. Page-cache state (``fincore``) and the load average are printed: the machine
may be shared. The checkpoints stay in ``--dir`` (reused when present); each output is removed
after its run.

    .venv/bin/python benchmarks/bench_weights.py [--dir /tmp/quantmap-bench-weights] [--variants dense moe]
        [--nproc 1 4] [--shard-size BYTES] [--tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch

TP, PP = 2, 2
ITERATION = "iter_0000001"
MIB = 2**20
SLACK = 256 * MIB  # the peak target: 2x the largest shard + this


@dataclass(frozen=True)
class Model:
    """The synthetic model's sizes; ``experts`` 0 is the dense variant."""

    variant: str
    layers: int
    hidden: int = 2048
    heads: int = 32
    groups: int = 8
    head_dim: int = 64
    ffn: int = 8192  # the dense MLP's, or each expert's
    experts: int = 0
    vocab: int = 32000

    @property
    def spec(self) -> str:
        return "mixtral" if self.experts else "llama"

    def hf_config(self) -> dict:
        """The HF config.json the export takes (``--config``): the sizes quantmap cross-checks against the shapes."""
        config = dict(architectures=["MixtralForCausalLM" if self.experts else "LlamaForCausalLM"],
                      model_type="mixtral" if self.experts else "llama", attention_bias=False, hidden_act="silu",
                      hidden_size=self.hidden, intermediate_size=self.ffn, num_attention_heads=self.heads,
                      num_key_value_heads=self.groups, head_dim=self.head_dim, num_hidden_layers=self.layers,
                      vocab_size=self.vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_parameters=dict(rope_theta=10000.0, rope_type="default"), tie_word_embeddings=False,
                      torch_dtype="bfloat16")
        if self.experts:
            config |= dict(num_local_experts=self.experts, num_experts_per_tok=2, router_jitter_noise=0.0)
        else:
            config |= dict(mlp_bias=False)
        return config


VARIANTS = {"dense": Model("dense", layers=32), "moe": Model("moe", layers=12, ffn=1536, experts=16)}
TINY = {"dense": Model("dense", layers=4, hidden=256, heads=4, groups=2, ffn=512, vocab=1024),
        "moe": Model("moe", layers=4, hidden=256, heads=4, groups=2, ffn=128, experts=4, vocab=1024)}


# -- the checkpoint -----------------------------------------------------------------------------------

def _split(local: torch.Tensor, shape: tuple[int, ...], dim: int, tp_rank: int, pp: int):
    """``local`` as TP rank ``tp_rank``'s chunk of a ``shape`` tensor split on ``dim``, with every TP rank's
    chunk declared (no collective: Megatron's own way to hand dcp its sharded tensors)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    chunks = []
    for rank in range(TP):
        offsets, sizes = [0] * len(shape), list(shape)
        offsets[dim], sizes[dim] = rank * shape[dim] // TP, shape[dim] // TP
        chunks.append(ShardMetadata(offsets, sizes, f"rank:{pp * TP + rank}/cpu"))
    metadata = ShardedTensorMetadata(chunks, torch.Size(shape), TensorProperties(dtype=local.dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata([Shard(local, chunks[tp_rank])], metadata)


def rank_state(model: Model, rank: int) -> dict:
    """What TP=2 x PP=2 rank ``rank`` saves: its stage's layers (global numbers), its TP chunk of each split
    weight, the replicated norms, router and amax whole (dcp saves one copy of a key two ranks hold)."""
    pp, tp = divmod(rank, TP)
    generator = torch.Generator().manual_seed(rank)
    state: dict = {}

    def weight(name: str, shape: tuple[int, ...], dim: int | None) -> None:
        local = list(shape)
        if dim is not None:
            local[dim] //= TP
        tensor = torch.empty(local, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=generator)
        state[name] = tensor if dim is None else _split(tensor, shape, dim, tp, pp)

    def amax(module: str) -> None:
        for quantizer in ("weight_quantizer", "input_quantizer"):
            state[f"{module}.{quantizer}._amax"] = torch.rand(1, generator=generator) + 0.5

    h, qkv = model.hidden, (model.heads + 2 * model.groups) * model.head_dim
    if pp == 0:
        weight("embedding.word_embeddings.weight", (model.vocab, h), 0)
    per_stage = model.layers // PP
    for layer in range(pp * per_stage, (pp + 1) * per_stage):
        attention = f"decoder.layers.{layer}.self_attention."
        weight(attention + "linear_qkv.layer_norm_weight", (h,), None)
        weight(attention + "linear_qkv.weight", (qkv, h), 0)
        weight(attention + "linear_proj.weight", (h, model.heads * model.head_dim), 1)
        amax(attention + "linear_qkv")
        amax(attention + "linear_proj")
        for kv in ("k", "v"):
            state[f"{attention}core_attention.{kv}_bmm_quantizer._amax"] = torch.tensor(1.0)
        mlp = f"decoder.layers.{layer}.mlp."
        if model.experts:
            weight(f"decoder.layers.{layer}.pre_mlp_layernorm.weight", (h,), None)
            weight(mlp + "router.weight", (model.experts, h), None)
            linears = [f"{mlp}experts.experts.{expert}." for expert in range(model.experts)]
        else:
            weight(mlp + "linear_fc1.layer_norm_weight", (h,), None)
            linears = [mlp]
        for linear in linears:
            weight(linear + "linear_fc1.weight_w", (model.ffn, h), 0)
            weight(linear + "linear_fc1.weight_v", (model.ffn, h), 0)
            weight(linear + "linear_fc2.weight", (h, model.ffn), 1)
            amax(linear + "linear_fc1")
            amax(linear + "linear_fc2")
    if pp == PP - 1:
        weight("decoder.final_layernorm.weight", (h,), None)
        weight("output_layer.weight", (model.vocab, h), 0)
    return state


def _save_rank(model: Model, directory: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    state = rank_state(model, dist.get_rank())
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, thread_count=2))  # __<rank>_{0,1}.distcp


def build(root: Path, model: Model) -> Path:
    """The save directory for ``model`` under ``root`` (tracker file, ``iter_0000001/``, ``hf/config.json``),
    saved by four spawned gloo ranks; reused when a finished one with the same sizes is there."""
    from quantmap.executor.launch import spawn

    save = root / model.variant
    stamp = save / "bench_model.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(model):
        return save
    shutil.rmtree(save, ignore_errors=True)
    (save / ITERATION).mkdir(parents=True)
    start = time.perf_counter()
    outcomes = spawn(TP * PP, _save_rank, (model, str(save / ITERATION)), timeout=timedelta(minutes=30))
    failed = [o for o in outcomes if o[0] != "ok"]
    if failed:
        sys.exit(f"saving the checkpoint failed: {failed[0][1]}\n{failed[0][2]}")
    (save / ITERATION / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}))
    (save / "latest_checkpointed_iteration.txt").write_text("1")
    (save / "hf").mkdir()
    (save / "hf" / "config.json").write_text(json.dumps(model.hf_config(), indent=2) + "\n")
    stamp.write_text(json.dumps(asdict(model)))
    print(f"built {save} in {time.perf_counter() - start:.0f} s", flush=True)
    return save


# -- the measures -------------------------------------------------------------------------------------

def _timed_shell(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, shell=True, check=True)
    return time.perf_counter() - start


def _cached(files: list[Path]) -> int:
    """Bytes of ``files`` in the page cache (util-linux ``fincore``), -1 where it cannot tell."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout
        return sum(int(line) for line in out.split())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return -1


def floor(files: list[Path], nbytes: int, scratch: Path) -> dict:
    """Reading ``files`` (cold as found, then warm) and writing ``nbytes`` into ``scratch``'s filesystem."""
    listed = " ".join(f"'{f}'" for f in files)
    cached = _cached(files)
    first = _timed_shell(f"cat {listed} > /dev/null")
    read = _timed_shell(f"cat {listed} > /dev/null")
    subprocess.run(["sync"], check=True)
    scratch.mkdir(parents=True, exist_ok=True)
    blocks = -(-nbytes // (16 * MIB))
    write = _timed_shell(f"dd if=/dev/zero of='{scratch}/floor.bin' bs=16M count={blocks} status=none")
    shutil.rmtree(scratch)
    return dict(cached_before=cached, read_first_s=round(first, 2), read_s=round(read, 2), write_s=round(write, 2),
                floor_s=round(read + write, 2))


# Runs the command and prints the largest resident set of it and every process it waited for (its workers).
_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); sys.exit(code)")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    todo += [int(child) for child in handle.read().split()]
        except OSError:
            continue
        found.append(parent)
    return found


def _watch(root: int, peaks: dict, done: threading.Event) -> None:
    """``peaks[pid] = [what it is, VmHWM bytes]`` for every process under ``root`` (the wrapper left out), every 50 ms."""
    while not done.is_set():
        for pid in _descendants(root)[1:]:
            try:
                with open(f"/proc/{pid}/status") as handle:
                    hwm = next((int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:")), 0)
                # told again at every poll: a child seen between its fork and its exec still has its parent's
                # command line (the fork server's, the CLI's); an exiting one has none
                kind, peak = peaks.get(pid, ("", 0))
                peaks[pid] = [_kind(pid) or kind, max(peak, hwm)]
            except OSError:
                continue
        done.wait(0.05)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode()


def _kind(pid: int) -> str:
    """What the process is: the CLI, multiprocessing's fork server or resource tracker, or a worker (forked
    from the fork server, whose command line it keeps, or spawned)."""
    cmdline = _cmdline(pid)
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if "forkserver" in cmdline:
        with open(f"/proc/{pid}/stat") as handle:
            parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        return "worker" if "forkserver" in _cmdline(parent) else "fork server"
    if "multiprocessing" in cmdline:
        return "worker"
    return "cli" if "quantmap" in cmdline else cmdline.split(" ")[0]


def export(save: Path, model: Model, out: Path, nproc: int, shard_size: int | None, fmt: str = "hf") -> dict:
    """One ``quantmap export --format fmt`` run as a subprocess: seconds, per-process peaks, its output's files,
    and the ``quant_algo`` its ``hf_quant_config.json`` declares (``None`` where it writes none)."""
    command = [sys.executable, "-m", "quantmap", "export", model.spec, "--megatron", str(save), "--out", str(out),
               "--format", fmt, "--config", str(save / "hf" / "config.json"), "--nproc", str(nproc)]
    if shard_size:
        command += ["--shard-size", str(shard_size)]
    log = out.parent / f"{out.name}.log"
    peaks: dict = {}
    done = threading.Event()
    with open(log, "w") as stream:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", _WRAPPER, *command], stdout=stream, stderr=stream,
                                   env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
        watcher = threading.Thread(target=_watch, args=(process.pid, peaks, done), daemon=True)
        watcher.start()
        code = process.wait()
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    text = log.read_text()
    if code != 0:
        sys.exit(f"export failed (exit {code}): {' '.join(command)}\n{text[-4000:]}")
    shards = sorted(out.glob("model-*.safetensors"))
    quantizers = sorted((out / "quantizer_state").glob("*.safetensors"))
    quant_config = out / "hf_quant_config.json"
    quant_algo = json.loads(quant_config.read_text())["quantization"]["quant_algo"] if quant_config.is_file() else None
    processes = sorted(([kind, peak] for kind, peak in peaks.values() if kind != "resource tracker"),
                       key=lambda p: p[0] != "cli")
    result = dict(export_s=round(seconds, 2), shards=len(shards), largest_shard=max(f.stat().st_size for f in shards),
                  output_bytes=sum(f.stat().st_size for f in shards + quantizers),
                  quantizer_files=len(quantizers), quant_algo=quant_algo,
                  peak_max=max([int(text.strip().splitlines()[-1])] + [peak for _, peak in processes]),
                  processes=[dict(process=kind, peak=peak) for kind, peak in processes])
    shutil.rmtree(out)
    log.unlink()
    return result


def run(save: Path, model: Model, nproc: int, shard_size: int | None, scratch: Path, fmt: str = "hf",
        target: float = 2.0) -> dict:
    """The floor, then the export (``--format fmt``); its time passes at ``target`` times the floor or less."""
    files = sorted((save / ITERATION).glob("*.distcp"))
    nbytes = sum(f.stat().st_size for f in files)
    load = os.getloadavg()[0]
    measured = floor(files, nbytes, scratch / "floor")
    subprocess.run(["sync"], check=True)
    result = export(save, model, scratch / f"{model.variant}_nproc{nproc}", nproc, shard_size, fmt)
    bound = 2 * result["largest_shard"] + SLACK
    ratio = result["export_s"] / measured["floor_s"]
    return dict(variant=model.variant, spec=model.spec, format=fmt, nproc=nproc, distcp_files=len(files), checkpoint_bytes=nbytes,
                load_average=round(load, 2), **measured, **result, ratio=round(ratio, 2),
                target=target, time_pass=ratio <= target, peak_bound=bound,
                peak_pass=all(p["peak"] <= bound for p in result["processes"]) and result["peak_max"] <= bound)


def print_table(rows: list[dict]) -> None:
    """The runs as a table (the time target is the first row's), then every process's peak."""
    within = f"<={rows[0]['target']:g}x"
    head = (f"{'variant':<7} {'output':<6} {'nproc':>5} {'GB read':>7} {'GB out':>6} {'cached':>6} {'read s':>6} {'write s':>7} "
            f"{'floor s':>7} {'export s':>8} {'ratio':>5} {within:>5}  {'largest MiB':>11} {'bound MiB':>9} "
            f"{'max peak MiB':>12} {'<=bound':>7}  load")
    print(head)
    print("-" * len(head))
    for r in rows:
        cached = f"{r['cached_before'] / r['checkpoint_bytes']:.0%}" if r["cached_before"] >= 0 else "?"
        print(f"{r['variant']:<7} {r['quant_algo'] or r['format']:<6} {r['nproc']:>5} {r['checkpoint_bytes'] / 1e9:>7.2f} {r['output_bytes'] / 1e9:>6.2f} "
              f"{cached:>6} {r['read_s']:>6.1f} {r['write_s']:>7.1f} {r['floor_s']:>7.1f} {r['export_s']:>8.1f} "
              f"{r['ratio']:>5.2f} {'PASS' if r['time_pass'] else 'FAIL':>5}  {r['largest_shard'] / MIB:>11.0f} "
              f"{r['peak_bound'] / MIB:>9.0f} {r['peak_max'] / MIB:>12.0f} {'PASS' if r['peak_pass'] else 'FAIL':>7}  "
              f"{r['load_average']:.2f}")
    print("\npeak resident memory per process (VmHWM, MiB; polled every 50 ms):")
    for r in rows:
        peaks = ", ".join(f"{p['process']} {p['peak'] / MIB:.0f}" for p in r["processes"])
        print(f"  {r['variant']:<5} {r['quant_algo'] or r['format']:<6} --nproc {r['nproc']}: {peaks}  (shards: {r['shards']}, first read of the "
              f"checkpoint {r['read_first_s']:.1f} s)")


def arguments(default_dir: Path, shard_size: int | None, shard_help: str) -> argparse.ArgumentParser:
    """The options this benchmark and those built on its checkpoints (``bench_deploy.py``) share."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_dir,
                        help="Keep (and reuse) the checkpoints here; outputs are written beside them and removed.")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["dense", "moe"])
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--shard-size", type=int, default=shard_size, help=shard_help)
    parser.add_argument("--tiny", action="store_true", help="Tiny models (a few MB), to try the benchmark itself.")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def workspace(args) -> tuple[dict, Path]:
    """The models and the directory of a run, with a line on the machine it runs on."""
    root = args.dir / "tiny" if args.tiny else args.dir
    root.mkdir(parents=True, exist_ok=True)
    print(f"{root}: {shutil.disk_usage(root).free / 1e9:.0f} GB free; load average {os.getloadavg()[0]:.2f}; "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    return (TINY if args.tiny else VARIANTS), root


def finish(rows: list[dict], benchmark: str, json_path: Path | None, passed: bool) -> None:
    """The table and the JSON record of a run; the exit status says whether every target was met."""
    print_table(rows)
    record = dict(benchmark=benchmark, layout=f"TP{TP}xPP{PP}", ram_bytes=os.sysconf("SC_PAGE_SIZE") *
                  os.sysconf("SC_PHYS_PAGES"), runs=rows)
    print(json.dumps(record))
    if json_path:
        json_path.write_text(json.dumps(record) + "\n")
    sys.exit(0 if passed else 1)


def main(argv=None) -> None:
    args = arguments(Path("/tmp/quantmap-bench-weights"), None,
                     "--shard-size for the export (its default: 5 GiB).").parse_args(argv)
    models, root = workspace(args)
    rows = []
    for variant in args.variants:
        save = build(root, models[variant])
        for nproc in args.nproc:
            rows.append(run(save, models[variant], nproc, args.shard_size, root / "scratch"))
            print(f"done: {variant} --nproc {nproc}: {rows[-1]['export_s']:.1f} s", flush=True)
    finish(rows, "weights", args.json, all(r["time_pass"] and r["peak_pass"] for r in rows))


if __name__ == "__main__":
    main()
