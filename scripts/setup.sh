#!/usr/bin/env bash
# Installs everything Flotilla needs on a fresh Debian machine with Python 3.11 (run as root).
# Safe to run again: it skips what is already installed.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."

# Debian packages: Mesa's EGL for robosuite/MuJoCo cameras without a GPU (robosuite picks
# MUJOCO_GL=egl itself). pybullet renders on the CPU and needs nothing. chromium: the browser the
# console's tests drive with Playwright (`playwright install` would download one; Debian's is used instead),
# and a font for its pages.
APT_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri chromium fonts-dejavu-core)
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# torch first and exactly pinned: a CPU wheel of 2.13.0 is on disk here, while a looser request
# would pull gigabytes of CUDA packages. The package itself asks for a range (the train extra).
python -m pip install --quiet torch==2.13.0
# Every part (extras in pyproject.toml: train, sim, robosuite, console, ros) and the test tools: what
# `flotilla demo` and the test suite need. A fleet server machine needs only `pip install .`.
python -m pip install --quiet -e ".[all,test]"
# buf (pinned in package.json/package-lock.json) guards the protocol in tests/test_proto_v1.py.
if [ ! -x node_modules/.bin/buf ]; then
  echo "setup: installing buf (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error >/dev/null  # errors still reach stderr
fi
# pyenv only sees new console scripts (the `flotilla` command) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
echo "setup: done ($(python --version), torch $(python -c 'import torch; print(torch.__version__)'))"
