"""Time one training step (forward + backward) of the demo CuMo on a batch of shapes samples.

    python demo_recipe/step_time.py [--batch-size 8] [--moe/--dense] [--steps 10]

Builds the demo config (`demo_model`), randomly initialised, renders a few shapes
images, and times value_and_grad of a stand-in loss: cross-entropy on the answer tokens plus the
balance and router-z losses of every MoE site (the trainer's exact loss lives in the training
code; the work per step is the same). Prints the median step time.
"""

import argparse
import statistics
import time

import cumo_mlx  # noqa: F401  (optimized BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.models.moe import balance_loss, router_z_loss
from cumo_mlx.processor import Processor
from cumo_mlx.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX, chat_prompt
from cumo_mlx.shapes import make_sample
from demo_model import build_tokenizer, demo_config


class _Tokenizer:
    """The demo tokenizer with the two methods Processor needs (no files, no transformers)."""

    def __init__(self):
        self.inner = build_tokenizer()
        self.bos_token_id = 1

    def encode(self, text):
        return self.inner.encode(text).ids


def make_batch(processor: Processor, batch_size: int, seed: int = 0):
    ids_list, label_list, images = [], [], []
    for index in range(batch_size):
        sample = make_sample(seed, index)
        _, question, answer = sample.turns[0]
        prompt_ids = processor.tokenize(chat_prompt([f"<image>\n{question}"]))
        ids = processor.tokenize(chat_prompt([f"<image>\n{question}", answer]))
        assert ids[: len(prompt_ids)] == prompt_ids
        ids_list.append(ids)
        label_list.append([IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :])
        images.append(sample.image)
    return ids_list, label_list, processor.preprocess_images(images)


def step_loss(model: Model, ids_list, label_list, pixels):
    encoding = model.encode_images(pixels)
    embeddings, labels = [], []
    image_tokens = encoding.features.shape[1]
    for i, (ids, lab) in enumerate(zip(ids_list, label_list)):
        embeddings.append(model.embed_inputs(ids, encoding.features[i : i + 1]))
        at = ids.index(IMAGE_TOKEN_INDEX)
        labels.append(lab[:at] + [IGNORE_INDEX] * image_tokens + lab[at + 1 :])
    length = max(e.shape[0] for e in embeddings)
    hidden = embeddings[0].shape[-1]
    batch = mx.stack([mx.concatenate([e, mx.zeros((length - e.shape[0], hidden), e.dtype)]) for e in embeddings])
    targets = mx.array([lab + [IGNORE_INDEX] * (length - len(lab)) for lab in labels])
    logits, _ = model.language_model.forward(None, input_embeddings=batch)
    logits, targets = logits[:, :-1], targets[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0)) * mask
    loss = ce.sum() / mask.sum()
    routings = list(encoding.vision_routings)
    if encoding.connector_routing is not None:
        routings.append(encoding.connector_routing)
    for routing in routings:
        loss = loss + 0.1 * balance_loss(routing.logits, per_sequence=True) + 0.01 * router_z_loss(routing.logits)
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dense", action="store_true", help="the dense model of stages 1-2 (default: upcycled MoE)")
    options = parser.parse_args()

    mx.random.seed(0)
    args = ModelArgs.from_dict(demo_config(moe=not options.dense))
    model = Model(args)
    model.train()
    processor = Processor(_Tokenizer(), args)
    ids_list, label_list, pixels = make_batch(processor, options.batch_size)
    params = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
    step = nn.value_and_grad(model, lambda *a: step_loss(model, *a))

    times, cpu = [], []
    for i in range(options.steps + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, grads = step(ids_list, label_list, pixels)
        mx.eval(loss, grads)
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    tokens = sum(len(ids) - 1 + args.image_tokens for ids in ids_list)
    kind = "dense" if options.dense else f"MoE {args.num_experts} experts top-{args.num_selected}"
    print(
        f"demo CuMo ({kind}, {params / 1e6:.2f}M parameters), batch {options.batch_size} "
        f"({tokens} LLM tokens): forward+backward median {statistics.median(times) * 1000:.0f} ms "
        f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}; CPU time median {statistics.median(cpu) * 1000:.0f}) "
        f"over {len(times)} steps, loss {loss.item():.3f}"
    )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
