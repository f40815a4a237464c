#!/bin/sh
# launch.sh: start, watch and stop a smolcluster cluster over ssh (README: "Running on several machines").
#
#   ./launch.sh up [--cluster-config FILE] [--nn-config FILE] [--set KEY=VALUE]... [--timeout S]
#   ./launch.sh status            one line per process: running, exited N, gone; where the dashboard is
#   ./launch.sh wait [--timeout S]  block until every process has exited; fails if one failed
#   ./launch.sh logs [DEST]       copy every log here (default: runs/launch/logs)
#   ./launch.sh down              stop what `up` started, and only that
#
# Every command takes --state DIR (default: runs/launch): where `up` records the hosts it used, so
# the other commands need no config. The hosts come from the cluster config (`server`, `workers`,
# `ssh`) through `smolcluster hosts`; this script never parses YAML.
#
# On each host, under its dir: the code (copied from this checkout's working tree), .venv (uv sync),
# and launch/: the config files, a start script, a log, a pid file and an exit-code file per process.
#
# Environment:
#   WANDB_API_KEY, SMOLCLUSTER_TOKEN  sent to every process when set: through ssh's standard input
#       into a 0600 file on the host (deleted once `up` is done), never on a command line
#   SMOLCLUSTER_SEND_ENV   more variable names to send the same way, e.g. "UV_OFFLINE HTTPS_PROXY"
#   SMOLCLUSTER_SSH_CONFIG an ssh config file to use instead of ~/.ssh/config (ssh -F)
# shellcheck disable=SC2016  # the remote scripts are single-quoted on purpose: they expand there
set -eu

REPO=$(cd "$(dirname "$0")" && pwd)
STATE=$REPO/runs/launch
TIMEOUT=
EOF_MARK=__SMOLCLUSTER_LAUNCH_EOF__

usage() { sed -n '3,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "launch.sh: $*" >&2; exit 1; }
say() { echo "launch.sh: $*"; }

# q WORD: WORD single-quoted for a shell. Data goes through a pipe, never through a command line.
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# --- ssh ---------------------------------------------------------------------------------------
# The fields of the current line of $STATE/hosts (see `smolcluster hosts --help`) are globals:
# role id name address user port key dir uv python; `proc` is server or worker-ID.

ssh_to() {  # ssh_to REMOTE_COMMAND: run it on the current host; stdin passes through
  set -- "$1" -o BatchMode=yes -o ConnectTimeout=15 -o ServerAliveInterval=15 -o ServerAliveCountMax=4
  [ -z "${SMOLCLUSTER_SSH_CONFIG:-}" ] || set -- "$@" -F "$SMOLCLUSTER_SSH_CONFIG"
  [ "$user" = - ] || set -- "$@" -l "$user"
  [ "$port" = - ] || set -- "$@" -p "$port"
  [ "$key" = - ] || set -- "$@" -i "$key" -o IdentitiesOnly=yes
  cmd=$1
  shift
  ssh "$@" -- "$address" "$cmd"
}

# rsh SCRIPT [ARG...]: run SCRIPT with sh in the host's dir, ARGs as $1...; no stdin.
rsh() { rsh_in "$@" </dev/null; }
rsh_in() {  # the same, with stdin passed through
  script=$1
  shift
  cmd="sh -c $(q "$PRELUDE$script") sh $(q "$dir") $(q "$proc")"
  for a in "$@"; do cmd="$cmd $(q "$a")"; done
  ssh_to "$cmd"
}

# Remote prelude: $1 is the dir, $2 the process; `ours` says whether launch/$P.pid names a live
# smolcluster process started from this dir (a stale pid file may name anything by now).
PRELUDE='set -eu
mkdir -p "$1/launch" && cd "$1" || { echo "cannot use the folder $1 on $(uname -n)" >&2; exit 3; }
D=$(pwd -P) P=$2
shift 2
ours() {
  case $P in server) a="server " ;; *) a="worker --id ${P#worker-} " ;; esac
  [ -f "launch/$P.pid" ] || return 1
  pid=$(cat "launch/$P.pid")
  args=$(ps -ww -p "$pid" -o args= 2>/dev/null) || return 1
  case $args in *"-m smolcluster $a"*"--cluster-config $D/launch/cluster.yaml "*) return 0 ;; esac
  return 1
}
'

each() {  # each FUNCTION: call it once per process, server first; stops at the first failure
  [ -f "$STATE/hosts" ] || die "no cluster started from here ($STATE/hosts is missing; launch.sh up first)"
  while read -r role id name address user port key dir uv python <&3; do
    proc=$role
    [ "$role" = server ] || proc=worker-$id
    "$1" || return
  done 3<"$STATE/hosts"
}

where() { if [ "$port" = - ]; then echo "$proc on $name ($address)"; else echo "$proc on $name ($address:$port)"; fi; }

# --- up ----------------------------------------------------------------------------------------

copy_code() {  # this checkout's working tree as git sees it (tracked and untracked, unignored files)
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tr '\0' '\n' |
    while IFS= read -r f; do if [ -f "$f" ]; then printf '%s\n' "$f"; fi; done |
    COPYFILE_DISABLE=1 tar -c -f - -T -) | rsh_in '
for f in launch/*.pid; do
  [ -f "$f" ] || continue
  P=${f#launch/} && P=${P%.pid}
  if ours; then echo "$P still runs in $D (pid $pid); launch.sh down first" >&2; exit 4; fi
done
rm -rf src
tar -x -f -
'
}

# setup_script: what each host runs once (through sh -s, so the secrets in it travel on stdin).
# It starts in the remote home, where relative paths of the config (dir, uv, python) start from.
setup_script() {
  cat <<EOF
set -eu
PY=$(q "$python") UV=$(q "$uv")
case \$PY in -|/*) ;; *) PY=\$HOME/\$PY ;; esac
case \$UV in -|/*) ;; *) UV=\$HOME/\$UV ;; esac
cd $(q "$dir")
mkdir -p launch
umask 077
cat >launch/env <<'$EOF_MARK'
$ENVTEXT$EOF_MARK
. ./launch/env
umask 022
cat >launch/cluster.yaml <<'$EOF_MARK'
$(cat "$CLUSTER_CONFIG")
$EOF_MARK
cat >launch/nn.yaml <<'$EOF_MARK'
$(cat "$NN_CONFIG")
$EOF_MARK
if [ "\$PY" != - ]; then
  "\$PY" -c 'import loguru, yaml' </dev/null ||
    { echo "\$PY on \$(uname -n) (ssh.$name.python) cannot import smolcluster's dependencies" >&2; exit 3; }
  exit 0
fi
if [ "\$UV" = - ]; then
  UV=\$(command -v uv 2>/dev/null || true)
  for c in "\$HOME/.local/bin/uv" "\$HOME/.cargo/bin/uv" /opt/homebrew/bin/uv /usr/local/bin/uv; do
    if [ -z "\$UV" ] && [ -x "\$c" ]; then UV=\$c; fi
  done
fi
if [ -z "\$UV" ] || [ ! -x "\$UV" ]; then
  echo "uv not found on \$(uname -n) (looked on PATH, in ~/.local/bin, ~/.cargo/bin, /opt/homebrew/bin, /usr/local/bin); install it or set ssh.$name.uv" >&2
  exit 3
fi
if ! "\$UV" sync --locked --no-dev >launch/uv-sync.log 2>&1 </dev/null; then
  echo "uv sync failed in \$(pwd); its last lines:" >&2
  tail -n 15 launch/uv-sync.log >&2
  exit 3
fi
EOF
}

prepare_host() {  # copy the code, write the configs and the secrets file, uv sync; once per host dir
  case $SEEN in *"|$address $user $port $dir|"*) return 0 ;; esac
  SEEN="$SEEN|$address $user $port $dir|"
  if [ "$python" = - ]; then
    say "$name: copying the code to $dir and running uv sync there"
  else
    say "$name: copying the code to $dir (to run with $python)"
  fi
  copy_code || { echo "launch.sh: cannot copy the code to $name ($address): see above" >&2; return 1; }
  setup_script | ssh_to "sh -s" || { echo "launch.sh: preparing $name ($address) failed: see above" >&2; return 1; }
}

start_one() {
  {
    echo "# written by launch.sh up: $proc on $name; runs in its dir"
    echo 'D=$(pwd -P)'
    echo 'if [ -f launch/env ]; then . ./launch/env; fi'
    echo 'PYTHONUNBUFFERED=1; export PYTHONUNBUFFERED'
    if [ "$python" = - ]; then
      echo 'PY=$D/.venv/bin/python'
    else
      echo "PY=$(q "$python")"
      echo 'case $PY in /*) ;; *) PY=$HOME/$PY ;; esac'
      echo 'PYTHONPATH=$D/src${PYTHONPATH:+:$PYTHONPATH}; export PYTHONPATH'
    fi
    printf '"$PY" -m smolcluster %s' "$role"
    [ "$role" = server ] || printf ' --id %s --host %s' "$id" "$name"
    printf ' --cluster-config "$D/launch/cluster.yaml" --nn-config "$D/launch/nn.yaml"%s &\n' "$PASS"
    echo "echo \$! >launch/$proc.pid"
    echo 'wait $!'
    echo "echo \$? >launch/$proc.exit"
  } | rsh_in '
if ours; then echo "$P is already running here (pid $pid); launch.sh down first" >&2; exit 4; fi
cat >"launch/$P.sh"
rm -f "launch/$P.pid" "launch/$P.exit"
S=
if command -v setsid >/dev/null 2>&1; then S=setsid; fi
nohup $S sh "$D/launch/$P.sh" >"launch/$P.log" 2>&1 </dev/null &
' || { echo "launch.sh: cannot start $(where)" >&2; return 1; }
  STARTED="$STARTED $proc"
}

ready_one() {  # wait for the line that says the process is up (the server listens, a worker joined)
  pattern="joined the "
  [ "$role" = worker ] || pattern="listening on"
  if out=$(rsh '
pattern=$1 end=$(( $(date +%s) + $2 ))
while ! grep -q "$pattern" "launch/$P.log" 2>/dev/null; do
  if [ -f "launch/$P.exit" ]; then why="exited with code $(cat "launch/$P.exit")"; break; fi
  if [ "$(date +%s)" -ge "$end" ]; then why="no \"$pattern\" in its log after $2 s"; break; fi
  sleep 0.2
done
if [ -z "${why:-}" ]; then grep -m1 "$pattern" "launch/$P.log" | sed "s/.* | //"; exit 0; fi
echo "$P $why; the last lines of $D/launch/$P.log:" >&2
tail -n 15 "launch/$P.log" >&2
exit 1
' "$pattern" "${TIMEOUT:-120}"); then
    say "$proc on $name: $out"
  else
    echo "launch.sh: $(where) did not come up" >&2
    return 1
  fi
}

up() {
  CLUSTER_CONFIG=$REPO/configs/cluster_config.yaml NN_CONFIG=$REPO/configs/nn_config.yaml PASS='' LOCAL=
  while [ $# -gt 0 ]; do
    case $1 in
      --cluster-config|--nn-config|--set|--epochs|--model|--seed|--log-level|--out)
        [ $# -ge 2 ] || die "$1 needs a value"
        case $1 in
          --cluster-config) CLUSTER_CONFIG=$2 ;;
          --nn-config) NN_CONFIG=$2 ;;
          *) PASS="$PASS $1 $(q "$2")" ;;
        esac
        LOCAL="$LOCAL $1 $(q "$2")"
        shift 2 ;;
      *) die "up: unknown option $1 (see launch.sh --help)" ;;
    esac
  done
  [ -f "$CLUSTER_CONFIG" ] || die "no cluster config $CLUSTER_CONFIG"
  [ -f "$NN_CONFIG" ] || die "no nn config $NN_CONFIG"
  if ! git -C "$REPO" rev-parse >/dev/null 2>&1; then
    die "$REPO is not a git checkout (or git is missing); launch.sh copies the files git knows about"
  fi

  ENVTEXT='' value=''
  for var in WANDB_API_KEY SMOLCLUSTER_TOKEN ${SMOLCLUSTER_SEND_ENV:-}; do
    case $var in ''|[0-9]*|*[!A-Za-z0-9_]*) die "SMOLCLUSTER_SEND_ENV: '$var' is not a variable name" ;; esac
    eval "isset=\${$var+x}"
    [ -n "$isset" ] || continue
    eval "value=\$$var"
    ENVTEXT="${ENVTEXT}export $var=$(q "$value")
"
  done

  mkdir -p "$STATE"
  eval "set -- $LOCAL"
  "${UV:-uv}" run --project "$REPO" --quiet smolcluster hosts "$@" >"$STATE/hosts.new" ||
    die "cannot read the hosts from the config (see above)"
  if [ -f "$STATE/hosts" ] && ! cmp -s "$STATE/hosts" "$STATE/hosts.new"; then
    each refuse_if_running  # the previous cluster's hosts: is anything of it still running?
  fi
  mv "$STATE/hosts.new" "$STATE/hosts"
  "${UV:-uv}" run --project "$REPO" --quiet smolcluster hosts --dashboard "$@" >"$STATE/dashboard" ||
    die "cannot read the dashboard's port from the config (see above)"

  SEEN='' STARTED=
  trap 'up_failed interrupted' INT TERM
  if each prepare_host && each start_server && each start_workers && each ready_one; then
    SEEN=
    each forget_secrets
    say "cluster up; next: ./launch.sh status | wait | logs | down"
    return 0
  fi
  up_failed failed
}

up_failed() {
  trap - INT TERM
  echo "launch.sh: up $1; stopping what it started:${STARTED:- nothing}" >&2
  each stop_started
  SEEN=
  each forget_secrets
  exit 1
}

refuse_if_running() {
  code=0
  rsh 'if ours; then echo "$P still runs in $D (pid $pid)"; exit 4; fi' || code=$?
  case $code in
    0) ;;
    4) die "the cluster started from $STATE is still running; launch.sh down first (or use another --state)" ;;
    *) echo "launch.sh: warning: cannot check whether $proc of the previous cluster still runs on $name" >&2 ;;
  esac
}

start_server() { if [ "$role" = server ]; then start_one; fi; }
start_workers() { if [ "$role" = worker ]; then start_one; fi; }
stop_started() { case "$STARTED " in *" $proc "*) down_one ;; esac; }
forget_secrets() {  # the processes have read launch/env by now: delete it, once per host dir
  case $SEEN in *"|$address $user $port $dir|"*) return 0 ;; esac
  SEEN="$SEEN|$address $user $port $dir|"
  rsh 'rm -f launch/env' || true
}

# --- status, wait, logs, down ------------------------------------------------------------------

STATUS='
if [ -f "launch/$P.exit" ]; then state="exited $(cat "launch/$P.exit")"
elif ours; then state="running (pid $pid)"
elif [ -f "launch/$P.pid" ]; then state="gone (pid $(cat "launch/$P.pid") is not running and left no exit code)"
else state="not started"; fi
echo "$state | $(tail -n 1 "launch/$P.log" 2>/dev/null | sed "s/.* | //" | cut -c 1-100)"
case $state in "exited 0"|running*) exit 0 ;; *) exit 1 ;; esac
'

status_one() {
  if line=$(rsh "$STATUS"); then :; else FAILED="$FAILED $proc"; fi
  printf '%-9s %-12s %s\n' "$proc" "$name" "${line:-unreachable (ssh failed)}"
}

wait_one() {  # poll in rounds of at most 60 s per ssh connection, so a dropped connection is retried
  while :; do
    round=60
    if [ -n "$TIMEOUT" ]; then
      left=$((DEADLINE - $(date +%s)))
      [ "$left" -gt 0 ] || { echo "launch.sh: $(where) still running after ${TIMEOUT} s" >&2; FAILED="$FAILED $proc"; return 0; }
      [ "$left" -ge "$round" ] || round=$left
    fi
    code=0
    out=$(rsh '
end=$(( $(date +%s) + $1 ))
while [ "$(date +%s)" -lt "$end" ]; do
  if [ -f "launch/$P.exit" ]; then echo "exited $(cat "launch/$P.exit")"; exit 0; fi
  if ! ours; then sleep 1; [ -f "launch/$P.exit" ] && continue; echo "gone without an exit code"; exit 0; fi
  sleep 0.2
done
exit 10
' "$round") || code=$?
    case $code in
      0) break ;;
      10) ;;
      *) sleep 2 ;;  # ssh failed (a laptop asleep, a flaky link): try again until the deadline
    esac
  done
  say "$proc on $name: $out"
  [ "$out" = "exited 0" ] || FAILED="$FAILED $proc"
}

logs_one() {
  if rsh 'cat "launch/$P.log"' >"$DEST/$proc.log"; then
    say "$DEST/$proc.log (from $name:$dir)"
  else
    FAILED="$FAILED $proc"
  fi
}

down_one() {
  if out=$(rsh '
if ours; then
  kill -TERM "$pid"
  n=0
  while ours && [ "$n" -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
  if ours; then kill -KILL "$pid"; echo "killed pid $pid (still there 5 s after SIGTERM)"; else echo "stopped pid $pid"; fi
else
  # it may have just exited (the server went first): its wrapper writes the exit code in a moment
  if [ -f "launch/$P.pid" ] && [ ! -f "launch/$P.exit" ]; then sleep 1; fi
  if [ -f "launch/$P.exit" ]; then echo "not running (exited $(cat "launch/$P.exit"))"
  elif [ -f "launch/$P.pid" ]; then echo "not running (pid $(cat "launch/$P.pid") is gone or is not ours: left alone)"
  else echo "not started"; fi
fi
rm -f launch/env
'); then say "$proc on $name: $out"; else FAILED="$FAILED $proc"; fi
}

# --- main --------------------------------------------------------------------------------------

[ $# -ge 1 ] || usage
command=$1
shift
REST=
while [ $# -gt 0 ]; do
  case $1 in
    --state) [ $# -ge 2 ] || die "--state needs a folder"; STATE=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; TIMEOUT=$2; shift 2
      case $TIMEOUT in ''|*[!0-9]*) die "--timeout: expected whole seconds, got '$TIMEOUT'" ;; esac ;;
    *) REST="$REST $(q "$1")"; shift ;;
  esac
done
eval "set -- $REST"
FAILED=
case $command in
  up) up "$@" ;;
  status) [ $# -eq 0 ] || usage; each status_one; if [ -f "$STATE/dashboard" ]; then cat "$STATE/dashboard"; fi ;;
  wait) [ $# -eq 0 ] || usage; DEADLINE=$(($(date +%s) + ${TIMEOUT:-0})); each wait_one ;;
  logs) [ $# -le 1 ] || usage; DEST=${1:-$STATE/logs}; mkdir -p "$DEST"; each logs_one ;;
  down) [ $# -eq 0 ] || usage; each down_one ;;
  -h|--help|help) usage ;;
  *) echo "launch.sh: unknown command '$command'" >&2; usage ;;
esac
[ -z "$FAILED" ] || die "$command failed for:$FAILED"
