#!/bin/sh
# Files for mosquitto/secure/mosquitto.conf. See README.md here.
#
#   setup.sh certs DIR HOST...        a CA and a server certificate for HOST... (names
#                                     or IP addresses) in DIR: ca.crt ca.key
#                                     server.crt server.key
#   setup.sh client DIR NAME          a client certificate for NAME, signed by DIR's CA:
#                                     NAME.crt NAME.key (for mqtt.client_cert/_key)
#   setup.sh user PASSWD NAME [PASS]  adds or changes NAME's login in the password file
#                                     PASSWD (created if missing); asks for the
#                                     password when PASS is not given
#
# The CA made here is for tests and small sites. Keep ca.key off the broker.
set -eu

usage() {
    sed -n '2,14p' "$0" >&2
    exit 2
}

# openssl req|x509 ... quietly, failing loudly.
ssl() {
    openssl "$@" 2>/dev/null || { echo "setup.sh: openssl $1 failed" >&2; exit 1; }
}

# DIR NAME CN EXTENSIONS: a P-256 key and a certificate signed by DIR/ca.
issue() {
    dir=$1 name=$2 cn=$3 ext=$4
    ssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=$cn" -keyout "$dir/$name.key" -out "$dir/$name.csr"
    printf '%s\n' "$ext" > "$dir/$name.ext"
    ssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 825 -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.crt"
    rm -f "$dir/$name.csr" "$dir/$name.ext"
    chmod 600 "$dir/$name.key"
}

[ $# -ge 1 ] || usage
command=$1
shift
case $command in
certs)
    [ $# -ge 2 ] || usage
    dir=$1
    shift
    mkdir -p "$dir"
    ssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 3650 -sha256 -subj "/CN=fleetwatch MQTT CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt"
    chmod 600 "$dir/ca.key"
    names=""
    for host in "$@"; do
        # Digits and dots, or anything with a colon, is an address; the rest names.
        case $host in
        *:*) kind=IP ;;
        *[!0-9.]*) kind=DNS ;;
        *) kind=IP ;;
        esac
        names="${names:+$names,}$kind:$host"
    done
    issue "$dir" server "$1" "subjectAltName=$names
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
    echo "setup.sh: $dir/ca.crt (give it to the hub as mqtt.ca_file, and to devices)," \
        "$dir/server.crt and $dir/server.key for $names"
    ;;
client)
    [ $# -eq 2 ] || usage
    [ -f "$1/ca.key" ] || { echo "setup.sh: no CA in $1 (run setup.sh certs first)" >&2; exit 1; }
    issue "$1" "$2" "$2" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
    echo "setup.sh: $1/$2.crt and $1/$2.key"
    ;;
user)
    [ $# -ge 2 ] && [ $# -le 3 ] || usage
    passwd=$1
    create=""
    [ -f "$passwd" ] || create=-c
    if [ $# -eq 3 ]; then
        mosquitto_passwd $create -b "$passwd" "$2" "$3"
    else
        mosquitto_passwd $create "$passwd" "$2"
    fi
    chmod 600 "$passwd"
    ;;
*)
    usage
    ;;
esac
