"""What limits Mask R-CNN at strict IoU: its boxes, its mask head, or the M x M mask it predicts in each box?

Without a checkpoint: every true nucleus, with its own box, turned into an M x M mask target exactly as training
does (`nucjax.data.targets.instances`) and pasted back as inference does (`paste_masks`): the ceiling the mask
resolution alone puts on a perfect detector. With `--checkpoint`: the trained model's own label images beside the
same model with the ideal mask in each of its boxes (its boxes' limit) and with its mask head run on the true boxes
(its masks' limit), all with the checkpoint's tuned post-processing; and where the true nuclei it misses are
lost: which stage (proposals, box refinement, score thresholds, NMS, masks) each one passes, by size, touching or
not, and modality.

    python -m experiments.maskrcnn_limits --sizes 14,28,56                      # the study's held-apart images
    python -m experiments.maskrcnn_limits --checkpoint runs/cpu/maskrcnn-s0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from nucjax import metrics
from nucjax.data.targets import instances
from nucjax.models.maskrcnn.boxes import box_iou
from nucjax.models.maskrcnn.inference import paste_masks
from nucjax.separation import touching_ids

REPORT_THRESHOLDS = (0.5, 0.75, 0.9)


def _count(label: np.ndarray) -> int:
    return int(np.unique(label[label > 0]).size)


def true_boxes(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids int[N], boxes f32[N, 4]) of the nuclei of `label`, in increasing id (boxes as `instances` gives them)."""
    ids = np.unique(label[label > 0])
    if ids.size == 0:
        return ids, np.zeros((0, 4), np.float32)
    return ids, instances(label, max_instances=ids.size, mask_size=2)["boxes"]


def oracle_labels(label: np.ndarray, mask_size: int) -> np.ndarray:
    """int32[H, W]: every nucleus of `label` through its M x M box-mask target and back (a perfect detector's output).

    Pasted in increasing id order, each onto the pixels that no earlier one took (paste_masks' overlap rule).
    """
    label = np.asarray(label)
    n = _count(label)
    if n == 0:
        return np.zeros(label.shape, np.int32)
    target = instances(label, max_instances=n, mask_size=mask_size)
    return paste_masks(target["boxes"], np.ones(n, np.float32), target["masks"].astype(np.float32),
                       target["instance_valid"], *label.shape)


def ideal_masks(boxes: np.ndarray, label: np.ndarray, mask_size: int, min_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """For boxes f32[D, 4] in an image with true labels `label`: (masks f32[D, M, M], matched bool[D]).

    A box is matched to the true nucleus whose box has the highest IoU with it (at least `min_iou`, as the mask
    head's training RoIs are); its ideal mask is that nucleus's pixels in the box, averaged over each of the M x M
    cells (exact areas of the pixel squares) and thresholded at 0.5. Unmatched boxes get zeros.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    masks = np.zeros((len(boxes), mask_size, mask_size), np.float32)
    ids, truth = true_boxes(label)
    if ids.size == 0 or len(boxes) == 0:
        return masks, np.zeros(len(boxes), bool)
    iou = _box_iou(boxes, truth)
    best, matched = iou.argmax(axis=1), iou.max(axis=1) >= min_iou
    h, w = label.shape
    for d in np.flatnonzero(matched):
        y0, x0, y1, x1 = boxes[d]
        wy, wx = _cell_weights(y0, y1, h, mask_size), _cell_weights(x0, x1, w, mask_size)
        masks[d] = (wy @ (label == ids[best[d]]).astype(np.float64) @ wx.T) >= 0.5
    return masks, matched


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """f32[len(a), len(b)]: the IoU of boxes a f32[N, 4] and b f32[M, 4] (either may be empty)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return np.asarray(box_iou(jnp.asarray(a), jnp.asarray(b)))


def _cell_weights(start: float, stop: float, size: int, cells: int) -> np.ndarray:
    """f64[cells, size]: the share of cell i of [start, stop) (split into `cells` equal parts) in pixel j."""
    edges = start + np.arange(cells + 1) * ((stop - start) / cells)
    lo = np.maximum(edges[:-1, None], np.arange(size)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(size)[None, :] + 1)
    return np.clip(hi - lo, 0.0, None) * (cells / max(stop - start, 1e-9))


FUNNEL = {"proposed": "a proposal", "refined": "its refined box", "scored": "above the score thresholds",
          "detected": "kept by NMS", "segmented": "its mask"}


def funnel(label: np.ndarray, proposals: np.ndarray, refined: np.ndarray, kept: np.ndarray, detections: np.ndarray,
           predicted: np.ndarray, min_iou: float = 0.5) -> dict[str, np.ndarray]:
    """Which stages of a detector each true nucleus of `label` (int[H, W]) passes: bool[N] per key of FUNNEL.

    proposed / refined / scored / detected: some box of the stage has box IoU >= min_iou with the nucleus's box
    (the IoU at which training counts a RoI as the nucleus's): the valid proposals f32[P, 4]; the box head's
    refinement of each f32[P, 4]; those refined boxes whose score passes the thresholds (kept bool[P]); the
    detections f32[D, 4] left after NMS (and the post-processing's min_score). segmented: a nucleus of `predicted`
    has mask IoU > 0.5 with it (a match at 0.5). Also "diameter" f64[N] (of the disk of its area) and "touching"
    bool[N] (8-adjacent to another nucleus), N nuclei in increasing id.
    """
    label, predicted = np.asarray(label), np.asarray(predicted)
    ids, boxes = true_boxes(label)

    def found(candidates: np.ndarray) -> np.ndarray:
        iou = _box_iou(boxes, candidates)
        return iou.max(axis=1) >= min_iou if iou.shape[1] else np.zeros(len(ids), bool)

    overlap = metrics.overlap_table(label, predicted)  # areas and pair IoUs, true nuclei in increasing id (as `ids`)
    segmented = np.zeros(len(ids), bool)
    segmented[overlap.true_idx[overlap.iou > 0.5]] = True
    return {"proposed": found(proposals), "refined": found(refined), "scored": found(np.asarray(refined)[kept]),
            "detected": found(detections), "segmented": segmented,
            "diameter": 2 * np.sqrt(overlap.area_true / np.pi),
            "touching": np.isin(ids, touching_ids(label))}


DIAMETERS = (0, 10, 20, 40)  # pixels: the bins of the funnel table


def funnel_table(parts: Sequence[Mapping[str, np.ndarray]], modalities: Sequence[str | None], title: str) -> str:
    """Markdown: the share of true nuclei passing each stage of FUNNEL (funnel() per image, with its modality), over
    all of them and by diameter, touching or not, and modality."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in (*FUNNEL, "diameter", "touching")}
    modality = np.concatenate([np.full(len(p["touching"]), m or "", object) for p, m in zip(parts, modalities)])
    groups = {"all": np.ones(len(modality), bool)}
    for low, high in zip(DIAMETERS, (*DIAMETERS[1:], None)):
        name = f"diameter {low}–{high} px" if high else f"diameter ≥ {low} px"
        groups[name] = (cat["diameter"] >= low) & (cat["diameter"] < (high or np.inf))
    groups["touching another"], groups["isolated"] = cat["touching"], ~cat["touching"]
    groups.update({m: modality == m for m in sorted(set(modality) - {""})})
    rows = [f"| {title}: true nuclei | count | " + " | ".join(FUNNEL.values()) + " |",
            "|---|---|" + "---|" * len(FUNNEL)]
    for name, members in groups.items():
        n = int(members.sum())
        cells = [f"{cat[k][members].mean():.3f}" if n else "–" for k in FUNNEL]
        rows.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _row(name: str, report: metrics.Report) -> str:
    pooled = {round(r["threshold"], 2): r for r in report.pooled}
    cells = [name, f"{report.dsb2018_score:.3f}"]
    cells += [f"{pooled[t]['accuracy']:.3f}" for t in REPORT_THRESHOLDS]
    cells += [f"{pooled[0.5]['mean_matched_score']:.3f}", str(report.errors["merges"])]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| {} | DSB2018 score | acc@0.5 | acc@0.75 | acc@0.9 | mean IoU of matches@0.5 | merges |\n"
          "|---|---|---|---|---|---|---|")


def ceiling_table(labels: Sequence[np.ndarray], names: Sequence[str], sizes: Iterable[int]) -> str:
    """Markdown rows: each label image against its own `oracle_labels`, per mask size."""
    rows = [HEADER.format("true boxes, M×M masks")]
    for size in sizes:
        rows.append(_row(f"{size}×{size}", metrics.evaluate(labels, [oracle_labels(lb, size) for lb in labels], names)))
    return "\n".join(rows)


def checkpoint_reports(path: str, examples: Sequence[Mapping],
                       progress: bool = True) -> tuple[dict[str, metrics.Report], list[dict[str, np.ndarray]]]:
    """A Mask R-CNN checkpoint on examples ({"image", "label", "id"}): its metrics by row of CHECKPOINT_ROWS (its
    label images as `predict` gives them, tiled as configured; on whole images; with the ideal mask in each of its
    boxes; with its mask head run on the true boxes; each with the checkpoint's post-processing), and `funnel` of
    each image on whole images."""
    import jax
    from tqdm import tqdm

    from nucjax import checkpoint
    from nucjax.models.maskrcnn.inference import candidates, propose, refine
    from nucjax.models.maskrcnn.model import SIZE_MULTIPLE

    tiled = checkpoint.load(path)
    if tiled.variant.dense:
        raise ValueError(f"{path}: a {tiled.config.variant!r} checkpoint; this analysis needs a detector (maskrcnn)")
    largest = round(max(max(e["image"].shape[:2]) for e in examples) * tiled.input_scale)
    whole = checkpoint.load(path, tile_size=-(-largest // SIZE_MULTIPLE) * SIZE_MULTIPLE, tile_overlap=0)
    config, paste = whole.config, whole.to_instances  # the checkpoint's post-processing, min_size included
    out_size = 2 * config.model.mask_pool_size
    min_score = max(float(whole.postprocess_params.get("min_score", 0.0)), 0.0)
    # The network on given boxes (MaskRCNN.__call__): its mask head's probabilities in each.
    masks_in = jax.jit(lambda v, x, b: jax.nn.sigmoid(whole.module.apply(v, x, b)["mask_logits"]))

    @jax.jit
    def stages(v, x):  # detect()'s first stages: valid proposals, their refined boxes and scores, NMS's candidates
        features, proposals, valid = propose(whole.module, v, x, config)
        refined, scores = refine(whole.module, v, features, proposals, x.shape[1:3], config)
        ok = candidates(refined, scores, valid, config.model.score_threshold)
        return proposals[0], valid[0], refined[0], scores[0], ok[0]

    columns = {k: [] for k in ("tiled", "whole", "ideal", "true_boxes")}
    funnels = []
    labels = [e["label"] for e in examples]
    for e, label in tqdm(list(zip(examples, labels)), desc=str(path), unit="image", file=sys.stderr,
                         disable=not progress):
        columns["tiled"].append(tiled.predict(e["image"]))
        out = whole.predict_outputs(e["image"])
        columns["whole"].append(paste(out))
        ideal, matched = ideal_masks(out["boxes"], label, out_size)
        columns["ideal"].append(paste({**out, "masks": np.where(matched[:, None, None], ideal, out["masks"])}))
        _, truth = true_boxes(label)
        x, factors = whole.network_input(e["image"])  # boxes in x are image boxes times `to_x`
        to_x = np.tile(factors, 2).astype(np.float32)
        h, w = x.shape[:2]
        padded = np.pad(x, ((0, -h % SIZE_MULTIPLE), (0, -w % SIZE_MULTIPLE), (0, 0)))[None]
        if len(truth):
            masks = np.asarray(masks_in(whole.variables, padded, (truth * to_x)[None]))[0]
            columns["true_boxes"].append(paste({"boxes": truth, "scores": np.ones(len(masks), np.float32),
                                                "masks": masks, "valid": np.ones(len(masks), bool),
                                                "size": np.array(label.shape)}))
        else:
            columns["true_boxes"].append(np.zeros(label.shape, np.int32))
        proposals, valid, refined, scores, ok = (np.asarray(a) for a in stages(whole.variables, x[None]))
        proposals, refined = proposals / to_x, refined / to_x
        kept = ok[valid] & (scores[valid] >= min_score)
        shown = out["valid"] & (out["scores"] >= min_score)
        funnels.append(funnel(label, proposals[valid], refined[valid], kept, out["boxes"][shown], columns["whole"][-1]))
    names = [e["id"] for e in examples]
    return {k: metrics.evaluate(labels, v, names) for k, v in columns.items()}, funnels


CHECKPOINT_ROWS = {"tiled": "its boxes, its masks (as predict gives them)",
                   "whole": "its boxes, its masks (whole images)",
                   "ideal": "its boxes, ideal masks",
                   "true_boxes": "true boxes, its masks"}


def checkpoint_table(path: str, examples: Sequence[Mapping], progress: bool = True) -> str:
    """Markdown: the rows of `checkpoint_reports`, then its funnel table."""
    reports, funnels = checkpoint_reports(path, examples, progress)
    rows = [HEADER.format(str(path))] + [_row(CHECKPOINT_ROWS[k], r) for k, r in reports.items()]
    return "\n".join(rows) + "\n\n" + funnel_table(funnels, [e.get("modality") for e in examples], str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.maskrcnn_limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                        help="a maskrcnn workdir or checkpoint (repeatable); without one, only the ceiling table")
    parser.add_argument("--dataset", default="dsb2018")
    parser.add_argument("--split", default="holdout", help="a prepared split (default: the study's held-apart images)")
    parser.add_argument("--setting", action="append", default=None, metavar="KEY=VALUE",
                        help="builder settings (default: holdout_fraction=0.1, the study's)")
    parser.add_argument("--sizes", default="14,28,56", help="mask sizes M of the ceiling table, comma-separated")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        if not sizes or min(sizes) < 2:
            raise ValueError
    except ValueError:
        print(f"--sizes must be integers >= 2, comma-separated; got {args.sizes!r}", file=sys.stderr)
        return 2
    settings = {}
    for item in args.setting or ["holdout_fraction=0.1"]:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--setting must be KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        settings[key] = float(value) if key.endswith("fraction") else value
    from nucjax import checkpoint, data  # TFDS and JAX come with these

    try:
        source = data.source(args.dataset, args.split, data_dir=args.data_dir, **settings)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    examples = [source[i] for i in range(len(source))]
    labels, names = [e["label"] for e in examples], [e["id"] for e in examples]
    counts = [_count(lb) for lb in labels]
    print(f"{args.dataset} {args.split}: {len(labels)} images, {sum(counts)} nuclei (at most {max(counts)} in one "
          "image)\n")
    print(ceiling_table(labels, names, sizes), flush=True)
    for path in args.checkpoint:
        try:
            print("\n" + checkpoint_table(path, examples), flush=True)
        except (checkpoint.CheckpointError, ValueError) as error:
            print(f"{path}: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
