#!/usr/bin/env bash
# Wheels of the [serve] extra for a device machine without Ray, in two folders under 64 MiB each (what one device
# call carries): .whl/serve-a and .whl/serve-b. Ray's own wheel (about 76 MiB) is split between them.
#   here:           bash benchmarks/serve_wheels.sh [PYTHON_VERSION, default 3.12: the device machines' Python]
#   device call 1:  carry .whl/serve-a (no room for the diffusers and peft wheels: carry those in an earlier call
#                   of the same warm machine, whose /tmp/site stays);  device call 2 (while warm): carry .whl/serve-b, then
#                   cat .whl/serve-a/ray.part.* .whl/serve-b/ray.part.* > /tmp/$(cat .whl/serve-a/ray.name)
#                   pip install --no-index --find-links .whl/serve-a --find-links .whl/serve-b --find-links /tmp \
#                       "ray[serve]==2.60.0" "fastapi==0.165.0" "python-multipart==0.0.34"
set -euo pipefail
version=${1:-3.12}
all=$(mktemp -d)
pip download "ray[serve]==2.60.0" "fastapi==0.165.0" "python-multipart==0.0.34" aiohttp -d "$all" -q \
    --only-binary=:all: --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --python-version "$version"
rm -rf .whl/serve-a .whl/serve-b && mkdir -p .whl/serve-a .whl/serve-b
ray=$(basename "$all"/ray-2*.whl)
echo "$ray" > .whl/serve-a/ray.name
split -b 38m "$all/$ray" "$all/ray.part." && mv "$all/ray.part.aa" .whl/serve-a/ && mv "$all/ray.part.ab" .whl/serve-b/
rm "$all/$ray" "$all"/numpy-*.whl  # numpy: the device has it
# The other wheels, largest first, into whichever folder is lighter.
for wheel in $(ls -S "$all"/*.whl); do
    a=$(du -sm .whl/serve-a | cut -f1); b=$(du -sm .whl/serve-b | cut -f1)
    if [ "$a" -le "$b" ]; then mv "$wheel" .whl/serve-a/; else mv "$wheel" .whl/serve-b/; fi
done
du -sh .whl/serve-a .whl/serve-b
