#!/usr/bin/env bash
# The report and playground tests drive Debian's headless Chromium. Install it when we can (root with
# apt); otherwise those tests skip and say why.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "ensure-chromium: could not install chromium; browser tests will be skipped"
else
  echo "ensure-chromium: chromium missing and not root; browser tests will be skipped"
fi
exit 0
