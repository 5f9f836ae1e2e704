"""`transfer detection --backend detectron2`: detectron2 itself trains and scores the detector.

The run folder is claimed by our engine (the overwrite guard, resume checks, config.json,
run.json); detectron2 writes its checkpoints, log and metrics under `<out>/detectron2/`.
Images and boxes come from our VOC reader (the records detectron2's own
`load_voc_instances` would build), the encoder is handed over as a `.pkl` loaded by
detectron2's checkpointer (a backbone key it cannot fill stops the run), and VOC AP is
detectron2's PascalVOCDetectionEvaluator. detectron2 is imported only inside functions:
without it the torchvision backend and these names still import.

The converter maps a whole detector between the two builds: the trunk through
`pirl.weights` names, the RPN head with its anchors reordered (torchvision's are
ratio-major, detectron2's size-major), and the predictors with the background class moved
from first (torchvision) to last (detectron2) and its box deltas dropped.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pirl.engine import progress, resolve_device
from pirl.errors import UserError
from pirl.weights import from_detectron2, to_detectron2
from transfer.detection import (
    ANCHOR_RATIOS,
    ANCHOR_SIZES,
    DetectionConfig,
    _claim,
    _d2_dataset_name,
    _load_trunk,
    _splits,
    markdown_row,
    uses_07_metric,
    write_detectron2_handover,
)
from transfer.voc_detection import VocImage, parse_set_name, read_voc_set, voc_classes

# What detectron2's own checkpointer writes in the run folder: a resume continues from it.
D2_CHECKPOINT = "detectron2/last_checkpoint"
# Parts of detectron2's R50-C4 that the encoder's weights must fill (the rest starts fresh).
D2_TRUNK_PREFIXES = ("backbone.", "roi_heads.res5.")


# --------------------------------------------------------------------------- data


def voc_records(images: Sequence[VocImage], classes: Sequence[str]) -> list[dict[str, Any]]:
    """detectron2 dataset dicts from our VOC reader: 0-based ids, boxes (x1-1, y1-1, x2, y2)."""
    from detectron2.structures import BoxMode

    index = {c: i for i, c in enumerate(classes)}
    return [
        {
            "file_name": str(im.path),
            "image_id": im.image_id,
            "height": im.height,
            "width": im.width,
            "annotations": [
                {
                    "category_id": index[o.name],
                    "bbox": [o.box[0] - 1.0, o.box[1] - 1.0, o.box[2], o.box[3]],
                    "bbox_mode": BoxMode.XYXY_ABS,
                }
                for o in im.objects
            ],
        }
        for im in images
    ]


def register_voc_set(
    name: str, devkit: str | Path, spec: str, classes: Sequence[str], use_07_metric: bool = True
) -> None:
    """Register one devkit split under `name` (replacing an earlier one) with the metadata
    PascalVOCDetectionEvaluator reads; it picks the 11-point metric from `year` 2007 alone."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    year, split = parse_set_name(spec)
    images = read_voc_set(devkit, year, split)
    records = voc_records(images, classes)
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        thing_classes=list(classes),
        dirname=str(Path(devkit) / f"VOC{year}"),
        year=2007 if use_07_metric else 2012,
        split=split,
    )


# --------------------------------------------------------------------------- weights


def _anchor_order(n_sizes: int, n_ratios: int) -> list[int]:
    """torchvision's anchor index (ratio * sizes + size) for each detectron2 anchor
    (size * ratios + ratio)."""
    return [r * n_sizes + s for s in range(n_sizes) for r in range(n_ratios)]


def _per_anchor(t: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Reorder the anchor dimension of an RPN output layer (A or A*4 channels)."""
    a = len(order)
    return t.reshape(a, -1, *t.shape[1:])[list(order)].reshape(t.shape)


_RPN = {
    "rpn.head.conv.0.0.": "proposal_generator.rpn_head.conv.",
    "rpn.head.cls_logits.": "proposal_generator.rpn_head.objectness_logits.",
    "rpn.head.bbox_pred.": "proposal_generator.rpn_head.anchor_deltas.",
}
_PER_ANCHOR = ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")


def detector_to_detectron2(
    state: Mapping[str, torch.Tensor],
    n_sizes: int = len(ANCHOR_SIZES),
    n_ratios: int = len(ANCHOR_RATIOS),
) -> dict[str, torch.Tensor]:
    """Our C4 detector's state dict (build_c4_detector) as detectron2's GeneralizedRCNN R50-C4."""
    order = _anchor_order(n_sizes, n_ratios)
    trunk = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    trunk.update(
        {k[len("roi_heads.box_head.") :]: v for k, v in state.items() if ".box_head." in k}
    )
    out = {f"backbone.{k}": torch.from_numpy(v) for k, v in to_detectron2(trunk).items()}
    out = {(k.replace("backbone.res5.", "roi_heads.res5.")): v for k, v in out.items()}
    for k, v in state.items():
        prefix = next((p for p in _RPN if k.startswith(p)), None)
        if prefix is not None:
            v = _per_anchor(v, order) if prefix in _PER_ANCHOR else v
            out[_RPN[prefix] + k[len(prefix) :]] = v.clone()
    cls_w, cls_b = (
        state["roi_heads.box_predictor.cls_score.weight"],
        state["roi_heads.box_predictor.cls_score.bias"],
    )
    out["roi_heads.box_predictor.cls_score.weight"] = torch.cat([cls_w[1:], cls_w[:1]])
    out["roi_heads.box_predictor.cls_score.bias"] = torch.cat([cls_b[1:], cls_b[:1]])
    for part in ("weight", "bias"):
        out[f"roi_heads.box_predictor.bbox_pred.{part}"] = state[
            f"roi_heads.box_predictor.bbox_pred.{part}"
        ][4:].clone()
    return out


def detector_from_detectron2(
    state: Mapping[str, torch.Tensor],
    n_sizes: int = len(ANCHOR_SIZES),
    n_ratios: int = len(ANCHOR_RATIOS),
) -> dict[str, torch.Tensor]:
    """detectron2's R50-C4 state dict as our C4 detector's (background box deltas are zero:
    torchvision never decodes them)."""
    order = _anchor_order(n_sizes, n_ratios)
    inverse = [order.index(i) for i in range(len(order))]
    trunk = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    trunk.update({k[len("roi_heads.") :]: v for k, v in state.items() if ".res5." in k})
    out: dict[str, torch.Tensor] = {}
    for k, v in from_detectron2(trunk).items():
        out[("roi_heads.box_head." if k.startswith("layer4.") else "backbone.") + k] = v
    back = {d: t for t, d in _RPN.items()}
    for k, v in state.items():
        prefix = next((p for p in back if k.startswith(p)), None)
        if prefix is not None:
            ours = back[prefix]
            v = _per_anchor(v, inverse) if ours in _PER_ANCHOR else v
            out[ours + k[len(prefix) :]] = v.clone()
    for part in ("weight", "bias"):
        cls = state[f"roi_heads.box_predictor.cls_score.{part}"]
        out[f"roi_heads.box_predictor.cls_score.{part}"] = torch.cat([cls[-1:], cls[:-1]])
        box = state[f"roi_heads.box_predictor.bbox_pred.{part}"]
        out[f"roi_heads.box_predictor.bbox_pred.{part}"] = torch.cat(
            [torch.zeros_like(box[:4]), box]
        )
    return out


def load_trunk_weights(model: torch.nn.Module, pkl: str | Path) -> list[str]:
    """Load the handed-over `.pkl` with detectron2's checkpointer; refuse, naming them, any
    backbone or res5 key it left unfilled or could not fit; the fresh keys (heads) otherwise."""
    from detectron2.checkpoint import DetectionCheckpointer

    class Reporting(DetectionCheckpointer):
        """Keeps the load report that detectron2 otherwise only logs."""

        def _load_model(self, checkpoint: Any) -> Any:
            self.report = super()._load_model(checkpoint)
            return self.report

    ck = Reporting(model)
    ck.load(str(pkl), checkpointables=[])
    report = ck.report
    missing = [k for k in report.missing_keys if k.startswith(D2_TRUNK_PREFIXES)]
    misfit = [k for k, *_ in report.incorrect_shapes if k.startswith(D2_TRUNK_PREFIXES)]
    if missing or misfit:
        bad = "; ".join(
            f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("wrong shape", misfit))
            if keys
        )
        raise UserError(f"{pkl}: detectron2 could not load the encoder into its R50-C4: {bad}")
    return sorted(report.missing_keys)


# --------------------------------------------------------------------------- run


def run_detectron2(cfg: DetectionConfig) -> dict[str, Any]:
    """Train and test with detectron2 itself from the handed-over config and weights."""
    if importlib.util.find_spec("detectron2") is None:
        raise UserError(
            "--backend detectron2: detectron2 is not installed; install it with pip install "
            "'git+https://github.com/facebookresearch/detectron2.git' or use --backend torchvision"
        )
    devkit, train, test, year, split = _splits(cfg)
    classes = voc_classes(train + test)
    trunk, source = _load_trunk(cfg)
    name, run = _claim(cfg, resolve_device(cfg.device), devkit, source, classes, D2_CHECKPOINT)
    yaml_path, pkl = write_detectron2_handover(cfg, trunk, len(classes))
    use_07 = uses_07_metric(cfg.metric, cfg.test_set)
    for spec in cfg.train_sets:
        register_voc_set(_d2_dataset_name(spec), devkit, spec, classes)
    register_voc_set(_d2_dataset_name(cfg.test_set), devkit, cfg.test_set, classes, use_07)

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer, HookBase
    from detectron2.engine.hooks import EvalHook
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import (
        CommonMetricPrinter,
        EventWriter,
        JSONWriter,
        get_event_storage,
    )

    class RunWriter(EventWriter):
        """detectron2's latest losses and LR as rows of the run's metrics.csv (and --logger),
        the columns the torchvision backend writes: iteration, loss, lr, each loss term."""

        last = 0  # the iteration of the last row: the final write after training repeats it

        def write(self) -> None:
            hinted = get_event_storage().latest_with_smoothing_hint(20)
            done = 1 + max((it for _, it in hinted.values()), default=-1)
            if done <= self.last:
                return
            self.last = done
            latest = {k: v for k, (v, _) in hinted.items()}
            terms = {k: float(latest[k]) for k in sorted(latest) if k.startswith("loss_")}
            row = {"iteration": done, "loss": sum(terms.values())}
            run.append_metrics({**row, "lr": float(latest.get("lr", math.nan)), **terms})

    class Progress(HookBase):
        """The torchvision backend's progress bar, loss and LR: detectron2's own log goes to
        log.txt, so without it the terminal says nothing for the whole run."""

        bar = None  # after_train runs even when an earlier hook's before_train raised

        def before_train(self) -> None:
            done, total = self.trainer.start_iter, self.trainer.max_iter
            self.bar = progress(total=total, initial=done, desc="detection")

        def after_step(self) -> None:
            latest = self.trainer.storage.latest()
            self.bar.update(1)
            if "total_loss" in latest and "lr" in latest:
                loss, lr = latest["total_loss"][0], latest["lr"][0]
                self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}")

        def after_train(self) -> None:
            if self.bar is not None:
                self.bar.close()

    class Trainer(DefaultTrainer):
        """DefaultTrainer with the VOC evaluator, no TensorBoard writer (not a dependency), no
        evaluation hook (the test runs once, after training, whose results we keep) and our
        progress bar."""

        def build_hooks(self) -> list[Any]:
            hooks = [h for h in super().build_hooks() if not isinstance(h, EvalHook)]
            return [*hooks, Progress()]

        @classmethod
        def build_evaluator(cls, d2cfg: Any, dataset_name: str) -> Any:
            return PascalVOCDetectionEvaluator(dataset_name)

        def build_writers(self) -> list[Any]:
            out = Path(self.cfg.OUTPUT_DIR) / "metrics.json"
            return [CommonMetricPrinter(self.max_iter), JSONWriter(str(out)), RunWriter()]

    d2cfg = get_cfg()
    d2cfg.merge_from_file(str(yaml_path))
    d2cfg.freeze()
    Path(d2cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    # detectron2's and its checkpointer's (fvcore) log go to detectron2/log.txt, not the terminal.
    logs = [logging.getLogger(n) for n in ("detectron2", "fvcore")]
    levels = [log.level for log in logs]
    handler = logging.FileHandler(Path(d2cfg.OUTPUT_DIR) / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    for log in logs:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        seed_all_rng(cfg.seed)
        trainer = Trainer(d2cfg)
        fresh = []
        if cfg.resume:
            trainer.resume_or_load(resume=True)
        else:
            fresh = load_trunk_weights(trainer.model, pkl)
        try:
            trainer.train()
        except FloatingPointError as exc:
            raise UserError(f"{cfg.out}: {str(exc).splitlines()[0]}; stopped") from None
        bbox = Trainer.test(d2cfg, trainer.model)["bbox"]
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.removeHandler(handler)
            log.setLevel(level)
        handler.close()
    results: dict[str, Any] = {k: float(bbox[k]) for k in ("AP", "AP50", "AP75")}
    results.update(
        metric="voc07-11point" if use_07 else "area", method=name, weights=source,
        backend="detectron2", iterations=cfg.iters, test_set=cfg.test_set,
        train_sets=list(cfg.train_sets),
    )  # fmt: skip
    if fresh:
        results["initialised_fresh"] = sorted({k.rsplit(".", 1)[0] for k in fresh})
    run.write_results(results)
    run.path("table1_row.md").write_text(markdown_row(name, results) + "\n")
    return results
