#!/bin/sh
# Entrypoint of a device container in docker/compose.yaml: shapes this container's uplink with tc,
# then becomes `pipar device`.
#
# Environment:
#   DEVICE_ID       device id, 0..devices-1 (required; one compose service per device sets it)
#   PIPAR_SERVER    server endpoint (default tcp://server:5555)
#   DEVICE_THREADS  CPU threads of pipar device (default 1; match the container's cpus limit)
#   UPLINK_MBPS     egress rate of eth0 in Mbit/s via a tbf qdisc (unset, empty or 0: no tc shaping)
#   LATENCY_MS      one-way delay added to egress via netem (unset, empty or 0: none)
#   TC_DEV          interface to shape (default eth0)
#   TC_OPTIONAL=1   go on unshaped when tc fails instead of stopping
# Extra arguments are passed on to pipar device.
#
# tc needs the NET_ADMIN capability (compose.yaml: cap_add: [NET_ADMIN]) and the host kernel's
# sch_tbf/sch_netem modules. Where tc cannot be used, leave UPLINK_MBPS unset and let PiPar shape the
# links itself: the server's --uplink-mbps/--downlink-mbps/--latency-ms are applied by the transport
# on every device and server link (PIPAR_UPLINK_MBPS in compose.yaml).
set -eu

dev=${TC_DEV:-eth0}
rate=${UPLINK_MBPS:-0}
delay=${LATENCY_MS:-0}

[ -n "${DEVICE_ID:-}" ] || { echo "device-entrypoint: set DEVICE_ID (0..devices-1)" >&2; exit 2; }

positive() {  # true when $1 is a number greater than 0
  awk -v x="$1" 'BEGIN { exit !(x + 0 > 0) }'
}

shape() {
  if positive "$rate"; then
    # Token bucket on egress = this device's uplink; netem under it adds the delay.
    tc qdisc replace dev "$dev" root handle 1: tbf rate "${rate}mbit" burst 32kbit latency 400ms || return 1
    if positive "$delay"; then
      tc qdisc add dev "$dev" parent 1:1 handle 10: netem delay "${delay}ms" || return 1
    fi
    echo "device-entrypoint: $dev egress shaped to ${rate} Mbit/s, delay ${delay} ms" >&2
  elif positive "$delay"; then
    tc qdisc replace dev "$dev" root netem delay "${delay}ms" || return 1
    echo "device-entrypoint: $dev egress delayed by ${delay} ms (rate unshaped)" >&2
  fi
}

if ! shape; then
  echo "device-entrypoint: tc failed on $dev: give the container NET_ADMIN (cap_add) and load sch_tbf/sch_netem" \
       "on the host, or leave UPLINK_MBPS unset and use PiPar's own shaping (pipar server --uplink-mbps)" >&2
  [ "${TC_OPTIONAL:-0}" = 1 ] || exit 3
fi

# Links are CURVE-authenticated (PIPAR_KEYS: this device's NAME.key, PIPAR_SERVER_KEY: the server's
# NAME.pub, both from `pipar keygen`) unless PIPAR_INSECURE=1 asks for plain links explicitly.
if [ -n "${PIPAR_KEYS:-}" ]; then
  set -- --keys "$PIPAR_KEYS" --server-key "${PIPAR_SERVER_KEY:?PIPAR_SERVER_KEY must name the server public key}" "$@"
elif [ "${PIPAR_INSECURE:-0}" = "1" ]; then
  set -- --insecure "$@"
fi
exec pipar device --connect "${PIPAR_SERVER:-tcp://server:5555}" --id "$DEVICE_ID" \
     --threads "${DEVICE_THREADS:-1}" "$@"
