"""The one table of evaluation kinds: what each probe takes (its options, which are both its
``launch/eval.py KIND --flag`` and its ``eval.probes`` keys), what it reports (its metrics, how the
results table shows them) and the function that runs it. The program, the evaluation during
training (``eval.probes``, and ``eval.knn_*`` as the ``knn`` kind) and the report all read
:data:`EVAL_KINDS`: a new kind is one :class:`EvalKind` (options, metrics, run function, e.g. in a
module of its own) and one entry of the table (``tests/toy_eval_kind.py`` is a complete one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dune_scale.eval.features import ENCODER, FeatureSource, check_features
from dune_scale.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE
from dune_scale.eval.probe_data import ProbeDataError, ade20k_pairs, nyu_pairs
from dune_scale.eval.probes import ProbeResult, ProbeSettings, run_depth, run_knn, run_linear_seg

# Split folder names that say nothing about the dataset: a k-NN set is then named by its parent.
_SPLIT_NAMES = {"train", "training", "val", "validation", "test"}


def _option(default: Any = dataclasses.MISSING, help: str = "") -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class KnnOptions:
    train: str = _option(help="labelled neighbours: an ImageFolder tree or MDS shards with a label column")
    val: str = _option(help="the queries, with the same classes, in either form")
    k: int = _option(DEFAULT_K, "neighbours that vote")
    temperature: float = _option(DEFAULT_TEMPERATURE, "votes weigh exp(similarity / temperature)")

    def problems(self) -> list[tuple[str, Any, str]]:
        return [p for p in (("k", self.k, "at least 1") if self.k < 1 else None,
                            ("temperature", self.temperature, "positive") if self.temperature <= 0 else None) if p]

    def check_data(self) -> None:
        for name in ("train", "val"):
            if not Path(getattr(self, name)).is_dir():
                raise ProbeDataError(f"{getattr(self, name)} is not a folder (an ImageFolder tree or MDS shards are expected)")

    @property
    def dataset(self) -> str:
        path = Path(self.val).resolve()
        return path.parent.name if path.name.lower() in _SPLIT_NAMES else path.name


@dataclass(frozen=True)
class HeadOptions:
    """What the dense probes share: the data folder and how the linear head trains."""

    data: str = _option(help="the dataset's folder, in its release layout")
    epochs: int = _option(10, "passes of head training over the cached training features")
    lr: float = _option(1e-3, "AdamW's peak learning rate (decays linearly to 0)")
    weight_decay: float = _option(1e-4, "AdamW's weight decay")
    head_batch_size: int = _option(16, "images per head-training step")

    def problems(self) -> list[tuple[str, Any, str]]:
        found = [("epochs", self.epochs, "at least 1") if self.epochs < 1 else None,
                 ("lr", self.lr, "positive") if not self.lr > 0 else None,
                 ("weight_decay", self.weight_decay, "at least 0") if self.weight_decay < 0 else None,
                 ("head_batch_size", self.head_batch_size, "at least 1") if self.head_batch_size < 1 else None]
        return [p for p in found if p]

    @property
    def dataset(self) -> str:
        return Path(self.data).resolve().name


@dataclass(frozen=True)
class SegOptions(HeadOptions):
    num_classes: int = _option(150, "classes 1..N of the annotations (0 = ignore)")

    def problems(self) -> list[tuple[str, Any, str]]:
        return super().problems() + ([("num_classes", self.num_classes, "at least 1")] if self.num_classes < 1 else [])

    def check_data(self) -> None:
        for split in ("train", "val"):
            ade20k_pairs(self.data, split)


@dataclass(frozen=True)
class DepthOptions(HeadOptions):
    max_depth: float = _option(10.0, "metres; deeper pixels are not evaluated")

    def problems(self) -> list[tuple[str, Any, str]]:
        return super().problems() + ([("max_depth", self.max_depth, "positive")] if not self.max_depth > 0 else [])

    def check_data(self) -> None:
        for split in ("train", "val"):
            nyu_pairs(self.data, split)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    percent: bool = True  # shown ×100

    def show(self, value: float) -> str:
        return f"{100 * value:.1f}" if self.percent else f"{value:.3f}"


@dataclass(frozen=True)
class EvalKind:
    """One kind of probe. ``options``: a frozen dataclass whose fields (type ``str``, ``int`` or
    ``float``, a ``help`` in their metadata, a default unless required) are the kind's settings,
    with ``problems()`` → ``[(field, value, what is allowed)]``, ``check_data()`` (raises a
    ``DataError`` naming what is missing, before any model is built) and a ``dataset`` property
    (the name results carry). ``run(options, seed, source, settings)`` → a :class:`ProbeResult`
    whose metrics are ``metrics``' keys; every rank calls it during training."""

    name: str
    help: str
    options: type
    metrics: tuple[Metric, ...]
    run: Callable[[Any, int, FeatureSource, ProbeSettings], ProbeResult]


EVAL_KINDS: dict[str, EvalKind] = {
    kind.name: kind
    for kind in (
        EvalKind("knn", "weighted k-NN on class tokens (DINO: k = 20, T = 0.07)", KnnOptions,
                 (Metric("top1", "top-1"), Metric("top5", "top-5")), run_knn),
        EvalKind("linear-seg", "semantic segmentation, linear head on patch tokens (ADE20K layout)", SegOptions,
                 (Metric("miou", "mIoU"), Metric("pixel_accuracy", "pixel acc.")), run_linear_seg),
        EvalKind("depth", "monocular depth, linear head on patch tokens (NYU-Depth-v2 layout)", DepthOptions,
                 (Metric("rmse", "RMSE (m)", False, False), Metric("abs_rel", "AbsRel", False, False),
                  Metric("delta1", "δ<1.25")), run_depth),
    )
}
# Keys of every probe spec besides its kind's options.
COMMON_KEYS = ("kind", "features", "seed", "batch_size")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe to run: its kind, the kind's options, which features, the head's seed and the
    feature-extraction batch."""

    kind: str
    options: Any
    features: str = ENCODER
    seed: int = 0
    batch_size: int = 64

    @property
    def eval_kind(self) -> EvalKind:
        return EVAL_KINDS[self.kind]

    def run(self, source: FeatureSource, settings: ProbeSettings) -> ProbeResult:
        return self.eval_kind.run(self.options, self.seed, source, settings)


def parse_probe(raw: dict[str, Any], key: Callable[[str], str]) -> ProbeSpec:
    """A spec from a mapping (an ``eval.probes`` entry, or the program's arguments); ValueError
    naming the setting as ``key(name)`` shows it, the value and what is allowed."""
    kind = EVAL_KINDS.get(raw.get("kind"))
    if kind is None:
        raise ValueError(f"{key('kind')}: {raw.get('kind')!r} is not a probe; choose one of {', '.join(EVAL_KINDS)}")
    fields = {f.name: f for f in dataclasses.fields(kind.options)}
    unknown = sorted(set(raw) - set(fields) - set(COMMON_KEYS))
    if unknown:
        raise ValueError(f"{key(unknown[0])}: unknown for {kind.name}; allowed: {', '.join([*COMMON_KEYS[1:], *fields])}")
    values = {}
    for name, spec_field in fields.items():
        if name not in raw:
            if spec_field.default is dataclasses.MISSING:
                raise ValueError(f"{key(name)}: missing; {kind.name} needs it ({spec_field.metadata['help']})")
            continue
        values[name] = _typed(raw[name], spec_field.type, key(name))
    options = kind.options(**values)
    for name, value, allowed in options.problems():
        raise ValueError(f"{key(name)}: {value!r} is not allowed; it must be {allowed}")
    features = raw.get("features", ENCODER)
    try:
        check_features(str(features))
    except ValueError as err:
        raise ValueError(f"{key('features')}: {err}") from None
    seed = _typed(raw.get("seed", 0), "int", key("seed"))
    batch_size = _typed(raw.get("batch_size", 64), "int", key("batch_size"))
    if batch_size < 1:
        raise ValueError(f"{key('batch_size')}: {batch_size!r} is not allowed; it must be at least 1")
    return ProbeSpec(kind.name, options, str(features), seed, batch_size)


def _typed(value: Any, type_name: Any, key: str) -> Any:
    """``value`` as the field's type (``str``, ``int`` or ``float``: annotations are strings here)."""
    kind = {"str": str, "int": int, "float": float}[str(type_name)]
    if kind is str and isinstance(value, (str, Path)):
        return str(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{key}: {value!r} is not a valid {kind.__name__}")
