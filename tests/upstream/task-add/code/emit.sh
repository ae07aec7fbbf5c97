#!/bin/bash
set -e
# The first attempt emits and then fails: nothing of it may reach 'sink'.
if [ "$ATTEMPT" = 1 ]; then
    scalebox task add "from the failed attempt"
    exit 1
fi
scalebox task add -H kind=plain 'a, b,{"not":"headers"}'
scalebox task add --sink-job=sink -H kind=many "two words" ' lead and trail '
printf 'line 1\nline 2\n' > "$WORK_DIR/list.txt"
scalebox task add --sink-job sink --header kind=file --task-file "$WORK_DIR/list.txt"
rm "$WORK_DIR/list.txt"
printf 'stdin 1\nstdin 2' | scalebox task add -h kind=stdin
scalebox task add --module-id="$JOB_ID" --headers='{"kind":"json","n":2}' "json headers"
if scalebox task add --no-such-flag x 2>"$WORK_DIR/err"; then exit 3; fi
grep -q "unknown flag '--no-such-flag'" "$WORK_DIR/err"
rm "$WORK_DIR/err"
scalebox semaphore increment-n emit:count 5
scalebox semaphore decrement emit:count
scalebox app set-status FINISHED "emitted"
