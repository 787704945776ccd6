# Shared by bench/start.sh and bench/runtime.sh (source it after scripts/env.sh, with W, BIN,
# PIDS set): a registry in its own network namespace behind a veth pair, and the two profiles
#   near: no shaping;  far: 20 ms RTT (soci-delay-proxy, 10 ms each way) + 200 Mbit/s (tbf on
#   both veth ends).
# Sets NS, NEAR, FAR; defines shape near|far, addr near|far, net_cleanup.
[ -x "$BIN/soci-delay-proxy" ] || cargo build --release -p integration-tests --bin soci-delay-proxy
NS=socibench$$
net_cleanup() { ip netns del "$NS" 2>/dev/null || true; }
# Namespaces left by an interrupted run would shadow our addresses.
for ns in $(ip netns list | awk '/^socibench/ {print $1}'); do
  kill -0 "${ns#socibench}" 2>/dev/null && continue
  ip netns pids "$ns" | xargs -r kill -9
  ip netns del "$ns"
done
VH=sbh$$ VN=sbn$$
ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add 10.213.0.1/30 dev "$VH"
ip link set "$VH" up
nsenter --net=/var/run/netns/"$NS" sh -c "ip link set lo up; ip addr add 10.213.0.2/30 dev $VN; ip link set $VN up"
NEAR=10.213.0.2:5000
REG_WRAP="nsenter --net=/var/run/netns/$NS" start_registry "$NEAR"
FAR=127.0.0.1:$(free_port)
"$BIN/soci-delay-proxy" "$FAR" "$NEAR" 10 > "$W/proxy.log" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do grep -q ready "$W/proxy.log" && break; sleep 0.1; done
shape() { # shape near|far
  local q="tbf rate 200mbit burst 256kb latency 100ms"
  if [ "$1" = far ]; then
    tc qdisc replace dev "$VH" root $q
    nsenter --net=/var/run/netns/"$NS" tc qdisc replace dev "$VN" root $q
  else
    tc qdisc del dev "$VH" root 2>/dev/null || true
    nsenter --net=/var/run/netns/"$NS" tc qdisc del dev "$VN" root 2>/dev/null || true
  fi
}
addr() { [ "$1" = far ] && echo "$FAR" || echo "$NEAR"; }
