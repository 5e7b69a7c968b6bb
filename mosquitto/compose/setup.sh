#!/bin/sh
# Makes what docker-compose.yml's locked-down Mosquitto needs, here: certs/ (a CA and
# a server certificate for the names the services use) and passwd (logins for the
# hubs, an operator and the simulated fleet). Prints the passwords as .env lines:
#
#   mosquitto/compose/setup.sh > .env
#   FLEETWATCH_API_KEY=... docker compose up --build
#
# Run it again to start over with new certificates and passwords.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
secure="$here/../secure/setup.sh"
"$secure" certs "$here/certs" mosquitto localhost 127.0.0.1 >&2
rm -f "$here/passwd"
for login in HUB:fleetwatch-hub OPERATOR:operator SIM:fleet-sim; do
    name=${login#*:}
    password=$(openssl rand -hex 24)
    "$secure" user "$here/passwd" "$name" "$password" >&2
    echo "MQTT_${login%%:*}_PASSWORD=$password"
done
# The broker's container reads these as its own user.
chmod 644 "$here/passwd" "$here/certs/server.key"
