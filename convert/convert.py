"""`cumo-mlx convert`: an original PyTorch CuMo checkpoint (hub id or directory) to an MLX model directory.

The conversion is planned before anything is written: the checkpoint's tensor names and shapes
(read from safetensors headers / pickle metadata, no data) go through `Model.sanitize` on lazy
placeholders, and the result must equal the parameters of the model the config describes;
missing, extra and mis-shaped tensors are reported by name. The quantization plan comes from
quantizing a lazy skeleton of the model with the same predicate; it fixes every output tensor's
name, shape and dtype, hence the shard layout, up front.

Then tensors stream through one group at a time (a group is one tensor, or the E per-expert
tensors that stack into one): read (memory-mapped), sanitized, cast, quantized, and written
straight to its place in a pre-laid-out safetensors shard. Peak memory is a few times the largest
group (sources, stacked, cast), independent of the model's size and never a float32 copy of it:
measured on an 826 MB bf16 Mixtral-style checkpoint (largest group 59 MB), peak RSS rose 230 MB
above the interpreter's baseline, float16 or 4-bit. Pickles read by torch (mmap) map their whole
file: its pages count in RSS while it is converted (file-backed, reclaimable).

Everything goes to a temporary directory beside DST that is renamed to DST at the very end
(`staging.staged_directory`); a failure removes it, a killed process leaves no DST (only the
hidden temporary directory, removed by the next conversion to the same DST).

Quantization (-q): the LLM's linears, its embedding and lm_head, and Mixtral's stacked experts
(QuantizedSwitchLinear, for gather_qmm) at --q-bits/--q-group-size, affine; the vision tower and
the connector at --vision-bits (default 8: it keeps a 4-bit CuMo-7B under 6 GB while its outputs
stay close to float16's, benchmarks/quantize_vision.py), or as floats with --no-quantize-vision.
Not quantized, kept as floats at --dtype: the routers of all three MoE sites (every `gate`),
CLIP's position embedding (used as a raw table), and any layer whose input size is not a
multiple of the group size. config.json's `quantization` records the defaults, maps each
unquantized layer to false and each layer at other bits to its own settings (mlx-lm's per-layer
entries), so loading rebuilds exactly these modules.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from cumo_mlx import hub
from cumo_mlx.errors import CheckpointError, ConfigError, CuMoError
from cumo_mlx.models.config import ModelArgs, load_config, local_vision_config, read_vision_tower
from cumo_mlx.models.model import Model, original_name
from cumo_mlx.staging import staged_directory
from mlx.utils import tree_flatten

from .checkpoint import (
    FLOAT_DTYPES,
    TensorEntry,
    _list,
    check_index,
    find_weight_files,
    read_checkpoint,
    select_weight_files,
)

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
VISION_BITS = 8  # the vision tower's and connector's bits with -q, unless --vision-bits says otherwise
VISION_SIDE = ("vision_tower.", "mm_projector.")
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's limit
ROUTER = re.compile(r"(^|\.)gate$")  # the router of a SparseMoE (CLIP layer, connector, Mixtral layer)
ALWAYS_FLOAT = re.compile(r"position_embedding$")  # read as a raw table, not through the module
SAFETENSORS_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


@dataclasses.dataclass
class Summary:
    """What a conversion produced."""

    path: Path
    parameters: int
    tensor_bytes: int
    bytes_written: int
    quantization: Optional[dict]
    dtype: str
    seconds: float
    quantized_layers: int = 0
    too_narrow: int = 0  # layers -q would quantize but for an input size that is not a multiple of the group size
    vision_bits: Optional[int] = None  # the vision tower's and connector's bits; None: kept as floats

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / max(self.parameters, 1)

    def line(self) -> str:
        q = self.quantization
        how = self.dtype
        if q:
            vision = f"{self.vision_bits}-bit" if self.vision_bits else self.dtype
            how = (f"LLM {q['bits']}-bit, vision {vision}, group {q['group_size']}" if self.quantized_layers
                   else f"{self.dtype}, nothing quantized")  # fmt: skip
        line = (
            f"converted to {self.path}: {_count(self.parameters)} parameters, {_bytes(self.bytes_written)} written, "
            f"{self.bits_per_weight:.2f} bits per weight ({how}) in {self.seconds:.0f}s"
        )
        if self.too_narrow:
            line += (f"; {self.too_narrow} layer(s) left at {self.dtype}: their input size is not a multiple of "
                     f"the group size {q['group_size']} (a smaller --q-group-size may divide it)")  # fmt: skip
        return line


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass
class Group:
    """Source tensors that become one or more model parameters together (experts stack)."""

    key: str  # the source name, with `*` for the expert index of expert tensors
    sources: list  # TensorEntry
    targets: dict  # our parameter name -> shape (from the dry run)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.sources)


def _placeholder(entry: TensorEntry) -> mx.array:
    return mx.zeros(entry.shape, dtype=mx.float32)  # lazy: never evaluated, never allocated


def plan_groups(model: Model, entries: dict[str, TensorEntry]) -> list[Group]:
    """Group the checkpoint's tensors and find the parameters each group becomes (no data read)."""
    grouped = defaultdict(list)
    for name, entry in entries.items():
        grouped[re.sub(r"\.experts\.\d+\.", ".experts.*.", name)].append(entry)
    groups = []
    for key, sources in grouped.items():
        targets = model.sanitize({e.name: _placeholder(e) for e in sources})
        groups.append(Group(key, sources, {name: tuple(value.shape) for name, value in targets.items()}))
    order = {path: i for i, path in enumerate(dict.fromkeys(e.file for e in entries.values()))}
    groups.sort(key=lambda g: (order[g.sources[0].file], g.key))
    return groups


def validate(model: Model, groups: list[Group]) -> None:
    """Missing, extra and mis-shaped tensors against the config's model: one error naming them."""
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    produced = {}
    extra, wrong_shape, not_float, twice = [], [], [], []
    for group in groups:
        for target, shape in group.targets.items():
            if target in produced:
                twice.append(f"{produced[target].key} and {group.key}")
            elif target not in expected:
                extra.append(group.key)
            elif shape != expected[target]:
                found = "x".join(map(str, shape))
                wanted = "x".join(map(str, expected[target]))
                stacked = " (stacked over experts)" if "*" in group.key else ""
                wrong_shape.append(f"{group.key} is {found}{stacked}, the config needs {wanted}")
            elif any(e.dtype not in FLOAT_DTYPES for e in group.sources):
                not_float.append(f"{group.key} ({group.sources[0].dtype})")
            produced[target] = group
    missing = [original_name(name) for name in expected if name not in produced]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_list(missing)}")
    if extra:
        problems.append(f"not part of the configured model: {_list(sorted(set(extra)))}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_list(wrong_shape, 4)}")
    if not_float:
        problems.append(f"not floating point: {_list(not_float)}")
    if twice:
        problems.append(f"stored twice under different names: {_list(twice, 4)}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not match its config.json: " + "; ".join(problems),
            "check that config.json belongs to these weights (model type, sizes, mm_projector_type, clip_smoe)",
        )


@dataclasses.dataclass
class QuantizationPlan:
    config: dict  # config.json's `quantization`
    layers: dict[str, dict]  # each quantized layer's path -> its group_size, bits and mode
    too_narrow: int  # layers kept as floats only because the group size does not divide their input size


def quantization_plan(
    model: Model, bits: Optional[int], group_size: int, vision_bits: Optional[int]
) -> QuantizationPlan:
    """Quantize the lazy skeleton `model` in place: the LLM at `bits`, the vision tower and the
    connector at `vision_bits` (None: either kept as floats), routers and position embeddings never."""
    plan = QuantizationPlan({"group_size": group_size, "bits": bits, "mode": "affine"}, {}, 0)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        layer_bits = vision_bits if path.startswith(VISION_SIDE) else bits
        by_rule = ROUTER.search(path) or ALWAYS_FLOAT.search(path) or layer_bits is None
        if by_rule or module.weight.shape[-1] % group_size != 0:
            plan.config[path] = False
            plan.too_narrow += not by_rule
            return False
        params = {"group_size": group_size, "bits": layer_bits, "mode": "affine"}
        plan.layers[path] = params
        if layer_bits != bits:
            plan.config[path] = params
        return params

    nn.quantize(model, group_size, bits, mode="affine", class_predicate=predicate)
    return plan


@dataclasses.dataclass
class OutputTensor:
    name: str
    shape: tuple
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def output_plan(model: Model, groups: list[Group], quantized: dict, dtype: mx.Dtype) -> list[OutputTensor]:
    """Every tensor the output holds, in writing order, with its final shape and dtype."""
    params = dict(tree_flatten(model.parameters()))
    plan = []
    for group in groups:
        for target in group.targets:
            module, _, leaf = target.rpartition(".")
            if module in quantized and leaf == "weight":
                for part in ("weight", "scales", "biases"):
                    value = params[f"{module}.{part}"]
                    plan.append(
                        OutputTensor(f"{module}.{part}", tuple(value.shape), mx.uint32 if part == "weight" else dtype)
                    )
            else:
                plan.append(OutputTensor(target, tuple(params[target].shape), dtype))
    planned = {t.name for t in plan}
    unplanned = sorted(set(params) - planned)
    if unplanned:  # validate() guarantees this cannot happen
        raise RuntimeError(f"conversion plan misses {unplanned[:5]}")
    return plan


def _default_dtype(config: dict, entries: dict[str, TensorEntry]) -> str:
    """mlx-lm's rule: config's torch_dtype, else the checkpoint's own float dtype (float64 -> float32)."""
    for key in ("torch_dtype", "dtype"):
        if config.get(key) in DTYPES:
            return config[key]
    sizes = defaultdict(int)
    for entry in entries.values():
        if entry.dtype in FLOAT_DTYPES:
            sizes["float32" if entry.dtype == "float64" else entry.dtype] += entry.nbytes
    return max(sizes, key=sizes.get) if sizes else "float16"


@dataclasses.dataclass
class Plan:
    """Everything a conversion writes, fixed before anything is."""

    model: Model  # the lazy skeleton, its quantized layers already swapped in
    groups: list[Group]  # the source tensors that become parameters, in reading order
    outputs: list[OutputTensor]
    dtype: str
    quantization: Optional[dict]  # config.json's `quantization`, None for floats
    quantized: dict[str, dict]  # each quantized layer's path -> its group_size, bits and mode
    parameters: int
    too_narrow: int = 0  # layers kept as floats only because the group size does not divide their input size
    vision_bits: Optional[int] = None


def plan_conversion(
    args: ModelArgs,
    config: dict,
    entries: dict[str, TensorEntry],
    dtype: Optional[str],
    quantize: bool,
    q_bits: int,
    q_group_size: int,
    vision_bits: Optional[int],
) -> Plan:
    """Check the checkpoint's tensors against the model `args` describes; plan every output tensor."""
    skeleton = Model(args)  # lazy parameters: shapes only, nothing is allocated
    groups = plan_groups(skeleton, entries)
    validate(skeleton, groups)
    parameters = sum(math.prod(v.shape) for _, v in tree_flatten(skeleton.parameters()))
    dtype = dtype or _default_dtype(config, entries)
    quantization = quantization_plan(skeleton, q_bits, q_group_size, vision_bits) if quantize else None
    quantized = quantization.layers if quantization else {}
    groups = [g for g in groups if g.targets]  # the others are dropped (rotary inv_freq, position_ids, post_layernorm)
    outputs = output_plan(skeleton, groups, quantized, getattr(mx, dtype))
    if quantization is None:
        return Plan(skeleton, groups, outputs, dtype, None, {}, parameters)
    return Plan(skeleton, groups, outputs, dtype, quantization.config, quantized, parameters, quantization.too_narrow,
                vision_bits)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Writing


def _shards(plan: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """The plan's tensors in order, cut into shards of at most `max_bytes` (a bigger tensor alone)."""
    shards: list[list[OutputTensor]] = []
    size = 0
    for tensor in plan:
        if not shards or (size + tensor.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class ShardWriter:
    """Safetensors shards laid out from the plan, written tensor by tensor at their offsets."""

    def __init__(self, directory: Path, plan: list[OutputTensor], max_bytes: Optional[int] = None):
        shards = _shards(plan, max_bytes or MAX_SHARD_BYTES)
        count = len(shards)
        self.files = [
            directory / ("model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
            for i in range(count)
        ]
        self.where: dict[str, tuple[int, int, int, OutputTensor]] = {}  # name -> (file, offset, nbytes, spec)
        self.pending = {t.name for t in plan}
        self.tensor_bytes = sum(t.nbytes for t in plan)
        self._handles = []
        for index, (path, tensors) in enumerate(zip(self.files, shards, strict=True)):
            header, offset = {"__metadata__": {"format": "mlx"}}, 0
            for t in tensors:
                header[t.name] = {
                    "dtype": SAFETENSORS_DTYPE[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes],
                }
                offset += t.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            start = 8 + len(blob)
            handle = open(path, "wb")
            handle.write(len(blob).to_bytes(8, "little") + blob)
            handle.truncate(start + offset)
            self._handles.append(handle)
            for t in tensors:
                begin = header[t.name]["data_offsets"][0]
                self.where[t.name] = (index, start + begin, t.nbytes, t)

    def write(self, name: str, value: mx.array) -> int:
        index, offset, nbytes, spec = self.where[name]
        if tuple(value.shape) != spec.shape or value.dtype != spec.dtype:
            raise RuntimeError(f"{name}: produced {value.shape} {value.dtype}, planned {spec.shape} {spec.dtype}")
        if value.dtype == mx.bfloat16:
            value = value.view(mx.uint16)
        data = memoryview(np.ascontiguousarray(np.asarray(value))).cast("B")
        if data.nbytes != nbytes:
            raise RuntimeError(f"{name}: {data.nbytes} bytes, {nbytes} planned")
        handle = self._handles[index]
        handle.seek(offset)
        handle.write(data)
        self.pending.discard(name)
        return nbytes

    def finish(self, total_parameters: int) -> int:
        """Close the shards and write the index; the bytes of all weight files."""
        if self.pending:
            raise RuntimeError(f"tensors planned but not written: {sorted(self.pending)[:5]}")
        for handle in self._handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        index = {
            "metadata": {"total_size": self.tensor_bytes, "total_parameters": total_parameters},
            "weight_map": {name: self.files[where[0]].name for name, where in sorted(self.where.items())},
        }
        index_path = self.files[0].parent / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=4) + "\n")
        return sum(path.stat().st_size for path in self.files)

    def close(self):
        """Close the shards of a failed conversion (they are removed after)."""
        for handle in self._handles:
            if not handle.closed:
                try:
                    handle.close()
                except OSError:  # a full disk: flushing what is buffered fails too
                    pass


def _progress(total: int, desc: str, enabled: bool, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        position=position,
        leave=True,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _convert_group(plan: Plan, group: Group) -> dict:
    """The output tensors of one group, evaluated."""
    weights = plan.model.sanitize({e.name: e.load() for e in group.sources})
    out = {}
    for name, value in weights.items():
        value = value.astype(getattr(mx, plan.dtype))
        module, _, leaf = name.rpartition(".")
        if module in plan.quantized and leaf == "weight":
            q = plan.quantized[module]
            w, scales, biases = mx.quantize(value, q["group_size"], q["bits"], mode="affine")
            out.update({f"{module}.weight": w, f"{module}.scales": scales, f"{module}.biases": biases})
        else:
            out[name] = value
    mx.eval(out)
    return out


def write_weights(directory: Path, plan: Plan, progress: bool) -> tuple[int, int]:
    """Stream the groups through sanitize, cast and quantize into their shards in `directory`; the
    bytes of tensor data and of the weight files."""
    writer = ShardWriter(directory, plan.outputs)
    try:
        reading = _progress(sum(g.nbytes for g in plan.groups), "converting", progress)
        writing = _progress(writer.tensor_bytes, "writing", progress, position=1)
        with reading, writing:
            for group in plan.groups:
                out = _convert_group(plan, group)
                reading.update(group.nbytes)
                for name, value in out.items():
                    writing.update(writer.write(name, value))
                del out
        return writer.tensor_bytes, writer.finish(plan.parameters)
    except BaseException:
        writer.close()
        raise


# --------------------------------------------------------------------------------------------
# The source checkpoint


def resolve_source(hf_path: str, revision: Optional[str], progress: bool) -> tuple[Path, Optional[str]]:
    """A local checkpoint directory for `hf_path`, and the hub id when it came from the hub."""
    path = hub.local_directory(hf_path, "checkpoint")
    if path is not None:
        return path, None
    return hub.download_checkpoint(hf_path, select_weight_files, revision=revision, progress=progress), hf_path


def read_args(config: dict, base_dir: Optional[Path] = None) -> ModelArgs:
    """The ModelArgs of a checkpoint's config.json. An original one names its vision tower instead of
    holding its config: a built-in or local tower's, else one fetched from the hub, is embedded."""
    tower = config.get("mm_vision_tower")
    if config.get("vision_config") is None and isinstance(tower, str):
        vision = local_vision_config(tower, base_dir)  # (read once here, not again by ModelArgs)
        if vision is None:
            vision = read_vision_tower(hub.download_vision_tower(tower))
        config = {**config, "vision_config": dataclasses.asdict(vision)}
    return ModelArgs.from_dict(config, base_dir)


def read_source(src: Path, vision_tower: Optional[str]) -> tuple[dict, ModelArgs, dict, list[str]]:
    """The checkpoint in `src`: its config.json, ModelArgs, tensors and tokenizer files (checked)."""
    config = load_config(src)
    if config.get("quantization") or config.get("quantization_config"):
        raise CheckpointError(f"{src} holds an already quantized model", "convert the original float checkpoint")
    if vision_tower is not None:
        config["mm_vision_tower"] = vision_tower
        config.pop("vision_config", None)
    args = read_args(config, src)
    if args.quantization is not None:
        raise ConfigError("config.json has a 'quantization' entry", "convert the original float checkpoint")
    with warnings.catch_warnings():  # torch's UserWarning on some pickles: the tensors are checked here
        warnings.simplefilter("ignore", UserWarning)
        entries = read_checkpoint(find_weight_files(src))
    check_index(src, entries)
    tokenizer_files = [name for name in hub.TOKENIZER_FILES if (src / name).is_file()]
    if not any(name in tokenizer_files for name in ("tokenizer.model", "tokenizer.json")):
        raise CheckpointError(
            f"no tokenizer in {src} (tokenizer.model or tokenizer.json)",
            "copy the tokenizer files into the checkpoint directory",
        )
    return config, args, entries, tokenizer_files


# --------------------------------------------------------------------------------------------
# The conversion


@dataclasses.dataclass
class Quantization:
    """The checked quantization options (meaningful only with quantize)."""

    bits: int
    group_size: int
    vision_bits: Optional[int]  # None: the vision tower and connector stay float


def _check_options(
    quantize: bool,
    q_bits: Optional[int],
    q_group_size: Optional[int],
    dtype: Optional[str],
    quantize_vision: Optional[bool],
    vision_bits: Optional[int],
) -> Quantization:
    """The settings to quantize with; CuMoError for an option out of range or one that would be ignored."""
    for flag, value in (("--q-bits", q_bits), ("--q-group-size", q_group_size), ("--vision-bits", vision_bits)):
        if value is not None and not quantize:
            raise CuMoError(f"{flag} has no effect without --quantize", f"add -q, or leave out {flag}")
    if quantize_vision is not None and not quantize:
        flag = "--quantize-vision" if quantize_vision else "--no-quantize-vision"
        raise CuMoError(f"{flag} needs --quantize", "add -q")
    if vision_bits is not None and quantize_vision is False:
        raise CuMoError("--vision-bits has no effect with --no-quantize-vision", "leave out one of them")
    q = Quantization(
        4 if q_bits is None else q_bits,
        64 if q_group_size is None else q_group_size,
        None if quantize_vision is False else (vision_bits or VISION_BITS),
    )
    for flag, value in (("--q-bits", q.bits), ("--vision-bits", q.vision_bits or VISION_BITS)):
        if value not in Q_BITS:
            raise CuMoError(f"{flag} must be one of {', '.join(map(str, Q_BITS))}, got {value}", "pick a supported bit width")
    if q.group_size not in Q_GROUP_SIZES:
        raise CuMoError(
            f"--q-group-size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, got {q.group_size}",
            "pick a supported group size",
        )
    if dtype is not None and dtype not in DTYPES:
        raise CuMoError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}", "pick a supported dtype")
    return q


def _check_destination(dst: Path, force: bool, src: Optional[Path] = None) -> None:
    if src is not None:
        src, target = src.resolve(), dst.resolve()
        if target == src or target in src.parents:
            raise CuMoError(
                f"--mlx-path {dst} would replace the checkpoint being converted", "choose another --mlx-path"
            )
    if (dst.exists() or dst.is_symlink()) and not force:
        raise CuMoError(f"{dst} already exists", "choose another --mlx-path, or pass --force to replace it")
    if force and (os.path.ismount(dst) or dst.resolve() in (Path.cwd(), *Path.cwd().parents)):
        # (a mount point cannot be renamed aside; a folder holding the current one would vanish under it)
        raise CuMoError(f"--mlx-path {dst} cannot be replaced: it is a mount point or holds the current folder", "choose a new --mlx-path")
    if dst.parent.exists() and not dst.parent.is_dir():
        raise CuMoError(f"{dst.parent} is not a directory", "choose another --mlx-path")


def _command(hf_path: str, mlx_path: str, plan: Plan) -> str:
    """The `cumo-mlx convert` command line that makes this conversion (for the model card)."""
    flags = [f"--hf-path {hf_path}", f"--mlx-path {mlx_path}", f"--dtype {plan.dtype}"]
    if plan.quantization:
        q = plan.quantization
        flags += ["-q", f"--q-bits {q['bits']}", f"--q-group-size {q['group_size']}"]
        flags += [f"--vision-bits {plan.vision_bits}" if plan.vision_bits else "--no-quantize-vision"]
    return "cumo-mlx convert " + " ".join(flags)


def model_card(
    source: str,
    base_model: Optional[str],
    args: ModelArgs,
    plan: Plan,
    command: str,
    upload_repo: Optional[str],
    dst: Path,
) -> str:
    from cumo_mlx import __version__

    llm = "Mixtral" if args.text_config.is_moe else "Mistral"
    parts = []
    parts.append("CLIP-MoE" if args.clip_smoe else "dense CLIP")
    parts.append("MLP-MoE connector" if args.connector_is_moe else "mlp2x_gelu connector")
    dtype, quantization = plan.dtype, plan.quantization
    if quantization:
        skipped = sum(1 for k, v in quantization.items() if v is False)
        vision = f"{plan.vision_bits}-bit" if plan.vision_bits else f"kept at {dtype}"
        how = (
            f"affine quantization, group size {quantization['group_size']}: the LLM {quantization['bits']}-bit, "
            f"the vision tower and connector {vision}; {skipped} layers kept at {dtype} (MoE routers, CLIP's "
            "position embedding, and layers whose input size is not a multiple of the group size)"
        )
    else:
        how = f"unquantized, {dtype}"
    name = upload_repo or dst.name
    meta = ["---", "license: cc-by-nc-4.0", "library_name: mlx", "pipeline_tag: image-text-to-text"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta += ["tags:", "- mlx", "- cumo", "- llava", "- mixture-of-experts", "---", ""]
    source_link = (
        f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"a local checkpoint (`{source}`)"
    )
    model_ref = upload_repo or str(dst)
    body = f"""# {name}

CuMo ({llm} LLM, {", ".join(parts)}, {args.num_experts} experts top-{args.num_selected}) in MLX format,
converted from {source_link} with cumo-mlx {__version__}.

- Weights: {how}.
- The vision tower's config is embedded in `config.json`; running this model needs no network.

Converted with:

```bash
{command}
```

## Licence

The weights are licensed CC-BY-NC-4.0 (non-commercial use), as the original CuMo release
([shi-labs/CuMo](https://github.com/SHI-Labs/CuMo)); the licence of the underlying language model
applies as well.

## Use

```bash
pip install cumo-mlx
cumo-mlx generate --model {model_ref} --image photo.jpg --prompt "Describe the image."
```

```python
import cumo_mlx

model, processor = cumo_mlx.load("{model_ref}")
```
"""
    return "\n".join(meta) + body


def convert(
    hf_path: str,
    mlx_path: str,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    vision_tower: Optional[str] = None,
    quantize_vision: Optional[bool] = None,
    vision_bits: Optional[int] = None,
    force: bool = False,
    progress: bool = True,
    command: Optional[str] = None,
) -> Summary:
    """Convert the CuMo checkpoint `hf_path` (hub id or directory) into the MLX directory `mlx_path`."""
    started = time.time()
    q = _check_options(quantize, q_bits, q_group_size, dtype, quantize_vision, vision_bits)
    dst = Path(os.path.abspath(os.path.expanduser(mlx_path)))  # (abspath drops a "..": a rename of one fails)
    _check_destination(dst, force)
    src, repo_id = resolve_source(str(hf_path), revision, progress)
    _check_destination(dst, force, src)
    config, args, entries, tokenizer_files = read_source(src, vision_tower)
    plan = plan_conversion(args, config, entries, dtype, quantize, q.bits, q.group_size, q.vision_bits)
    if command is None:
        command = _command(hf_path, mlx_path, plan)
    out_config = dataclasses.replace(args, quantization=plan.quantization).to_dict()
    if plan.quantization:
        out_config["quantization_config"] = plan.quantization
    try:
        with staged_directory(dst, replace=force) as staged:
            tensor_bytes, bytes_written = write_weights(staged, plan, progress)
            (staged / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
            for name in tokenizer_files:
                shutil.copyfile(src / name, staged / name)
            card = model_card(str(hf_path), repo_id, args, plan, command, upload_repo, dst)
            (staged / "README.md").write_text(card)
    except FileExistsError:  # (staged_directory's, without --force: DST was made meanwhile)
        raise CuMoError(
            f"{dst} appeared while converting", "choose another --mlx-path, or pass --force to replace it"
        ) from None
    seconds = time.time() - started
    summary = Summary(dst, plan.parameters, tensor_bytes, bytes_written, plan.quantization, plan.dtype, seconds,
                      len(plan.quantized), plan.too_narrow, plan.vision_bits)  # fmt: skip
    if upload_repo:
        hub.upload(dst, upload_repo)
    return summary
