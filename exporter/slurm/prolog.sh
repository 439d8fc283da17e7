#!/bin/sh
# Slurm node Prolog for ugro: records which job holds each GPU of this node, so that
# `ugro-exporter --gpu-jobs-dir DIR` serves ugro_gpu_scheduler_job_info (gpu_uuid ->
# scheduler_job_id, user) for jobs ugro did not launch. Pair it with epilog.sh.
#
# slurm.conf, on every GPU node (slurmd runs it as root; PrologFlags=Alloc runs it when the job
# is allocated, rather than at its first step):
#     Prolog=/etc/slurm/prolog.d/ugro-gpu-jobs.sh
#     Epilog=/etc/slurm/epilog.d/ugro-gpu-jobs.sh
#
# Reads SLURM_JOB_ID, SLURM_JOB_USER (SLURM_JOB_UID when no name is given) and SLURM_JOB_GPUS
# (the job's GPUs on this node, comma-separated; unset or empty for a job without GPUs).
# Slurm numbers GPUs by their /dev/nvidiaN device; they are mapped to UUIDs through
# nvidia-smi's index, which is the same number unless the driver was told to order GPUs
# otherwise (check with `nvidia-smi -q | grep -e 'Minor Number' -e 'GPU UUID'`).
#
# Writes one file per GPU, named by its UUID, into UGRO_GPU_JOBS_DIR (default
# /run/ugro/gpu-jobs), atomically (temporary dot-file, then rename), mode 0644:
#     job_id=<SLURM_JOB_ID>
#     user=<SLURM_JOB_USER>
# A GPU that several jobs share holds the newest job's file: one job per GPU keeps the info
# series unique per gpu_uuid, which PromQL's group_left join needs.
#
# Slurm drains a node whose Prolog fails. Telemetry must never do that: every problem is logged
# (standard error and syslog, tag ugro-gpu-jobs) and the script exits 0.
# UGRO_NVIDIA_SMI names another nvidia-smi (default: the one on PATH).
set -eu

log() {
	printf 'ugro-gpu-jobs prolog: %s\n' "$*" >&2
	logger -t ugro-gpu-jobs -- "prolog: $*" 2>/dev/null || true
}

tmp=
finish() {
	status=$?
	if [ -n "$tmp" ]; then rm -f "$tmp" 2>/dev/null || true; fi
	if [ "$status" -ne 0 ]; then
		log "job ${SLURM_JOB_ID:-?}: stopped (status $status); its GPUs stay unattributed"
	fi
	exit 0
}
trap finish EXIT

# Slurm starts prologs without a search path; the node's own PATH, if any, comes first.
PATH="${PATH:+$PATH:}/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
export PATH
umask 022 # the exporter need not run as root to read the files
dir=${UGRO_GPU_JOBS_DIR:-/run/ugro/gpu-jobs}
nvidia_smi=${UGRO_NVIDIA_SMI:-nvidia-smi}

gpus=${SLURM_JOB_GPUS:-}
if [ -z "$gpus" ]; then
	exit 0 # no GPUs of this node in the job
fi
job=${SLURM_JOB_ID:-}
case $job in
'' | *[!0-9]*)
	log "SLURM_JOB_ID '$job' is not a job number; nothing recorded"
	exit 0
	;;
esac
user=${SLURM_JOB_USER:-${SLURM_JOB_UID:-}}
case $user in
'' | *[[:space:][:cntrl:]]*)
	log "job $job: SLURM_JOB_USER '$user' is empty or has blanks; nothing recorded"
	exit 0
	;;
esac

if ! command -v "$nvidia_smi" >/dev/null 2>&1; then
	log "job $job: $nvidia_smi not found; nothing recorded"
	exit 0
fi
# A wedged driver can hang nvidia-smi; the job must not wait on it for long.
limit=
if command -v timeout >/dev/null 2>&1; then limit="timeout 30"; fi
if ! table=$($limit "$nvidia_smi" --query-gpu=index,uuid --format=csv,noheader); then
	log "job $job: $nvidia_smi --query-gpu=index,uuid failed; nothing recorded"
	exit 0
fi

mkdir -p "$dir"
chmod 0755 "$dir"
# Against an epilog of a job that shared these GPUs removing a file just written.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$dir/.lock"
	flock -w 10 9 || log "job $job: $dir/.lock is held; writing without it"
fi

set -f # SLURM_JOB_GPUS is split on commas below, never globbed
old_ifs=$IFS
IFS=,
for index in $gpus; do
	IFS=$old_ifs
	case $index in
	'' | *[!0-9]*)
		log "job $job: SLURM_JOB_GPUS item '$index' is not a GPU number; skipped"
		continue
		;;
	esac
	# nvidia-smi's CSV: "<index>, <uuid>" per GPU.
	uuid=$(printf '%s\n' "$table" | awk -F' *, *' -v i="$index" '$1 == i { print $2; exit }')
	case $uuid in
	GPU-* | MIG-*) ;;
	*)
		log "job $job: nvidia-smi lists no GPU $index; skipped"
		continue
		;;
	esac
	case $uuid in
	*[!A-Za-z0-9-]*)
		log "job $job: GPU $index has an unexpected UUID '$uuid'; skipped"
		continue
		;;
	esac
	tmp="$dir/.$uuid.$$"
	printf 'job_id=%s\nuser=%s\n' "$job" "$user" >"$tmp"
	mv -f "$tmp" "$dir/$uuid"
	tmp=
done
