#!/usr/bin/env bash
# Prepares tests/browser: Debian's chromium + playwright-core (pinned in tests/browser/package-lock.json).
# Idempotent; CI (fresh Debian machine, root) runs it before pytest. Never downloads a browser build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ ! -x /usr/bin/chromium ]]; then
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
    echo "browser-setup: installing chromium (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

command -v node >/dev/null || { echo "browser-setup: node (>=20) is required" >&2; exit 1; }

cd "$here/tests/browser"
# playwright-core never downloads browsers; the variable is belt and braces.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
echo "browser-setup: ok ($(/usr/bin/chromium --version 2>/dev/null), playwright-core $(node -p 'require("playwright-core/package.json").version'))"
