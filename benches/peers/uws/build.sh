#!/bin/bash
# Builds target/uws-echo: echo.c linked against the uWebSockets library that PyPI's socketify
# 0.0.31 ships (its sdist carries the prebuilt libsocketify_linux_amd64.so; the tarball's
# sha256 is checked). Needs pip, a C compiler and libuv1 (`apt-get install libuv1`).
set -euo pipefail
cd "$(dirname "$0")"
SHA=7502bed5b382e75f04ea3c6d6b53b76f27bb8653740db92e3f2b55fab388df20
OUT=target
LIB=$OUT/libsocketify_linux_amd64.so
mkdir -p "$OUT"
if [ ! -f "$LIB" ]; then
  pip download socketify==0.0.31 --no-deps --no-binary :all: -d "$OUT/dl" >/dev/null
  echo "$SHA  $OUT/dl/socketify-0.0.31.tar.gz" | sha256sum -c --quiet
  tar -xzf "$OUT/dl/socketify-0.0.31.tar.gz" -C "$OUT" \
    socketify-0.0.31/src/socketify/libsocketify_linux_amd64.so
  mv "$OUT/socketify-0.0.31/src/socketify/libsocketify_linux_amd64.so" "$LIB"
  rm -rf "$OUT/socketify-0.0.31" "$OUT/dl"
fi
if ! ldconfig -p | grep -q 'libuv\.so\.1 '; then
  echo "uws-echo needs libuv1: apt-get install libuv1" >&2
  exit 1
fi
cc -O2 -Wall -o "$OUT/uws-echo" echo.c -L"$OUT" -l:libsocketify_linux_amd64.so \
  -Wl,-rpath,"$PWD/$OUT"
echo "built $PWD/$OUT/uws-echo"
