# Sourced by the GPU scripts (bench/gpu/device_suite.sh, bench/gate/device.sh, bench/gpu/scaling.sh) from the
# checkout's root, on a machine that has torch but none of our other deps: the wheels carried in ./.whl
# (built elsewhere with ../shared/tools/wheelhouse.sh; README "GPU results") go to /tmp/site, and /tmp/site
# and the checkout go on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
