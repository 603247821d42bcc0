#!/usr/bin/env bash
# Generate the TEST-ONLY self-signed certificate and key in examples/certs/.
# Never use these for anything but local tests: the private key is public.
#
# Usage: scripts/gen-test-certs.sh [OUTDIR]   (default: examples/certs, relative to the repo root)
#
# rustls (webpki) refuses a self-signed certificate carrying CA:TRUE as a server
# certificate (CaUsedAsEndEntity), and `openssl req -x509` adds CA:TRUE by default,
# hence the explicit basicConstraints/extendedKeyUsage below.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo_root/examples/certs}"
mkdir -p "$outdir"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$outdir/key.pem" -out "$outdir/cert.pem" -days 3650 -sha256 \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
  -addext "basicConstraints=critical,CA:FALSE" \
  -addext "extendedKeyUsage=serverAuth" \
  -addext "keyUsage=critical,digitalSignature" \
  2>/dev/null

chmod 0644 "$outdir/cert.pem" "$outdir/key.pem"
echo "wrote $outdir/cert.pem and $outdir/key.pem"
