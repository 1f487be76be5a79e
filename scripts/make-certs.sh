#!/usr/bin/env bash
# Credentials for a dpfpl deployment: a CA, the SuperLink's TLS certificate, node keys.
#
#   make-certs.sh superlink DIR [SAN]   CA + SuperLink certificate (run by the SuperLink operator)
#   make-certs.sh node DIR NAME         one SuperNode key pair (run by each organisation)
#   make-certs.sh secret DIR NAME       a SuperExec shared secret (Docker / process isolation)
#   make-certs.sh all DIR [N] [SAN]     all of it, for N nodes named supernode-0..N-1 (demos, CI)
#
# SAN is an openssl subjectAltName list; it must name every address the SuperNodes and
# the `flwr` CLI use to reach the SuperLink (default: the compose service name and
# loopback). Example: "DNS:superlink.example.org,IP:203.0.113.7".
#
# Output (private files 0600, directories 0700; nothing is overwritten):
#   DIR/ca.crt                public: give to every SuperNode and every `flwr` user
#   DIR/ca.key                SECRET: signs certificates; keep offline
#   DIR/superlink.crt         public: the SuperLink's certificate (signed by ca.key)
#   DIR/superlink.key         SECRET: the SuperLink's TLS key, only on the SuperLink host
#   DIR/NAME                  SECRET: a SuperNode's private key, only on that node's host
#   DIR/NAME.pub              public: register it with `flwr supernode register DIR/NAME.pub`
#   DIR/NAME.secret           SECRET: shared by one SuperLink/SuperNode and its SuperExec
#   DIR/registry.pub          public (`all` only): every node's NAME.pub, one per line; each
#                             node's ClientApp checks secure-aggregation signatures against it
set -euo pipefail

DEFAULT_SAN="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"
DAYS="${DPFPL_CERT_DAYS:-365}"

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

refuse_overwrite() {
    for path in "$@"; do
        if [[ -e "$path" ]]; then
            echo "make-certs.sh: $path exists; refusing to overwrite credentials" >&2
            exit 1
        fi
    done
}

make_superlink() {
    local dir="$1" san="${2:-$DEFAULT_SAN}"
    refuse_overwrite "$dir/ca.key" "$dir/superlink.key"
    local tmp
    tmp="$(mktemp -d)"
    # CA: a self-signed P-384 root, allowed to sign only (pathlen 0).
    openssl ecparam -name secp384r1 -genkey -noout -out "$dir/ca.key"
    chmod 600 "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -sha384 -days "$DAYS" \
        -subj "/CN=dpfpl federation CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$dir/ca.crt"
    # SuperLink: a server certificate whose SAN lists every address clients dial.
    openssl ecparam -name secp384r1 -genkey -noout -out "$dir/superlink.key"
    chmod 600 "$dir/superlink.key"
    openssl req -new -key "$dir/superlink.key" -sha384 -subj "/CN=dpfpl superlink" \
        -out "$tmp/superlink.csr"
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=$san" >"$tmp/ext.cnf"
    openssl x509 -req -in "$tmp/superlink.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -days "$DAYS" -sha384 \
        -extfile "$tmp/ext.cnf" -out "$dir/superlink.crt" 2>/dev/null
    openssl verify -CAfile "$dir/ca.crt" "$dir/superlink.crt" >/dev/null
    chmod 644 "$dir/ca.crt" "$dir/superlink.crt"
    rm -rf "$tmp"  # the CSR and serial file hold nothing secret, but are clutter
    echo "CA and SuperLink certificate in $dir (SAN: $san)"
}

make_node() {
    local dir="$1" name="$2"
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "make-certs.sh: bad node name '$name'" >&2; exit 2; }
    refuse_overwrite "$dir/$name" "$dir/$name.pub"
    # Flower's SuperNode auth wants an OpenSSH ECDSA key on a NIST curve.
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$dir/$name"
    chmod 600 "$dir/$name"
    chmod 644 "$dir/$name.pub"
    echo "SuperNode key pair $dir/$name (secret) and $dir/$name.pub (register it)"
}

make_secret() {
    local dir="$1" name="$2"
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "make-certs.sh: bad name '$name'" >&2; exit 2; }
    refuse_overwrite "$dir/$name.secret"
    # 32 random bytes, hex: Flower reads the file as exact raw bytes, so no newline.
    openssl rand -hex 32 | tr -d '\n' >"$dir/$name.secret"
    chmod 600 "$dir/$name.secret"
    echo "SuperExec secret $dir/$name.secret"
}

main() {
    [[ $# -ge 2 ]] || usage
    local cmd="$1" dir="$2"
    umask 077
    mkdir -p "$dir"
    chmod 700 "$dir"
    case "$cmd" in
        superlink) make_superlink "$dir" "${3:-}" ;;
        node) [[ $# -eq 3 ]] || usage; make_node "$dir" "$3" ;;
        secret) [[ $# -eq 3 ]] || usage; make_secret "$dir" "$3" ;;
        all)
            local n="${3:-3}"
            [[ "$n" =~ ^[0-9]+$ ]] || usage
            make_superlink "$dir" "${4:-}"
            make_secret "$dir" superexec-superlink
            for ((i = 0; i < n; i++)); do
                make_node "$dir" "supernode-$i"
                make_secret "$dir" "superexec-supernode-$i"
            done
            # the registered organisations' keys, as every node's secagg-registry
            cat "$dir"/supernode-*.pub >"$dir/registry.pub"
            chmod 644 "$dir/registry.pub"
            ;;
        *) usage ;;
    esac
}

main "$@"
