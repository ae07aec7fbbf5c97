#!/bin/bash
# Upstream's task-exec-files feature test, re-created: a chain of three messages, each
# leaving a different set of the interface files in /work (the task's WORK_DIR).
#   0: task-exec.json with byte counts, userText, five timestamps, and message 1 for itself
#   1: timestamps.txt, user-file.txt, and task-exec.json with file lists and message 2
#   2: timestamps.txt and user-file.txt only
n=$1

stamps() {
    printf '%s\n' 2008-03-19T18:35:03-08:00 2009-11-05T17:50:20.154+08:00 \
        2010-11-05T17:50:20.154918+08:00 2011-11-05T17:50:20.154918780+08:00 \
        2012-11-17T08:52:21,963572856+08:00 > /work/timestamps.txt
    date --iso-8601=ns >> /work/timestamps.txt
    printf 'This is user-defined data in a file.\nMulti-line is supported.\n' > /work/user-file.txt
}

echo "stdout in message-$n."
echo "stderr in message-$n." >&2
case $n in
0)
    cat > /work/task-exec.json <<JSON
{
  "statusCode": 0,
  "inputBytes": 9999,
  "outputBytes": 999,
  "userText": "user-defined text\nHello scalebox in message-$n",
  "timestamps": ["2018-03-19T18:35:03-08:00", "2019-11-05T17:50:20.154+08:00",
                 "2020-11-05T17:50:20.154918+08:00", "2021-11-05T17:50:20.154918780+08:00",
                 "2022-11-17T08:52:21,963572856+08:00"],
  "sinkJob": "task-exec-files",
  "messageBody": "1"
}
JSON
    ;;
1)
    stamps
    cat > /work/task-exec.json <<JSON
{
  "statusCode": 0,
  "inputFiles": ["/etc/passwd", "/etc/group"],
  "outputFiles": ["/etc/fstab", "/etc/hosts"],
  "sinkJob": "task-exec-files",
  "messageBody": "2"
}
JSON
    ;;
*)
    stamps
    ;;
esac
exit 0
