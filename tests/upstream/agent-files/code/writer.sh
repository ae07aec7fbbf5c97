#!/bin/bash
# Writes every interface file of upstream's agent into WORK_DIR.
set -e
cd "$WORK_DIR"
# A file in DATA_DIR (shared by the app's tasks on this node) that this task consumes.
mkdir -p "$DATA_DIR/in"
printf '%s' 0123456789 > "$DATA_DIR/in/consumed.dat"
printf '%s' 01234 > "$DATA_DIR/in/kept.dat"
cat > task-exec.yaml <<YAML
statusCode: 0
userText: |
  written as YAML
timestamps:
  - 2024-05-01T12:00:00Z
  - parsed,2024-05-01 12:00:01.5
YAML
cat > extra-attrs.yaml <<YAML
frames: 12
detector: {name: "ccd 3", gain: 1.5}
YAML
cat > timestamps.txt <<TXT
# a comment, as upstream allows
2024-05-01T12:00:02
written,2024-05-01T12:00:03.123456789+08:00
TXT
printf '%s\n' "$DATA_DIR/in/consumed.dat" "$DATA_DIR/in/kept.dat" > input-files.txt
printf 'result' > result.dat
echo result.dat > output-files.txt
echo "$DATA_DIR/in/consumed.dat" > removed-files.txt
echo "aux line" > auxout.txt
cat > sink-tasks.txt <<'TXT'
body1
{"bh0":"a","body":"body2"}
body3,{"h0":"a","h1":"b"}
{"bh0":"a","body":"body4"},{"h0":"a","h1":"b"}
sink,body5
sink,body6,{"h0":"a","h1":"b"}
sink,{"bh0":"a","body":"body7"},{"h0":"a","h1":"b"}
TXT
