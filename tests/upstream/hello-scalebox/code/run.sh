#!/bin/bash
# As upstream's hello-scalebox: the result through the in-task scalebox command.
scalebox app set-finished --job-id=${JOB_ID} "Hello $1, it is OK!"
