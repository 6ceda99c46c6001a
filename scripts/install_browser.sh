#!/usr/bin/env sh
# Install Debian's Chromium for tests/test_browser.py (driven by Playwright's Python package with
# executable_path=/usr/bin/chromium; `playwright install` is never needed). Idempotent: does nothing
# when /usr/bin/chromium exists. Exits non-zero, saying why, when it cannot install it.
set -eu

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $CHROMIUM is already installed."
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_browser: $CHROMIUM is missing and installing it needs root (or password-less sudo):" >&2
    echo "  sudo apt-get update && sudo apt-get install -y chromium" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here (not Debian/Ubuntu); install Chromium so that $CHROMIUM exists." >&2
    exit 1
fi

echo "install_browser: installing Debian's chromium package..."
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; }; then
    echo "install_browser: apt-get could not install chromium (no network to the Debian mirror?)." >&2
    exit 1
fi
if [ ! -x "$CHROMIUM" ]; then
    echo "install_browser: the chromium package installed but $CHROMIUM is missing (Ubuntu ships a snap stub instead;" >&2
    echo "  install a real Chromium or Google Chrome and link it to $CHROMIUM)." >&2
    exit 1
fi
echo "install_browser: $($CHROMIUM --version 2>/dev/null || echo chromium) installed."
