#!/usr/bin/env bash
# Installs what the C/C++ and Go test suites need on a fresh Debian machine, only where it is
# missing: cmake, a C/C++ compiler, GoogleTest, pkg-config, and Go >= 1.21. Idempotent; prints
# what it found, and puts that Go on PATH (/usr/local/bin/go) if it is not the one there.
# .ci/run calls it before tests/run_all.sh.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v cc >/dev/null || need_apt+=(gcc)
command -v make >/dev/null || need_apt+=(make)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
gtest_lib=$(ls /usr/lib/*/libgtest.a /usr/lib/libgtest.a 2>/dev/null || true)
if [ ! -f /usr/include/gtest/gtest.h ] || [ -z "$gtest_lib" ]; then
  need_apt+=(libgtest-dev)
fi

# Go: the first of PATH, /usr/local/go, Debian's versioned packages that is new enough.
go_ok() { # $1 = a go binary; true when it is Go >= 1.21
  local v
  v=$("$1" env GOVERSION 2>/dev/null) || return 1
  v=${v#go}
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ "$major" -gt 1 ] || { [ "$major" -eq 1 ] && [ "${minor%%[!0-9]*}" -ge 21 ]; }
}
find_go() {
  local g
  for g in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go $(ls -d /usr/lib/go-1.*/bin/go 2>/dev/null | sort -V -r); do
    [ -n "$g" ] && [ -x "$g" ] && go_ok "$g" && { echo "$g"; return 0; }
  done
  return 1
}

apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: installing ${need_apt[*]}"
  apt_install "${need_apt[@]}"
fi

if ! find_go >/dev/null; then
  # Debian 12's golang-go is 1.19: take the newest versioned golang-1.NN-go apt offers.
  apt_updated=0
  apt-get update -qq; apt_updated=1
  pkg=$(apt-cache search --names-only '^golang-1\.[0-9]+-go$' | awk '{print $1}' | sort -V | tail -n1)
  if [ -n "$pkg" ]; then
    echo "install-deps: installing $pkg"
    apt_install "$pkg"
  fi
  find_go >/dev/null || { echo "install-deps: no Go >= 1.21 found or installable (looked in PATH, /usr/local/go, /usr/lib/go-1.*)" >&2; exit 1; }
fi
# tests/run_all.sh runs `go` from PATH.
go_bin=$(find_go)
if [ "$(command -v go 2>/dev/null || true)" != "$go_bin" ]; then
  echo "install-deps: linking /usr/local/bin/go -> $go_bin"
  ln -sf "$go_bin" /usr/local/bin/go
fi

echo "install-deps: cmake $(cmake --version | head -n1 | awk '{print $3}'), $(g++ --version | head -n1), gtest $(ls /usr/include/gtest/gtest.h), $(go version)"
