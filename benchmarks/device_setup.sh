# Sourced at the start of a device run: carried wheels (diffusers, peft), the package's folders importable in place.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
for p in export engines train; do ln -sfn ../$p lcmla_sdk/$p; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
