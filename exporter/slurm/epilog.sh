#!/bin/sh
# Slurm node Epilog for ugro: removes the GPU files prolog.sh wrote for this job (see there).
# Only files that name this job: a GPU another job has taken over since keeps that job's file.
#
# Slurm drains a node whose Epilog fails. Telemetry must never do that: every problem is logged
# (standard error and syslog, tag ugro-gpu-jobs) and the script exits 0.
set -eu

log() {
	printf 'ugro-gpu-jobs epilog: %s\n' "$*" >&2
	logger -t ugro-gpu-jobs -- "epilog: $*" 2>/dev/null || true
}

finish() {
	status=$?
	if [ "$status" -ne 0 ]; then
		log "job ${SLURM_JOB_ID:-?}: stopped (status $status); some of its GPU files may remain"
	fi
	exit 0
}
trap finish EXIT

PATH="${PATH:+$PATH:}/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
export PATH
dir=${UGRO_GPU_JOBS_DIR:-/run/ugro/gpu-jobs}

job=${SLURM_JOB_ID:-}
case $job in
'' | *[!0-9]*)
	log "SLURM_JOB_ID '$job' is not a job number; nothing removed"
	exit 0
	;;
esac
if [ ! -d "$dir" ]; then
	exit 0 # no prolog has recorded a GPU on this node
fi
if command -v flock >/dev/null 2>&1; then
	exec 9>"$dir/.lock"
	flock -w 10 9 || log "job $job: $dir/.lock is held; removing without it"
fi

# Every file, not only SLURM_JOB_GPUS's: the files are few and the content decides.
for file in "$dir"/GPU-* "$dir"/MIG-*; do
	if [ -f "$file" ] && grep -qx "job_id=$job" "$file"; then
		rm -f "$file"
	fi
done
