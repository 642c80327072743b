#!/usr/bin/env bash
# A private one-node Slurm cluster on this machine (with accounting), to try `--executor slurm` or test it.
#
#   sudo scripts/local-slurm.sh up      # install Debian's packages if missing, start the daemons
#   export SLURM_CONF=/tmp/fmnist-slurm/etc/slurm.conf
#   fmnist-book run fixmatch --profile smoke --executor slurm
#   sudo scripts/local-slurm.sh down    # cancel its jobs, stop its daemons (by their PIDs), wipe its state
#
# Needs root on Debian (or Ubuntu) without systemd running the packages' own services. State, spool, logs and
# the MariaDB database live in FMNIST_SLURM_DIR (default /tmp/fmnist-slurm); `down` wipes them together, or
# job ids would restart against an old database. Ports 6817-6819 (Slurm) and the munge socket are fixed, so one
# such cluster runs per machine; MariaDB listens on FMNIST_SLURM_DB_PORT (default 3407) on 127.0.0.1 only.
# A requeued job (a preemption, a time limit) waits cred_expire seconds before it may start again: 5 here
# instead of Slurm's 120, so that the tests see it resume in seconds.
set -euo pipefail

DIR=${FMNIST_SLURM_DIR:-/tmp/fmnist-slurm}
DB_PORT=${FMNIST_SLURM_DB_PORT:-3407}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
ORDER=(munged mariadb slurmdbd slurmctld slurmd)   # started in this order, stopped in reverse
export SLURM_CONF=$DIR/etc/slurm.conf

die() { echo "local-slurm: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
  echo "local-slurm: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Run "$@" in the background, its PID recorded in $DIR/pids/<name>.pid (the only way `down` finds it).
start() {
  local name=$1; shift
  "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 seconds=$2; shift 2
  for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up in ${seconds} s (logs: $DIR/log)"
}

write_configs() {
  local node cpus boards sockets cores threads memory
  node=$(slurmd -C | head -1)
  field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$node"; }
  cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
  cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); memory=$(( $(field RealMemory) * 9 / 10 ))
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=fmnist
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=fmnist-slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
  mkdir -p /run/munge "$DIR/munge"
  chown munge:munge /run/munge "$DIR/munge"; chmod 755 /run/munge; chmod 700 "$DIR/munge"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  start munged setpriv --reuid=munge --regid=munge --init-groups munged -F \
    --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" --seed-file="$DIR/munge/munged.seed"
  wait_for munged 10 bash -c 'munge -n | unmunge'
}

start_mariadb() {
  mkdir -p "$DIR/db" "$DIR/mysql"; chown mysql:mysql "$DIR/db" "$DIR/mysql"   # mysql: its socket, pid, log
  mariadb-install-db --user=mysql --datadir="$DIR/db" --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.out" 2>&1
  start mariadb mariadbd --user=mysql --datadir="$DIR/db" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --socket="$DIR/mysql/mysql.sock" --pid-file="$DIR/mysql/mariadb.pid" --log-error="$DIR/mysql/mariadb.log"
  wait_for mariadb 30 mariadb-admin --socket="$DIR/mysql/mysql.sock" ping
  mariadb --socket="$DIR/mysql/mysql.sock" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'fmnist-slurm';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'fmnist-slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts munged as the munge user)"
  [ -d "$DIR/pids" ] && { echo "local-slurm: stopping the leftovers of an earlier cluster in $DIR"; down; }
  for port in 6817 6818 6819 "$DB_PORT"; do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && die "port $port is in use (another Slurm or MariaDB on this machine?)"
  done
  install_packages
  mkdir -p "$DIR"/{etc,state,spool,log,run,pids}
  chmod 755 "$DIR"
  write_configs
  start_munge
  start_mariadb
  start slurmdbd slurmdbd -D
  wait_for slurmdbd 30 sacctmgr -n list cluster
  sacctmgr -i add cluster fmnist >/dev/null
  start slurmctld slurmctld -D -i
  wait_for slurmctld 30 scontrol ping
  start slurmd slurmd -D -N localhost
  wait_for "the node" 30 bash -c '[[ $(sinfo -h -N -o %T) == idle* ]]'
  echo "local-slurm: up; export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid NAME: TERM the recorded PID, wait up to 15 s, then KILL
  local file=$DIR/pids/$1.pid pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  [ "$(id -u)" = 0 ] || die "needs root"
  if [ -f "$DIR/pids/slurmctld.pid" ] && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null; then
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
  fi
  for (( i=${#ORDER[@]}-1; i>=0; i-- )); do stop_pid "${ORDER[i]}"; done
  rm -rf "$DIR"   # state and database together
  echo "local-slurm: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down   (state in FMNIST_SLURM_DIR, default /tmp/fmnist-slurm)" >&2; exit 2 ;;
esac
