#!/bin/sh
# list.sh N: prints N files as XML (<files><file name="fI.txt" size="I0"/>...</files>), reports progress and a
# log line on fd 3 and writes to stderr -- the helper of evQueue's loopdemo (reference/evqueue.md §2.7).
n=${1:-3}
echo "<files>"
i=1
while [ "$i" -le "$n" ]; do
    echo "<file name=\"f$i.txt\" size=\"${i}0\"/>"
    echo "%$((i * 100 / n))" >&3
    i=$((i + 1))
done
echo "</files>"
echo "a log line" >&3
echo "some stderr" >&2
