#!/usr/bin/env bash
# Run here, before the first call on a lent GPU machine: what benchmarks/gpu.sh needs that does not travel by itself.
#   .whl/      wheels (Python 3.12, manylinux) of the packages nucjax needs that the GPU image lacks, at the
#              versions of this machine's .venv: the dependency closure of nucjax's install_requires (setup.py),
#              less GPU_HAS (those of the closure that the image has, /work/.library/device/KINDS.md, 2026-11-17)
#   .gpudata/  the prepared DSB2018 of the study (holdout_fraction=0.1, ~46 MiB), prepared here first if needed
# Both are added to .git/info/exclude; name them in the device tool's `carry` (64 MiB in all with the tree).
#   bash benchmarks/gpu_pack.sh          (NUCJAX_DSB2018_DIR: the raw data, default ../shared/data/dsb2018)
set -eu
PY=${PY:-.venv/bin/python}
GPU_HAS="absl-py aiofiles attrs certifi charset-normalizer cloudpickle contourpy cycler etils flax fonttools \
humanize idna imageio jax jaxlib kiwisolver lazy-loader markdown-it-py matplotlib mdurl ml-dtypes msgpack networkx \
numpy opt-einsum optax orbax-checkpoint packaging pillow prometheus-client protobuf psutil pyarrow pygments pyparsing \
python-dateutil pyyaml requests rich scikit-image scipy simplejson six tensorstore tifffile tqdm treescope \
typing-extensions urllib3 uvloop wrapt"
names=$("$PY" - $GPU_HAS <<'EOF'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
split = lambda requires: [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
has, seen, todo = set(sys.argv[1:]), set(), split(md.requires("nucjax"))
while todo:
    name = norm(todo.pop())
    if name in seen:
        continue
    seen.add(name)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:  # a requirement only for other Python versions
        seen.discard(name)
        continue
    todo += split(requires)
print(" ".join(f"{n}=={md.version(n)}" for n in sorted(seen - has)))
EOF
)
mkdir -p .whl .git/info
for exclude in /.whl/ /.gpudata/; do grep -qxF "$exclude" .git/info/exclude 2>/dev/null || echo "$exclude" >> .git/info/exclude; done
for spec in $names; do
  ls .whl/"$(echo "${spec%%==*}" | tr - _)"-"${spec##*==}"-*.whl >/dev/null 2>&1 && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w .whl "$spec"  # a source-only package (promise): built here, pure Python
done
prepared=${NUCJAX_DATA_DIR:-$HOME/.cache/nucjax/datasets}/dsb2018
if [ ! -d "$prepared/holdout_fraction=0.1" ]; then
  NUCJAX_DSB2018_DIR=${NUCJAX_DSB2018_DIR:-../shared/data/dsb2018} \
    "$PY" -m nucjax.data.prepare dsb2018 --holdout_fraction=0.1
fi
mkdir -p .gpudata/dsb2018
cp -r "$prepared/holdout_fraction=0.1" "$prepared/.config" .gpudata/dsb2018/
du -sh .whl .gpudata
echo "wheels: $names"
