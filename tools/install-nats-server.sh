#!/usr/bin/env bash
# Install the NATS server (Debian package `nats-server`, JetStream built in) if it is missing.
#
# The NATS tests (tests/test_nats.py) and the NATS benchmark start a real `nats-server -js`
# on a loopback port; `make test` and `make bench` run this script first. Idempotent: with the
# package installed it only checks dpkg and exits.
set -euo pipefail

PACKAGE=nats-server

if dpkg-query -W -f='${Status}' "$PACKAGE" 2>/dev/null | grep -q "install ok installed"; then
    exit 0
fi
echo "installing Debian package: $PACKAGE"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PACKAGE" >/dev/null
