#!/bin/sh
# show.sh: prints what it was given -- argv, PARAM_A, EVQUEUE_ENV, the working directory and stdin -- so a test can
# see how a task's inputs, stdin and wd arrived (reference/evqueue.md §2.7).
printf 'argc=%s args=[%s] PARAM_A=%s EVQUEUE_ENV=%s cwd=%s\n' "$#" "$*" "${PARAM_A:-}" "${EVQUEUE_ENV:-}" "$(pwd)"
printf 'stdin=[%s]\n' "$(cat)"
echo "err line" >&2
