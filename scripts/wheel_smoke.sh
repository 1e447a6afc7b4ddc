#!/usr/bin/env bash
# Wheel smoke test: build the sdist and, from it, the wheel (python -m build); check what they
# hold; install the wheel into a fresh virtual environment that does not see this machine's
# site-packages; then, from a folder outside the repository, import bilevel, run one solve on
# the toy T1 and `bilevel --help`.
#
# Offline-friendly: the build runs with --no-isolation when setuptools >= 77 (the backend
# pyproject.toml asks for) is installed, so it needs no package index; the venv gets
# torch==2.13.0 (the CPU wheel on local disk; a plain `torch` would pull a multi-GB CUDA build)
# and the other dependencies through pip's configured index.
#
# Usage: bash scripts/wheel_smoke.sh   (KEEP=1 keeps the temporary folder and prints it)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bilevel-wheel.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then echo "temporary folder kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
t0=$SECONDS

isolation="--no-isolation"
if ! "$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    isolation=""  # backend not installed here: let build fetch it into an isolated environment
    echo "setuptools >= 77 not installed: building in an isolated environment"
fi
(cd "$ROOT" && "$PYTHON" -m build $isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1) \
    || { tail -40 "$WORK/build.log"; echo "wheel smoke: python -m build failed (log above)"; exit 1; }
sdist=$(ls "$WORK"/dist/bilevel-*.tar.gz)
wheel=$(ls "$WORK"/dist/bilevel-*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel") in $((SECONDS - t0)) s"

"$PYTHON" - "$sdist" "$wheel" <<'EOF'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
names = tarfile.open(sdist).getnames()
root = names[0].split("/")[0]
for need in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "src/bilevel/py.typed",
             "src/bilevel/experiments/hyperclean_demo.yaml", "tests/conftest.py", "docs/index.md"):
    assert f"{root}/{need}" in names, f"the sdist lacks {need}"
files = zipfile.ZipFile(wheel).namelist()
for need in ("bilevel/__init__.py", "bilevel/py.typed", "bilevel/experiments/hyperclean_demo.yaml"):
    assert need in files, f"the wheel lacks {need}"
assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in files), "the wheel ships tests, benchmarks or docs"
meta = zipfile.ZipFile(wheel).read(next(n for n in files if n.endswith(".dist-info/METADATA"))).decode()
assert "License-Expression: MIT" in meta, "METADATA has no License-Expression: MIT"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in files), "the wheel lacks its LICENSE"
print(f"sdist: {len(names)} entries, wheel: {len(files)} files; LICENSE, py.typed and the configs are in both")
EOF

t1=$SECONDS
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check torch==2.13.0 "$wheel" >"$WORK/pip.log" 2>&1 \
    || { tail -40 "$WORK/pip.log"; echo "wheel smoke: installing the wheel into a fresh venv failed (log above)"; exit 1; }
echo "fresh venv with torch==2.13.0 and the wheel in $((SECONDS - t1)) s"

cd "$WORK"  # outside the repository: nothing can be imported from src/
"$VPY" - "$ROOT" <<'EOF'
import importlib.metadata, pathlib, sys
import torch
import bilevel as bl
root = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(bl.__file__).resolve()
assert root not in where.parents, f"bilevel was imported from the repository ({where}), not from the wheel"
assert importlib.metadata.version("bilevel") == bl.__version__, "package metadata and bilevel.__version__ disagree"
assert (where.parent / "py.typed").is_file(), "py.typed is not installed"
result = bl.solve(bl.problems.T1(n=5), bl.AID(lr_upper=0.5, lr_lower=0.5, lower_steps=30), max_iters=60)
x = float(result.x["x"][0])
assert abs(x - 0.5) < 1e-3, f"T1 with AID gave x = {x}, expected 0.5"
print(f"bilevel {bl.__version__} (torch {torch.__version__}) from {where.parent}: T1 with AID: x = {x:.6f}, status {result.status.value}")
EOF
"$WORK/venv/bin/bilevel" --help >"$WORK/help.txt"
grep -q "usage: bilevel" "$WORK/help.txt" || { cat "$WORK/help.txt"; echo "wheel smoke: bilevel --help printed no usage"; exit 1; }
echo "bilevel --help: $(head -1 "$WORK/help.txt")"
echo "wheel smoke test passed in $((SECONDS - t0)) s"
