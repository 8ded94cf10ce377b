#!/bin/sh
# fail.sh N: prints a line and exits with status N (default 1), for retry tests.
echo "failing with ${1:-1}"
exit "${1:-1}"
