"""nucjax: nucleus instance segmentation in JAX, with instance metrics that match the field's references."""

__version__ = "0.1.0"
