#!/usr/bin/env bash
# Runs studies in the background from a frozen worktree of one commit, and
# commits every finished run's JSON to the main checkout as it appears.
#
#   bash experiments/run_background.sh COMMIT PROCESSES STUDY [STUDY ...]
#
# The code is that of COMMIT (a worktree under ../study-worktrees/); the
# results land in this checkout's experiments/results/<study>/ and are
# committed every 2 minutes (only those paths, so work in progress stays
# out of the commits). PROCESSES workers (1 thread each) share each study:
# the odd ones take its groups last to first (--reverse), and a run another
# worker finished is never redone. Logs: experiments/results/<study>/log*.txt
# (not committed). FIRST=mwbp:code,joint:code (settings of the study's
# factor) runs those settings before the others. Stop with: kill -- -$(cat /tmp/mwbp_background.pid)
set -u
commit=$(git rev-parse "$1"); processes=$2; shift 2
main=$(git rev-parse --show-toplevel)
tree="$main/../study-worktrees/${commit:0:12}"
[ -d "$tree" ] || git worktree add --detach "$tree" "$commit" >/dev/null
results="$main/experiments/results"
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH="$tree"
commit_results() {
  cd "$main" || return
  local paths=()
  for study in "$@"; do  # Only the studies that have begun (a pathspec
    # that matches nothing would stop `git add`).
    [ -d "experiments/results/$study" ] && paths+=("experiments/results/$study")
  done
  [ ${#paths[@]} -gt 0 ] || return
  git add -- "${paths[@]}" 2>/dev/null || return
  git diff --cached --quiet -- "${paths[@]}" && return
  local n; n=$(git diff --cached --name-only -- "${paths[@]}" | grep -c '/runs/.*\.json$')
  git commit -q -m "Study results: $n finished run(s) of $* (code at ${commit:0:12})" \
    -- "${paths[@]}" || true
}
(
  while sleep 120; do commit_results "$@"; done
) &
committer=$!
for study in "$@"; do
  mkdir -p "$results/$study"
  pids=()
  for ((p = 0; p < processes; p++)); do
    flag=""; [ $((p % 2)) -eq 1 ] && flag="--reverse"
    (cd "$tree" && python -m experiments.run "$study" --results "$results" $flag \
      --first "${FIRST:-}" \
      >> "$results/$study/log$p.txt" 2>&1) &
    pids+=($!)
  done
  wait "${pids[@]}"
  commit_results "$@"
done
kill "$committer"
commit_results "$@"
