#!/bin/sh
# Echoes its body; the first also lists what the writer left in DATA_DIR/in (its
# removed-files.txt is applied once its attempt is committed: allow a moment).
printf '%s\n' "$1"
if [ "$1" = body1 ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -e "$DATA_DIR/in/consumed.dat" ] || break; sleep 0.5; done
    ls "$DATA_DIR/in"
fi
