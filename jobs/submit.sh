#!/usr/bin/env bash
# Submit `mimi-tokenize run` to a running Ray cluster as a Ray job, follow its logs, exit with its outcome.
#
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh --config configs/run.yaml [more `mimi-tokenize run` flags]
#
# Run it from the repository root (or anywhere: it cds there). What it does:
#   ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env jobs/runtime_env.yaml \
#       --submission-id mimi-tokenize-<hash of the output URL>-<attempt> \
#       -- mimi-tokenize run --config configs/run.yaml --ray-address auto [flags]
#
# * The config path is read on the cluster, relative to the uploaded working dir: keep run configs inside the
#   repository (e.g. configs/run.yaml), or pass an absolute path the head node can read.
# * The submission id is derived from the output URL (--output, else `output:` of the config file), so every job
#   that writes one dataset is recognisable in `ray job list` and the dashboard: mimi-tokenize-<12 hex>-<n>, where
#   n is 1 for the first submission, 2 for the next... Submitting again after a failure or a stop resumes the
#   run (finished shards are skipped, nothing is written twice). While an earlier job for the same output is
#   PENDING or RUNNING this script refuses (exit 2) instead of queueing a second one behind its output lock.
# * Without --no-wait, `ray job submit` streams the job's logs and (ray 2.60) exits 0 when the job SUCCEEDED and 1
#   when it FAILED. This script then reads the final status and exits 0 for SUCCEEDED, 1 for FAILED, 3 for
#   STOPPED, 4 otherwise (still running, or the job server could not be reached). Interrupting the script
#   (Ctrl-C) stops following the logs but leaves the job running; `ray job stop <id>` stops it. Exit 2: the job
#   was not submitted (bad arguments, or a job for this output is still active).
#
# Environment:
#   RAY_ADDRESS (or RAY_API_SERVER_ADDRESS)  the job server (dashboard) URL, http://HEAD:8265; required.
#   RUNTIME_ENV     runtime_env YAML (default jobs/runtime_env.yaml).
#   WORKING_DIR     directory uploaded with the job (default .); set WORKING_DIR= to upload nothing (the image's
#                   package and a config file already on the head node).
#   ENTRYPOINT      command before `run` (default `mimi-tokenize`; `python -m pipeline.cli` when the package is not
#                   installed in the image but shipped in the working dir, option (b) of jobs/runtime_env.yaml).
#   RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or the file ~/.ray/auth_token)  when the cluster uses Ray token
#                   authentication; without RAY_AUTH_MODE=token the client sends no token and is refused (401).
#
# Secrets (HF_TOKEN, AWS keys) are NOT passed by this script: they belong in the cluster's environment (see
# jobs/runtime_env.yaml), never on this command line, in the runtime_env or in the config file.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}"
[ -n "$address" ] || { echo "submit.sh: set RAY_ADDRESS to the job server URL (http://HEAD:8265)" >&2; usage; }
[ "$#" -gt 0 ] || usage
runtime_env="${RUNTIME_ENV:-jobs/runtime_env.yaml}"
working_dir="${WORKING_DIR-.}"
read -r -a entrypoint <<< "${ENTRYPOINT:-mimi-tokenize}"

# The output URL: --output, else the config file's `output:`.
config="" output=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --config) config="${args[i + 1]:-}" ;;
        --config=*) config="${args[i]#--config=}" ;;
        --output) output="${args[i + 1]:-}" ;;
        --output=*) output="${args[i]#--output=}" ;;
        --ray-address|--ray-address=*) echo "submit.sh: the job always joins its own cluster (--ray-address auto)" >&2; exit 2 ;;
    esac
done
if [ -z "$output" ] && [ -n "$config" ]; then
    [ -f "$config" ] || { echo "submit.sh: config file $config not found (relative paths: from the repository root)" >&2; exit 2; }
    output=$(python -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("output") or "")' "$config")
fi
[ -n "$output" ] || { echo "submit.sh: no output URL (give --output, or output: in the --config file)" >&2; exit 2; }

# Submission id: the output URL's hash, then the first free attempt number; refuse while one is still active.
prefix="mimi-tokenize-$(printf '%s' "${output%/}" | sha256sum | cut -c1-12)"
submission_id=$(python - "$address" "$prefix" <<'EOF'
import sys

from ray.job_submission import JobStatus, JobSubmissionClient

address, prefix = sys.argv[1:]
jobs = [j for j in JobSubmissionClient(address).list_jobs() if (j.submission_id or "").startswith(prefix + "-")]
active = [j.submission_id for j in jobs if j.status in (JobStatus.PENDING, JobStatus.RUNNING)]
if active:
    sys.exit(f"submit.sh: job {active[0]} for this output is still active; follow it with "
             f"`ray job logs -f {active[0]}` or stop it with `ray job stop {active[0]}`")
attempts = [int(s) for j in jobs if (s := j.submission_id[len(prefix) + 1:]).isdigit()]
print(f"{prefix}-{max(attempts, default=0) + 1}")
EOF
) || exit 2

echo "submit.sh: output ${output} -> submission id ${submission_id}" >&2
submit=(ray job submit --address "$address" --submission-id "$submission_id" --runtime-env "$runtime_env")
[ -n "$working_dir" ] && submit+=(--working-dir "$working_dir")
set +e
"${submit[@]}" -- "${entrypoint[@]}" run "$@" --ray-address auto
submit_rc=$?
set -e

status=$(python - "$address" "$submission_id" <<'EOF' 2>/dev/null || echo UNKNOWN
import sys

from ray.job_submission import JobSubmissionClient

print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
EOF
)
echo "submit.sh: job ${submission_id} ${status} (ray job submit exited ${submit_rc})" >&2
case "$status" in
    SUCCEEDED) exit 0 ;;
    FAILED) exit 1 ;;
    STOPPED) exit 3 ;;
    *) exit 4 ;;
esac
