#!/usr/bin/env bash
# Debian packages the local stack needs. Installs what is missing (as root), or says
# exactly what to install. Safe to run repeatedly: does nothing when all are present.
set -euo pipefail

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need python3.11 python3.11
need openssl openssl
need node nodejs
need npm npm
need mvn maven
need setpriv util-linux
need unzip unzip
need rclone rclone  # bench/: the peer the copy benchmark compares against
need docker-compose docker-compose  # tests/infra: validates docker-compose.yml (config only, no engine)
need chromium chromium  # tests/console: the browser test drives Debian's Chromium through Playwright

java_ok=0
for j in /usr/lib/jvm/temurin-2[5-9]* /usr/lib/jvm/java-2[1-9]*; do
  [ -x "$j/bin/java" ] && java_ok=1
done
[ -n "${ES_JAVA_HOME:-}" ] && [ -x "$ES_JAVA_HOME/bin/java" ] && java_ok=1

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[system-deps] installing: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "[system-deps] missing: ${missing[*]} — install them (Debian: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
if [ "$java_ok" = 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-cache show openjdk-21-jre-headless >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-21-jre-headless
  else
    echo "[system-deps] Elasticsearch 9 needs Java 21 or newer: install one under /usr/lib/jvm or set ES_JAVA_HOME" >&2
    exit 1
  fi
fi
