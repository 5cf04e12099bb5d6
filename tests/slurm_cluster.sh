#!/usr/bin/env bash
# A throw-away SLURM cluster on this machine: munged + slurmctld + two emulated nodes (node1, node2), all on
# 127.0.0.1, started directly (no systemd) with pid files and logs under one state directory.
#
#   tests/slurm_cluster.sh start   # writes $STATE/slurm.conf, starts the daemons, waits for both nodes idle
#   tests/slurm_cluster.sh env     # prints "export SLURM_CONF=..." for the client commands (eval it)
#   tests/slurm_cluster.sh status  # sinfo + squeue
#   tests/slurm_cluster.sh stop    # cancels jobs, stops the daemons by pid, removes the state and hosts entries
#
# Needs root and Debian's packages (.ci/install_slurm.sh). State dir: $SLURM_CLUSTER_DIR (/tmp/slurm-cluster).
# Settings are the ones known to work with SLURM 22.05 in containers (see issue 5): no cgroup plugins,
# accounting off, multiple slurmd on one host with per-node ports and %n paths.
set -euo pipefail

STATE=${SLURM_CLUSTER_DIR:-/tmp/slurm-cluster}
CONF=$STATE/slurm.conf
CTLD_PORT=${SLURM_CLUSTER_CTLD_PORT:-16817}
NODES=(node1 node2)
NODE_PORTS=(17001 17002)
CPUS_PER_NODE=${SLURM_CLUSTER_CPUS:-2}
HOSTS_TAG="# added by slurm_cluster.sh"
MUNGE_SOCKET=/run/munge/munge.socket.2

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

write_conf() {
    local host; host=$(hostname -s)
    cat > "$CONF" <<EOF
ClusterName=testcluster
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait for their old credential to expire before they may run again: 10 s, not 120 s.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=${STATE}/ctld
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdSpoolDir=${STATE}/spool-%n
SlurmdPidFile=${STATE}/slurmd-%n.pid
SlurmdLogFile=${STATE}/slurmd-%n.log
# Containers have no cgroup freezer etc.: track processes by parent pid, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Both emulated nodes share this machine's cores: trust the CPU counts written here, not the hardware probe.
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
# Finished jobs leave the controller after 5 s, so "sbatch --wait" returns promptly.
MinJobAge=5
KillWait=10
InactiveLimit=0
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODES[0]} NodeHostname=${host} NodeAddr=127.0.0.1 Port=${NODE_PORTS[0]} CPUs=${CPUS_PER_NODE} State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=${host} NodeAddr=127.0.0.1 Port=${NODE_PORTS[1]} CPUs=${CPUS_PER_NODE} State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

# The rendezvous endpoint is a node name (first host of the job's nodelist): make it resolve.
add_hosts() {
    grep -q "$HOSTS_TAG" /etc/hosts || echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG" >> /etc/hosts
}

remove_hosts() {
    if grep -q "$HOSTS_TAG" /etc/hosts; then
        # /etc/hosts may be a bind mount: rewrite in place rather than replace the file.
        local kept; kept=$(grep -v "$HOSTS_TAG" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts
    fi
}

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    if munge_works; then return; fi        # a munged is already serving the socket: share it
    # munged refuses paths the munge user cannot own or reach (the state dir may be private to root):
    # its files stay in the package's own folders.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"   # we started it, so stop will stop it
    for _ in $(seq 50); do munge_works && return; sleep 0.1; done
    die "munged did not come up; see /var/log/munge/munged.log"
}

wait_nodes_idle() {
    for _ in $(seq 60); do
        local states; states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        if [ "$(grep -c ' idle$' <<<"$states")" -eq "${#NODES[@]}" ]; then return; fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes not idle after 30 s; logs in $STATE (slurmctld.log, slurmd-node*.log)"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (munged, slurmd and /etc/hosts need it)"
    for cmd in munged slurmctld slurmd sbatch; do
        command -v "$cmd" >/dev/null || die "'$cmd' not found; run .ci/install_slurm.sh"
    done
    [ ! -e "$STATE/slurmctld.pid" ] || die "a cluster seems to be running ($STATE); run '$0 stop' first"
    mkdir -p "$STATE/ctld"
    write_conf
    add_hosts
    start_munge
    slurmctld -c -f "$CONF"
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE/spool-$node"
        slurmd -c -f "$CONF" -N "$node"
    done
    export SLURM_CONF=$CONF
    wait_nodes_idle
    echo "slurm_cluster.sh: ${NODES[*]} idle; export SLURM_CONF=$CONF"
}

any_alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

# TERM every daemon at once (each takes a second or two to shut down), then KILL what is left after 10 s.
stop_pidfiles() {
    local pids=() pidfile
    for pidfile in "$@"; do
        [ -s "$pidfile" ] && pids+=("$(cat "$pidfile")")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do any_alive "${pids[@]}" || break; sleep 0.1; done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    rm -f "$@"
}

stop() {
    if [ -e "$CONF" ]; then
        export SLURM_CONF=$CONF
        # Cancel leftovers so no job's processes outlive the cluster (they are not the daemons' children).
        if scancel --full --quiet --user="$(id -un)" 2>/dev/null; then
            for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    stop_pidfiles "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"
    remove_hosts
    rm -rf "$STATE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    status) export SLURM_CONF=$CONF; sinfo -N; squeue ;;
    *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
