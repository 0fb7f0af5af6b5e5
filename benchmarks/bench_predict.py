"""Prediction speed and host memory: megapixels/s and peak RSS of `Predictor.predict` on 1024², 2048², 4096² images.

Each size runs in a fresh process so that peaks do not mix; the maps (`predict_outputs`, after a warm-up that compiles
the tile batch shapes) and the post-processing (`to_instances`) are timed separately. The model is a
checkpoint's, or a randomly initialised one built from a config (its maps are noise near 0.5, so its
post-processing finds far more, smaller objects than a trained model's). Runs on JAX's default device (GPU if any).

  python benchmarks/bench_predict.py --config configs/quickstart.py
  python benchmarks/bench_predict.py --checkpoint runs/quickstart --sizes 1024,2048
  python benchmarks/bench_predict.py --checkpoint runs/quickstart --sizes 1024 --tta  # test-time augmentation

Goal (issue 6): peak RSS at 4096² <= 1.5 x peak RSS at 1024² + the 4096² input image's own bytes.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from nucjax import cli

TILE_SOURCE = 512  # the test image is a synthetic 512² image repeated to the size asked for


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a training workdir (or a checkpoint in it)")
    model.add_argument("--config", help="a config file: its model, randomly initialised")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--sizes", default="1024,2048,4096", help="square image sizes, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # measure this one size here and print JSON
    cli.add_prediction_arguments(p)  # --tile-size, --tile-overlap, --tta, --input-scale
    return p.parse_args(argv)


def build_predictor(args: argparse.Namespace):
    """The checkpoint's Predictor, or one around a randomly initialised model of the config."""
    import jax

    from nucjax import checkpoint, variants
    from nucjax.config import load_config
    from nucjax.inference import Predictor

    if args.checkpoint:
        return checkpoint.load(args.checkpoint, **cli.prediction_options(args))
    config = load_config(args.config, args.override)
    module = variants.get(config.variant).model(config)
    side = 2 ** config.model.depth  # parameters do not depend on the image size: initialise on the smallest input
    variables = module.init(jax.random.PRNGKey(args.seed), np.zeros((1, side, side, 3), np.float32), train=False)
    return Predictor(config, variables, **cli.prediction_options(args))


def make_image(size: int, seed: int) -> np.ndarray:
    """uint8[size, size, 3]: a synthetic nuclei image repeated (and cropped) to size x size."""
    from nucjax.data import synthetic

    image, _ = synthetic.generate(seed, height=TILE_SOURCE, width=TILE_SOURCE)
    reps = -(-size // TILE_SOURCE)
    return np.ascontiguousarray(np.tile(image, (reps, reps, 1))[:size, :size])


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_up(predictor, image: np.ndarray) -> None:
    """Compiles every batch shape the timed run will use: 1..tile_batch tiles, or the image itself if it fits one."""
    t = predictor.tile_size
    if max(image.shape[:2]) <= t:
        predictor.predict_outputs(image)
        return
    for k in range(1, predictor.tile_batch + 1):
        predictor.predict_many([np.zeros((t, t, 3), np.uint8)] * k)


def measure(args: argparse.Namespace) -> dict:
    """Times and peak memory of one size, in this process."""
    import jax

    predictor = build_predictor(args)
    image = make_image(args.child, args.seed)
    base = peak_rss_mib()
    warm_up(predictor, image)
    start = time.perf_counter()
    outputs = predictor.predict_outputs(image)
    maps_s = time.perf_counter() - start
    peak_maps = peak_rss_mib()
    start = time.perf_counter()
    labels = predictor.to_instances(outputs)
    post_s = time.perf_counter() - start
    return {
        "size": args.child, "device": str(jax.devices()[0]), "tile_size": predictor.tile_size,
        "tile_overlap": predictor.tile_overlap, "tile_batch": predictor.tile_batch, "tta": predictor.tta,
        "input_scale": predictor.input_scale, "nuclei": int(labels.max()),
        "maps_s": maps_s, "post_s": post_s, "mpix_per_s": args.child**2 / 1e6 / (maps_s + post_s),
        "image_mib": image.nbytes / 2**20, "base_rss_mib": base, "peak_maps_rss_mib": peak_maps,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:  # one process per size: its own peak memory
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(size)], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        if not rows:
            print(f"device {r['device']}; tiles {r['tile_size']}² overlap {r['tile_overlap']}, "
                  f"batch {r['tile_batch']}; tta {'on' if r['tta'] else 'off'}; input scale {r['input_scale']:g}")
            print(f"{'size':>6} {'maps s':>8} {'post s':>8} {'MP/s':>7} {'image MiB':>10} {'base MiB':>9} "
                  f"{'peak maps':>10} {'peak MiB':>9} {'nuclei':>7}")
        rows.append(r)
        print(f"{r['size']:>6} {r['maps_s']:>8.2f} {r['post_s']:>8.2f} {r['mpix_per_s']:>7.3f} {r['image_mib']:>10.1f} "
              f"{r['base_rss_mib']:>9.0f} {r['peak_maps_rss_mib']:>10.0f} {r['peak_rss_mib']:>9.0f} {r['nuclei']:>7}",
              flush=True)
    by_size = {r["size"]: r for r in rows}
    if 1024 in by_size and 4096 in by_size:
        small, large = by_size[1024], by_size[4096]
        bound = 1.5 * small["peak_rss_mib"] + large["image_mib"]
        verdict = "met" if large["peak_rss_mib"] <= bound else "NOT met"
        print(f"goal: peak 4096² {large['peak_rss_mib']:.0f} MiB <= 1.5 x {small['peak_rss_mib']:.0f} + "
              f"{large['image_mib']:.0f} = {bound:.0f} MiB: {verdict}")


if __name__ == "__main__":
    main()
