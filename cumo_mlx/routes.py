"""Route statistics: how a dataset's tokens are spread over the experts of every MoE layer.

For each MoE layer (CLIP layers, the connector, Mixtral layers) it counts the (token, top-k slot)
assignments each expert receives and reports each expert's share (the shares of a layer sum to 1).
The model runs as at inference; only the vision tower is switched to training mode while it runs,
which makes it return its routings (and route, without computing, its last layer, whose router the
auxiliary losses train but whose experts inference never uses). Outputs are unchanged.

Tokens counted: CLIP, every token (CLS included) of every S2 crop; connector, every image patch;
Mixtral, every position of the whole conversation (images spliced in). The LLM only runs when it
has MoE layers.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import DataError
from .models.moe import Routing, SparseMoE, route
from .prompt import IMAGE_PLACEHOLDER
from .train.data import BadSample, build_prompt, check_sample, read_records


@dataclass
class Layer:
    name: str  # "vision.3", "connector", "llm.0"
    num_experts: int
    top_k: int
    router_only: bool = False  # the last CLIP layer: routed in training, experts unused at inference


def moe_layers(model) -> list[Layer]:
    """The model's MoE layers in forward order."""
    layers = []
    clip_layers = model.vision_tower.vision_model.encoder.layers
    for i, layer in enumerate(clip_layers):
        if isinstance(layer.mlp, SparseMoE):
            layers.append(Layer(f"vision.{i}", layer.mlp.num_experts, layer.mlp.top_k, i == len(clip_layers) - 1))
    if isinstance(model.mm_projector, SparseMoE):
        layers.append(Layer("connector", model.mm_projector.num_experts, model.mm_projector.top_k))
    for i, layer in enumerate(model.language_model.layers):
        moe = getattr(layer, "block_sparse_moe", None)
        if isinstance(moe, SparseMoE):
            layers.append(Layer(f"llm.{i}", moe.num_experts, moe.top_k))
    return layers


@dataclass
class RouteStats:
    layers: list[Layer]
    counts: list[np.ndarray]  # per layer, assignments per expert
    samples: int = 0

    @property
    def shares(self) -> list[np.ndarray]:
        return [c / max(1, c.sum()) for c in self.counts]

    def min_share(self) -> tuple[float, str]:
        """The smallest expert share and where it is ("vision.1 e3")."""
        layer, expert = min(
            ((i, e) for i, s in enumerate(self.shares) for e in range(len(s))), key=lambda ie: self.shares[ie[0]][ie[1]]
        )
        return float(self.shares[layer][expert]), f"{self.layers[layer].name} e{expert}"

    def to_dict(self) -> dict:
        share, where = self.min_share()
        return {
            "samples": self.samples,
            "layers": [
                {
                    "name": layer.name,
                    "experts": layer.num_experts,
                    "top_k": layer.top_k,
                    "router_only": layer.router_only,
                    "assignments": int(counts.sum()),
                    "counts": counts.tolist(),
                    "shares": [round(float(s), 6) for s in shares],
                }
                for layer, counts, shares in zip(self.layers, self.counts, self.shares)
            ],
            "min_share": {"share": round(share, 6), "where": where},
        }

    def table(self) -> str:
        """A text table: one row per layer, one column per expert, shares in percent."""
        width = max(len(layer.name) + (1 if layer.router_only else 0) for layer in self.layers)
        columns = max(layer.num_experts for layer in self.layers)
        lines = [f"{'layer':<{width}}  {'assigned':>10}" + "".join(f"{f'e{e}':>7}" for e in range(columns))]
        for layer, counts, shares in zip(self.layers, self.counts, self.shares):
            name = layer.name + ("*" if layer.router_only else "")
            cells = "".join(f"{100 * s:6.1f}%" for s in shares)
            lines.append(f"{name:<{width}}  {int(counts.sum()):>10}{cells}")
        if any(layer.router_only for layer in self.layers):
            lines.append("* the last CLIP layer: routed (and balanced) in training, its experts unused at inference")
        share, where = self.min_share()
        lines.append(f"{self.samples} samples; smallest share {100 * share:.1f}% ({where})")
        return "\n".join(lines)


def _routing_counts(routing: Routing, num_experts: int, top_k: int) -> np.ndarray:
    indices = routing.indices
    if indices is None:  # a router-only layer: route as the MoE block would
        indices, _ = route(routing.logits, top_k)
    return np.bincount(np.asarray(indices).reshape(-1), minlength=num_experts).astype(np.int64)


def detect_template(records: list) -> str:
    """`plain` for stage-1 caption data (every human turn only image placeholders), else the chat one."""
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) != 2 or not isinstance(turns[0], dict):
            return "mistral_instruct_system"
        if str(turns[0].get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip():
            return "mistral_instruct_system"
    return "plain"


def count_routes(
    model,
    processor,
    data_path: Path,
    image_folder: Optional[Path],
    batch_size: int = 16,
    template: str = "auto",
    max_samples: Optional[int] = None,
    progress: Optional[bool] = None,
    report: Callable[[str], None] = print,
) -> RouteStats:
    """Route statistics of `model` over a LLaVA JSON dataset (images relative to `image_folder`).

    Samples the trainer would reject are reported and skipped, as in training.
    """
    from tqdm import tqdm

    layers = moe_layers(model)
    if not layers:
        raise DataError("the model has no MoE layers", "give an upcycled model (cumo-mlx upcycle)")
    records = read_records(data_path)[:max_samples]
    if template == "auto":
        template = detect_template(records)
    samples = []
    for index, record in enumerate(records):
        try:
            samples.append(check_sample(record, index, image_folder, template))
        except BadSample as e:
            name = f"sample {record['id']!r} (#{index})" if isinstance(record, dict) and "id" in record else f"sample #{index}"
            report(f"skipping {name}: {e}")
    names = [layer.name for layer in layers]
    vision_layers = [layer for layer in layers if layer.name.startswith("vision.")]
    connector = layers[names.index("connector")] if "connector" in names else None
    llm_layers = [layer for layer in layers if layer.name.startswith("llm.")]
    if not llm_layers:
        samples = [sample for sample in samples if sample.images]  # nothing else reaches an MoE layer
    if not samples:
        raise DataError(f"{data_path} has no usable samples with images", "give samples with images")
    counts = {layer.name: np.zeros(layer.num_experts, dtype=np.int64) for layer in layers}

    def add(layer: Layer, routing: Routing):
        counts[layer.name] += _routing_counts(routing, layer.num_experts, layer.top_k)

    was_training = model.vision_tower.training
    model.vision_tower.train()
    try:
        bar = tqdm(total=len(samples), desc="routes", unit="sample", disable=None if progress is None else not progress)
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            paths = [path for sample in batch for path in sample.images]
            features = None
            if paths:
                encoding = model.encode_images(processor.preprocess_images(paths))
                for layer, routing in zip(vision_layers, encoding.vision_routings):
                    add(layer, routing)
                if connector is not None:
                    add(connector, encoding.connector_routing)
                features = encoding.features
            offset = 0
            for sample in batch if llm_layers else []:
                images = features[offset : offset + len(sample.images)] if sample.images else None
                offset += len(sample.images)
                text, _ = build_prompt(sample.turns, template)
                embeddings = model.embed_inputs(processor.tokenize(text), images)
                _, routings = model.language_model.forward(None, input_embeddings=embeddings[None])
                for layer, routing in zip(llm_layers, routings):
                    add(layer, routing)
            bar.update(len(batch))
        bar.close()
    finally:
        model.vision_tower.train(was_training)
    return RouteStats(layers, [counts[name] for name in names], len(samples))
