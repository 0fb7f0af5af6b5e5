"""Mask R-CNN (masks learned beside box detection), sized for a CPU: ResNet-18-FPN with narrow heads, from scratch.

The data, crops, augmentation and schedule are the shared ones of `default.py`; `config.model` is Mask R-CNN's
own section (`nucjax.models.maskrcnn.default_model_config`: ResNet-50-FPN, 256-wide, as in He et al. 2017), here
narrowed so that a step fits a 2-core CPU. On a GPU, `--config.model.resnet_depth=50 --config.model.fpn_width=256`.
"""

import pathlib

from nucjax.config import load_config
from nucjax.models.maskrcnn import default_model_config


def get_config():
    config = load_config(pathlib.Path(__file__).with_name("default.py"))
    config.variant = "maskrcnn"
    with config.unlocked():
        config.model = default_model_config()
    config.model.resnet_depth = 18
    config.model.resnet_width = 32
    config.model.groups = 8
    config.model.fpn_width = 128
    config.model.box_head_dim = 256
    config.model.mask_head_width = 64
    config.model.rpn_pre_nms_topk_train = 1000
    config.model.rpn_post_nms_topk_train = 500
    config.model.roi_batch_per_image = 256
    config.model.detections_per_image = 200
    config.targets.max_instances = 128
    return config
