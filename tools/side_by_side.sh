#!/bin/sh
# Usage: tools/side_by_side.sh LOG 'BACKGROUND COMMAND' 'FOREGROUND COMMAND'
# Runs the first command in the background (what it prints goes to LOG, unless it
# redirects itself) beside the second, then prints LOG; fails if either failed. The
# demo uses it to keep both cores busy with steps that each use one.
log=$1
sh -c "$2" > "$log" 2>&1 &
pid=$!
sh -c "$3"
st=$?
wait $pid
st2=$?
cat "$log"
test $st = 0 && test $st2 = 0
