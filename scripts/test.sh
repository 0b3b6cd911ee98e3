#!/usr/bin/env bash
# The whole test suite, headless (Xvfb when there is no display). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-xcb}"
export MPLBACKEND=Agg
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
echo "[medseg] ruff check"
"$VENV/bin/ruff" check napari_medseg tests benchmarks scripts fuzz
with_display "$VENV/bin/python" -m pytest -ra --timeout=900 "$@"
