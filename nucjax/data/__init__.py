"""Data: reading files, TFDS builders, training targets, augmentation and the grain input pipeline.

`nucjax.data.source(name, split, *, data_dir=None, manual_dir=None, **builder_kwargs)` opens a prepared split
(see `nucjax.data.prepare.source`); it is imported on first use so that `nucjax.data.io` and friends stay light.
"""


def __getattr__(name: str):
    if name in ("source", "source_for"):
        from nucjax.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'nucjax.data' has no attribute {name!r}")
