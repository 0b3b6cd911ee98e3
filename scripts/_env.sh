#!/usr/bin/env bash
# Shared set-up for scripts/run.sh and scripts/test.sh: a local venv at .venv pinned through
# constraints.txt, plus Debian's Xvfb and Mesa GL when there is no display. Idempotent and quiet
# when everything is already there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.medseg-installed"

need_apt=()
if [ -z "${DISPLAY:-}" ] && ! command -v xvfb-run >/dev/null 2>&1; then
    need_apt+=(xvfb xauth)
fi
# Mesa GL + the X/xcb libraries that Qt5's xcb platform plugin loads.
for lib in libGL.so.1 libEGL.so.1 libxkbcommon-x11.so.0 libxcb-icccm.so.4 libxcb-image.so.0 \
           libxcb-keysyms.so.1 libxcb-randr.so.0 libxcb-render-util.so.0 libxcb-xinerama.so.0 \
           libxcb-xfixes.so.0 libxcb-shape.so.0 libfontconfig.so.1 libdbus-1.so.3; do
    if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
        need_apt+=(libgl1 libglx-mesa0 libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
                   libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
                   libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libfontconfig1 libdbus-1-3)
        break
    fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[medseg] installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[medseg] creating venv at .venv"
    "$PY" -m venv "$VENV"
fi
# Reinstall when the pins or the package metadata changed.
want="$(cat constraints.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "[medseg] installing napari-medseg and its pinned dependencies into .venv (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
    # torch first, from the pin, so that nothing can pull a CUDA build.
    "$VENV/bin/python" -m pip install -q -c constraints.txt torch
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[testing]"
    echo "$want" > "$STAMP"
fi

# Run under a virtual X server when there is no display.
with_display() {
    if [ -n "${DISPLAY:-}" ]; then
        "$@"
    else
        xvfb-run -a -s "-screen 0 1600x1000x24 +extension GLX +render -noreset" "$@"
    fi
}
