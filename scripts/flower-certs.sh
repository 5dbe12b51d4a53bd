#!/usr/bin/env bash
# Make a throw-away certificate authority and a server certificate for a Flower SuperLink
# on this machine (SANs IP:127.0.0.1, IP:::1, DNS:localhost), for TLS on loopback.
#
#   scripts/flower-certs.sh DIR [DAYS]
#
# writes DIR/ca.crt      CA certificate: SuperNodes' --root-certificates, the CLI's
#                        root-certificates, the SuperLink's --ssl-ca-certfile
#        DIR/ca.key      CA private key (only needed to sign more certificates)
#        DIR/server.pem  server certificate: the SuperLink's --ssl-certfile
#        DIR/server.key  server private key: the SuperLink's --ssl-keyfile
# Keys are EC P-256, the certificates last DAYS days (default 30). Existing files in DIR
# are overwritten. For testing and local use only: a real deployment's certificate
# must name the SuperLink's real address.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dir=$1
days=${2:-30}
command -v openssl >/dev/null || { echo "error: openssl not found" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"

umask 077  # private keys readable by their owner only
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null
umask 022

openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=baffle local Flower CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out ca.crt

openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
cat > server.ext <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:::1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl

openssl verify -CAfile ca.crt server.pem >/dev/null
echo "wrote $dir/{ca.crt,ca.key,server.pem,server.key} (SANs IP:127.0.0.1, IP:::1, DNS:localhost)"
