"""Mask R-CNN hyper-parameters: the defaults of `config.model` for the `maskrcnn` variant, and their checks."""

import ml_collections


def default_model_config() -> ml_collections.ConfigDict:
    """The `config.model` section of a Mask R-CNN run (ResNet-50-FPN with GroupNorm, trained from scratch).

    Anchor sizes suit DSB2018 nuclei (4 to ~150 pixels across): one size per FPN level P2..P6 (strides 4..64).
    """
    m = ml_collections.ConfigDict()
    m.name = "maskrcnn"
    # Backbone: ResNet (GroupNorm everywhere, no pretrained weights) and FPN levels P2..P6.
    m.resnet_depth = 50  # 18 | 34 | 50
    m.resnet_width = 64  # channels of the stem and the first stage (x2 per stage; x4 more inside bottlenecks)
    m.groups = 32  # GroupNorm groups (reduced to a divisor of the channel count where needed)
    m.fpn_width = 256
    # Anchors and RPN.
    m.anchor_sizes = (8.0, 16.0, 32.0, 64.0, 128.0)  # one side length (sqrt of area) per level P2..P6
    m.aspect_ratios = (0.5, 1.0, 2.0)  # height / width
    m.rpn_fg_iou = 0.7
    m.rpn_bg_iou = 0.3
    m.rpn_batch_per_image = 256
    m.rpn_positive_fraction = 0.5
    m.rpn_pre_nms_topk_train = 2000  # per level
    m.rpn_post_nms_topk_train = 1000  # per image
    m.rpn_pre_nms_topk_test = 1000
    m.rpn_post_nms_topk_test = 1000
    m.rpn_nms_iou = 0.7
    m.rpn_min_size = 1.0  # proposals smaller than this (pixels, either side) are dropped
    # RoI heads.
    m.roi_fg_iou = 0.5
    m.roi_bg_iou = 0.5
    m.roi_batch_per_image = 512
    m.roi_positive_fraction = 0.25
    m.roi_canonical_size = 224.0  # FPN level assignment: k = k0 + log2(sqrt(area) / canonical_size)
    m.roi_canonical_level = 4
    m.box_pool_size = 7
    m.mask_pool_size = 14  # mask logits are 2 * mask_pool_size square (28 = config.targets.mask_size)
    m.sampling_ratio = 2  # RoIAlign samples per bin side (a fixed number: shapes must be static)
    m.box_head_dim = 1024
    m.mask_head_width = 256
    m.box_weights = (10.0, 10.0, 5.0, 5.0)  # delta scaling of the box head (y, x, h, w)
    # Inference.
    m.score_threshold = 0.5  # detections below are dropped (label images have no use for low-confidence boxes)
    m.detection_nms_iou = 0.5
    m.detections_per_image = 300
    m.nms_tile = 256  # boxes per tile of the fixed-size NMS
    return m


def check_model_config(m: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `config.model` key that is missing or out of range."""
    missing = sorted(set(default_model_config().keys()) - set(m.keys()))
    if missing:
        raise ValueError(f"config.model is missing Mask R-CNN keys {missing}; start from default_model_config()")
    if m.resnet_depth not in (18, 34, 50):
        raise ValueError(f"config key 'model.resnet_depth' must be 18, 34 or 50, got {m.resnet_depth!r}")
    if len(m.anchor_sizes) != 5:
        raise ValueError(f"config key 'model.anchor_sizes' needs one size per level P2..P6 (5), got {m.anchor_sizes!r}")
    if m.sampling_ratio < 1:
        raise ValueError(f"config key 'model.sampling_ratio' must be >= 1 (static shapes), got {m.sampling_ratio!r}")
    for key in ("rpn_positive_fraction", "roi_positive_fraction", "rpn_nms_iou", "detection_nms_iou"):
        if not 0.0 < m[key] <= 1.0:
            raise ValueError(f"config key 'model.{key}' must be in (0, 1], got {m[key]!r}")
    if m.rpn_bg_iou > m.rpn_fg_iou or m.roi_bg_iou > m.roi_fg_iou:
        raise ValueError("config keys 'model.rpn_bg_iou'/'model.roi_bg_iou' must not exceed the matching *_fg_iou")
