#!/usr/bin/env bash
# The main job, on simulated hosts: a 2-host cluster with two Violins that use the same
# guest addresses (blue and red), traffic inside each, a blocked pair, and the counters.
# Everything it makes is removed at the end, also on failure or Ctrl-C. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --quiet --bin violin --bin violin-dp
export VIOLIN_CLUSTER=${VIOLIN_CLUSTER:-demo}
V=./target/debug/violin

say() { printf '\n\033[1m▶ %s\033[0m\n' "$*"; }
trap 'say "violin cluster down"; rm -f /tmp/violin-demo-root-file /tmp/violin-demo-blue2.toml; $V cluster down' EXIT

say "violin cluster up --hosts 2   (host namespaces on a bridge, a violin-dp in each)"
$V cluster up --hosts 2
say "violin up examples/blue.toml  (a, b, c; links a–b at 50 Mbit/s and b–c)"
$V up examples/blue.toml
say "violin up examples/red.toml   (the same addresses 10.0.0.1-3, no link table)"
$V up examples/red.toml
say "violin ls"
$V ls
say "blue: a (h1) pings b (h2) across the underlay"
$V exec blue a -- ping -c 3 -i 0.2 10.0.0.2
say "red: a (h1) pings c (h2) — same address, other Violin"
$V exec red a -- ping -c 3 -i 0.2 10.0.0.3
say "blue: a → c has no link, so nothing gets through"
$V exec blue a -- ping -c 2 -W 1 10.0.0.3 || echo "(no reply, as the topology says)"
say "blue: a is root in its own network, an unprivileged uid on the host"
install -m 0644 /dev/null /tmp/violin-demo-root-file
$V exec blue a -- sh -c 'echo "inside: uid $(id -u); uid_map: $(cat /proc/self/uid_map)"; ip link set eth0 up && echo "ip link set works (CAP_NET_ADMIN in its netns)"; echo x >> /tmp/violin-demo-root-file || echo "(a root-owned host file is not writable)"'
say "blue: iperf3 offers 200 Mbit/s of UDP from a to b; the a–b link is policed to 50"
$V exec blue b -- iperf3 -s -1 -D
sleep 0.5
$V exec blue a -- iperf3 -c 10.0.0.2 -u -b 200M -t 2 -l 1350 | grep -E 'sender|receiver'
say "violin stats blue"
$V stats blue
say "violin stats red"
$V stats red
say "violin profile blue   (the traffic matrix: who sent how much to whom)"
$V profile blue --interval 0.5
say "violin apply: blue gets a link a–c at 10 Mbit/s (b keeps its connection)"
sed 's/^\[\[external\]\]/[[link]]\nbetween = ["a", "c"]\nrate = "10mbit"\n\n[[external]]/' examples/blue.toml > /tmp/violin-demo-blue2.toml
$V apply /tmp/violin-demo-blue2.toml
$V exec blue a -- ping -c 2 -i 0.2 10.0.0.3
say "violin scale blue --add name=d,host=h2,ip=10.0.0.4/24 --link a"
$V scale blue --add name=d,host=h2,ip=10.0.0.4/24 --link a
say "violin migrate blue a --to h2   (re-created there; b measures the outage)"
$V migrate blue a --to h2
say "violin up examples/vms.toml   (two QEMU VMs and a cgroup-limited lightweight guest)"
$V up examples/vms.toml
say "vms: vm1 (a VM on h1) pings vm2 (a VM on h2) and n (netns, h2)"
$V exec vms vm1 -- ping -c 3 -W 2 10.1.0.2
$V exec vms vm1 -- ping -c 3 -W 2 10.1.0.3
say "violin migrate vms vm1 --to h2   (QEMU live migration while n pings it)"
$V migrate vms vm1 --to h2
$V exec vms vm1 -- sh -c 'echo "vm1 is up $(cut -d" " -f1 /proc/uptime) s, now on h2"'
say "Prometheus metrics of h1 (http://172.31.0.1:9464/metrics, inside the host's namespace)"
ip netns exec "$VIOLIN_CLUSTER-h1" bash -c 'exec 3<>/dev/tcp/172.31.0.1/9464; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' \
  | grep -E '^violin_(edge_bytes_total|drops_total|guests_attached)' | head -12
rm -f /tmp/violin-demo-blue2.toml
