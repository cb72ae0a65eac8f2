# Sourced by gpu_check.sh and mfu_check.sh (from the repository root of a GPU machine): wheels for packages the
# machine lacks (deepspeed, pydantic, webdataset, ...) from ./.whl when it exists, the packages' sources on
# PYTHONPATH (no install needed), unbuffered output, and one line naming the GPU and the versions.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/packages/dd2-core/src:$PWD/packages/dd2-teachers/src:$PWD/packages/dd2-train/src
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
