#!/usr/bin/env bash
# Runs the Molecule scenario of every role that has one (each boots its own simulated fleet, or none
# for the roles that run on the controller, so they run in parallel) and prints the time each took.
# Needs root and `make double`. Usage: tests/molecule/test-all.sh [role...]
set -uo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
roles=("$@")
if [ ${#roles[@]} -eq 0 ]; then
  for scenario in roles/*/molecule/default; do
    roles+=("$(basename "${scenario%/molecule/default}")")
  done
fi
logs=$(mktemp -d)
declare -A pids started
for role in "${roles[@]}"; do
  started[$role]=$(date +%s)
  (cd "roles/$role" && molecule test >"$logs/$role.log" 2>&1; echo $? >"$logs/$role.rc"; date +%s >"$logs/$role.end") &
  pids[$role]=$!
done
failed=0
for role in "${roles[@]}"; do
  wait "${pids[$role]}"
  rc=$(cat "$logs/$role.rc")
  echo "molecule $role: rc=$rc in $(( $(cat "$logs/$role.end") - started[$role] )) s (log $logs/$role.log)"
  [ "$rc" = 0 ] || { failed=1; tail -40 "$logs/$role.log"; }
done
exit $failed
