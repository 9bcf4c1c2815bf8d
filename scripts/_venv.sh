# Sourced by scripts/serve and scripts/test: make .venv and install the project into it,
# again only when setup.cfg has changed since the last install.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PI_AGENT_VENV:-.venv}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Pi Agent Server needs Python 3.11 or newer as \$PYTHON (now: $PYTHON)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating the virtual environment in $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$("$VENV/bin/python" -c 'import hashlib; print(hashlib.sha256(open("setup.cfg","rb").read()).hexdigest()[:16])')"
# The stamp lists the extras installed for this setup.cfg; "[test]" also serves the server.
if ! { [ -f "$stamp" ] && { [ -z "$EXTRAS" ] || grep -qxF "$EXTRAS" "$stamp"; }; }; then
    echo "installing Pi Agent Server into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".$EXTRAS"
    if [ -n "$EXTRAS" ]; then
        # The runtime dependencies alone, as wheels: tests/test_install.py installs the
        # project from them into a new virtual environment, without reaching an index.
        rm -rf "$VENV/wheelhouse"
        "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check \
            -d "$VENV/wheelhouse" . "setuptools>=68" wheel
    fi
    echo "$EXTRAS" >> "$stamp"
fi
